"""Phone videos taken as they are: variable frame rate, display rotation, odd sizes, HDR.

Every clip is made here with PyAV (tests/media_factory.py) and carries its frame index in grey
marker blocks at the top-left of the upright picture, so the source frame behind any delivered
or output frame can be read back.  Each case is checked where frames are delivered
(``probe_video`` / ``iter_video_frames``) and end to end through ``talkrt.cli.main`` on the tiny
config; the GPU tests at the end run the same inputs through the GPU path.
"""
from __future__ import annotations

import hashlib
import logging
import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from media_factory import (
    draw_marker,
    hlg_signal,
    make_audio,
    make_hdr_video,
    make_vfr_video,
    make_video,
    pq_signal,
    read_marker,
    sdr_to_hdr_signal,
    stored_picture,
    write_frames,
)
from talkrt.errors import InputError, TalkrtError
from talkrt.media import iter_video_frames, probe_output, probe_video, read_video_frames
from talkrt.media.audio import load_audio, num_video_frames
from talkrt.media.geometry import Orientation
from talkrt.media.timing import fps_filter_plan, nominal_rate
from benchmarks.sample import moving_face_frames

DATA = Path(__file__).parent / "data"
# (degrees counter-clockwise, hflip, vflip) as PyAV's set_display_rotation takes them
ORIENTATIONS = [(0, False, False), (90, False, False), (180, False, False), (270, False, False),
                (0, True, False), (0, False, True), (90, True, False), (270, True, False)]
# Phone-like VFR: 30 fps steps with a burst (67 and 80 ms share output tick 2) and a gap (100 -> 167 ms)
VFR_PTS_MS = [0, 33, 67, 80, 100, 167]
VFR_AT_30 = [0, 1, 3, 4, 4, 5]          # the fps filter's pick: frame 2 dropped, frame 4 shown twice


def face_clip(width: int, height: int, n: int, first: int = 0) -> list[np.ndarray]:
    """``n`` upright face frames marked with their index (from ``first``).

    The moving face fills the bottom-right three quarters (each way) of the picture and the
    rest mirrors it, so the face's blend region never reaches the marker at the top-left.
    """
    pad_x, pad_y = width // 4, height // 4
    frames = moving_face_frames(width=width - pad_x, height=height - pad_y, fps=25, seconds=(n + 1) / 25)[:n]
    return [draw_marker(np.pad(f, ((pad_y, 0), (pad_x, 0), (0, 0)), mode="reflect"), first + i)
            for i, f in enumerate(frames)]


def mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------ variable frame rate
def test_nominal_rate_is_the_regular_interval_snapped_to_a_clean_rate():
    ms = Fraction(1, 1000)
    assert nominal_rate([33, 33, 34] * 10 + [67, 100, 13], ms) == 30          # 1/1000 time base, drops, bursts
    assert nominal_rate([3003] * 40 + [6006, 9009], Fraction(1, 90000)) == Fraction(30000, 1001)
    ntsc_ms = [round((i + 1) * 1001 / 30) - round(i * 1001 / 30) for i in range(600)]     # 29.97 fps in whole ms
    assert nominal_rate(ntsc_ms + [100], ms) == Fraction(30000, 1001)
    assert nominal_rate([33, 34, 13, 20, 67], ms) == 30            # few steps: 30 and 29.97 both fit, 30 wins
    assert nominal_rate([20] * 5 + [40, 21, 19], Fraction(1, 600)) == 30      # iPhone's 1/600
    assert nominal_rate([70, 70, 71, 69, 140], ms) == Fraction(100, 7)        # 14.29 fps: no clean rate within 1 %
    assert nominal_rate([40, 40, 41, 39, 120], ms) == 25
    assert nominal_rate([], ms) is None


def test_fps_filter_rule_rounds_to_nearest_and_keeps_the_last_frame_of_a_tick():
    tb = Fraction(1, 1000)
    # ticks at 30 fps: 0, 1, 2, 2 (80 ms = 2.4), 3, 5; the last frame ends at 200 ms -> tick 6
    assert fps_filter_plan(VFR_PTS_MS, 200, tb, Fraction(30)) == VFR_AT_30
    assert fps_filter_plan([0, 25], 75, tb, Fraction(20)) == [0, 1]          # 25 ms = tick 0.5: rounds up to 1
    assert fps_filter_plan([0, 24], 74, tb, Fraction(20)) == [1]             # tick 0.48 -> 0: replaces frame 0
    assert fps_filter_plan([], 0, tb, Fraction(25)) == []


