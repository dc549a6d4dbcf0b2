"""LatentSync weights: official layout round trip, clear refusals, synthetic labels, Whisper conversion."""
import json
import logging
import re

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from talkrt.errors import InputError
from talkrt.face.align_mask import load_mask
from talkrt.models.latentsync.config import load_latentsync_config
from talkrt.models.latentsync.weights import (
    UNET_FILE,
    WHISPER_FILE,
    build_synthetic,
    load_official,
    save_official_layout,
)


@pytest.fixture(scope="module")
def cfg():
    return load_latentsync_config("latentsync16-tiny")


@pytest.fixture(scope="module")
def synthetic(cfg):
    return build_synthetic(cfg)


@pytest.fixture()
def layout(tmp_path, cfg, synthetic):
    return save_official_layout(synthetic, cfg, tmp_path / "weights", global_step=123)


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_official_layout_round_trip(cfg, synthetic, layout):
    ckpt = torch.load(layout / UNET_FILE, weights_only=True)
    assert set(ckpt) == {"global_step", "state_dict"} and ckpt["global_step"] == 123
    keys = ckpt["state_dict"].keys()
    assert any(".motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1.to_q." in k for k in keys)
    assert any(k.endswith("attn2.to_k.weight") for k in keys)
    loaded = load_official(cfg, layout)
    assert loaded.source == "official" and loaded.identity.startswith("official-")
    assert _same_state(loaded.unet, synthetic.unet)
    assert _same_state(loaded.whisper.encoder, synthetic.whisper.encoder)
    assert _same_state(loaded.vae_encoder, synthetic.vae_encoder)
    assert _same_state(loaded.vae_decoder, synthetic.vae_decoder)
    assert np.array_equal(loaded.mask.keep, load_mask(None, cfg.model.crop_size).keep)
    assert load_official(cfg, layout).identity == loaded.identity


def test_mask_png_is_used_and_changes_the_identity(cfg, layout):
    before = load_official(cfg, layout).identity
    keep = np.full((256, 256, 3), 255, np.uint8)
    keep[150:240, 40:216] = 0
    cv2.imwrite(str(layout / "mask.png"), keep)
    loaded = load_official(cfg, layout)
    s = cfg.model.crop_size
    assert loaded.mask.keep.shape == (s, s)
    assert loaded.mask.keep[s // 4, s // 2] == 1.0 and loaded.mask.keep[int(s * 0.75), s // 2] == 0.0
    assert loaded.identity != before


def test_position_tables_may_be_omitted_but_nothing_else(cfg, layout):
    path = layout / UNET_FILE
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.endswith("pos_encoder.pe")}
    torch.save(ckpt, path)
    load_official(cfg, layout)                                   # rebuilt from the config
    key = "up_blocks.3.motion_modules.2.temporal_transformer.proj_out.weight"
    del ckpt["state_dict"][key]
    torch.save(ckpt, path)
    with pytest.raises(InputError, match="1 missing keys") as err:
        load_official(cfg, layout)
    assert str(path) in str(err.value) and key in str(err.value)


def test_wrong_shapes_name_the_tensor(cfg, layout):
    path = layout / UNET_FILE
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"]["conv_in.weight"] = torch.zeros(32, 9, 3, 3)
    torch.save(ckpt, path)
    with pytest.raises(InputError, match=r"conv_in.weight: \(32, 9, 3, 3\) in the file"):
        load_official(cfg, layout)


@pytest.mark.parametrize("victim, phrase", [
    (UNET_FILE, "missing UNet checkpoint"),
    (WHISPER_FILE, "missing Whisper checkpoint"),
    ("sd-vae/config.json", "missing VAE config"),
    ("sd-vae/diffusion_pytorch_model.safetensors", "missing weights file"),
])
def test_missing_files_are_named(cfg, layout, victim, phrase):
    (layout / victim).unlink()
    with pytest.raises(InputError, match=phrase) as err:
        load_official(cfg, layout)
    assert err.value.path is not None


