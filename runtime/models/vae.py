"""The SD VAE (sd-vae-ft-mse shape) as MuseTalk uses it, split into exportable halves."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from torch import nn

from talkrt.config import ModelConfig


def vae_diffusers_config(model: ModelConfig) -> dict:
    """The ``config.json`` of the diffusers-format ``sd-vae`` folder for this architecture."""
    v = model.vae
    n = len(v.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": list(v.block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": v.latent_channels,
        "layers_per_block": v.layers_per_block,
        "norm_num_groups": v.norm_num_groups,
        "sample_size": model.crop_size,
        "scaling_factor": v.scaling_factor,
    }


def build_vae(vae_json: dict) -> AutoencoderKL:
    kwargs = {k: v for k, v in vae_json.items() if not k.startswith("_")}
    return AutoencoderKL(**kwargs)


class VaeEncoder(nn.Module):
    """``images [B,3,S,S] in [-1,1] -> scaled latents [B,4,S/8,S/8]``.

    MuseTalk samples the posterior; talkrt takes its mean so that avatar preparation is
    deterministic (the posterior's std is ~1e-3 of the latent range for sd-vae-ft-mse).
    """

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean = moments[:, : moments.shape[1] // 2]
        return mean * self.scaling_factor


class VaeDecoder(nn.Module):
    """``scaled latents [B,4,h,w] -> RGB faces [B,S,S,3]`` as floats in [0, 255] (not yet rounded).

    Rounding to uint8 is left to the caller so that exported graphs keep float outputs.
    """

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.decoder = vae.decoder
        self.post_quant_conv = vae.post_quant_conv
        self.inv_scaling = 1.0 / float(vae.config.scaling_factor)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents * self.inv_scaling
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        image = self.decoder(z)
        image = (image * 127.5 + 127.5).clamp(0.0, 255.0)
        return image.permute(0, 2, 3, 1)
