"""Tests for talkrt.media: probing, decoding, audio loading and the MP4 writer.

All media is synthesised with PyAV by tests/media_factory.py (no ffmpeg executable).
"""

from __future__ import annotations

import logging
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from media_factory import (
    audio_signal,
    make_audio,
    make_empty_wav,
    make_not_media,
    make_video,
    make_video_with_audio,
    pattern_frame,
    x264_supports,
)
from talkrt.errors import InputError, TalkrtError
from talkrt.media import (
    Mp4Writer,
    iter_video_frames,
    load_audio,
    probe_output,
    probe_video,
    read_video_frames,
)

W, H = 64, 48

# Lossy H.264 (crf 18) + 4:2:0 chroma subsampling on 64x48 frames with a sharp-edged
# moving box measure ~2-4 grey levels mean absolute error; 6 leaves headroom for
# other libx264 builds while still failing for a wrong frame (the next pattern
# frames differ by >= 10 levels on average, checked below) or a wrong color matrix.
MAE_TOLERANCE = 6.0


def _mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".partial-" in p.name)


# ------------------------------------------------------------------------------ probe
@pytest.mark.parametrize(
    "fps, suffix, expected_frames",
    [(25, ".mp4", 25), (30, ".mp4", 30), (Fraction(30000, 1001), ".mp4", 30), (Fraction(30000, 1001), ".mkv", 30)],
)
def test_probe_reports_size_rate_and_exact_frame_count(tmp_path, fps, suffix, expected_frames):
    path = make_video(tmp_path / f"clip{suffix}", W, H, fps, seconds=1.0)
    info = probe_video(path)
    assert (info.width, info.height) == (W, H)
    assert info.fps == Fraction(fps) and isinstance(info.fps, Fraction)
    assert info.num_frames == expected_frames
    assert info.duration_s == pytest.approx(expected_frames / float(Fraction(fps)))
    assert info.codec == "h264"
    assert (info.pix_fmt, info.bit_depth, info.chroma_subsampling) == ("yuv420p", 8, "420")
    assert info.has_audio is False and info.is_vfr is False
    assert info.is_8bit_420


def test_probe_sees_audio_track(tmp_path):
    path = tmp_path / "av.mp4"
    make_video_with_audio(path, W, H, 25, seconds=1.0)
    info = probe_video(path)
    assert info.has_audio and info.num_frames == 25


# ------------------------------------------------------------------------------ decode
def test_decoded_frames_match_the_encoded_pattern(tmp_path):
    path = make_video(tmp_path / "clip.mp4", W, H, 25, seconds=1.0)
    frames = list(iter_video_frames(path))
    assert len(frames) == 25
    for i, frame in enumerate(frames):
        assert frame.shape == (H, W, 3) and frame.dtype == np.uint8 and frame.flags.c_contiguous
        assert _mae(frame, pattern_frame(i, W, H)) < MAE_TOLERANCE, f"frame {i}"
    # Content really moves, so a wrong frame order would fail the check above.
    assert _mae(pattern_frame(10, W, H), pattern_frame(13, W, H)) > 2 * MAE_TOLERANCE
    assert _mae(frames[10], pattern_frame(13, W, H)) > 2 * MAE_TOLERANCE


def test_iter_start_skips_frames_exactly(tmp_path):
    path = make_video(tmp_path / "clip.mp4", W, H, 25, seconds=1.0)
    full = list(iter_video_frames(path))
    tail = list(iter_video_frames(path, start=10))
    assert len(tail) == 15
    assert np.array_equal(tail[0], full[10]) and np.array_equal(tail[-1], full[-1])


def test_read_video_frames_respects_memory_limit(tmp_path):
    path = make_video(tmp_path / "clip.mp4", W, H, 25, seconds=1.0)
    frames = read_video_frames(path, max_bytes=25 * W * H * 3)
    assert len(frames) == 25
    with pytest.raises(TalkrtError, match=r"clip\.mp4: decoding 25 frames of 64x48 RGB needs .* over the limit"):
        read_video_frames(path, max_bytes=25 * W * H * 3 - 1)