@pytest.mark.parametrize("victim", [UNET_FILE, WHISPER_FILE])
@pytest.mark.parametrize("damage", ["garbage", "truncated", "folder"])
def test_corrupt_checkpoints_are_named_in_one_line(cfg, layout, victim, damage):
    """Not a checkpoint, cut short or a folder: one line naming the file, without torch.load's
    advice to retry with weights_only=False (wrong for a damaged file, unsafe in general)."""
    path = layout / victim
    if damage == "garbage":
        path.write_bytes(b"not a checkpoint")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    else:
        path.unlink()
        path.mkdir()
    what = "UNet" if victim == UNET_FILE else "Whisper"
    reason = "Is a directory" if damage == "folder" else "not a PyTorch checkpoint (or truncated)"
    with pytest.raises(InputError, match=re.escape(f"cannot read the {what} checkpoint: {reason}")) as err:
        load_official(cfg, layout)
    assert err.value.path.endswith(victim)
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)


def test_checkpoint_holding_python_objects_names_the_type_in_one_line(cfg, layout):
    import datetime
    torch.save({"global_step": datetime.date(2024, 1, 1), "state_dict": {}}, layout / UNET_FILE)
    with pytest.raises(InputError, match="holds a Python object of type datetime.date") as err:
        load_official(cfg, layout)
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)


def test_vae_config_that_does_not_match_its_weights_is_named_in_one_line(cfg, layout):
    """diffusers raises RuntimeError with one line per tensor; the refusal names DIR/sd-vae, the
    first tensor and the count."""
    config = layout / "sd-vae" / "config.json"
    data = json.loads(config.read_text())
    data["block_out_channels"] = [128, 256, 512, 512]
    config.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"config.json does not match the weights: \d+ tensors have another shape, "
                                         r"e.g. \S+: \[\d+(, \d+)*\] in the weights, \[\d+(, \d+)*\] from config.json") as err:
        load_official(cfg, layout)
    assert err.value.path == str(layout / "sd-vae") and "\n" not in str(err.value)


def test_no_accelerate_warning_on_load(cfg, layout, caplog):
    """diffusers warns on every load without `accelerate` unless low_cpu_mem_usage=False is asked."""
    with caplog.at_level(logging.WARNING):
        load_official(cfg, layout)
    assert "accelerate" not in caplog.text


@pytest.mark.parametrize("kind", ["folder", "garbage"])
def test_mask_png_that_is_not_a_readable_image_is_refused(cfg, layout, kind, caplog):
    """DIR/mask.png that is a folder or not an image: refused, not ignored with a false "no mask.png" log."""
    mask = layout / "mask.png"
    if kind == "folder":
        mask.mkdir()
    else:
        mask.write_bytes(b"\x89PNG garbage")
    phrase = "exists but is not a file" if kind == "folder" else "not an image OpenCV can read"
    with caplog.at_level(logging.INFO), pytest.raises(InputError, match=phrase) as err:
        load_official(cfg, layout)
    assert err.value.path == str(mask) and "\n" not in str(err.value)
    assert "no mask.png" not in caplog.text


def test_wrong_formats_are_refused(cfg, layout):
    torch.save({"weights": {}}, layout / UNET_FILE)
    with pytest.raises(InputError, match="expected a dict with 'state_dict'"):
        load_official(cfg, layout)


def test_whisper_of_another_size_is_refused(cfg, layout):
    ckpt = torch.load(layout / WHISPER_FILE, weights_only=True)
    ckpt["dims"]["n_audio_state"] = 768
    torch.save(ckpt, layout / WHISPER_FILE)
    with pytest.raises(InputError, match=r"n_audio_state=768 \(config needs 64\)"):
        load_official(cfg, layout)
    torch.save({"model": {}}, layout / WHISPER_FILE)
    with pytest.raises(InputError, match="not an OpenAI Whisper checkpoint"):
        load_official(cfg, layout)


