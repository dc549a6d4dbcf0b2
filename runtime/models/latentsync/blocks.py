"""Building blocks of LatentSync's 3-D UNet on diffusers' 2-D parts, with upstream's norm placement.

Activations are kept frame-major, ``[(b f), c, h, w]`` (``b`` clips of ``f`` frames), so every
convolution and spatial attention runs on the frames as a plain 2-D batch. What makes the
network 3-D is where statistics and attention span frames (LatentSync ``latentsync/models``,
with ``use_inflated_groupnorm: false`` as in every shipped config):

* resnet GroupNorms (and ``conv_norm_out``) are ``nn.GroupNorm`` applied to the 5-D tensor
  ``[b, c, f, h, w]``: mean and variance pool over all ``f`` frames of a clip
  (:func:`group_norm_frames`);
* the spatial transformer's GroupNorm and LayerNorms, and the temporal transformer's
  GroupNorm, see one frame at a time (plain ``nn.GroupNorm`` on the 2-D batch);
* the temporal ("motion") module attends across the ``f`` frames at each pixel, with a
  sinusoidal position table added to its input (AnimateDiff's ``VanillaTemporalModule``).

Parameter and buffer names match upstream's, so an official state dict loads strictly.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import BasicTransformerBlock, FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from talkrt.models.unet import sinusoidal_encoding
from torch import nn


def group_norm_frames(x: torch.Tensor, frames: int, norm: nn.GroupNorm) -> torch.Tensor:
    """``norm`` with statistics pooled over the frames of each clip.

    ``x [(b f), c, h, w] -> same shape``; equal to ``norm`` applied to ``[b, c, f, h, w]``.
    The per-(clip, channel) scale and shift are formed in float32 and applied in one
    multiply-add in ``x``'s dtype, so half precision needs no float32 copy of ``x``.
    """
    bf, c, h, w = x.shape
    b, g = bf // frames, norm.num_groups
    var, mean = torch.var_mean(x.reshape(b, frames, g, -1), dim=(1, 3), correction=0, keepdim=True)
    scale = torch.rsqrt(var.float() + norm.eps).expand(b, 1, g, c // g)            # [b, 1, g, c/g]
    shift = -mean.float() * scale
    if norm.affine:
        weight = norm.weight.float().reshape(1, 1, g, c // g)
        scale, shift = scale * weight, shift * weight + norm.bias.float().reshape(1, 1, g, c // g)
    y = torch.addcmul(shift.reshape(b, 1, c, 1).to(x.dtype), x.reshape(b, frames, c, h * w),
                      scale.reshape(b, 1, c, 1).to(x.dtype))
    return y.reshape(bf, c, h, w)


class FrameResnet(ResnetBlock2D):
    """diffusers' ``ResnetBlock2D`` (same parameters) whose two GroupNorms pool over frames.

    ``forward(x [(b f), cin, h, w], temb [b, temb_channels], frames) -> [(b f), cout, h, w]``.
    """

    def forward(self, x: torch.Tensor, temb: torch.Tensor, frames: int) -> torch.Tensor:  # type: ignore[override]
        h = self.conv1(self.nonlinearity(group_norm_frames(x, frames, self.norm1)))
        t = self.time_emb_proj(self.nonlinearity(temb)).repeat_interleave(frames, dim=0)
        h = h + t[:, :, None, None].to(h.dtype)
        h = self.conv2(self.dropout(self.nonlinearity(group_norm_frames(h, frames, self.norm2))))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return (skip + h) / self.output_scale_factor


class SpatialTransformer(nn.Module):
    """Per-frame self-attention plus cross-attention on the frame's audio tokens (upstream
    ``Transformer3DModel`` with ``add_audio_layer``, ``use_linear_projection: false``).

    ``forward(x [(b f), c, h, w], context [(b f), T, D]) -> [(b f), c, h, w]``.
    """

    def __init__(self, channels: int, heads: int, cross_attention_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(
            channels, heads, channels // heads, cross_attention_dim=cross_attention_dim,
            activation_fn="geglu", attention_bias=False)])
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        bf, c, h, w = x.shape
        y = self.proj_in(self.norm(x)).permute(0, 2, 3, 1).reshape(bf, h * w, c)
        for block in self.transformer_blocks:
            y = block(y, encoder_hidden_states=context)
        return self.proj_out(y.reshape(bf, h, w, c).permute(0, 3, 1, 2)) + x


class TemporalPositions(nn.Module):
    """The persistent ``pe [1, max_frames, dim]`` table (sin on even, cos on odd channels)."""

    def __init__(self, dim: int, max_frames: int):
        super().__init__()
        self.register_buffer("pe", sinusoidal_encoding(max_frames, dim)[None])


class TemporalAttention(Attention):
    """Self-attention over frames; its input gets the temporal position table added first.

    ``forward(y [(b h w), f, c]) -> [(b h w), f, c]``; ``f`` may not exceed the table length.
    """

    def __init__(self, dim: int, heads: int, max_frames: int):
        super().__init__(query_dim=dim, heads=heads, dim_head=dim // heads, bias=False)
        self.pos_encoder = TemporalPositions(dim, max_frames)

    def forward(self, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        frames = y.shape[1]
        if frames > self.pos_encoder.pe.shape[1]:
            raise ValueError(f"{frames} frames in a chunk; the temporal layers take at most "
                             f"{self.pos_encoder.pe.shape[1]}")
        return super().forward(y + self.pos_encoder.pe[:, :frames].to(y.dtype))


class TemporalBlock(nn.Module):
    """Pre-norm temporal self-attentions then a GEGLU feed-forward, residual each (upstream
    ``TemporalTransformerBlock``). Works on ``[(b h w), f, c]``."""

    def __init__(self, dim: int, heads: int, attention_blocks: int, max_frames: int):
        super().__init__()
        self.attention_blocks = nn.ModuleList([TemporalAttention(dim, heads, max_frames)
                                               for _ in range(attention_blocks)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(attention_blocks)])
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        for attention, norm in zip(self.attention_blocks, self.norms):
            y = attention(norm(y)) + y
        return self.ff(self.ff_norm(y)) + y


class TemporalTransformer(nn.Module):
    """Per-frame GroupNorm, linear in, temporal blocks, linear out, residual (upstream
    ``TemporalTransformer3DModel``)."""

    def __init__(self, channels: int, heads: int, attention_blocks: int, max_frames: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([TemporalBlock(channels, heads, attention_blocks, max_frames)])
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        bf, c, h, w = x.shape
        b = bf // frames
        # LayerNorms and the feed-forward act per token, so the whole block stays in the temporal
        # layout; upstream switches layouts around each attention, with the same result.
        y = self.norm(x).reshape(b, frames, c, h * w).permute(0, 3, 1, 2).reshape(b * h * w, frames, c)
        y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y)
        y = self.proj_out(y).reshape(b, h * w, frames, c).permute(0, 2, 3, 1).reshape(bf, c, h, w)
        return y + x


class MotionModule(nn.Module):
    """The AnimateDiff-style temporal layer after a resnet/attention pair: ``forward(x, frames)``."""

    def __init__(self, channels: int, heads: int, attention_blocks: int, max_frames: int, groups: int):
        super().__init__()
        self.temporal_transformer = TemporalTransformer(channels, heads, attention_blocks, max_frames, groups)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        return self.temporal_transformer(x, frames)