@pytest.mark.parametrize("pix_fmt, bit_depth, chroma", [("yuv420p10le", 10, "420"), ("yuv444p", 8, "444"), ("yuv422p", 8, "422")])
def test_high_precision_inputs_decode_to_8bit_rgb(tmp_path, caplog, pix_fmt, bit_depth, chroma):
    if not x264_supports(pix_fmt):
        pytest.skip(f"this libx264 build cannot encode {pix_fmt}")
    path = make_video(tmp_path / f"{pix_fmt}.mp4", W, H, 30, seconds=0.5, pix_fmt=pix_fmt)
    info = probe_video(path)
    assert (info.pix_fmt, info.bit_depth, info.chroma_subsampling) == (pix_fmt, bit_depth, chroma)
    assert not info.is_8bit_420
    with caplog.at_level(logging.WARNING, logger="talkrt.media"):
        frames = list(iter_video_frames(path))
        list(iter_video_frames(path))  # second pass: no second warning
    assert len(frames) == 15
    assert all(f.dtype == np.uint8 and f.shape == (H, W, 3) for f in frames)
    assert np.mean([_mae(f, pattern_frame(i, W, H)) for i, f in enumerate(frames)]) < MAE_TOLERANCE
    warnings = [r for r in caplog.records if "8-bit 4:2:0" in r.getMessage()]
    assert len(warnings) == 1 and path.name in warnings[0].getMessage()


# ------------------------------------------------------------------------------ bad inputs
def _bad_missing(tmp: Path) -> Path:
    return tmp / "missing.mp4"


def _bad_directory(tmp: Path) -> Path:
    (tmp / "folder.mp4").mkdir()
    return tmp / "folder.mp4"


def _bad_text(tmp: Path) -> Path:
    return make_not_media(tmp / "notes.mp4")


def _bad_empty_file(tmp: Path) -> Path:
    (tmp / "zero.mp4").write_bytes(b"")
    return tmp / "zero.mp4"


def _bad_audio_only(tmp: Path) -> Path:
    make_audio(tmp / "voice.m4a", 0.5)
    return tmp / "voice.m4a"


def _bad_zero_frames(tmp: Path) -> Path:
    make_video_with_audio(tmp / "blank.mkv", W, H, 25, seconds=0, audio_seconds=0.5)  # MKV keeps the empty stream
    return tmp / "blank.mkv"


@pytest.mark.parametrize(
    "make_bad, phrases",
    [
        (_bad_missing, ["file not found"]),
        (_bad_directory, ["is a directory"]),
        (_bad_text, ["not a readable media file"]),
        (_bad_empty_file, ["file is empty"]),
        (_bad_audio_only, ["no video stream"]),
        (_bad_zero_frames, ["zero frames"]),
    ],
    ids=["missing", "directory", "text-renamed-mp4", "empty-file", "audio-only", "zero-frames"],
)
def test_probe_video_rejects_bad_inputs(tmp_path, make_bad, phrases):
    path = make_bad(tmp_path)
    with pytest.raises(InputError) as info:
        probe_video(path)
    message = str(info.value)
    assert message.startswith(str(path)) and path.name in message
    for phrase in phrases:
        assert phrase in message


def test_iter_video_frames_fails_at_call_for_missing_file(tmp_path):
    with pytest.raises(InputError, match="nothing.mp4: file not found"):
        iter_video_frames(tmp_path / "nothing.mp4")


# ------------------------------------------------------------------------------ audio
def test_load_wav_is_sample_accurate(tmp_path):
    source = make_audio(tmp_path / "voice.wav", 1.0, sample_rate=16000)
    clip = load_audio(tmp_path / "voice.wav")
    assert clip.sample_rate == 16000 and clip.samples.dtype == np.float32 and clip.samples.ndim == 1
    assert clip.num_samples == 16000 and clip.duration_s == pytest.approx(1.0)
    # 16-bit PCM quantisation error is at most 1/32768.
    assert np.abs(clip.samples - source[0]).max() < 1e-4


def test_load_m4a_stereo_resamples_and_downmixes(tmp_path):
    source = make_audio(tmp_path / "voice.m4a", 1.0, sample_rate=44100, channels=2)
    clip = load_audio(tmp_path / "voice.m4a", sample_rate=16000)
    # The MP4 edit list gives the exact length: AAC priming/padding is not returned.
    assert clip.num_samples == 16000
    expected = audio_signal(1.0, 16000, 2).mean(axis=0)  # band-limited chirp, so resampling is benign
    assert float(np.corrcoef(clip.samples, expected)[0, 1]) > 0.98  # AAC is lossy: compare shape...
    assert np.sqrt(np.mean(clip.samples**2)) == pytest.approx(np.sqrt(np.mean(expected**2)), rel=0.05)  # ...and level
    assert np.abs(clip.samples).max() <= 1.0
    assert source.shape == (2, 44100)


def test_load_audio_track_of_a_video(tmp_path):
    make_video_with_audio(tmp_path / "talk.mp4", W, H, 25, seconds=1.0, sample_rate=48000, channels=2)
    clip = load_audio(tmp_path / "talk.mp4")
    assert clip.duration_s == pytest.approx(1.0, abs=1e-3)


