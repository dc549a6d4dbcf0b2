"""Engines of the LatentSync family: the UNet's denoising steps and the VAE as ``compiled`` engines.

``make engines CONFIG=latentsync16`` (``python -m talkrt.build_engines --config latentsync16``)
compiles the specs below through the shared machinery (:mod:`talkrt.engines.compiled`: one
ahead-of-time compiled function per (model, bucket), the manifest that refuses a stale build,
the build-time parity check). All sizes are fixed by the config, so ``--max-batch`` does not
apply and each model has one bucket (``F = model.frames_per_chunk``, ``T, D`` the audio tokens):

=============== ============================================================ =====================
name            inputs -> outputs (the model dtype; ``timestep`` holds the   bucket (batch axis)
                integer DDIM step, exact in fp16 below 2048)
=============== ============================================================ =====================
``unet``        ``sample [b,13,F,h,w], timestep [b], audio [b,F,T,D]`` ->      ``b = 2`` with guidance
                ``noise_pred [b,4,F,h,w], deep [b,F,c0,h,w]``                 (unconditional and
                (:class:`~talkrt.models.latentsync.unet.UNetFullStep`)        conditional rows in one
                                                                             call), 1 without
``unet_shallow`` the same plus ``deep`` -> ``noise_pred`` (DeepCache's cached ``b``; only with
                step, :class:`~talkrt.models.latentsync.unet.UNetShallowStep`) ``denoise.deepcache``
``vae_decoder`` ``latents [n,4,h,w] -> faces [n,S,S,3]`` (floats in [0, 255]) ``n = F``
``vae_encoder`` ``images [n,3,S,S] -> latents [n,4,h,w]``                     ``n = 2F`` (masked and
                                                                             reference faces)
=============== ============================================================ =====================

The guidance scale and DeepCache are part of the config's model hash, so a build serves exactly
the denoise settings it was made for; ``--buckets 1,2`` builds both UNet batch variants.

A short last chunk (``f < F`` frames, at most one per video) runs the UNet eagerly (the same
module, same weights): the temporal layers and the per-chunk group norms mix frames, so padding
the chunk to ``F`` would change the real frames' output, and a bucket per frame count would
cost one compile each. The VAE treats frames independently, so a short batch is padded to its
bucket. ONNX and TensorRT are not built for this family (``engine_backends``): an explicit
``--backend tensorrt`` is refused.

At run time :func:`generator_networks` picks the backend once (``compiled`` when asked, or for
``auto`` when a matching build exists; else the eager modules) and hands the generator objects
with the modules' own call signatures (:class:`CompiledUNetSteps`, :class:`EngineCall`), so its
loop never branches on the backend. On CUDA every engine call replays a CUDA graph per bucket
(:mod:`talkrt.engines.graphs`); on the CPU the compiled functions run without graphs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from talkrt.engines.base import Engine, TensorSpec
from talkrt.engines.graphs import check_warmup_policy
from talkrt.engines.select import prebuilt_engines, warn_eager_fallback
from talkrt.engines.specs import BatchProfile, ModelSpec, engine_backends, engine_models
from talkrt.models.latentsync.config import LatentSyncConfig
from talkrt.models.latentsync.unet import LatentSyncUNet, UNetFullStep, UNetShallowStep

log = logging.getLogger(__name__)

ENGINE_MODELS = ("unet", "unet_shallow", "vae_decoder", "vae_encoder")


def guidance_batch(cfg: LatentSyncConfig) -> int:
    """UNet rows per denoising call: 2 with classifier-free guidance (``guidance_scale > 1``), else 1."""
    return 2 if cfg.model.denoise.guidance_scale > 1.0 else 1


def latentsync_specs(cfg: LatentSyncConfig, max_batch: int | None = None) -> dict[str, ModelSpec]:
    """The family's engine specs (table in the module docstring); ``max_batch`` is ignored."""
    m = cfg.model
    f, h, s, a = m.frames_per_chunk, m.latent_size, m.crop_size, m.audio
    c0, lat = m.unet.block_out_channels[0], m.vae.latent_channels
    b = guidance_batch(cfg)
    step = BatchProfile(b, b, b)
    sample = TensorSpec("sample", ("batch", m.unet.in_channels, f, h, h))
    timestep = TensorSpec("timestep", ("batch",))
    audio = TensorSpec("audio", ("batch", f, a.tokens_per_frame, a.d_model))
    noise = TensorSpec("noise_pred", ("batch", m.unet.out_channels, f, h, h))
    deep = TensorSpec("deep", ("batch", f, c0, h, h))
    step_ranges = (("normal", 1.0), ("steps", 1000), ("normal", 1.0))
    latents = TensorSpec("latents", ("batch", lat, h, h))
    specs = [
        ModelSpec("unet", (sample, timestep, audio), (noise, deep), step,
                  lambda models: UNetFullStep(models.unet), step_ranges),
        ModelSpec("vae_decoder", (latents,), (TensorSpec("faces", ("batch", s, s, 3)),), BatchProfile(f, f, f),
                  lambda models: models.vae_decoder, (("normal", 1.0),)),
        ModelSpec("vae_encoder", (TensorSpec("images", ("batch", 3, s, s)),), (latents,),
                  BatchProfile(2 * f, 2 * f, 2 * f), lambda models: models.vae_encoder, (("uniform", 1.0),)),
    ]
    if m.denoise.deepcache:
        specs.insert(1, ModelSpec("unet_shallow", (sample, timestep, audio, deep), (noise,), step,
                                  lambda models: UNetShallowStep(models.unet), (*step_ranges, ("normal", 1.0))))
    return {spec.name: spec for spec in specs}


