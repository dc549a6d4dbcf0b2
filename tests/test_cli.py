"""The CLI's contract: inputs never harmed, refusals before any model is built, reports that parse."""
import hashlib
import json
import os
import signal
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

import talkrt.session
from talkrt import __version__
from talkrt.cli import main
from talkrt.media.probe import probe_output
from talkrt.media.writer import Mp4Writer
from benchmarks.sample import moving_face_frames
from media_factory import make_audio

FPS = 25


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A 10-frame face clip (0.4 s) and 0.6 s of speech-like audio."""
    root = tmp_path_factory.mktemp("cli")
    video = root / "avatar.mp4"
    with Mp4Writer(video, 256, 256, Fraction(FPS)) as writer:
        for frame in moving_face_frames(size=256, seconds=0.4):
            writer.write_rgb(frame)
    audio = root / "speech.wav"
    make_audio(audio, 0.6, sample_rate=16000, kind="chirp")
    return {"video": video, "audio": audio, "cache": root / "cache"}


def args(media, out, video=None, audio=None, *extra):
    return ["--config", "tiny", "--device", "cpu", "--no-progress", "--video", str(video or media["video"]),
            "--audio", str(audio or media["audio"]), "--out", str(out), "--cache-dir", str(media["cache"]), *extra]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def no_models(monkeypatch):
    """Fail the test if a refusal got as far as building the models."""
    def refuse(*a, **k):
        raise AssertionError("the models were built for an input that should have been refused")
    monkeypatch.setattr(talkrt.session, "build_session", refuse)


def refused(rc, folder: Path, caplog, *phrases):
    """Exit 2, the ERROR line holds ``phrases``, no traceback, no temporary file left in ``folder``."""
    assert rc == 2
    assert not [p for p in folder.iterdir() if p.name.startswith(".talkrt-")]
    errors = " ".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    for phrase in phrases:
        assert phrase in errors, errors
    assert "Traceback" not in caplog.text


def test_output_equal_to_the_video_is_refused_and_the_video_untouched(media, tmp_path, caplog, no_models):
    video = tmp_path / "v.mp4"
    video.write_bytes(media["video"].read_bytes())
    before = digest(video)
    refused(main(args(media, video, video=video)), tmp_path, caplog, "same file as --video", str(video))
    assert digest(video) == before


def test_output_through_a_symlink_or_relative_path_to_the_audio_is_refused(media, tmp_path, caplog, no_models,
                                                                           monkeypatch):
    audio = tmp_path / "speech.mp4"            # AAC in an .mp4 container, so the .mp4 check passes
    make_audio(audio, 0.6, sample_rate=16000)
    link = tmp_path / "link.mp4"
    link.symlink_to(audio)
    before = digest(audio)
    refused(main(args(media, link, audio=audio)), tmp_path, caplog, "same file as --audio")
    assert link.resolve() == audio.resolve()
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    refused(main(args(media, Path("sub/../speech.mp4"), audio=audio)), tmp_path, caplog, "same file as --audio")
    assert digest(audio) == before


def test_a_name_longer_than_the_filesystem_allows_is_refused_before_work(media, tmp_path, caplog, no_models):
    out = tmp_path / ("n" * 252 + ".mp4")      # 256 bytes
    refused(main(args(media, out)), tmp_path, caplog, "bytes; this filesystem allows")


@pytest.mark.parametrize("extra, phrase", [
    (("--device", "gpu0"), "--device 'gpu0'"),
    (("--compose", "gpu"), "--compose gpu needs a CUDA device"),
    (("--compose", "reference", "--set", "pipeline.sharpen.enabled=true"), "'reference' reproduces MuseTalk"),
    (("--weights", "/nonexistent/weights"), "/nonexistent/weights: --weights must be a folder"),
    (("--backend", "tensorrt"), "tensorrt package is not installed"),
    (("--config", "latentsync16-tiny", "--backend", "tensorrt"), "no tensorrt engines (its model family builds compiled"),
])
def test_settings_that_cannot_run_are_refused_before_the_models(media, tmp_path, caplog, no_models, extra, phrase):
    out = tmp_path / "o.mp4"
    refused(main(args(media, out, None, None, *extra)), tmp_path, caplog, phrase)
    assert not out.exists()


def test_unusable_report_and_cache_paths_are_refused_before_work(media, tmp_path, caplog, no_models):
    out = tmp_path / "o.mp4"
    (tmp_path / "rep.json").mkdir()
    refused(main(args(media, out, None, None, "--json", str(tmp_path / "rep.json"))), tmp_path, caplog,
            "rep.json: is a directory")
    refused(main(args(media, out, None, None, "--json", str(media["audio"]))), tmp_path, caplog, ".json")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    argv = [a if a != str(media["cache"]) else str(blocker / "cache") for a in args(media, out)]
    refused(main(argv), tmp_path, caplog, "cannot create this folder")
    assert not out.exists()


def test_output_that_is_a_directory_is_named_as_such(media, tmp_path, caplog, no_models):
    (tmp_path / "dir.mp4").mkdir()
    refused(main(args(media, tmp_path / "dir.mp4")), tmp_path, caplog, "dir.mp4: is a directory")


@pytest.mark.slow
def test_the_longest_legal_name_works(media, tmp_path):
    out = tmp_path / ("é" * 125 + ".mp4")      # 254 bytes of UTF-8
    assert len(os.fsencode(out.name)) == 254
    assert main(args(media, out)) == 0
    assert probe_output(out).num_frames == int(0.6 * FPS)


def test_audio_shorter_than_a_frame_is_refused_before_the_models(media, tmp_path, caplog, no_models):
    short = tmp_path / "blip.wav"
    make_audio(short, 0.02, sample_rate=16000)
    refused(main(args(media, tmp_path / "o.mp4", audio=short)), tmp_path, caplog, "blip.wav",
            "shorter than one video frame")
    assert not (tmp_path / "o.mp4").exists()


def test_bad_batch_size_is_refused(media, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args(media, tmp_path / "o.mp4", None, None, "--batch-size", "0"))
    assert exit_info.value.code == 2
    assert "--batch-size: must be at least 1" in capsys.readouterr().err


def test_refusals_do_not_import_torch(media, tmp_path):
    code = ("import sys; from talkrt.cli import main; "
            f"rc = main({args(media, tmp_path / 'o.mp4', tmp_path / 'missing.mp4')!r}); "
            "print(rc, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr
    assert "missing.mp4" in done.stderr and "Traceback" not in done.stderr


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"talkrt {__version__}"


@pytest.mark.slow
def test_json_report_and_summary_line(media, tmp_path, capsys):
    out, report = tmp_path / "my result.mp4", tmp_path / "report.json"
    assert main(args(media, out, None, None, "--json", str(report))) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    fields = dict(item.split("=", 1) for item in line.split(" "))      # key=value, no spaces in values
    assert fields["frames"] == "15" and fields["faces"] == "15/15" and fields["weights"] == "synthetic"
    assert fields["encode"] == "libx264-rgb" and float(fields["startup_s"]) > 0
    doc = json.loads(report.read_text())
    assert doc["output"] == str(out.resolve()) and doc["frames"] == 15 and doc["config"] == "tiny"
    assert doc["faces"] == {"output_frames_with_face": 15, "output_frames": 15, "source_frames": 10,
                            "no_face_ranges": []}
    seconds = doc["seconds"]
    assert seconds["total"] == pytest.approx(seconds["startup"] + seconds["preparation"] + seconds["pipeline"])
    assert [s["stage"] for s in doc["stages"]] == ["audio_features", "1.frames", "2.audio", "3.unet",
                                                  "4.vae_decode", "5.compose", "6.encode", "6.encode-drain"]
    assert doc["config_hash"] and doc["finished"].endswith("+00:00") and Path(doc["inputs"]["video"]).is_absolute()
    assert doc["versions"]["talkrt"] == __version__ and "torch" in doc["versions"]
    startup = doc["startup"]            # called from Python: counted from main(), so no interpreter time
    assert list(startup) == ["interpreter", "checks", "imports", "weights", "engines", "tracker_and_audio",
                             "avatar", "first_batch", "to_first_frame"]
    assert startup["interpreter"] == 0 and startup["first_batch"] > 0 and startup["avatar"] > 0
    assert startup["to_first_frame"] == pytest.approx(sum(v for k, v in startup.items() if k != "to_first_frame"))
    assert float(fields["first_frame_s"]) == pytest.approx(startup["to_first_frame"], abs=0.01)


@pytest.mark.slow
def test_without_config_the_cpu_runs_tiny_and_says_so(media, tmp_path, caplog):
    argv = [a for a in args(media, tmp_path / "o.mp4") if a not in ("--config", "tiny")]
    assert main(argv) == 0
    assert any("config: tiny" in r.getMessage() and "--config musetalk" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_sigterm_mid_run_leaves_nothing(media, tmp_path):
    out = tmp_path / "o.mp4"
    long_audio = tmp_path / "long.wav"
    make_audio(long_audio, 20.0, sample_rate=16000)
    proc = subprocess.Popen([sys.executable, "-m", "talkrt.cli", *args(media, out, None, long_audio)],
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:                   # wait until frames are being written
        if "media path:" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "terminated; no output was written" in err and "Traceback" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".talkrt-")]


@pytest.mark.slow
def test_fps_resamples_the_avatar(media, tmp_path, capsys):
    out = tmp_path / "o.mp4"
    assert main(args(media, out, None, None, "--fps", "25/2")) == 0
    info = probe_output(out)
    assert info.fps == Fraction(25, 2) and info.num_frames == int(0.6 * 12.5)
    with pytest.raises(SystemExit) as exit_info:
        main(args(media, out, None, None, "--fps", "0"))
    assert exit_info.value.code == 2 and "--fps: must be positive" in capsys.readouterr().err


def test_process_age_counts_from_process_start():
    code = "import time; time.sleep(0.5); from talkrt.cli import seconds_since_process_start as s; print(s())"
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0.45 <= age < 10.0          # /proc's clock ticks are 10 ms; the interpreter start adds a little


@pytest.mark.slow
def test_a_truncated_video_is_refused_not_cycled_over_what_decodes(tmp_path, caplog):
    """The first half of the bundled sample: its index lists 37 frames, 31 decode. Running on
    those 31 would silently loop a shorter face video; the run says the file is damaged."""
    sample = Path(__file__).parent / "data" / "sample_avatar.mp4"
    data = sample.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[:len(data) // 2])
    media = {"cache": tmp_path / "cache"}
    out = tmp_path / "o.mp4"
    refused(main(args(media, out, cut, Path(__file__).parent / "data" / "sample_speech.wav")), tmp_path, caplog,
            "cut.mp4", "only 31 of its 37 frames could be decoded", "truncated or damaged")
    assert not out.exists() and cut.read_bytes() == data[:len(data) // 2]