def _fps_filter_sources(path: Path, fps: Fraction) -> list[int]:
    """Run FFmpeg's own fps filter (libavfilter through PyAV) and name the source frame of each output."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        graph = av.filter.Graph()
        chain = [graph.add_buffer(template=stream), graph.add("fps", fps=f"{fps.numerator}/{fps.denominator}"),
                 graph.add("buffersink")]
        chain[0].link_to(chain[1])
        chain[1].link_to(chain[2])
        graph.configure()
        out = []
        for frame in frames + [None]:
            graph.push(frame)
            while True:
                try:
                    out.append(graph.pull())
                except (av.BlockingIOError, av.EOFError):
                    break
        sources = [f.to_ndarray() for f in frames]
    return [next(k for k, s in enumerate(sources) if np.array_equal(o.to_ndarray(), s)) for o in out]


@pytest.mark.parametrize("fps", [None, Fraction(25), Fraction(30000, 1001)], ids=["nominal", "25", "29.97"])
def test_vfr_frames_are_the_ones_ffmpegs_fps_filter_picks(tmp_path, fps):
    rng = np.random.default_rng(3)
    durations = [int(d) for d in rng.choice([8, 17, 20, 33, 34, 40, 50, 66, 100], size=40)]
    path = make_vfr_video(tmp_path / "vfr.mp4", 64, 48, durations)
    info = probe_video(path, fps=fps)
    rate = fps or info.fps
    expected = _fps_filter_sources(path, rate)
    assert info.is_vfr and info.fps == rate and info.conversions == ("cfr",)
    assert list(info.frame_map) == expected and info.num_frames == len(expected)
    assert info.duration_s == pytest.approx(len(expected) / float(rate))
    with av.open(str(path)) as container:      # the delivered frames are those source frames, in that order
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    delivered = list(iter_video_frames(path, fps=fps))
    assert len(delivered) == len(expected)
    assert all(np.array_equal(d, decoded[k]) for d, k in zip(delivered, expected))
    assert all(np.array_equal(a, b) for a, b in zip(read_video_frames(path, 1 << 30, fps=fps), delivered))
    tail = list(iter_video_frames(path, fps=fps, start=5))
    assert len(tail) == len(expected) - 5 and np.array_equal(tail[0], delivered[5])


def test_vfr_marker_clip_is_resampled_to_its_nominal_30_fps(tmp_path, caplog):
    path = write_frames(tmp_path / "phone.mp4", face_clip(96, 64, len(VFR_PTS_MS)), pts_ms=VFR_PTS_MS)
    with caplog.at_level(logging.INFO, logger="talkrt.media"):
        info = probe_video(path)
        frames = list(iter_video_frames(path))
    assert (info.fps, info.num_frames, info.source_frames) == (30, 6, 6)
    assert [read_marker(f) for f in frames] == VFR_AT_30 == list(info.frame_map)
    assert frames[3] is not frames[4] and np.array_equal(frames[3], frames[4])    # a repeat is its own array
    lines = [r.getMessage() for r in caplog.records if "resampled" in r.getMessage()]
    assert len(lines) == 1 and "variable frame rate" in lines[0] and "30 fps" in lines[0]
    assert "6 source frames -> 6 frames (1 dropped, 1 repeated)" in lines[0]


def test_constant_rate_video_keeps_every_frame_unless_another_rate_is_asked(tmp_path):
    path = make_video(tmp_path / "cfr.mp4", 64, 48, 25, seconds=0.4)
    plain = probe_video(path)
    assert (plain.fps, plain.num_frames, plain.frame_map, plain.conversions) == (25, 10, None, ())
    assert probe_video(path, fps=25).frame_map is None
    faster = probe_video(path, fps=30)
    assert faster.num_frames == 12 and list(faster.frame_map) == [0, 1, 2, 2, 3, 4, 5, 6, 7, 7, 8, 9]
    with pytest.raises(TalkrtError, match="out of range"):
        probe_video(path, fps=0)


# ------------------------------------------------------------------------------ display rotation
@pytest.mark.parametrize("rotation", ORIENTATIONS, ids=lambda r: f"{r[0]}{'-hflip' * r[1]}{'-vflip' * r[2]}")
def test_display_rotation_is_applied_so_frames_are_upright(tmp_path, rotation):
    upright = face_clip(64, 96, 3, first=5)                     # portrait, as a phone films it
    path = write_frames(tmp_path / "phone.mp4", [stored_picture(f, *rotation) for f in upright],
                        display_rotation=rotation)
    info = probe_video(path)
    frames = list(iter_video_frames(path))
    assert (info.width, info.height) == (64, 96)
    assert info.orientation.is_identity == (rotation == (0, False, False))
    assert [read_marker(f) for f in frames] == [5, 6, 7]
    assert max(mae(f, u) for f, u in zip(frames, upright)) < 4.0


def test_a_rotation_that_is_not_a_multiple_of_90_degrees_is_refused(tmp_path):
    path = tmp_path / "tilted.mp4"
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    matrix = [round(c * 65536), round(-s * 65536), 0, round(s * 65536), round(c * 65536), 0, 0, 0, 1 << 30]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.set_display_matrix(matrix)
        for i, frame in enumerate(face_clip(64, 48, 2)):
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            vf.pts = i
            container.mux(stream.encode(vf))
        container.mux(stream.encode(None))
    with pytest.raises(InputError, match=r"tilted.mp4: display rotation of -?30.0 degrees \(only multiples of 90"):
        probe_video(path)


def test_orientation_describes_what_it_does():
    assert Orientation(transpose=True, flip_y=True).apply(np.arange(6).reshape(2, 3)).tolist() == \
        np.rot90(np.arange(6).reshape(2, 3)).tolist()
    assert Orientation(transpose=True, flip_y=True).describe() == "rotated 90 degrees counter-clockwise"
    assert Orientation(flip_x=True).describe() == "mirrored left-right"


# ------------------------------------------------------------------------------ odd sizes
@pytest.mark.parametrize("size, delivered, dropped", [((65, 49), (64, 48), "column and row are"),
                                                      ((65, 48), (64, 48), "column is"),
                                                      ((64, 49), (64, 48), "row is")])
def test_odd_sizes_lose_their_last_column_or_row(tmp_path, caplog, size, delivered, dropped):
    width, height = size
    frames = face_clip(width, height, 3)
    path = write_frames(tmp_path / "odd.mp4", frames, pix_fmt="yuv444p")     # 4:2:0 cannot code odd sizes
    with caplog.at_level(logging.INFO, logger="talkrt.media"):
        info = probe_video(path)
        out = list(iter_video_frames(path))
        list(iter_video_frames(path))
    assert (info.width, info.height) == delivered and (info.source_width, info.source_height) == size
    assert all(f.shape == (48, 64, 3) for f in out) and [read_marker(f) for f in out] == [0, 1, 2]
    assert max(mae(f, s[:48, :64]) for f, s in zip(out, frames)) < 3.0      # a crop, not a rescale
    lines = [r.getMessage() for r in caplog.records if "odd frame size" in r.getMessage()]
    assert len(lines) == 1 and f"{width}x{height}" in lines[0] and dropped in lines[0] and "64x48" in lines[0]


def test_the_even_size_rule_applies_to_the_upright_picture(tmp_path):
    upright = face_clip(49, 65, 2)
    path = write_frames(tmp_path / "odd_phone.mp4", [stored_picture(f, 90) for f in upright],
                        display_rotation=(90, False, False), pix_fmt="yuv444p")
    info = probe_video(path)
    frames = list(iter_video_frames(path))
    assert (info.source_width, info.source_height, info.width, info.height) == (65, 49, 48, 64)
    assert info.conversions == ("orientation", "even-crop")
    assert [read_marker(f) for f in frames] == [0, 1] and frames[0].shape == (64, 48, 3)


# ------------------------------------------------------------------------------ HDR
def _pq_eotf(e: float) -> float:
    m1, m2, c1, c2, c3 = 2610 / 16384, 2523 / 4096 * 128, 3424 / 4096, 2413 / 4096 * 32, 2392 / 4096 * 32
    p = e ** (1 / m2)
    return 10000 * (max(p - c1, 0) / (c2 - c3 * p)) ** (1 / m1)


def _pq_inverse(nits: float) -> float:
    return float(pq_signal(nits))


def sdr_expected(signal: tuple[float, float, float], transfer: str) -> np.ndarray:
    """Scalar reference of talkrt.media.hdr's documented operator (no tables)."""
    if transfer == "pq":
        light = [_pq_eotf(e) for e in signal]
    else:
        a, b, c = 0.17883277, 1 - 4 * 0.17883277, 0.5 - 0.17883277 * math.log(4 * 0.17883277)
        scene = [e * e / 3 if e <= 0.5 else (math.exp((e - c) / a) + b) / 12 for e in signal]
        ys = 0.2627 * scene[0] + 0.6780 * scene[1] + 0.0593 * scene[2]
        light = [1000 * ys ** 0.2 * e for e in scene]
    k = 100 / 203                                   # reference white 203 cd/m2 -> SDR white
    peak_pq = _pq_inverse(1000 * k)
    max_lum = _pq_inverse(100) / peak_pq
    ks = 1.5 * max_lum - 0.5
    peak = max(light)
    e1 = min(_pq_inverse(peak * k) / peak_pq, 1.0)
    if e1 >= ks:
        t = (e1 - ks) / (1 - ks)
        e1 = (2 * t**3 - 3 * t**2 + 1) * ks + (t**3 - 2 * t**2 + t) * (1 - ks) + (-2 * t**3 + 3 * t**2) * max_lum
    mapped = _pq_eotf(e1 * peak_pq)
    rel = [v * (mapped / peak if peak > 0 else k) / 100 for v in light]
    m = [[1.660491, -0.587641, -0.072850], [-0.124550, 1.132900, -0.008349], [-0.018151, -0.100579, 1.118730]]
    lin = [min(max(sum(m[i][j] * rel[j] for j in range(3)), 0.0), 1.0) for i in range(3)]
    return np.array([round(255 * v ** (1 / 2.4)) for v in lin])


