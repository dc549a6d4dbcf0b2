"""LatentSync 1.6's UNet (upstream ``UNet3DConditionModel``, ``configs/unet/stage2_512.yaml``).

Structure: ``conv_in`` (13 -> 320), time embedding (320 -> 1280), four down blocks (three with
audio cross-attention, the last plain), a cross-attention mid block, four up blocks (the first
plain, three with cross-attention), ``conv_norm_out``/SiLU/``conv_out`` (320 -> 4). Each
down/up layer is resnet -> [spatial transformer] -> [temporal motion module]; motion modules sit
at the resolutions listed in the config (all four), none in the mid block.

The call matches upstream's shapes::

    forward(sample [b, 13, f, h, w], timestep (scalar or [b]),
            encoder_hidden_states [(b f), T, D] or [b, f, T, D]) -> noise prediction [b, 4, f, h, w]

with ``f <= motion_max_frames`` (16 in a chunk), ``T = 50`` audio tokens of ``D = 384``. Inside,
activations are ``[(b f), c, h, w]`` (see :mod:`talkrt.models.latentsync.blocks`).

DeepCache (Ma et al., 2023; upstream enables ``DeepCacheSDHelper`` with ``cache_interval=3,
cache_branch_id=0``): on a cached step every block is replayed from the last full step except
the final layer of the last up block, which takes the cached features and the current
``conv_in`` output as its skip connection. :meth:`forward_full` returns those features,
:meth:`forward_shallow` consumes them; both are plain tensor-in/tensor-out calls, so each can be
compiled or captured as its own graph.
"""

from __future__ import annotations

import torch
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.upsampling import Upsample2D
from talkrt.models.latentsync.blocks import (
    FrameResnet,
    MotionModule,
    SpatialTransformer,
    group_norm_frames,
)
from talkrt.models.latentsync.config import LatentSyncModelConfig, LatentSyncUNetConfig
from torch import nn


class _Parts:
    """Constructors of one UNet's resnets, transformers and motion modules (shared settings)."""

    def __init__(self, u: LatentSyncUNetConfig, temb_channels: int, cross_attention_dim: int):
        self.u, self.temb, self.cross = u, temb_channels, cross_attention_dim

    def resnet(self, cin: int, cout: int) -> FrameResnet:
        return FrameResnet(in_channels=cin, out_channels=cout, temb_channels=self.temb, groups=self.u.norm_num_groups,
                           eps=self.u.norm_eps, non_linearity="silu")

    def attention(self, channels: int) -> SpatialTransformer:
        return SpatialTransformer(channels, self.u.attention_heads, self.cross, self.u.norm_num_groups)

    def motion(self, channels: int, enabled: bool) -> MotionModule | None:
        u = self.u
        return MotionModule(channels, u.motion_heads, u.motion_attention_blocks, u.motion_max_frames,
                            u.norm_num_groups) if enabled else None


class _Layers(nn.Module):
    """``resnets``, optional ``attentions`` and ``motion_modules`` (``None`` entries hold no weights)."""

    def run_layer(self, j: int, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor,
                  frames: int) -> torch.Tensor:
        x = self.resnets[j](x, temb, frames)
        if self.attentions is not None:
            x = self.attentions[j](x, context)
        motion = self.motion_modules[j]
        return x if motion is None else motion(x, frames)


class DownBlock(_Layers):
    def __init__(self, parts: _Parts, cin: int, cout: int, cross: bool, motion: bool, downsample: bool):
        super().__init__()
        n = parts.u.layers_per_block
        self.resnets = nn.ModuleList([parts.resnet(cin if j == 0 else cout, cout) for j in range(n)])
        self.attentions = nn.ModuleList([parts.attention(cout) for _ in range(n)]) if cross else None
        self.motion_modules = nn.ModuleList([parts.motion(cout, motion) for _ in range(n)])
        self.downsamplers = (nn.ModuleList([Downsample2D(cout, use_conv=True, out_channels=cout, padding=1, name="op")])
                             if downsample else None)

    def forward(self, x, temb, context, frames) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for j in range(len(self.resnets)):
            x = self.run_layer(j, x, temb, context, frames)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    def __init__(self, parts: _Parts, channels: int):
        super().__init__()
        self.resnets = nn.ModuleList([parts.resnet(channels, channels), parts.resnet(channels, channels)])
        self.attentions = nn.ModuleList([parts.attention(channels)])
        self.motion_modules = nn.ModuleList([None])

    def forward(self, x, temb, context, frames) -> torch.Tensor:
        x = self.resnets[0](x, temb, frames)
        return self.resnets[1](self.attentions[0](x, context), temb, frames)


