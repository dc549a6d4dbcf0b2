"""Pick and build the engines for a run: TensorRT > compiled > eager.

:func:`prebuilt_engines` is the choice every family shares (it takes the family's engine
models and the backends it builds); :func:`create_engines` is MuseTalk's, with its eager
fallback, and :mod:`talkrt.families.latentsync_engines` LatentSync's.

``create_engines(cfg, models, backend="auto")`` tries each prebuilt backend in order and
takes the first whose artifacts exist and whose manifests match this machine and config.
An explicit ``backend="tensorrt"`` or ``"compiled"`` that cannot be used raises
``EngineError`` (saying to run ``make engines``); ``"auto"`` warns and falls back to eager,
CUDA-graph captured per batch bucket on CUDA.  Whisper always runs eager.

``warmup`` (``talkrt.engines.graphs.WARMUP_POLICIES``) says which buckets are prepared before
``create_engines`` returns: ``"max"`` (the default: a file run pads a partial batch up to the
largest bucket) or ``"all"`` (a server).  ``startup_seconds(engines)`` reports what loading
and warm-up cost per engine.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from talkrt.config import BACKENDS, TalkrtConfig
from talkrt.engines.base import EagerEngine, Engine
from talkrt.engines.compiled import CompiledEngine, open_compiled_build
from talkrt.engines.graphs import EagerGraphEngine, check_warmup_policy
from talkrt.engines.manifest import config_dir, rebuild_hint
from talkrt.engines.specs import ENGINE_MODELS, ModelSpec, default_max_batch, export_specs
from talkrt.engines.tensorrt import TensorRTEngine, import_tensorrt
from talkrt.errors import EngineError

log = logging.getLogger(__name__)


def _placement(models, device, dtype) -> tuple[torch.device, torch.dtype]:
    param = next(models.unet.parameters())
    return torch.device(device) if device is not None else param.device, dtype or param.dtype


def eager_engines(specs: dict[str, ModelSpec], models, *, device: torch.device, dtype: torch.dtype,
                  cuda_graphs: bool, graph_fallback: bool = True, warmup: str = "max") -> dict[str, Engine]:
    """Eager engines for ``ENGINE_MODELS`` (CUDA-graph captured per bucket when asked)."""
    engines: dict[str, Engine] = {}
    for name in ENGINE_MODELS:
        spec = specs[name]
        module = spec.make_module(models)
        if cuda_graphs:
            engines[name] = EagerGraphEngine(name, module, spec.inputs, spec.outputs, spec.buckets, device=device,
                                             dtype=dtype, cuda_graphs=True, warmup=warmup,
                                             graph_fallback=graph_fallback)
        else:
            engines[name] = EagerEngine(name, module, spec.inputs, spec.outputs, spec.profile.max)
    return engines


def tensorrt_engines(cfg: TalkrtConfig, specs: dict[str, ModelSpec], models, *, names=ENGINE_MODELS,
                     device: torch.device, dtype: torch.dtype, engines_dir, cuda_graphs: bool,
                     warmup: str) -> dict[str, Engine]:
    if device.type != "cuda":
        raise EngineError(f"TensorRT engines need a CUDA device, this run uses {device}")
    import_tensorrt()
    return {name: TensorRTEngine(cfg, name, specs[name].inputs, specs[name].outputs, dtype=dtype,
                                 weights_identity=models.identity, max_batch=specs[name].profile.max,
                                 buckets=specs[name].buckets, engines_dir=engines_dir, device=device,
                                 cuda_graphs=cuda_graphs, warmup=warmup)
            for name in names}


def compiled_engines(cfg, specs: dict[str, ModelSpec], models, *, names=ENGINE_MODELS, device: torch.device,
                     dtype: torch.dtype, engines_dir, cuda_graphs: bool, warmup: str) -> dict[str, Engine]:
    """A ``CompiledEngine`` per model of ``names``, each at its built buckets up to its spec's max batch."""
    build = open_compiled_build(cfg, device=device, dtype=dtype, models=names,
                                max_batch={n: specs[n].profile.max for n in names}, engines_dir=engines_dir)
    engines: dict[str, Engine] = {}
    for name in names:
        spec = specs[name]
        engines[name] = CompiledEngine(name, spec.make_module(models), spec.inputs, spec.outputs,
                                       build.buckets[name], device=device, dtype=dtype, build=build,
                                       cuda_graphs=cuda_graphs, warmup=warmup, graph_fallback=True)
    return engines


PREBUILT = {"tensorrt": tensorrt_engines, "compiled": compiled_engines}     # best first


def check_family_backend(cfg, backend: str, supported: tuple[str, ...]) -> None:
    """Raise ``EngineError`` when ``backend`` is a prebuilt one that ``cfg``'s model family does not
    build (``supported``: its ``engine_backends``)."""
    if backend in PREBUILT and backend not in supported:
        raise EngineError(f"--backend {backend}: config '{cfg.name}' has no {backend} engines (its model family "
                          f"builds {', '.join(b for b in supported if b in PREBUILT) or 'none'}; or use eager or auto)")