def test_silent_audio_is_allowed(tmp_path):
    make_audio(tmp_path / "quiet.wav", 0.5, kind="silence")
    clip = load_audio(tmp_path / "quiet.wav")
    assert clip.num_samples == 8000 and not np.any(clip.samples)


@pytest.mark.parametrize(
    "make_bad, phrase",
    [
        (lambda t: t / "missing.wav", "file not found"),
        (lambda t: make_not_media(t / "voice.wav"), "not a readable media file"),
        (lambda t: make_video(t / "silent_film.mp4", W, H, 25, seconds=0.2), "no audio stream"),
        (lambda t: make_empty_wav(t / "empty.wav"), "audio stream is empty"),
    ],
    ids=["missing", "text-renamed-wav", "video-without-audio", "empty-audio"],
)
def test_load_audio_rejects_bad_inputs(tmp_path, make_bad, phrase):
    path = make_bad(tmp_path)
    with pytest.raises(InputError) as info:
        load_audio(path)
    assert str(info.value).startswith(str(path)) and phrase in str(info.value)


# ------------------------------------------------------------------------------ writer
def test_writer_round_trip_with_audio_and_metadata(tmp_path):
    source = tmp_path / "source.mp4"
    make_video_with_audio(source, W, H, 25, seconds=1.0, sample_rate=48000, channels=2)
    out = tmp_path / "out.mp4"
    tags = {"talkrt_weights": "synthetic", "talkrt_version": "0.1.0"}
    with Mp4Writer(out, W, H, Fraction(25), audio_path=source, metadata=tags) as writer:
        for frame in iter_video_frames(source):
            writer.write_rgb(frame)
        assert writer.frames_written == 25
        assert not out.exists() and writer.temp_path.exists()  # nothing published before close
    info = probe_output(out)
    assert (info.width, info.height, info.fps, info.num_frames) == (W, H, Fraction(25), 25)
    assert (info.video_codec, info.pix_fmt, info.color_matrix) == ("h264", "yuv420p", "bt709")
    assert info.has_audio and info.audio_codec == "aac"
    assert (info.audio_sample_rate, info.audio_channels) == (48000, 2)
    assert abs(info.audio_duration_s - info.duration_s) <= 1 / 25
    for key, value in tags.items():
        assert info.metadata.get(key) == value
    data = out.read_bytes()
    assert 0 <= data.find(b"moov") < data.find(b"mdat")  # +faststart
    frames = list(iter_video_frames(out))
    assert np.mean([_mae(f, pattern_frame(i, W, H)) for i, f in enumerate(frames)]) < 2 * MAE_TOLERANCE
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "audio_seconds, expected_seconds",
    [(1.5, 1.0), (1.02, 1.02), (0.6, 0.6)],
    ids=["longer-is-cut", "within-one-frame-kept", "shorter-kept"],
)
def test_writer_audio_length_rule(tmp_path, audio_seconds, expected_seconds):
    audio = tmp_path / "voice.wav"
    make_audio(audio, audio_seconds, sample_rate=16000, channels=1)
    out = tmp_path / "out.mp4"
    with Mp4Writer(out, W, H, 25, audio_path=audio) as writer:
        for i in range(25):  # 1.0 s of video
            writer.write_rgb(pattern_frame(i, W, H))
    info = probe_output(out)
    assert (info.audio_sample_rate, info.audio_channels) == (16000, 1)
    assert info.audio_duration_s == pytest.approx(expected_seconds, abs=1e-3)
    clip = load_audio(out)
    assert clip.duration_s == pytest.approx(expected_seconds, abs=1e-3)
    n = min(clip.num_samples, 16000)  # AAC is lossy: the chirp must survive, not bit-exactly
    assert float(np.corrcoef(clip.samples[:n], audio_signal(audio_seconds, 16000)[0, :n])[0, 1]) > 0.98


def test_writer_resamples_unusual_rates_to_48k(tmp_path):
    audio = tmp_path / "odd_rate.wav"
    make_audio(audio, 0.4, sample_rate=30000, channels=2)
    out = tmp_path / "out.mp4"
    with Mp4Writer(out, W, H, 25, audio_path=audio) as writer:
        for i in range(10):
            writer.write_rgb(pattern_frame(i, W, H))
    info = probe_output(out)
    assert (info.audio_sample_rate, info.audio_channels) == (48000, 2)
    assert info.audio_duration_s == pytest.approx(0.4, abs=1e-3)


