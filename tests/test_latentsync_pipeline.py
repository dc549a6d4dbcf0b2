"""LatentSync 1.6 through the model-family interface: `run_pipeline --config latentsync16-tiny` on the CPU."""
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from talkrt.avatar import load_avatar
from talkrt.cli import main
from talkrt.config import TalkrtConfig
from talkrt.errors import ConfigError, TalkrtError
from talkrt.face.align_mask import load_mask
from talkrt.families import get_family, load_family_config
from talkrt.families.latentsync_avatar import AlignedAvatar
from talkrt.kernels import reference as kernels
from talkrt.media.audio import load_audio
from talkrt.media.frames import iter_video_frames
from talkrt.media.probe import probe_output, probe_video
from talkrt.models.latentsync.config import LatentSyncConfig
from talkrt.session import build_session

DATA = Path(__file__).parent / "data"
SECONDS = 1.2          # 30 frames at 25 fps: one 16-frame chunk and a short one of 14


def write_speech_excerpt(path: Path, seconds: float) -> Path:
    """The first ``seconds`` of the bundled speech sample as 16 kHz mono PCM."""
    samples = load_audio(DATA / "sample_speech.wav").samples[: int(seconds * 16000)]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.round(samples * 32767).astype(np.int16)[None], format="s16",
                                           layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return path


def test_configs_pick_their_family(tmp_path):
    assert isinstance(load_family_config("tiny"), TalkrtConfig)
    cfg = load_family_config("latentsync16-tiny", ["model.denoise.steps=2"])
    assert isinstance(cfg, LatentSyncConfig) and cfg.model.denoise.steps == 2
    assert get_family(cfg.family).chunk_frames(cfg) == 16
    bad = tmp_path / "wav2lip.yaml"
    bad.write_text("name: x\nfamily: wav2lip\n")
    with pytest.raises(ConfigError, match="unknown model family 'wav2lip'"):
        load_family_config(bad)


@pytest.mark.parametrize("option, phrase", [({"compose": "reference"}, "--compose reference"),
                                            ({"backend": "tensorrt"}, "--backend tensorrt")])
def test_latentsync_refuses_what_it_cannot_run(tmp_path, option, phrase):
    with pytest.raises(TalkrtError, match=phrase):
        build_session(load_family_config("latentsync16-tiny"), device="cpu", cache_dir=tmp_path, **option)


@pytest.mark.slow
def test_latentsync_tiny_end_to_end_on_cpu(tmp_path, capsys):
    audio = write_speech_excerpt(tmp_path / "speech.wav", SECONDS)
    out, cache = tmp_path / "ls.mp4", tmp_path / "cache"
    # 3 steps instead of 20 keeps CI short; DeepCache (interval 3) and guidance stay on
    code = main(["--config", "latentsync16-tiny", "--device", "cpu", "--no-progress", "--set", "model.denoise.steps=3",
                 "--video", str(DATA / "sample_avatar.mp4"), "--audio", str(audio), "--out", str(out),
                 "--cache-dir", str(cache)])
    assert code == 0
    info, src = probe_output(out), probe_video(DATA / "sample_avatar.mp4")
    assert (info.width, info.height, info.fps) == (src.width, src.height, src.fps)
    assert info.num_frames == 30
    assert info.has_audio and info.audio_duration_s == pytest.approx(SECONDS, abs=1 / 25)
    assert info.metadata["talkrt_weights"] == "synthetic" and info.metadata["talkrt_config"] == "latentsync-1.6-tiny"
    summary = capsys.readouterr().out
    assert "frames=30" in summary and "faces=30/30" in summary and "weights=synthetic" in summary

    # The generated region in frame coordinates: the restore kernel itself pastes a white face into
    # black frames with the model's mask, so "inside" is where it wrote and "outside" where it did not.
    (folder,) = [p for p in cache.iterdir() if (p / "meta.json").is_file()]
    avatar = load_avatar(folder, AlignedAvatar)
    assert avatar.found.all() and avatar.conditions.shape == (100, 9, 8, 8)
    cfg = load_family_config("latentsync16-tiny")
    paste = load_mask(None, cfg.model.crop_size).paste
    size = cfg.model.crop_size
    source = list(iter_video_frames(DATA / "sample_avatar.mp4"))[:30]
    result = list(iter_video_frames(out))
    inside_means, outside_means = [], []
    for i in (0, 15, 16, 29):          # both chunks, at their edges
        region = np.zeros((1, src.height, src.width, 3), np.uint8)
        kernels.restore_rgb(region, np.full((1, size, size, 3), 255, np.uint8), avatar.to_crop[i:i + 1], paste)
        inside, touched = region[0, :, :, 0] > 200, region[0, :, :, 0] > 0
        assert 500 < inside.sum() < 0.5 * src.width * src.height      # a lower face, not nothing nor everything
        # a margin of 4 pixels: x264's blocks straddle the edge of the pasted region
        outside = cv2.dilate(touched.astype(np.uint8), np.ones((9, 9), np.uint8)) == 0
        diff = np.abs(source[i].astype(int) - result[i].astype(int)).mean(axis=2)
        inside_means.append(diff[inside].mean())
        outside_means.append(diff[outside].mean())
    assert min(inside_means) > 10, inside_means          # synthetic weights: the mouth region changed
    assert max(outside_means) < 3, outside_means         # the rest is the source, up to re-encoding
