"""End-to-end ``run_pipeline`` on the tiny config (CPU), and its bad-input contract."""
import logging
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from talkrt.cli import main
from talkrt.media.frames import iter_video_frames
from talkrt.media.probe import probe_output, probe_video
from talkrt.media.writer import Mp4Writer
from talkrt.pipeline import ping_pong_index
from benchmarks.sample import moving_face_frames
from media_factory import make_audio, make_empty_wav, make_not_media, make_video

FPS = 25


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A 20-frame real-face avatar clip (0.8 s), speech-like audio of 1.3 s and 0.5 s."""
    root = tmp_path_factory.mktemp("media")
    avatar = root / "avatar.mp4"
    with Mp4Writer(avatar, 320, 320, Fraction(FPS)) as w:
        for frame in moving_face_frames(seconds=0.8):
            w.write_rgb(frame)
    long_audio, short_audio = root / "long.wav", root / "short.m4a"
    make_audio(long_audio, 1.3, sample_rate=22050, kind="chirp")
    make_audio(short_audio, 0.5, sample_rate=48000, channels=2)
    return {"avatar": avatar, "long": long_audio, "short": short_audio, "root": root}


def run(media, out: Path, audio: Path | None = None, video: Path | None = None, *extra: str) -> int:
    return main(["--config", "tiny", "--device", "cpu", "--no-progress",
                 "--video", str(video or media["avatar"]), "--audio", str(audio or media["long"]),
                 "--out", str(out), "--cache-dir", str(media["root"] / "cache"), *extra])


def test_ping_pong_matches_musetalk_cycle():
    frames = list(range(4))
    cycle = frames + frames[::-1]
    expected = [cycle[i % len(cycle)] for i in range(20)]
    assert list(ping_pong_index(np.arange(20), 4)) == expected


@pytest.mark.slow
def test_end_to_end_tiny_with_cycling(media, tmp_path, capsys, caplog):
    out = tmp_path / "result.mp4"
    assert run(media, out) == 0
    info = probe_output(out)
    src = probe_video(media["avatar"])
    assert (info.width, info.height, info.fps) == (src.width, src.height, src.fps)
    assert info.num_frames == int(1.3 * FPS)                      # floor(audio seconds x fps), cycling
    assert abs(info.duration_s - 1.3) <= 1 / FPS
    assert info.has_audio and info.audio_duration_s == pytest.approx(1.3, abs=1 / FPS)
    assert info.metadata["talkrt_weights"] == "synthetic"
    assert info.metadata["talkrt_faces"] == "32/32"                # output frames with a face
    summary = capsys.readouterr().out
    assert "frames=32" in summary and "faces=32/32" in summary and "weights=synthetic" in summary
    # the mouth region changed, the forehead did not (compose touches only the face box)
    source = next(iter_video_frames(media["avatar"]))
    result = next(iter_video_frames(out))
    diff = np.abs(source.astype(int) - result.astype(int)).mean(axis=2)
    assert diff[200:240, 130:190].mean() > 10
    assert diff[:40].mean() < 3
    # frame 25 of the output is frame 20-1-(25-20)=14 of the source (ping-pong), its top rows match
    frames = list(iter_video_frames(out))
    src14 = list(iter_video_frames(media["avatar"]))[14]
    assert np.abs(frames[25][:40].astype(int) - src14[:40]).mean() < 3
    # second run hits the avatar cache
    caplog.clear()
    caplog.set_level(logging.INFO, logger="talkrt")
    assert run(media, tmp_path / "again.mp4") == 0
    assert any("avatar cache hit" in r.message for r in caplog.records)


@pytest.mark.slow
def test_short_audio_cuts_the_video(media, tmp_path):
    out = tmp_path / "short.mp4"
    assert run(media, out, audio=media["short"], video=None) == 0
    info = probe_output(out)
    assert info.num_frames == int(0.5 * FPS)
    assert info.audio_channels == 2


def _assert_failed_cleanly(rc: int, out: Path, caplog, *phrases: str) -> None:
    assert rc == 2
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".") and "partial" in p.name]
    text = " ".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    for phrase in phrases:
        assert phrase in text, text


def test_missing_video(media, tmp_path, caplog):
    out = tmp_path / "o.mp4"
    _assert_failed_cleanly(run(media, out, video=tmp_path / "nope.mp4"), out, caplog, "nope.mp4", "not found")


def test_not_a_video(media, tmp_path, caplog):
    bogus = make_not_media(tmp_path / "bogus.mp4")
    out = tmp_path / "o.mp4"
    _assert_failed_cleanly(run(media, out, video=bogus), out, caplog, "bogus.mp4")


def test_audio_without_audio_stream(media, tmp_path, caplog):
    out = tmp_path / "o.mp4"
    _assert_failed_cleanly(run(media, out, audio=media["avatar"]), out, caplog, "avatar.mp4", "no audio stream")


def test_empty_audio(media, tmp_path, caplog):
    empty = make_empty_wav(tmp_path / "empty.wav")
    out = tmp_path / "o.mp4"
    _assert_failed_cleanly(run(media, out, audio=empty), out, caplog, "empty.wav")


def test_no_face_in_any_frame(media, tmp_path, caplog):
    noface = make_video(tmp_path / "noface.mp4", 128, 96, FPS, num_frames=6, pattern="gradient")
    out = tmp_path / "o.mp4"
    _assert_failed_cleanly(run(media, out, video=noface), out, caplog, "noface.mp4", "no face found")


def test_output_must_be_mp4_in_existing_folder(media, tmp_path, caplog):
    _assert_failed_cleanly(run(media, tmp_path / "o.mkv"), tmp_path / "o.mkv", caplog, "o.mkv", ".mp4")
    missing = tmp_path / "nowhere" / "o.mp4"
    assert run(media, missing) == 2 and not missing.exists()


def test_bad_config_override(media, tmp_path, caplog):
    out = tmp_path / "o.mp4"
    _assert_failed_cleanly(run(media, out, None, None, "--set", "pipeline.batch_size=0"), out, caplog, "batch_size")


@pytest.mark.slow
def test_frames_without_a_face_pass_through_unchanged(media, tmp_path, capsys, caplog):
    """Frames 6..9 show no face: they are counted, not generated, and stay aligned with the rest."""
    faces = moving_face_frames(seconds=0.4)          # 10 frames
    blank = np.full_like(faces[0], 128)
    mixed = tmp_path / "mixed.mp4"
    with Mp4Writer(mixed, 320, 320, Fraction(FPS), crf=12) as w:
        for i, frame in enumerate(faces):
            w.write_rgb(blank if 6 <= i < 10 else frame)
    audio = tmp_path / "a.wav"
    make_audio(audio, 0.4, sample_rate=16000)
    out = tmp_path / "mixed_out.mp4"
    assert run(media, out, audio=audio, video=mixed) == 0
    assert "faces=6/10" in capsys.readouterr().out
    assert any("no face in 4 of 10 output frames" in r.getMessage() and "frames 6-9" in r.getMessage()
               for r in caplog.records)
    src, res = list(iter_video_frames(mixed)), list(iter_video_frames(out))
    assert len(res) == 10
    for i in range(6, 10):    # untouched apart from re-encoding
        assert np.abs(src[i].astype(int) - res[i]).mean() < 1.5
    assert np.abs(src[3].astype(int) - res[3])[200:240, 130:190].mean() > 10   # face frames are generated


def test_requested_engine_backend_missing_is_refused(media, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("TALKRT_ENGINES_DIR", str(tmp_path / "no-engines"))
    out = tmp_path / "o.mp4"
    _assert_failed_cleanly(run(media, out, None, None, "--backend", "compiled"), out, caplog, "make engines CONFIG=tiny",
                          "--config tiny")


def test_gpu_compose_on_cpu_is_refused(media, tmp_path, caplog):
    out = tmp_path / "o.mp4"
    _assert_failed_cleanly(run(media, out, None, None, "--compose", "gpu"), out, caplog, "--compose gpu")
