"""One export spec per network: tensor names and shapes, batch profile, sample inputs, module.

The same specs drive ONNX export, TensorRT profiles, the compiled backend's batch buckets
and the run-time engines, so names and shapes are defined once.  Each model family supplies
its own set (``ModelFamily.engine_specs``; MuseTalk's is :func:`musetalk_specs`, LatentSync's
:func:`talkrt.families.latentsync_engines.latentsync_specs`), and :func:`export_specs` asks the
config's family::

    specs = export_specs(cfg)                 # {"unet": ModelSpec, "vae_decoder": ..., ...}
    spec = specs["unet"]
    module = spec.make_module(models)         # nn.Module from LipSyncModels
    feeds = spec.sample_inputs(4, device=dev, dtype=torch.float16)

Batch buckets are powers of two up to the max batch (plus the max batch itself when it is
not a power of two), from the profile's ``min`` on.  The default max batch is ``max(pipeline.batch_size, 32)`` capped at
``MAX_BATCH_CAP``; Whisper takes 30 s audio segments, at most ``WHISPER_MAX_BATCH`` per call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from talkrt.config import TalkrtConfig
from talkrt.engines.base import TensorSpec
from talkrt.models.audio import SEGMENT_STEPS

MODEL_NAMES = ("unet", "vae_decoder", "vae_encoder", "whisper")
ENGINE_MODELS = ("unet", "vae_decoder", "vae_encoder")   # the ones compiled / built as plans
MIN_DEFAULT_MAX_BATCH = 32
MAX_BATCH_CAP = 128
WHISPER_MAX_BATCH = 8        # AudioFeatures.segments_per_batch
SAMPLE_SEED = 1234


@dataclass(frozen=True)
class BatchProfile:
    """TensorRT-style optimisation profile over the batch axis."""

    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"batch profile needs 1 <= min <= opt <= max, got {self}")


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """``(1, 2, 4, ..., max_batch)``: powers of two below ``max_batch``, then ``max_batch``."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(b)
        b *= 2
    buckets.append(max_batch)
    return tuple(buckets)


def default_max_batch(cfg: TalkrtConfig) -> int:
    """The largest batch engines are built for unless ``--max-batch`` says otherwise."""
    return min(max(cfg.pipeline.batch_size, MIN_DEFAULT_MAX_BATCH), MAX_BATCH_CAP)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to export, build and run one network."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profile: BatchProfile
    make_module: Callable[[object], nn.Module]       # LipSyncModels -> nn.Module
    input_ranges: tuple[tuple[str, float], ...]      # per input: ("normal", std), ("uniform", half-width)
                                                     # or ("steps", n): integers in [0, n) (diffusion timesteps)

    @property
    def buckets(self) -> tuple[int, ...]:
        """``batch_buckets(profile.max)`` from ``profile.min`` on (a network run at fixed sizes has min = max)."""
        return tuple(b for b in batch_buckets(self.profile.max) if b >= self.profile.min)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.outputs)

    def with_max_batch(self, max_batch: int) -> "ModelSpec":
        """The same spec with its profile clipped or extended to ``max_batch``."""
        opt = min(self.profile.opt, max_batch)
        return dataclasses.replace(self, profile=BatchProfile(1, opt, max_batch))

    def sample_inputs(self, batch: int, *, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32, seed: int = SAMPLE_SEED) -> dict[str, torch.Tensor]:
        """Fresh random inputs (fixed seed, generated on the CPU so every device sees the same)."""
        gen = torch.Generator().manual_seed(seed)
        feeds = {}
        for spec, (kind, scale) in zip(self.inputs, self.input_ranges):
            shape = spec.concrete_shape(batch)
            if kind == "normal":
                x = torch.randn(shape, generator=gen) * scale
            elif kind == "steps":
                x = torch.randint(0, int(scale), shape, generator=gen).float()
            else:
                x = (torch.rand(shape, generator=gen) * 2 - 1) * scale
            feeds[spec.name] = x.to(device=device, dtype=dtype)
        return feeds


def _family(cfg):
    from talkrt.families import config_family, get_family     # families import the engines: imported late
    return get_family(config_family(cfg))


def export_specs(cfg, max_batch: int | None = None) -> dict[str, ModelSpec]:
    """The specs of ``cfg``'s model family (``ModelFamily.engine_specs``), keyed by model name.

    ``max_batch``: the largest batch of the networks whose batch the run chooses (MuseTalk's);
    a family whose networks run at sizes its config fixes (LatentSync) ignores it."""
    return _family(cfg).engine_specs(cfg, max_batch)


def engine_models(cfg) -> tuple[str, ...]:
    """The models of ``cfg``'s family built as engines, of those its specs hold (MuseTalk: ``ENGINE_MODELS``)."""
    specs = export_specs(cfg)
    return tuple(n for n in _family(cfg).engine_models if n in specs)


def engine_backends(cfg) -> tuple[str, ...]:
    """The build backends ``cfg``'s family supports (of ``onnx``, ``tensorrt``, ``compiled``)."""
    return tuple(_family(cfg).engine_backends)


def musetalk_specs(cfg: TalkrtConfig, max_batch: int | None = None) -> dict[str, ModelSpec]:
    """Specs of MuseTalk's four networks for ``cfg``, keyed by ``MODEL_NAMES``."""
    m = cfg.model
    max_batch = max_batch or default_max_batch(cfg)
    opt = min(cfg.pipeline.batch_size, max_batch)
    lat, size, a = m.latent_size, m.crop_size, m.audio
    main = BatchProfile(1, opt, max_batch)
    whisper_max = min(max_batch, WHISPER_MAX_BATCH)
    latent_in = TensorSpec("latent_input", ("batch", m.unet.in_channels, lat, lat))
    audio = TensorSpec("audio_features", ("batch", a.tokens_per_frame, a.d_model))
    latents = TensorSpec("latents", ("batch", m.vae.latent_channels, lat, lat))
    specs = [
        ModelSpec("unet", (latent_in, audio),
                  (TensorSpec("pred_latents", ("batch", m.unet.out_channels, lat, lat)),),
                  main, lambda models: models.unet, (("normal", 1.0), ("normal", 1.0))),
        ModelSpec("vae_decoder", (latents,), (TensorSpec("faces", ("batch", size, size, 3)),),
                  main, lambda models: models.vae_decoder, (("normal", 1.0),)),
        ModelSpec("vae_encoder", (TensorSpec("images", ("batch", 3, size, size)),), (latents,),
                  main, lambda models: models.vae_encoder, (("uniform", 1.0),)),
        ModelSpec("whisper", (TensorSpec("mel", ("batch", a.num_mel_bins, 2 * SEGMENT_STEPS)),),
                  (TensorSpec("hidden_states", ("batch", SEGMENT_STEPS, a.hidden_states, a.d_model)),),
                  BatchProfile(1, 1, whisper_max), lambda models: models.whisper, (("uniform", 1.0),)),
    ]
    return {s.name: s for s in specs}
