"""The sub-pixel upsampling rewrite (talkrt.models.subpixel) and the compiled backend's settings."""

import argparse

import pytest
import torch
from diffusers.models.upsampling import Upsample2D

from talkrt.config import load_config
from talkrt.engines.compiled import (
    CompileSettings, add_compile_arguments, apply_rewrites, settings_from_args,
)
from talkrt.errors import EngineError
from talkrt.models.subpixel import SubpixelUpsample, ineligible_reason, rewrite_upsamplers
from talkrt.models.weights import build_synthetic


@pytest.fixture(scope="module")
def tiny_models():
    return build_synthetic(load_config("tiny")).to(torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("height,width", [(1, 1), (5, 7), (8, 8), (2, 9)])
@pytest.mark.parametrize("bias", [True, False])
def test_subpixel_equals_nearest_upsample_then_conv(height, width, bias):
    torch.manual_seed(height * 10 + width)
    upsampler = Upsample2D(6, use_conv=True, out_channels=5, bias=bias).double()
    rewritten = SubpixelUpsample(upsampler)
    x = torch.randn(3, 6, height, width, dtype=torch.float64)
    expected, got = upsampler(x), rewritten(x)
    assert got.shape == expected.shape == (3, 5, 2 * height, 2 * width)
    # float64, the same products summed in another order: agreement to rounding of ~1e-15
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)


def test_subpixel_explicit_output_size_uses_the_original_pair():
    upsampler = Upsample2D(4, use_conv=True).double()
    rewritten = SubpixelUpsample(upsampler)
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    assert torch.equal(rewritten(x, (5, 7)), upsampler(x, (5, 7)))          # odd size: not a 2x grid
    assert torch.allclose(rewritten(x, (6, 6)), upsampler(x), atol=1e-12)   # 2x: the rewritten path


@pytest.mark.parametrize("kwargs,reason", [
    ({"use_conv": False}, "no plain convolution"),
    ({"use_conv": True, "use_conv_transpose": True}, "no plain convolution"),
    ({"use_conv": True, "interpolate": False}, "does not interpolate"),
    ({"use_conv": True, "norm_type": "ln_norm", "eps": 1e-5, "elementwise_affine": True}, "norm"),
    ({"use_conv": True, "kernel_size": 5, "padding": 2}, "not 3x3"),
])
def test_ineligible_upsamplers_are_named_and_refused(kwargs, reason):
    upsampler = Upsample2D(4, **kwargs)
    assert reason in ineligible_reason(upsampler)
    with pytest.raises(ValueError, match=reason):
        SubpixelUpsample(upsampler)
    _, count = rewrite_upsamplers(torch.nn.Sequential(upsampler))
    assert count == 0


@pytest.mark.parametrize("name", ["vae_decoder", "unet"])
def test_rewrite_keeps_outputs_and_leaves_the_original_alone(tiny_models, name):
    module = getattr(tiny_models, name)
    before = sum(type(m).__name__ == "Upsample2D" for m in module.modules())
    rewritten, count = rewrite_upsamplers(module)
    assert before > 0 and count == before
    assert sum(isinstance(m, SubpixelUpsample) for m in rewritten.modules()) == count
    assert not any(isinstance(m, SubpixelUpsample) for m in module.modules())      # original untouched
    shared = {p.data_ptr() for p in module.parameters()}
    assert all(p.data_ptr() in shared for n, p in rewritten.named_parameters()
               if not n.endswith(("upsamplers.0.weight", "upsamplers.0.bias")))   # weights shared, not copied
    torch.manual_seed(0)
    if name == "vae_decoder":
        feeds = (torch.randn(2, 4, 32, 32),)
    else:
        a = load_config("tiny").model.audio
        feeds = (torch.randn(2, 8, 32, 32), torch.randn(2, a.tokens_per_frame, a.d_model))
    with torch.no_grad():
        expected, got = module(*feeds), rewritten(*feeds)
    # float32 through the whole tiny network; only accumulation order differs in 3 layers
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= 1e-4 * max(scale, 1.0)


def test_compile_settings_validate_and_round_trip_through_the_manifest():
    with pytest.raises(EngineError, match="unknown graph rewrite"):
        CompileSettings(rewrites=("fuse_everything",))
    settings = CompileSettings("default", ("subpixel_upsample",))
    fields = settings.manifest_fields()
    assert fields == {"compile_mode": "default", "rewrites": ["subpixel_upsample"]}
    assert CompileSettings.from_manifest(fields) == settings
    with pytest.raises(KeyError):               # settings a manifest lacks are never guessed
        CompileSettings.from_manifest({"compile_mode": "default"})


def test_compile_arguments_parse_rewrites():
    parser = argparse.ArgumentParser()
    add_compile_arguments(parser)
    assert settings_from_args(parser.parse_args([])) == CompileSettings()
    assert settings_from_args(parser.parse_args(["--rewrites", "none"])).rewrites == ()
    with pytest.raises(EngineError, match="unknown graph rewrite"):
        settings_from_args(parser.parse_args(["--rewrites", "subpixel_upsample,bogus"]))


def test_apply_rewrites_with_none_returns_the_module(tiny_models):
    assert apply_rewrites(tiny_models.vae_decoder, ()) is tiny_models.vae_decoder
