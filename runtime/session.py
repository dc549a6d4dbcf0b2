"""Build everything ``run_pipeline`` needs once: device, stream, then the model family's models,
engines, tracker and avatar preparer."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from talkrt.errors import TalkrtError
from talkrt.families import ModelFamily, config_family, get_family
from talkrt.paths import default_cache_dir
from talkrt.pipeline import PipelineParts

log = logging.getLogger(__name__)

DEFAULT_TRACKER = "blazeface-mesh"


def freeze_gc() -> int:
    """Move every object alive now out of the cyclic garbage collector's reach (``gc.freeze``)
    and return how many: call once the models are loaded, from an application (the CLI, the
    server), never from library code. A full collection walks every tracked object: with the
    modules and models of a loaded session (about 470,000 objects) it took 370-400 ms on a
    2-core CPU host (2026-12-01; the live server on an H200 had steps 90-120 ms longer a few
    times a minute, suspected to be these passes, not shown); after the freeze a collection
    walks only objects made since. No
    collection first (it would cost that same pass at start-up): garbage alive now stays."""
    import gc
    gc.freeze()
    return gc.get_freeze_count()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TalkrtError("--device cuda was requested but no CUDA device is available")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise TalkrtError(f"unknown device '{name}' (use cpu, cuda or auto)")
    return torch.device(name)


def resolve_compose(mode: str, device: torch.device, family: ModelFamily | None = None) -> str:
    """``auto`` -> ``gpu`` on CUDA when the CuPy kernels can run, else ``numpy``; an explicit
    ``gpu`` that cannot run is refused rather than silently replaced.

    ``family``: refuse a mode outside its ``compose_modes`` (a family that lists ``auto`` lists
    ``gpu`` and ``numpy`` too).
    Raises:
        TalkrtError: a mode the family does not run; ``gpu`` without CUDA or without the CuPy kernels.
    """
    if family is not None and mode not in family.compose_modes:
        raise TalkrtError(f"--compose {mode}: the {family.name} family does not compose that way "
                          f"(use {', '.join(family.compose_modes)})")
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


def build_session(cfg, *, device: str = "auto", weights_dir: str | None = None,
                  backend: str | None = None, compose: str | None = None, cache_dir: str | Path | None = None,
                  engines_dir: str | Path | None = None, tracker: str = DEFAULT_TRACKER,
                  cuda_graphs: bool = True, warmup: str = "max") -> PipelineParts:
    """Everything a run of ``cfg`` needs, built by the config's model family
    (:func:`talkrt.families.get_family`; a config of any family, :func:`talkrt.families.load_family_config`).

    Raises:
        TalkrtError: an unusable device, backend or compose mode; InputError: unreadable weights.
    """
    dev = resolve_device(device)
    dtype = getattr(torch, cfg.pipeline.precision) if dev.type == "cuda" else torch.float32
    stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
    family = get_family(config_family(cfg))
    return family.build_parts(cfg, device=dev, dtype=dtype, stream=stream, weights_dir=weights_dir, backend=backend,
                              compose=compose, cache_dir=Path(cache_dir) if cache_dir else default_cache_dir(),
                              engines_dir=engines_dir, tracker=tracker, cuda_graphs=cuda_graphs, warmup=warmup)
