import json
import logging
import math

import pytest
import torch

from talkrt.config import load_config
from talkrt.errors import InputError
from talkrt.models.unet import sinusoidal_encoding
from talkrt.models.weights import build_synthetic, load_official, save_official_layout


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("tiny")
    return cfg, build_synthetic(cfg).to(torch.device("cpu"), torch.float32)


def test_positional_encoding_formula():
    pe = sinusoidal_encoding(50, 384)
    pos, i = 7, 10  # channel 2i -> sin(pos / 10000^(2i/d)), 2i+1 -> cos
    angle = pos / 10000 ** (2 * i / 384)
    assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
    assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_synthetic_weights_are_deterministic(tiny):
    cfg, models = tiny
    again = build_synthetic(cfg)
    for a, b in zip(models.unet.state_dict().values(), again.unet.state_dict().values()):
        assert torch.equal(a, b)
    other = build_synthetic(cfg, seed=1)
    assert not torch.equal(next(iter(models.unet.unet.parameters())), next(iter(other.unet.unet.parameters())))
    assert models.source == "synthetic" and "synthetic" in models.identity


def test_shapes(tiny):
    cfg, m = tiny
    a = cfg.model.audio
    x = torch.randn(3, 8, 32, 32)
    audio = torch.randn(3, a.tokens_per_frame, a.d_model)
    with torch.no_grad():
        assert m.unet(x, audio).shape == (3, 4, 32, 32)
        faces = m.vae_decoder(torch.randn(3, 4, 32, 32))
        assert faces.shape == (3, 256, 256, 3) and faces.min() >= 0 and faces.max() <= 255
        assert m.vae_encoder(torch.rand(2, 3, 256, 256) * 2 - 1).shape == (2, 4, 32, 32)
        assert m.whisper(torch.randn(2, 80, 3000)).shape == (2, 1500, a.hidden_states, a.d_model)


def test_official_layout_round_trip(tiny, tmp_path):
    cfg, m = tiny
    root = save_official_layout(m, cfg, tmp_path / "models")
    assert (root / "musetalkV15" / "unet.pth").is_file()
    assert json.loads((root / "musetalkV15" / "musetalk.json").read_text())["cross_attention_dim"] == cfg.model.audio.d_model
    assert (root / "sd-vae" / "config.json").is_file() and (root / "whisper" / "config.json").is_file()
    loaded = load_official(cfg, root).to(torch.device("cpu"), torch.float32)
    assert loaded.source == "official"
    torch.manual_seed(3)
    x, audio = torch.randn(2, 8, 32, 32), torch.randn(2, cfg.model.audio.tokens_per_frame, cfg.model.audio.d_model)
    lat = torch.randn(2, 4, 32, 32)
    mel = torch.randn(1, 80, 3000)
    with torch.no_grad():
        assert torch.equal(m.unet(x, audio), loaded.unet(x, audio))
        assert torch.equal(m.vae_decoder(lat), loaded.vae_decoder(lat))
        assert torch.allclose(m.whisper(mel), loaded.whisper(mel), atol=1e-6)


def test_official_layout_errors(tiny, tmp_path):
    cfg, m = tiny
    with pytest.raises(InputError, match="missing weights folder"):
        load_official(cfg, tmp_path / "nowhere")
    root = save_official_layout(m, cfg, tmp_path / "models")
    (root / "musetalkV15" / "unet.pth").unlink()
    with pytest.raises(InputError, match="unet.pth: missing UNet weights"):
        load_official(cfg, root)
    state = m.unet.unet.state_dict()
    state.pop(next(iter(state)))
    torch.save(state, root / "musetalkV15" / "unet.pth")
    with pytest.raises(InputError, match="does not match musetalk.json"):
        load_official(cfg, root)
    (root / "musetalkV15" / "unet.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot read the UNet checkpoint"):
        load_official(cfg, root)