def test_writer_timestamps_do_not_drift(tmp_path):
    out = tmp_path / "ntsc.mp4"
    fps = Fraction(30000, 1001)
    frame = pattern_frame(0, 32, 32)
    with Mp4Writer(out, 32, 32, fps) as writer:
        for _ in range(600):
            writer.write_rgb(frame)
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        tb = Fraction(stream.time_base.numerator, stream.time_base.denominator)
        times = sorted(Fraction(p.pts) * tb for p in container.demux(stream) if p.pts is not None)
    assert len(times) == 600
    assert times[0] == 0 and times[-1] == 599 / fps  # exact, no accumulated rounding
    assert probe_video(out).fps == fps


def test_writer_uses_bt709_limited_range(tmp_path):
    out = tmp_path / "solid.mp4"
    rgb = (200, 30, 90)
    with Mp4Writer(out, 32, 32, 25) as writer:
        for _ in range(3):
            writer.write_rgb(np.full((32, 32, 3), rgb, np.uint8))
    with av.open(str(out)) as container:
        yuv = next(container.decode(video=0)).to_ndarray()  # yuv420p planes stacked: [H*3/2, W]
    r, g, b = (c / 255 for c in rgb)
    y709 = 16 + 219 * (0.2126 * r + 0.7152 * g + 0.0722 * b)
    y601 = 16 + 219 * (0.299 * r + 0.587 * g + 0.114 * b)
    assert abs(float(yuv[16, 16]) - y709) <= 1.0 and abs(y709 - y601) > 10
    decoded = next(iter_video_frames(out))[16, 16].astype(int)  # tags are honoured on the way back
    assert np.abs(decoded - np.array(rgb)).max() <= 2


def test_writer_nv12_path(tmp_path):
    out = tmp_path / "nv12.mp4"
    nv12 = np.empty((H * 3 // 2, W), np.uint8)
    nv12[:H] = np.linspace(16, 235, W, dtype=np.uint8)[None, :]
    nv12[H:, 0::2], nv12[H:, 1::2] = 100, 160  # U, V
    with Mp4Writer(out, W, H, 25) as writer:
        for _ in range(5):
            writer.write_nv12(nv12)
    with av.open(str(out)) as container:
        yuv = next(container.decode(video=0)).to_ndarray()
    # Y plane survives up to H.264 loss (crf 20: ~1 level on average); a color conversion would shift it.
    assert _mae(yuv[:H], nv12[:H]) < 1.5 and np.abs(yuv[:H].astype(int) - nv12[:H]).max() <= 6
    assert abs(float(yuv[H:].mean()) - 130) <= 2  # U (100) and V (160) planes, stacked
    assert probe_output(out).num_frames == 5


def test_writer_replaces_existing_output_only_on_success(tmp_path):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"previous result")
    with Mp4Writer(out, W, H, 25) as writer:
        writer.write_rgb(pattern_frame(0, W, H))
        assert out.read_bytes() == b"previous result"
    assert probe_output(out).num_frames == 1
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_exception_in_writer_leaves_nothing(tmp_path):
    out = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="model crashed"):
        with Mp4Writer(out, W, H, 25) as writer:
            writer.write_rgb(pattern_frame(0, W, H))
            assert writer.temp_path.exists()
            raise RuntimeError("model crashed")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_abort_and_empty_close_leave_nothing(tmp_path):
    out = tmp_path / "out.mp4"
    writer = Mp4Writer(out, W, H, 25)
    writer.write_rgb(pattern_frame(0, W, H))
    writer.abort()
    with pytest.raises(TalkrtError, match="no video frames"):
        with Mp4Writer(out, W, H, 25):
            pass
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_bad_arguments(tmp_path):
    with pytest.raises(InputError, match="no_such_dir: folder does not exist"):
        Mp4Writer(tmp_path / "no_such_dir" / "out.mp4", W, H, 25)
    with pytest.raises(InputError, match=r"out\.mov: file name must end with \.mp4"):
        Mp4Writer(tmp_path / "out.mov", W, H, 25)
    with pytest.raises(InputError, match="even width and height"):
        Mp4Writer(tmp_path / "out.mp4", 63, 48, 25)
    silent = make_video(tmp_path / "silent.mp4", W, H, 25, seconds=0.2)
    with pytest.raises(InputError, match="silent.mp4: no audio stream"):
        Mp4Writer(tmp_path / "out.mp4", W, H, 25, audio_path=silent)
    with pytest.raises(InputError, match="missing.wav: file not found"):
        Mp4Writer(tmp_path / "out.mp4", W, H, 25, audio_path=tmp_path / "missing.wav")
    writer = Mp4Writer(tmp_path / "out.mp4", W, H, 25)
    with pytest.raises(ValueError, match="uint8"):
        writer.write_rgb(np.zeros((H, W, 3), np.float32))
    writer.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["silent.mp4"]
