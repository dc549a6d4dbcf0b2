"""LatentSync configs: the full size is stage2_512, the tiny one has the same structure, errors name the field."""
import pytest
from talkrt.config import load_config
from talkrt.errors import ConfigError
from talkrt.models.latentsync.config import load_latentsync_config


def test_full_size_is_stage2_512():
    cfg = load_latentsync_config("latentsync16")
    m = cfg.model
    u, a, d = m.unet, m.audio, m.denoise
    assert (m.crop_size, m.latent_size, m.frames_per_chunk, m.cross_attention_dim) == (512, 64, 16, 384)
    assert (u.in_channels, u.out_channels, u.block_out_channels, u.layers_per_block) == (13, 4, (320, 640, 1280, 1280), 2)
    assert u.down_block_types == ("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",)
    assert u.up_block_types == ("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3
    assert (u.attention_heads, u.motion_module_resolutions, u.motion_max_frames) == (8, (1, 2, 4, 8), 24)
    assert (a.d_model, a.hidden_states, a.tokens_per_frame, a.window_before_steps) == (384, 5, 50, 4)
    assert (d.steps, d.guidance_scale, d.deepcache, d.deepcache_interval) == (20, 1.5, True, 3)
    assert cfg.model.vae.scaling_factor == pytest.approx(0.18215)


def test_tiny_has_the_same_structure():
    full, tiny = load_latentsync_config("latentsync16"), load_latentsync_config("latentsync16-tiny")
    for field in ("down_block_types", "up_block_types", "layers_per_block", "motion_module_resolutions",
                  "motion_attention_blocks", "in_channels"):
        assert getattr(tiny.model.unet, field) == getattr(full.model.unet, field), field
    assert tiny.model.denoise == full.model.denoise and tiny.model.frames_per_chunk == 16
    assert tiny.model_hash() != full.model_hash()


@pytest.mark.parametrize("override, phrase", [
    ("model.unet.in_channels=12", "in_channels"),
    ("model.frames_per_chunk=25", "frames_per_chunk"),
    ("model.denoise.guidance_scale=0.5", "guidance_scale"),
    ("model.unet.down_block_types=[DownBlock2D,DownBlock3D,DownBlock3D,DownBlock3D]", "down_block_types"),
    ("model.audio.nonsense=1", "unknown key"),
    ("pipeline.batch_size=0", "batch_size"),
    ("family=musetalk", "family"),
])
def test_invalid_values_are_rejected_by_name(override, phrase):
    with pytest.raises(ConfigError, match=phrase):
        load_latentsync_config("latentsync16-tiny", [override])


def test_the_musetalk_loader_says_what_runs_a_latentsync_config():
    with pytest.raises(ConfigError, match=r"MuseTalk configs only .*python -m talkrt.cli --config latentsync16"):
        load_config("latentsync16")
    with pytest.raises(ConfigError, match="missing key 'family'|unknown key"):
        load_latentsync_config("tiny")


def test_reading_a_latentsync_config_imports_no_model_library():
    """The CLI reads the config before its checks; they must refuse bad input without torch."""
    import subprocess
    import sys
    code = ("import sys; from talkrt.families import load_family_config; load_family_config('latentsync16-tiny', []); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