class UpBlock(_Layers):
    """``layers_per_block + 1`` layers, each taking one skip tensor (the last first)."""

    def __init__(self, parts: _Parts, cin: int, cprev: int, cout: int, cross: bool, motion: bool, upsample: bool):
        super().__init__()
        n = parts.u.layers_per_block + 1
        self.resnets = nn.ModuleList([
            parts.resnet((cprev if j == 0 else cout) + (cin if j == n - 1 else cout), cout) for j in range(n)])
        self.attentions = nn.ModuleList([parts.attention(cout) for _ in range(n)]) if cross else None
        self.motion_modules = nn.ModuleList([parts.motion(cout, motion) for _ in range(n)])
        self.upsamplers = nn.ModuleList([Upsample2D(cout, use_conv=True, out_channels=cout)]) if upsample else None

    def forward(self, x, skips: list[torch.Tensor], temb, context, frames, start: int = 0,
                stop: int | None = None) -> torch.Tensor:
        """Layers ``start..stop-1``, taking ``skips`` from the end, one per layer; upsample after the last."""
        n = len(self.resnets)
        stop = n if stop is None else stop
        for k, j in enumerate(range(start, stop)):
            x = self.run_layer(j, torch.cat([x, skips[-1 - k]], dim=1), temb, context, frames)
        if stop == n and self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class LatentSyncUNet(nn.Module):
    """The denoising UNet; see the module docstring for shapes and the DeepCache split."""

    def __init__(self, model: LatentSyncModelConfig):
        super().__init__()
        u = model.unet
        ch = list(u.block_out_channels)
        n = len(ch)
        temb = ch[0] * 4
        parts = _Parts(u, temb, model.cross_attention_dim)
        self.max_frames = u.motion_max_frames
        self.conv_in = nn.Conv2d(u.in_channels, ch[0], kernel_size=3, padding=1)
        self.time_proj = Timesteps(ch[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.down_blocks = nn.ModuleList([
            DownBlock(parts, ch[max(i - 1, 0)], ch[i], kind == "CrossAttnDownBlock3D",
                      2 ** i in u.motion_module_resolutions, downsample=i < n - 1)
            for i, kind in enumerate(u.down_block_types)])
        self.mid_block = MidBlock(parts, ch[-1])
        rev = ch[::-1]
        self.up_blocks = nn.ModuleList([
            UpBlock(parts, rev[min(i + 1, n - 1)], rev[max(i - 1, 0)], rev[i], kind == "CrossAttnUpBlock3D",
                    2 ** (n - 1 - i) in u.motion_module_resolutions, upsample=i < n - 1)
            for i, kind in enumerate(u.up_block_types)])
        self.conv_norm_out = nn.GroupNorm(u.norm_num_groups, ch[0], eps=u.norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[0], u.out_channels, kernel_size=3, padding=1)

    def _prepare(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor):
        if sample.dim() != 5:
            raise ValueError(f"sample must be [b, c, f, h, w], got shape {tuple(sample.shape)}")
        b, c, f, h, w = sample.shape
        if f > self.max_frames:
            raise ValueError(f"{f} frames in a chunk; the temporal layers take at most {self.max_frames}")
        x = sample.transpose(1, 2).reshape(b * f, c, h, w)
        context = encoder_hidden_states.reshape(b * f, *encoder_hidden_states.shape[-2:])
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1)
        if t.numel() not in (1, b):
            raise ValueError(f"timestep must be a scalar or have {b} entries, got {t.numel()}")
        t = t.expand(b)
        emb = self.time_embedding(self.time_proj(t).to(sample.dtype))
        return x, context, emb, (b, f, h, w)

    def _finish(self, x: torch.Tensor, shape) -> torch.Tensor:
        b, f, h, w = shape
        x = self.conv_out(self.conv_act(group_norm_frames(x, f, self.conv_norm_out)))
        return x.reshape(b, f, -1, h, w).transpose(1, 2)

    def forward_full(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Full step: ``(noise prediction [b, 4, f, h, w], deep features [(b f), c0, h, w])``."""
        x, context, emb, shape = self._prepare(sample, timestep, encoder_hidden_states)
        f = shape[1]
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, s = block(x, emb, context, f)
            skips += s
        x = self.mid_block(x, emb, context, f)
        for block in self.up_blocks[:-1]:
            k = len(block.resnets)
            x = block(x, skips[-k:], emb, context, f)
            skips = skips[:-k]
        last = self.up_blocks[-1]
        deep = last(x, skips[1:], emb, context, f, stop=len(last.resnets) - 1)
        out = last(deep, skips[:1], emb, context, f, start=len(last.resnets) - 1)
        return self._finish(out, shape), deep

    def forward_shallow(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                        deep: torch.Tensor) -> torch.Tensor:
        """DeepCache step: only the last up block's final layer, on ``deep`` from :meth:`forward_full`
        (same batch and frames) and this sample's ``conv_in`` output."""
        x, context, emb, shape = self._prepare(sample, timestep, encoder_hidden_states)
        last = self.up_blocks[-1]
        out = last(deep, [self.conv_in(x)], emb, context, shape[1], start=len(last.resnets) - 1)
        return self._finish(out, shape)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.forward_full(sample, timestep, encoder_hidden_states)[0]


class UNetFullStep(nn.Module):
    """:meth:`LatentSyncUNet.forward_full` as a tensor-only step with per-sample deep features:
    ``(sample [b, 13, f, h, w], timestep [b], audio [b, f, T, D]) -> (noise prediction
    [b, 4, f, h, w], deep [b, f, c0, h, w])``. Every tensor has the batch first, so it runs as an
    engine (:mod:`talkrt.families.latentsync_engines`); batch rows (the guidance branches) are
    independent, frames are not (temporal layers)."""

    def __init__(self, unet: LatentSyncUNet):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, audio: torch.Tensor):
        eps, deep = self.unet.forward_full(sample, timestep, audio)
        return eps, deep.reshape(sample.shape[0], sample.shape[2], *deep.shape[1:])


class UNetShallowStep(nn.Module):
    """:meth:`LatentSyncUNet.forward_shallow` on :class:`UNetFullStep`'s deep features:
    ``(sample, timestep [b], audio [b, f, T, D], deep [b, f, c0, h, w]) -> noise prediction``."""

    def __init__(self, unet: LatentSyncUNet):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, audio: torch.Tensor,
                deep: torch.Tensor) -> torch.Tensor:
        return self.unet.forward_shallow(sample, timestep, audio, deep.flatten(0, 1))
