"""Typed, frozen configuration of the LatentSync 1.6 model family, validated once.

``load_latentsync_config("latentsync16")`` reads ``configs/latentsync16.yaml`` (or any YAML of
the same shape) with the shared reader of :mod:`talkrt.config`; the ``pipeline`` section is
talkrt's :class:`~talkrt.config.PipelineConfig` and the VAE section its
:class:`~talkrt.config.VAEConfig`, so everything outside the model reads the same keys for
every family. The architecture facts come from LatentSync's ``configs/unet/stage2_512.yaml``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from talkrt.config import (
    PipelineConfig,
    VAEConfig,
    WhisperEncoderConfig,
    build_config,
    pipeline_checks,
)
from talkrt.errors import ConfigError

FAMILY = "latentsync16"
DOWN_BLOCKS = ("CrossAttnDownBlock3D", "DownBlock3D")
UP_BLOCKS = ("CrossAttnUpBlock3D", "UpBlock3D")


@dataclass(frozen=True)
class LatentSyncUNetConfig:
    """The 3-D UNet (upstream ``UNet3DConditionModel`` with ``add_audio_layer``)."""

    in_channels: int                    # 13 = noisy latent 4 + mask 1 + masked-image latent 4 + reference latent 4
    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    attention_heads: int                # upstream's "attention_head_dim: 8" is the number of heads
    norm_num_groups: int                # resnets, spatial and temporal transformers (upstream: 32 everywhere)
    norm_eps: float
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    motion_module_resolutions: tuple[int, ...]   # down block i has resolution 2**i, up block i 2**(n-1-i)
    motion_heads: int
    motion_attention_blocks: int        # "Temporal_Self" attentions per temporal transformer block
    motion_max_frames: int              # length of the sinusoidal temporal position table


@dataclass(frozen=True)
class LatentSyncAudioConfig(WhisperEncoderConfig):
    """Whisper encoder shape plus LatentSync's window rule and talkrt's segment overlap."""

    window_before_steps: int            # frame i takes steps [c - before, c - before + window_steps)
    window_steps: int
    segment_overlap_steps: int          # overlap of consecutive 30-s Whisper segments (cross-faded)

    @property
    def tokens_per_frame(self) -> int:
        return self.window_steps * self.hidden_states


@dataclass(frozen=True)
class DenoiseConfig:
    """Sampling settings (upstream ``scripts/inference.py`` and ``inference.sh`` defaults)."""

    steps: int = 20
    guidance_scale: float = 1.5
    deepcache: bool = True
    deepcache_interval: int = 3
    noise_seed: int = 1247


@dataclass(frozen=True)
class LatentSyncModelConfig:
    crop_size: int
    frames_per_chunk: int
    unet: LatentSyncUNetConfig
    vae: VAEConfig
    audio: LatentSyncAudioConfig
    denoise: DenoiseConfig

    @property
    def latent_size(self) -> int:
        return self.crop_size // 2 ** (len(self.vae.block_out_channels) - 1)

    @property
    def cross_attention_dim(self) -> int:
        """The UNet attends to Whisper states directly, so its context width is Whisper's."""
        return self.audio.d_model


@dataclass(frozen=True)
class LatentSyncConfig:
    """A whole LatentSync config: same top-level shape as :class:`talkrt.config.TalkrtConfig`."""

    name: str
    family: str
    model: LatentSyncModelConfig
    pipeline: PipelineConfig
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def model_hash(self) -> str:
        """Hash of everything that changes model outputs (architecture, window rule, sampling)."""
        blob = json.dumps({"family": self.family, **dataclasses.asdict(self.model)}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _model_checks(m: LatentSyncModelConfig) -> list[tuple[bool, str]]:
    u, v, a, d = m.unet, m.vae, m.audio, m.denoise
    n = len(u.block_out_channels)
    return [
        (m.crop_size > 0 and m.crop_size % 2 ** (len(v.block_out_channels) - 1) == 0,
         "model.crop_size must be a positive multiple of the VAE downsampling factor"),
        (u.in_channels == 3 * v.latent_channels + 1,
         "model.unet.in_channels must be 3 x vae.latent_channels + 1 (noisy, masked and reference latents, mask)"),
        (u.out_channels == v.latent_channels, "model.unet.out_channels must equal vae.latent_channels"),
        (n >= 2 and len(u.down_block_types) == n == len(u.up_block_types),
         "model.unet block lists must have equal lengths (at least 2)"),
        (all(t in DOWN_BLOCKS for t in u.down_block_types), f"model.unet.down_block_types must be in {DOWN_BLOCKS}"),
        (all(t in UP_BLOCKS for t in u.up_block_types), f"model.unet.up_block_types must be in {UP_BLOCKS}"),
        (u.layers_per_block >= 1, "model.unet.layers_per_block must be >= 1"),
        (all(c % u.norm_num_groups == 0 for c in u.block_out_channels),
         "model.unet.block_out_channels must be divisible by norm_num_groups"),
        (all(c % u.attention_heads == 0 and c % u.motion_heads == 0 for c in u.block_out_channels),
         "model.unet.block_out_channels must be divisible by attention_heads and motion_heads"),
        (all(r > 0 and r & (r - 1) == 0 for r in u.motion_module_resolutions),
         "model.unet.motion_module_resolutions must be powers of two"),
        (u.motion_attention_blocks >= 1 and u.motion_max_frames >= 1,
         "model.unet needs motion_attention_blocks >= 1 and motion_max_frames >= 1"),
        (u.norm_eps > 0, "model.unet.norm_eps must be > 0"),
        (1 <= m.frames_per_chunk <= u.motion_max_frames,
         "model.frames_per_chunk must be in [1, unet.motion_max_frames]"),
        (all(c % v.norm_num_groups == 0 for c in v.block_out_channels),
         "model.vae.block_out_channels must be divisible by norm_num_groups"),
        (a.d_model % a.encoder_attention_heads == 0, "model.audio.d_model must be divisible by the head count"),
        (a.window_steps >= 1 and 0 <= a.window_before_steps,
         "model.audio needs window_steps >= 1 and window_before_steps >= 0"),
        (0 <= a.segment_overlap_steps <= 1000, "model.audio.segment_overlap_steps must be in [0, 1000]"),
        (d.steps >= 1, "model.denoise.steps must be >= 1"),
        (d.guidance_scale >= 1.0, "model.denoise.guidance_scale must be >= 1 (1 disables guidance)"),
        (d.deepcache_interval >= 1, "model.denoise.deepcache_interval must be >= 1"),
    ]


def validate_latentsync(cfg: LatentSyncConfig) -> LatentSyncConfig:
    """Check every cross-field constraint once; raise ConfigError naming the field."""
    checks = [(cfg.family == FAMILY, f"family must be '{FAMILY}'"), *_model_checks(cfg.model),
              *pipeline_checks(cfg.pipeline),
              (not cfg.pipeline.sharpen.enabled,
               "pipeline.sharpen.enabled must be false: the LatentSync restore does not sharpen")]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"config '{cfg.source or cfg.name}': {message}")
    return cfg


def load_latentsync_config(name_or_path: str | Path = "latentsync16",
                           overrides: list[str] | None = None) -> LatentSyncConfig:
    """Load, override (dotted ``KEY=VALUE``) and validate a LatentSync config; raises ConfigError."""
    return validate_latentsync(build_config(LatentSyncConfig, name_or_path, overrides))