def prebuilt_engines(cfg, specs: dict[str, ModelSpec], models, *, backend: str, names: tuple[str, ...],
                     supported: tuple[str, ...], device: torch.device, dtype: torch.dtype, engines_dir,
                     cuda_graphs: bool, warmup: str) -> tuple[dict[str, Engine] | None, str | None, list[str]]:
    """Prebuilt engines for ``names``: ``(engines, backend, [])``, or ``(None, None, reasons)`` when
    ``backend`` is ``"auto"`` (try each of ``PREBUILT`` in ``supported``, best first) and none is usable,
    or ``"eager"``.

    Raises ``EngineError`` for an explicit backend that is not in ``supported`` (the config's family
    builds no such engines) or cannot be used (missing, stale, failing to load)."""
    check_family_backend(cfg, backend, supported)
    order = [b for b in PREBUILT if b in supported] if backend == "auto" else [b for b in (backend,) if b in PREBUILT]
    reasons = []
    for candidate in order:
        try:
            engines = PREBUILT[candidate](cfg, specs, models, names=names, device=device, dtype=dtype,
                                         engines_dir=engines_dir, cuda_graphs=cuda_graphs, warmup=warmup)
        except EngineError as exc:
            if backend != "auto":
                raise
            log.info("backend %s not usable: %s", candidate, exc)
            reasons.append(f"{candidate}: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - e.g. a torch.compile or CUDA failure while loading
            if backend != "auto":
                raise EngineError(f"{candidate} engines failed to load ({type(exc).__name__}: {exc}); "
                                  f"{rebuild_hint(cfg.source)}") from exc
            log.warning("backend %s failed to load: %s: %s", candidate, type(exc).__name__, exc)
            reasons.append(f"{candidate}: {type(exc).__name__}: {exc}")
            continue
        return engines, candidate, []
    return None, None, reasons


def warn_eager_fallback(cfg, engines_dir, graphs: bool, reasons: list[str]) -> None:
    """The warning of ``--backend auto`` when no prebuilt engine is usable (``reasons``: why each was not)."""
    folder = config_dir(cfg, engines_dir)
    log.warning("no usable prebuilt engines for config '%s' in %s%s; falling back to eager%s; to use them, "
                "%s [%s]", cfg.name, folder, "" if folder.is_dir() else " (no such folder)",
                " with CUDA graphs" if graphs else "", rebuild_hint(cfg.source), " | ".join(reasons))


def create_engines(cfg: TalkrtConfig, models, *, backend: str = "auto", device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None, engines_dir: str | Path | None = None,
                   max_batch: int | None = None, cuda_graphs: bool = True,
                   warmup: str = "max") -> tuple[dict[str, Engine], str]:
    """MuseTalk's engines: unet, vae_decoder, vae_encoder (and eager whisper), plus the backend chosen.

    ``models`` (``LipSyncModels``) must be on ``device`` in ``dtype`` (both default to the
    UNet's).  ``engines_dir`` defaults to ``$TALKRT_ENGINES_DIR`` or ``./engines``.
    ``warmup``: which batch buckets are prepared before returning (``"max"``, ``"all"``,
    ``"none"``; see the module docstring).  Raises ``EngineError`` for an unknown backend or
    policy, or an explicit backend that cannot be used.
    """
    if backend not in BACKENDS:
        raise EngineError(f"unknown engine backend '{backend}'; choose one of {BACKENDS}")
    check_warmup_policy(warmup)                       # an unknown policy fails before any loading
    device, dtype = _placement(models, device, dtype)
    specs = export_specs(cfg, max_batch or default_max_batch(cfg))
    graphs = cuda_graphs and device.type == "cuda"
    engines, chosen, reasons = prebuilt_engines(cfg, specs, models, backend=backend, names=ENGINE_MODELS,
                                                supported=tuple(PREBUILT), device=device, dtype=dtype,
                                                engines_dir=engines_dir, cuda_graphs=graphs, warmup=warmup)
    if engines is not None:
        return _finish(engines, specs, models, cfg, chosen, graphs, engines_dir)
    if backend == "auto":
        warn_eager_fallback(cfg, engines_dir, graphs, reasons)
    engines = eager_engines(specs, models, device=device, dtype=dtype, cuda_graphs=graphs, graph_fallback=True,
                            warmup=warmup)
    return _finish(engines, specs, models, cfg, "eager", graphs, engines_dir)


def _finish(engines: dict[str, Engine], specs: dict[str, ModelSpec], models, cfg: TalkrtConfig, backend: str,
            graphs: bool, engines_dir) -> tuple[dict[str, Engine], str]:
    whisper = specs["whisper"]
    engines["whisper"] = EagerEngine("whisper", whisper.make_module(models), whisper.inputs, whisper.outputs,
                                     whisper.profile.max)
    used_graphs = graphs and all(getattr(engines[n], "cuda_graphs", False) for n in ENGINE_MODELS)
    where = f", from {config_dir(cfg, engines_dir)}" if backend != "eager" else ""
    log.info("engine backend for config '%s': %s%s (batch <= %d%s)", cfg.name, backend,
             " + CUDA graphs" if used_graphs else "", specs["unet"].profile.max, where)
    return engines, backend


def startup_seconds(engines: dict[str, Engine]) -> dict[str, dict[str, object]]:
    """Per engine: ``load_s`` (artifact loading) and ``warmup_s`` (bucket -> first call + graph capture).

    Engines without buckets (plain eager, Whisper) report 0 and no buckets."""
    return {name: {"load_s": round(getattr(engine, "load_seconds", 0.0), 3),
                   "warmup_s": {b: round(s, 3) for b, s in getattr(engine, "warmup_seconds", {}).items()}}
            for name, engine in engines.items()}
