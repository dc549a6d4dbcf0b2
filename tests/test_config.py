import pytest

from talkrt.config import load_config
from talkrt.errors import ConfigError


def test_full_size_config_is_musetalk_v15():
    cfg = load_config("musetalk")
    u, v, a = cfg.model.unet, cfg.model.vae, cfg.model.audio
    assert u.block_out_channels == (320, 640, 1280, 1280)
    assert (u.in_channels, u.out_channels, u.layers_per_block, u.attention_head_dim) == (8, 4, 2, 8)
    assert u.down_block_types[:3] == ("CrossAttnDownBlock2D",) * 3 and u.down_block_types[3] == "DownBlock2D"
    assert v.block_out_channels == (128, 256, 512, 512) and v.scaling_factor == pytest.approx(0.18215)
    assert a.d_model == 384 and a.hidden_states == 5 and a.tokens_per_frame == 50
    assert cfg.model.latent_size == 32


def test_tiny_has_same_structure():
    full, tiny = load_config("musetalk"), load_config("tiny")
    assert tiny.model.unet.down_block_types == full.model.unet.down_block_types
    assert tiny.model.unet.up_block_types == full.model.unet.up_block_types
    assert len(tiny.model.vae.block_out_channels) == len(full.model.vae.block_out_channels)
    assert tiny.model.latent_size == full.model.latent_size
    assert tiny.model_hash() != full.model_hash()


def test_overrides_and_frozen():
    cfg = load_config("tiny", ["pipeline.batch_size=3", "pipeline.sharpen.enabled=true"])
    assert cfg.pipeline.batch_size == 3 and cfg.pipeline.sharpen.enabled is True
    with pytest.raises(Exception):
        cfg.pipeline.batch_size = 4  # frozen


@pytest.mark.parametrize("override, phrase", [
    ("pipeline.batch_size=0", "batch_size"),
    ("pipeline.compose=magic", "compose"),
    ("pipeline.nonsense=1", "unknown key"),
    ("model.unet.in_channels=9", "in_channels"),
    ("pipeline.smooth_window=4", "smooth_window"),
    ("pipeline.batch_size=two", "expected int"),
])
def test_invalid_values_are_rejected_by_name(override, phrase):
    with pytest.raises(ConfigError, match=phrase):
        load_config("tiny", [override])


def test_unknown_config_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown config"):
        load_config("nope")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
