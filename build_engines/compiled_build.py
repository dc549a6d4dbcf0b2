"""Build the ``compiled`` backend: compile every batch bucket once, save the compile caches.

The build compiles through the very ``CompiledEngine`` the run time uses (same static
buffers, same ``torch.compile`` call, same inference mode), so the run time's compiles hit
the caches saved here.  Output, beside a manifest::

    <engines>/<config>-<hash>/compiled/<device>-<dtype>/artifacts.bin   torch.compiler cache bytes
    <engines>/<config>-<hash>/compiled/<device>-<dtype>/manifest.json

A matching manifest (same machine, torch, dtype, config, mode, covering the buckets) makes
the build a no-op unless ``force``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from talkrt.build_engines.specs import ENGINE_MODELS, batch_buckets, default_max_batch, export_specs
from talkrt.config import TalkrtConfig
from talkrt.engines.compiled import (
    ARTIFACTS_FILE, DEFAULT_COMPILE_MODE, MANIFEST_FILE, CompiledEngine, compiled_dir, expected_manifest,
)
from talkrt.engines.manifest import manifest_mismatches, read_manifest, sha256_files, write_manifest
from talkrt.errors import EngineError

log = logging.getLogger(__name__)


def _up_to_date(folder: Path, expected: dict, models: Sequence[str], buckets: Sequence[int]) -> str | None:
    """None if the saved build covers this request, else the reason to rebuild."""
    try:
        manifest = read_manifest(folder / MANIFEST_FILE, "compiled engines")
    except EngineError:
        return "no manifest"
    diffs = manifest_mismatches(manifest, expected)
    if diffs:
        return "; ".join(diffs)
    built = manifest.get("buckets", {})
    for name in models:
        if not set(buckets) <= set(built.get(name, [])):
            return f"'{name}' lacks buckets {sorted(set(buckets) - set(built.get(name, [])))}"
    artifacts = folder / manifest.get("artifacts_file", ARTIFACTS_FILE)
    if not artifacts.is_file() or sha256_files([artifacts]) != manifest.get("artifacts_sha256"):
        return "artefacts missing or modified"
    return None


def _check_placement(module: torch.nn.Module, name: str, device: torch.device, dtype: torch.dtype) -> None:
    param = next(module.parameters())
    if param.device.type != device.type or param.dtype != dtype:
        raise EngineError(f"compiled build: model '{name}' is on {param.device}/{param.dtype}, "
                          f"expected {device}/{dtype}; move the models first (LipSyncModels.to)")


def build_compiled(cfg: TalkrtConfig, models, *, device: torch.device | str, dtype: torch.dtype,
                   engines_dir: str | Path | None = None, max_batch: int | None = None,
                   buckets: Sequence[int] | None = None, mode: str = DEFAULT_COMPILE_MODE,
                   model_names: Sequence[str] = ENGINE_MODELS, force: bool = False) -> Path:
    """Compile ``model_names`` at every bucket and save the caches; return the output folder.

    ``models`` (``LipSyncModels``) must already be on ``device`` in ``dtype``.
    """
    device = torch.device(device)
    max_batch = max_batch or (max(buckets) if buckets else default_max_batch(cfg))
    buckets = tuple(sorted(set(buckets or batch_buckets(max_batch))))
    specs = export_specs(cfg, max(buckets))
    folder = compiled_dir(cfg, device, dtype, engines_dir)
    expected = {**expected_manifest(cfg, device, dtype), "compile_mode": mode}
    if not force:
        reason = _up_to_date(folder, expected, model_names, buckets)
        if reason is None:
            log.info("compiled engines in %s are up to date (use --force to rebuild)", folder)
            return folder
        log.info("building compiled engines in %s (%s)", folder, reason)
    total = len(model_names) * len(buckets)
    done, seconds = 0, {}
    build_start = time.perf_counter()
    for name in model_names:
        spec = specs[name]
        module = spec.make_module(models)
        _check_placement(module, name, device, dtype)
        engine = CompiledEngine(name, module, spec.inputs, spec.outputs, buckets, device=device, dtype=dtype,
                                mode=mode, cuda_graphs=False, expect_cache_hits=False, warmup=False)
        seconds[name] = {}
        for bucket in buckets:
            done += 1
            log.info("[%d/%d] compiling %s at batch %d (mode %s)...", done, total, name, bucket, mode)
            engine.prepare(bucket)
            seconds[name][str(bucket)] = round(engine.warmup_seconds[bucket], 2)
            log.info("[%d/%d] %s batch %d compiled in %.1f s (%.0f s elapsed)", done, total, name, bucket,
                     engine.warmup_seconds[bucket], time.perf_counter() - build_start)
        del engine
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        raise EngineError("compiled build: torch recorded no compile-cache artefacts to save "
                          "(is the Inductor FX graph cache disabled, e.g. TORCHINDUCTOR_FX_GRAPH_CACHE=0?)")
    blob, info = saved
    folder.mkdir(parents=True, exist_ok=True)
    artifacts = folder / ARTIFACTS_FILE
    tmp = artifacts.with_name(ARTIFACTS_FILE + ".tmp")
    tmp.write_bytes(blob)
    tmp.replace(artifacts)
    write_manifest(folder / MANIFEST_FILE, {
        **expected,
        "config_name": cfg.name,
        "weights_identity": models.identity,
        "models": list(model_names),
        "buckets": {name: list(buckets) for name in model_names},
        "artifacts_file": ARTIFACTS_FILE,
        "artifacts_sha256": sha256_files([artifacts]),
        "artifacts_bytes": len(blob),
        "artifact_counts": {kind: len(keys) for kind, keys in info.artifacts.items()},
        "compile_seconds": seconds,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    log.info("compiled engines saved to %s (%.0f MB of caches, %.0f s total)", folder, len(blob) / 1e6,
             time.perf_counter() - build_start)
    return folder