HDR_PATCHES = {  # 16x16 patches side by side at the top-right: BT.2020 R'G'B' signals (grey, reference white, skin)
    "hlg": [(0.5, 0.5, 0.5), (0.75, 0.75, 0.75), (0.70, 0.56, 0.48)],
    "pq": [(0.5081,) * 3, (0.5807,) * 3, (0.60, 0.53, 0.50)],
}


def hdr_face_clip(path: Path, transfer: str, width: int, height: int, n: int) -> Path:
    signals = [sdr_to_hdr_signal(f, transfer) for f in face_clip(width, height, n)]
    for signal in signals:
        for k, patch in enumerate(HDR_PATCHES[transfer]):
            signal[:16, width - 16 * (k + 1):width - 16 * k] = patch
    return make_hdr_video(path, signals, transfer)


def patch_values(frame: np.ndarray) -> list[np.ndarray]:
    width = frame.shape[1]
    return [frame[4:12, width - 16 * k - 12:width - 16 * k - 4].reshape(-1, 3).mean(axis=0) for k in range(3)]


def test_reference_points_of_the_tone_map():
    # neutral greys: the docstring's table
    assert sdr_expected((0.5,) * 3, "hlg")[0] == 143 and sdr_expected((0.75,) * 3, "hlg")[0] == 230
    assert sdr_expected((_pq_inverse(203),) * 3, "pq")[0] == 230
    assert sdr_expected((_pq_inverse(100),) * 3, "pq")[0] == 189
    assert sdr_expected((0.0,) * 3, "hlg")[0] == 0 and sdr_expected((1.0,) * 3, "pq")[0] == 255
    assert float(hlg_signal(1 / 12)) == pytest.approx(0.5)