def test_missing_folder(cfg, tmp_path):
    with pytest.raises(InputError, match="missing weights folder"):
        load_official(cfg, tmp_path / "nope")


def test_synthetic_weights_are_labelled_and_seeded(cfg, synthetic, caplog):
    with caplog.at_level(logging.WARNING):
        again = build_synthetic(cfg)
    assert "SYNTHETIC WEIGHTS" in caplog.text and "NOT be lip-synced" in caplog.text
    assert synthetic.source == again.source == "synthetic"
    assert synthetic.identity == again.identity and synthetic.identity.startswith("synthetic-")
    assert _same_state(synthetic.unet, again.unet)
    other = build_synthetic(cfg, seed=1)
    assert other.identity != synthetic.identity and not _same_state(other.unet, synthetic.unet)


def openai_encoder_states(sd, dims, mel):
    """OpenAI Whisper's AudioEncoder (whisper/model.py) with include_embeddings, in plain torch."""
    heads = dims["n_audio_head"]
    x = F.gelu(F.conv1d(mel, sd["encoder.conv1.weight"], sd["encoder.conv1.bias"], padding=1))
    x = F.gelu(F.conv1d(x, sd["encoder.conv2.weight"], sd["encoder.conv2.bias"], stride=2, padding=1))
    x = x.permute(0, 2, 1) + sd["encoder.positional_embedding"]
    states = [x]
    for i in range(dims["n_audio_layer"]):
        p = lambda name, i=i: sd[f"encoder.blocks.{i}.{name}"]
        h = F.layer_norm(x, x.shape[-1:], p("attn_ln.weight"), p("attn_ln.bias"))
        q = F.linear(h, p("attn.query.weight"), p("attn.query.bias"))
        k = F.linear(h, p("attn.key.weight"))
        v = F.linear(h, p("attn.value.weight"), p("attn.value.bias"))
        n, t, d = q.shape
        scale = (d // heads) ** -0.25
        q = q.view(n, t, heads, -1).permute(0, 2, 1, 3) * scale
        k = k.view(n, t, heads, -1).permute(0, 2, 3, 1) * scale
        v = v.view(n, t, heads, -1).permute(0, 2, 1, 3)
        a = (torch.softmax(q @ k, dim=-1) @ v).permute(0, 2, 1, 3).flatten(2)
        x = x + F.linear(a, p("attn.out.weight"), p("attn.out.bias"))
        h = F.layer_norm(x, x.shape[-1:], p("mlp_ln.weight"), p("mlp_ln.bias"))
        x = x + F.linear(F.gelu(F.linear(h, p("mlp.0.weight"), p("mlp.0.bias"))), p("mlp.2.weight"), p("mlp.2.bias"))
        states.append(x)
    return torch.stack(states, dim=2)


def test_openai_whisper_converts_to_the_same_states(cfg, layout):
    """A checkpoint in OpenAI's format (random weights, decoder entries included) loads into the
    transformers encoder, and talkrt's stacked states equal OpenAI's include_embeddings output."""
    path = layout / WHISPER_FILE
    ckpt = torch.load(path, weights_only=True)
    gen = torch.Generator().manual_seed(5)
    sd = {k: torch.randn(v.shape, generator=gen) * 0.2 for k, v in ckpt["model_state_dict"].items()}
    sd["encoder.positional_embedding"] = ckpt["model_state_dict"]["encoder.positional_embedding"]
    sd["decoder.token_embedding.weight"] = torch.zeros(10, cfg.model.audio.d_model)     # ignored
    torch.save({"dims": ckpt["dims"], "model_state_dict": sd}, path)
    whisper = load_official(cfg, layout).whisper.eval()
    mel = torch.randn(1, cfg.model.audio.num_mel_bins, 3000, generator=gen)
    with torch.no_grad():
        ours = whisper(mel)
        ref = openai_encoder_states(sd, ckpt["dims"], mel)
    assert ours.shape == (1, 1500, cfg.model.audio.hidden_states, cfg.model.audio.d_model)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()
