"""Build everything ``run_pipeline`` needs once: device, stream, models, engines, tracker."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from talkrt.avatar import AvatarPreparer
from talkrt.config import TalkrtConfig
from talkrt.engines.select import create_engines
from talkrt.errors import TalkrtError
from talkrt.face.tracker import create_tracker
from talkrt.models.audio import AudioFeatures
from talkrt.models.weights import load_models
from talkrt.paths import default_cache_dir
from talkrt.pipeline import PipelineParts

log = logging.getLogger(__name__)

DEFAULT_TRACKER = "blazeface-mesh"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TalkrtError("--device cuda was requested but no CUDA device is available")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise TalkrtError(f"unknown device '{name}' (use cpu, cuda or auto)")
    return torch.device(name)


def resolve_compose(mode: str, device: torch.device) -> str:
    """``auto`` -> ``gpu`` on CUDA when the CuPy kernels can run, else ``numpy``; an explicit
    ``gpu`` that cannot run is refused rather than silently replaced."""
    if mode == "gpu":
        from talkrt.kernels import gpu_available, unavailable_reason
        if device.type != "cuda":
            raise TalkrtError("--compose gpu needs --device cuda")
        if not gpu_available():
            raise TalkrtError(f"--compose gpu: the CuPy kernels cannot run here ({unavailable_reason()})")
    if mode != "auto":
        return mode
    if device.type == "cuda":
        from talkrt.kernels import gpu_available
        if gpu_available():
            return "gpu"
        log.warning("CuPy GPU kernels unavailable: composing on the CPU with the numpy reference")
    return "numpy"


def build_session(cfg: TalkrtConfig, *, device: str = "auto", weights_dir: str | None = None,
                  backend: str | None = None, compose: str | None = None, cache_dir: str | Path | None = None,
                  engines_dir: str | Path | None = None, tracker: str = DEFAULT_TRACKER,
                  cuda_graphs: bool = True, warmup: str = "max") -> PipelineParts:
    dev = resolve_device(device)
    dtype = getattr(torch, cfg.pipeline.precision) if dev.type == "cuda" else torch.float32
    stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
    start = time.perf_counter()
    models = load_models(cfg, weights_dir, dev, dtype)
    weights_done = time.perf_counter()
    engines, chosen = create_engines(cfg, models, backend=backend or cfg.pipeline.backend, device=dev, dtype=dtype,
                                     engines_dir=engines_dir, max_batch=cfg.pipeline.batch_size,
                                     cuda_graphs=cuda_graphs, warmup=warmup)
    engines_done = time.perf_counter()
    face_tracker = create_tracker(tracker)
    preparer = AvatarPreparer(cfg, face_tracker, tracker, engines["vae_encoder"], models.identity, dev, dtype,
                              Path(cache_dir) if cache_dir else default_cache_dir(),
                              batch_size=cfg.pipeline.batch_size)
    audio = AudioFeatures(models.whisper, cfg.model.audio, dev, dtype)
    log.info("session: device=%s dtype=%s backend=%s weights=%s", dev, dtype, chosen, models.source)
    return PipelineParts(cfg=cfg, device=dev, dtype=dtype, stream=stream, unet=engines["unet"],
                         vae_decoder=engines["vae_decoder"], audio_features=audio, preparer=preparer,
                         weights=models.source, backend=chosen, compose=resolve_compose(compose or cfg.pipeline.compose, dev),
                         load_seconds={"weights": weights_done - start, "engines": engines_done - weights_done,
                                       "tracker_and_audio": time.perf_counter() - engines_done})