def test_log_mel_matches_the_whisper_feature_extractor():
    """talkrt's batched log-mel equals transformers' WhisperFeatureExtractor (torch path) on the
    CPU: same float32 arithmetic, so within 1e-5 (outputs are O(1)); clips shorter than, equal
    to and longer than 30 s (truncated), and an empty one."""
    import numpy as np
    from transformers import WhisperFeatureExtractor

    from talkrt.models.audio import LogMel

    extractor = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000)
    rng = np.random.default_rng(0)
    clips = [(0.3 * rng.standard_normal(n)).astype(np.float32) for n in (16000, 480000, 500000, 0, 7)]
    want = extractor(clips, sampling_rate=16000, return_tensors="pt", device="cpu").input_features
    got = LogMel(extractor, torch.device("cpu"))(clips)
    assert got.shape == want.shape == (5, 80, 3000) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_synthetic_weights_cache_loads_the_same_tensors(tmp_path, caplog):
    from safetensors.torch import load as load_file_bytes

    from talkrt.models.weights import load_models, synthetic_cache_path

    cfg = load_config("tiny")
    fresh = load_models(cfg, None, torch.device("cpu"), torch.float32, cache_dir=tmp_path)
    path = synthetic_cache_path(cfg, torch.float32, tmp_path)
    assert path.is_file()
    before = path.read_bytes()
    cached = load_models(cfg, None, torch.device("cpu"), torch.float32, cache_dir=tmp_path)
    assert path.read_bytes() == before
    assert cached.identity == fresh.identity and cached.source == "synthetic"
    for a, b in ((fresh.unet, cached.unet), (fresh.vae_decoder, cached.vae_decoder),
                 (fresh.vae_encoder, cached.vae_encoder), (fresh.whisper, cached.whisper)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # a damaged cache file is ignored with a warning and written again
    path.write_bytes(b"not a safetensors file")
    again = load_models(cfg, None, torch.device("cpu"), torch.float32, cache_dir=tmp_path)
    assert "ignoring the synthetic weights cache" in caplog.text
    from safetensors.torch import load_file
    written, first = load_file(str(path)), load_file_bytes(before)
    assert written.keys() == first.keys() and all(torch.equal(v, first[k]) for k, v in written.items())
    assert all(torch.equal(v, again.unet.state_dict()[k]) for k, v in fresh.unet.state_dict().items())


@pytest.mark.parametrize("config, key, value, named", [
    ("sd-vae/config.json", "block_out_channels", [128, 256, 512, 512], "sd-vae"),
    ("whisper/config.json", "encoder_ffn_dim", 1536, "whisper"),
    ("musetalkV15/musetalk.json", "block_out_channels", [64, 128, 256, 256], "musetalkV15/unet.pth"),
])
def test_config_that_does_not_match_its_weights_is_one_line(tiny, tmp_path, config, key, value, named):
    """diffusers and torch raise RuntimeError with one line per tensor (transformers points at a
    report it printed): the refusal names the folder or file, the first tensor and the count."""
    cfg, m = tiny
    root = save_official_layout(m, cfg, tmp_path / "models")
    data = json.loads((root / config).read_text())
    data[key] = value
    (root / config).write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"\d+ tensors have (another|the wrong) shape.*, e\.g\. \S+: ") as err:
        load_official(cfg, root)
    assert err.value.path == str(root / named) and "\n" not in str(err.value)


def test_unreadable_unet_checkpoint_is_one_line_without_torch_advice(tiny, tmp_path, caplog):
    cfg, m = tiny
    root = save_official_layout(m, cfg, tmp_path / "models")
    with caplog.at_level(logging.WARNING):
        load_official(cfg, root)
    assert "accelerate" not in caplog.text      # diffusers' warning without `accelerate`
    (root / "musetalkV15" / "unet.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=r"unet.pth: cannot read the UNet checkpoint: not a PyTorch checkpoint") as err:
        load_official(cfg, root)
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)
