"""MuseTalk v1.5 UNet: diffusers ``UNet2DConditionModel`` plus the audio positional encoding.

MuseTalk runs the UNet as a single-step inpainter: timestep fixed at 0, input the
concatenation [masked-face latent, reference latent] (8 channels), cross-attention on
Whisper audio features to which a sinusoidal positional encoding is added first.
"""

from __future__ import annotations

import math

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from talkrt.config import ModelConfig


def unet_diffusers_config(model: ModelConfig) -> dict:
    """The ``musetalk.json`` that describes this UNet (the official file has the same keys)."""
    u = model.unet
    return {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "attention_head_dim": u.attention_head_dim,
        "block_out_channels": list(u.block_out_channels),
        "center_input_sample": False,
        "cross_attention_dim": model.audio.d_model,
        "down_block_types": list(u.down_block_types),
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": u.in_channels,
        "layers_per_block": u.layers_per_block,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": u.norm_num_groups,
        "out_channels": u.out_channels,
        "sample_size": model.latent_size,
        "up_block_types": list(u.up_block_types),
    }


def build_unet(unet_json: dict) -> UNet2DConditionModel:
    """Instantiate the diffusers UNet from a ``musetalk.json``-style dict (random weights)."""
    kwargs = {k: v for k, v in unet_json.items() if not k.startswith("_")}
    return UNet2DConditionModel(**kwargs)


def sinusoidal_encoding(length: int, d_model: int) -> torch.Tensor:
    """MuseTalk's positional table: sin on even channels, cos on odd channels, base 10000."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model)
    table[:, 0::2] = torch.sin(position * div_term)
    table[:, 1::2] = torch.cos(position * div_term)
    return table


class LipSyncUNet(nn.Module):
    """One denoising step at t=0: ``(latent_input [B,8,h,w], audio [B,T,D]) -> latents [B,4,h,w]``.

    The timestep and the positional encoding are buffers, so exported graphs bake them in.
    """

    def __init__(self, unet: UNet2DConditionModel, tokens_per_frame: int):
        super().__init__()
        self.unet = unet
        d_model = unet.config.cross_attention_dim
        self.register_buffer("positional_encoding", sinusoidal_encoding(tokens_per_frame, d_model)[None])
        self.register_buffer("timestep", torch.zeros((), dtype=torch.long))

    def forward(self, latent_input: torch.Tensor, audio_features: torch.Tensor) -> torch.Tensor:
        audio = audio_features + self.positional_encoding.to(audio_features.dtype)
        return self.unet(latent_input, self.timestep, encoder_hidden_states=audio, return_dict=False)[0]
