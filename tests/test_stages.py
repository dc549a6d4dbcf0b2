"""The stage protocol on the CPU: unchanged output, sharpening, batches that mix avatars."""
import hashlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from talkrt.cli import main
from talkrt.config import SharpenConfig, load_config
from talkrt.errors import TalkrtError
from talkrt.media.audio import load_audio
from talkrt.media.frames import iter_video_frames
from talkrt.media.probe import probe_video
from talkrt.media.writer import Mp4Writer
from benchmarks.sample import moving_face_frames
from talkrt.session import build_session
from talkrt.stages import AudioWindows, CpuComposeStage, FrameBatch, UNetStage, VaeDecodeStage

DATA = Path(__file__).parent / "data"
# sha256 over the decoded RGB frames of `run_pipeline --config tiny --device cpu` on the bundled
# sample, recorded with the code before the stage protocol existed: the CPU output must not change.
SAMPLE_DIGEST = "7dbcea93e62768e7b4e08f84d907fdfe4d30eaa59a277ee02d44ed02c7c9e3f1"


def frames_digest(path: Path) -> str:
    h = hashlib.sha256()
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            h.update(frame.to_ndarray(format="rgb24").tobytes())
    return h.hexdigest()


def run_sample(tmp_path: Path, name: str, *extra: str) -> Path:
    out = tmp_path / name
    code = main(["--config", "tiny", "--device", "cpu", "--no-progress", "--video", str(DATA / "sample_avatar.mp4"),
                 "--audio", str(DATA / "sample_speech.wav"), "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache"), *extra])
    assert code == 0
    return out


@pytest.mark.slow
def test_cpu_output_is_unchanged_and_sharpening_applies(tmp_path):
    plain = run_sample(tmp_path, "plain.mp4")
    assert frames_digest(plain) == SAMPLE_DIGEST
    sharp = run_sample(tmp_path, "sharp.mp4", "--set", "pipeline.sharpen.enabled=true")
    a, b = list(iter_video_frames(plain)), list(iter_video_frames(sharp))
    assert len(a) == len(b)
    diff = [np.abs(x.astype(int) - y).mean(axis=2) for x, y in zip(a, b)]
    assert max(d.mean() for d in diff) > 0.05                       # the option does something...
    assert max(d[:60].mean() for d in diff) < 0.5                   # ...inside the face box only (not the top rows)


def test_reference_compose_refuses_sharpening():
    with pytest.raises(TalkrtError, match="sharpen"):
        CpuComposeStage("reference", SharpenConfig(enabled=True))
    with pytest.raises(TalkrtError, match="compose mode 'gpu' does not run on the CPU"):
        CpuComposeStage("gpu", SharpenConfig())


@pytest.fixture(scope="module")
def two_avatars(tmp_path_factory):
    """A tiny CPU session and two prepared avatars of different size and motion."""
    root = tmp_path_factory.mktemp("avatars")
    parts = build_session(load_config("tiny"), device="cpu", cache_dir=root / "cache")
    avatars, frames = [], []
    for name, size, seconds in (("a.mp4", 256, 0.32), ("b.mp4", 320, 0.4)):
        path = root / name
        clip = moving_face_frames(size=size, seconds=seconds)
        with Mp4Writer(path, size, size, Fraction(25)) as writer:
            for frame in clip:
                writer.write_rgb(frame)
        avatars.append(parts.preparer(path, probe_video(path)))
        frames.append(list(iter_video_frames(path)))
    assert all(a.found.all() for a in avatars)
    return parts, avatars, frames, load_audio(DATA / "sample_speech.wav")


def _run_model_and_compose(parts, batch: FrameBatch, frames, clip) -> list[np.ndarray]:
    """Stages 2-5 on ``batch``; ``frames[k]`` holds the RGB frames of ``batch.avatars[k]``."""
    batch.frames = [frames[int(a)][int(s)].copy() for a, s in zip(batch.avatar_index, batch.src_index)]
    AudioWindows(parts.audio_features, clip, Fraction(25))(batch)   # fresh: windows are read in order
    UNetStage(parts.unet, parts.device, parts.dtype, None)(batch)
    VaeDecodeStage(parts.vae_decoder, None, on_device=False)(batch)
    CpuComposeStage("numpy", SharpenConfig())(batch)
    return batch.frames


def test_a_batch_mixing_avatars_equals_one_batch_per_avatar(two_avatars):
    parts, avatars, frames, clip = two_avatars
    # rows alternate between the avatars, each with its own source and output frame numbers
    owner = np.array([0, 1, 1, 0, 1, 0])
    src = np.array([0, 9, 2, 7, 4, 3])
    out = np.array([3, 0, 5, 1, 8, 6])
    mixed = FrameBatch(index=0, out_index=out, src_index=src, avatars=tuple(avatars), avatar_index=owner,
                       found=np.ones(len(owner), bool))
    got = _run_model_and_compose(parts, mixed, frames, clip)
    for a, avatar in enumerate(avatars):
        rows = np.flatnonzero(owner == a)
        alone = FrameBatch.of_avatar(0, out[rows], src[rows], avatar)
        want = _run_model_and_compose(parts, alone, [frames[a]], clip)
        for row, expected in zip(rows, want):
            assert got[row].shape == expected.shape
            # float convolutions over a different batch may round a face pixel one level apart
            assert np.abs(got[row].astype(int) - expected).max() <= 1
        assert not all(np.array_equal(got[r], frames[a][s]) for r, s in zip(rows, src[rows]))