@pytest.mark.parametrize("transfer", ["hlg", "pq"])
def test_hdr_is_tone_mapped_to_sdr_bt709(tmp_path, caplog, transfer):
    path = hdr_face_clip(tmp_path / f"{transfer}.mp4", transfer, 96, 64, 2)
    with caplog.at_level(logging.INFO, logger="talkrt.media"):
        info = probe_video(path)
        frames = list(iter_video_frames(path))
    assert info.hdr is not None and info.hdr.transfer == transfer and info.bit_depth == 10
    assert info.conversions == ("tonemap",)
    for got, signal in zip(patch_values(frames[0]), HDR_PATCHES[transfer]):
        assert np.abs(got - sdr_expected(signal, transfer)).max() <= 2, (got, signal)
    lines = [r.getMessage() for r in caplog.records if "HDR source" in r.getMessage()]
    assert len(lines) == 1 and "tone-mapped to SDR BT.709" in lines[0] and "203 cd/m2" in lines[0]
    assert not [r for r in caplog.records if "8-bit 4:2:0" in r.getMessage()]   # the HDR line says it all


def test_phone_hlg_sample_b13_matches_the_reference_operator():
    """b13 (HEVC Main10, BT.2020, HLG; from the shared inputs): every pixel follows the operator."""
    path = DATA / "b13_hlg10_320x240.mp4"
    before = sha256(path)
    info = probe_video(path)
    assert (info.codec, info.hdr.transfer, info.hdr.bt2020_primaries) == ("hevc", "hlg", True)
    delivered = next(iter_video_frames(path))
    with av.open(str(path)) as container:
        yuv = next(container.decode(video=0)).to_ndarray().astype(np.float64)    # yuv420p10le planes
    h, w = 240, 320
    y, cb, cr = yuv[:h], yuv[h:h + h // 4].reshape(h // 2, w // 2), yuv[h + h // 4:].reshape(h // 2, w // 2)
    for row, col in [(75, 150), (200, 20), (20, 300), (150, 250)]:          # skin, backdrop, green square, suit
        yn = (y[row, col] - 64) / 876
        cbn, crn = (cb[row // 2, col // 2] - 512) / 896, (cr[row // 2, col // 2] - 512) / 896
        r, b = yn + 2 * (1 - 0.2627) * crn, yn + 2 * (1 - 0.0593) * cbn
        g = (yn - 0.2627 * r - 0.0593 * b) / 0.678
        signal = tuple(min(max(v, 0.0), 1.0) for v in (r, g, b))
        assert np.abs(delivered[row, col].astype(int) - sdr_expected(signal, "hlg")).max() <= 2, (row, col)
    assert sha256(path) == before


# ------------------------------------------------------------------------------ GPU decode choice
def test_converted_inputs_take_the_host_decode_path(tmp_path):
    pytest.importorskip("torch")
    from talkrt.media.nvcodec import nvdec_obstacles
    plain = make_video(tmp_path / "plain.mp4", 64, 48, 25, seconds=0.2)
    assert nvdec_obstacles(probe_video(plain)) == []
    png = tmp_path / "still.png"
    av.VideoFrame.from_ndarray(face_clip(64, 48, 1)[0], format="rgb24").save(str(png))
    assert "rgb matrix" in nvdec_obstacles(probe_video(png))[-1]
    vfr = write_frames(tmp_path / "vfr.mp4", face_clip(64, 48, len(VFR_PTS_MS)), pts_ms=VFR_PTS_MS)
    assert nvdec_obstacles(probe_video(vfr)) == ["cfr"]
    hlg = hdr_face_clip(tmp_path / "hlg.mp4", "hlg", 64, 48, 1)
    assert nvdec_obstacles(probe_video(hlg)) == ["tonemap", "10-bit 420", "bt2020nc matrix"]


# ------------------------------------------------------------------------------ end to end (CLI, tiny config)
@pytest.fixture(scope="module")
def avatar_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("avatar-cache")


def run_cli(video: Path, seconds: float, tmp_path: Path, cache: Path, capsys) -> tuple[Path, Path, str]:
    """``talkrt`` on ``video`` with ``seconds`` of speech-like audio; returns (output, audio, summary line)."""
    from talkrt.cli import main
    audio, out = tmp_path / "speech.wav", tmp_path / "talking.mp4"
    make_audio(audio, seconds, sample_rate=16000)
    before = sha256(video)
    rc = main(["--config", "tiny", "--device", "cpu", "--no-progress", "--video", str(video), "--audio", str(audio),
               "--out", str(out), "--cache-dir", str(cache)])
    assert rc == 0
    assert sha256(video) == before                                  # the input is never touched
    return out, audio, capsys.readouterr().out.strip().splitlines()[-1]


def check_output(out: Path, audio: Path, size: tuple[int, int], fps: Fraction, summary: str) -> int:
    """Size, rate, frames = floor(audio_s x fps), duration and BT.709 tags of the MP4; returns the frame count."""
    clip = load_audio(audio)
    frames = num_video_frames(clip.num_samples, fps, clip.sample_rate)
    info = probe_output(out)
    assert (info.width, info.height, info.fps, info.num_frames) == (*size, fps, frames)
    assert info.duration_s == pytest.approx(frames / fps)
    assert info.has_audio and abs(info.audio_duration_s - clip.duration_s) <= 1 / fps
    assert info.color_matrix == "bt709"
    with av.open(str(out)) as container:
        cc = container.streams.video[0].codec_context
        assert (int(cc.color_primaries), int(cc.color_trc), int(cc.color_range)) == (1, 1, 1)   # BT.709, limited
    assert summary.startswith(f"frames={frames} ")
    return frames


def check_order(out: Path, frame_map: list[int] | None, delivered: int) -> None:
    """Output frame n shows delivered frame ping-pong(n), i.e. source frame frame_map[ping-pong(n)]."""
    from talkrt.pipeline import ping_pong_index
    markers = [read_marker(f) for f in iter_video_frames(out)]
    order = ping_pong_index(np.arange(len(markers)), delivered)
    assert markers == [int(frame_map[i]) if frame_map else int(i) for i in order]


@pytest.mark.slow
def test_cli_vfr_phone_video(tmp_path, avatar_cache, capsys):
    video = write_frames(tmp_path / "vfr.mp4", face_clip(128, 96, len(VFR_PTS_MS)), pts_ms=VFR_PTS_MS)
    out, audio, summary = run_cli(video, 0.2, tmp_path, avatar_cache, capsys)
    check_output(out, audio, (128, 96), Fraction(30), summary)
    check_order(out, VFR_AT_30, len(VFR_AT_30))


@pytest.mark.slow
@pytest.mark.parametrize("rotation", [(90, False, False), (180, False, False), (270, False, False), (0, True, False)],
                         ids=["90", "180", "270", "hflip"])
def test_cli_rotated_phone_video(tmp_path, avatar_cache, capsys, rotation):
    upright = face_clip(96, 128, 2)
    video = write_frames(tmp_path / "rotated.mp4", [stored_picture(f, *rotation) for f in upright],
                         display_rotation=rotation)
    out, audio, summary = run_cli(video, 0.12, tmp_path, avatar_cache, capsys)
    check_output(out, audio, (96, 128), Fraction(25), summary)
    check_order(out, None, 2)


@pytest.mark.slow
def test_cli_odd_sized_video(tmp_path, avatar_cache, capsys):
    video = write_frames(tmp_path / "odd.mp4", face_clip(129, 97, 2), pix_fmt="yuv444p")
    out, audio, summary = run_cli(video, 0.12, tmp_path, avatar_cache, capsys)
    check_output(out, audio, (128, 96), Fraction(25), summary)
    check_order(out, None, 2)


@pytest.mark.slow
@pytest.mark.parametrize("transfer", ["hlg", "pq"])
def test_cli_hdr_video(tmp_path, avatar_cache, capsys, transfer):
    video = hdr_face_clip(tmp_path / f"{transfer}.mp4", transfer, 128, 96, 2)
    out, audio, summary = run_cli(video, 0.12, tmp_path, avatar_cache, capsys)
    check_output(out, audio, (128, 96), Fraction(25), summary)
    for frame in iter_video_frames(out):       # the calibration patches, through 8-bit 4:2:0 H.264 once more
        for got, signal in zip(patch_values(frame), HDR_PATCHES[transfer]):
            assert np.abs(got - sdr_expected(signal, transfer)).max() <= 4, (got, signal)


# ------------------------------------------------------------------------------ GPU path (CUDA hosts only)
def _gpu_modules():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("cupy")
    return torch


@pytest.fixture(scope="module")
def gpu_sessions(tmp_path_factory):
    _gpu_modules()
    from talkrt.config import load_config
    from talkrt.session import build_session
    cfg = load_config("tiny", ["pipeline.batch_size=8"])
    cache = tmp_path_factory.mktemp("gpu-avatar-cache")
    return {compose: build_session(cfg, device="cuda", backend="eager", compose=compose, cache_dir=cache)
            for compose in ("gpu", "numpy")}


def phone_input(case: str, tmp_path: Path) -> tuple[Path, tuple[int, int], list[int] | None]:
    """(video, delivered (width, height), source index of each delivered frame or None) of one GPU case."""
    if case == "vfr":
        return (write_frames(tmp_path / "vfr.mp4", face_clip(128, 96, len(VFR_PTS_MS)), pts_ms=VFR_PTS_MS),
                (128, 96), VFR_AT_30)
    if case == "rot90":
        upright = face_clip(96, 128, 4)
        return (write_frames(tmp_path / "rot90.mp4", [stored_picture(f, 90) for f in upright],
                             display_rotation=(90, False, False)), (96, 128), None)
    if case == "odd":
        return write_frames(tmp_path / "odd.mp4", face_clip(129, 97, 4), pix_fmt="yuv444p"), (128, 96), None
    if case == "hlg":
        return hdr_face_clip(tmp_path / "hlg.mp4", "hlg", 128, 96, 4), (128, 96), None
    if case == "png":
        path = tmp_path / "still.png"
        av.VideoFrame.from_ndarray(face_clip(128, 96, 1)[0], format="rgb24").save(str(path))
        return path, (128, 96), None
    raise ValueError(case)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["png", "hlg", "rot90", "vfr"])
def test_gpu_frame_source_delivers_the_cpu_frames(tmp_path, case):
    """The GPU source's NV12 (host decode + upload) shows the CPU path's frames: same order,
    same colors (a PNG's RGB and the tone-mapped HDR included)."""
    torch = _gpu_modules()
    from talkrt import kernels
    from talkrt.gpu_stages import GpuFrameSource
    from talkrt.stages import FrameBatch
    video, _, _ = phone_input(case, tmp_path)
    info = probe_video(video)
    n = info.num_frames
    source = GpuFrameSource(video, info, num_out=n, batch_size=n, max_cache_bytes=1 << 30,
                            device=torch.device("cuda"), stream=None)
    assert source.decode_path == "pyav-cpu-upload" and not source.color.needed
    batch = FrameBatch(index=0, out_index=np.arange(n), src_index=np.arange(n), avatars=(),
                       avatar_index=np.zeros(n, np.int64), found=np.zeros(n, bool))
    source(batch)
    source.close()
    gpu = kernels.cupy_module().asnumpy(kernels.nv12_to_rgb(batch.nv12, matrix="bt709", full_range=False))
    cpu = np.stack(list(iter_video_frames(video)))
    assert gpu.shape == cpu.shape
    # the same bound as test_nvdec_frames_match_pyav: one 8-bit YUV round trip (rounding, 4:2:0 chroma)
    assert np.abs(gpu.astype(int) - cpu).mean() < 2.0


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["vfr", "rot90", "odd", "hlg"])
def test_gpu_pipeline_on_phone_inputs_matches_the_host_path(gpu_sessions, tmp_path, case):
    """``run_pipeline`` with ``compose=gpu`` on the tiny config: right size, rate, frame count and
    order, and the same frames as the host-compose path within tests/test_gpu_pipeline.py's bound."""
    from talkrt.pipeline import ping_pong_index, run_pipeline
    video, size, frame_map = phone_input(case, tmp_path)
    audio = tmp_path / "speech.wav"
    make_audio(audio, 0.4, sample_rate=16000)
    info, clip = probe_video(video), load_audio(audio)
    outs, reports = {}, {}
    for compose, parts in gpu_sessions.items():
        outs[compose] = tmp_path / f"{compose}.mp4"
        reports[compose] = run_pipeline(parts, video, info, audio, clip, outs[compose])
    assert reports["gpu"].decode_path == "pyav-cpu-upload" and reports["gpu"].compose == "gpu"
    frames = num_video_frames(clip.num_samples, info.fps, clip.sample_rate)
    for out in outs.values():
        got = probe_output(out)
        assert (got.width, got.height, got.fps, got.num_frames, got.color_matrix) == (*size, info.fps, frames, "bt709")
    if case != "hlg":
        markers = [read_marker(f) for f in iter_video_frames(outs["gpu"])]
        order = ping_pong_index(np.arange(frames), info.num_frames)
        assert markers == [int(frame_map[i]) if frame_map else int(i) for i in order]
    diffs = [np.abs(x.astype(int) - y).mean()
             for x, y in zip(iter_video_frames(outs["gpu"]), iter_video_frames(outs["numpy"]), strict=True)]
    assert max(diffs) < 3.0, diffs