class EngineCall:
    """An engine called as the one-input module it replaces: ``call(x [n, ...]) -> y [n, ...]``.

    ``n`` above the engine's max batch runs in pieces (rows are independent: the VAE). The result
    may alias the engine's buffers (reused by its next call) unless it was assembled from pieces."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.input, self.output = engine.inputs[0].name, engine.outputs[0].name

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return self.engine.run({self.input: x})[self.output]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        step = self.engine.max_batch
        if x.shape[0] <= step:
            return self._run(x)
        return torch.cat([self._run(x[i:i + step]).clone() for i in range(0, x.shape[0], step)])


class CompiledUNetSteps:
    """:meth:`LatentSyncUNet.forward_full` / :meth:`LatentSyncUNet.forward_shallow` through the
    ``unet`` / ``unet_shallow`` engines, same signatures: ``sample [b, 13, f, h, w]``, ``timestep``
    (a scalar: the step's integer timestep), ``context [b * f, T, D]``.

    ``deep`` is opaque to the caller: ``[b, F, c0, h, w]`` from the engine, the module's own layout
    for a chunk of ``f != frames`` frames, which runs ``unet`` eagerly (see the module docstring);
    a chunk takes one path for all its steps, so the two never mix. ``shallow`` may be None when
    the config runs no DeepCache steps. Outputs alias engine buffers until the next call.
    """

    def __init__(self, full: Engine, shallow: Engine | None, unet: LatentSyncUNet, frames: int):
        self.full, self.shallow, self.unet, self.frames = full, shallow, unet, frames

    @staticmethod
    def _feeds(sample: torch.Tensor, timestep, context: torch.Tensor) -> dict[str, torch.Tensor]:
        b, f = sample.shape[0], sample.shape[2]
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(b)
        return {"sample": sample, "timestep": t, "audio": context.reshape(b, f, *context.shape[-2:])}

    def forward_full(self, sample: torch.Tensor, timestep, context: torch.Tensor):
        if sample.shape[2] != self.frames:
            return self.unet.forward_full(sample, timestep, context)
        out = self.full.run(self._feeds(sample, timestep, context))
        return out["noise_pred"], out["deep"]

    def forward_shallow(self, sample: torch.Tensor, timestep, context: torch.Tensor, deep: torch.Tensor):
        if sample.shape[2] != self.frames:
            return self.unet.forward_shallow(sample, timestep, context, deep)
        return self.shallow.run({**self._feeds(sample, timestep, context), "deep": deep})["noise_pred"]


@dataclass
class GeneratorNetworks:
    """What :class:`~talkrt.models.latentsync.generator.LatentSyncGenerator` calls, and the backend."""

    unet: LatentSyncUNet | CompiledUNetSteps
    vae_encoder: torch.nn.Module | EngineCall
    vae_decoder: torch.nn.Module | EngineCall
    backend: str
    engines: dict[str, Engine]      # empty for eager


def generator_networks(cfg: LatentSyncConfig, models, *, backend: str, device: torch.device, dtype: torch.dtype,
                       engines_dir: str | Path | None, cuda_graphs: bool, warmup: str) -> GeneratorNetworks:
    """The generator's networks for ``backend`` (``auto``, ``compiled``, ``eager``; ``models``: the
    ``LatentSyncModels`` on ``device`` in ``dtype``).

    ``auto`` takes the compiled engines when a build matching this machine and config exists, else
    warns and runs the eager modules. Raises ``EngineError`` for ``tensorrt``, or for ``compiled``
    when the build is missing, stale or fails to load (the message says how to build it)."""
    check_warmup_policy(warmup)
    specs = latentsync_specs(cfg)
    graphs = cuda_graphs and device.type == "cuda"
    engines, chosen, reasons = prebuilt_engines(
        cfg, specs, models, backend=backend, names=engine_models(cfg), supported=engine_backends(cfg),
        device=device, dtype=dtype, engines_dir=engines_dir, cuda_graphs=graphs, warmup=warmup)
    if engines is None:
        if backend == "auto":
            warn_eager_fallback(cfg, engines_dir, False, reasons)
        return GeneratorNetworks(models.unet, models.vae_encoder, models.vae_decoder, "eager", {})
    used_graphs = graphs and all(getattr(e, "cuda_graphs", False) for e in engines.values())
    log.info("LatentSync engines: %s%s for %s (UNet batch %d x %d frames; a shorter chunk runs the UNet eagerly)",
             chosen, " + CUDA graphs" if used_graphs else "", ", ".join(engines), guidance_batch(cfg),
             cfg.model.frames_per_chunk)
    unet = CompiledUNetSteps(engines["unet"], engines.get("unet_shallow"), models.unet, cfg.model.frames_per_chunk)
    return GeneratorNetworks(unet, EngineCall(engines["vae_encoder"]), EngineCall(engines["vae_decoder"]), chosen,
                             engines)
