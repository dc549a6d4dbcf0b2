"""Build the ``compiled`` backend: compile every batch bucket once, save the compile caches.

The build compiles through the very ``CompiledEngine`` the run time uses (same static
buffers, same ``torch.compile`` call, same inference mode), so the run time's compiles hit
the caches saved here.  Output::

    <engines>/<config>-<hash>/compiled/<device>-<dtype>/manifest.json
    <engines>/<config>-<hash>/compiled/<device>-<dtype>/artifacts-<model>-b<bucket>-<run id>.bin

Each (model, bucket) is compiled under a fresh artifact recorder and saved once to its own
file (a recorder saved repeatedly yields a blob that ``torch.compiler.load_cache_artifacts``
only partly loads: see ``talkrt.engines.compiled``).  The manifest is rewritten after every
bucket, so an interrupted build keeps what it finished and the next run compiles only the
missing (model, bucket) pairs; runs can also be split with ``model_names`` / ``buckets``.
A build for another machine, torch, dtype, config or compile mode is discarded and rebuilt;
``force`` rebuilds everything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from talkrt.config import TalkrtConfig
from talkrt.engines.compiled import (
    MANIFEST_FILE, CompiledEngine, CompileSettings, compiled_dir, expected_manifest, fresh_artifact_recording,
)
from talkrt.engines.manifest import manifest_mismatches, read_manifest, write_manifest
from talkrt.engines.specs import ENGINE_MODELS, batch_buckets, default_max_batch, export_specs
from talkrt.errors import EngineError
from talkrt.hashing import sha256_files

log = logging.getLogger(__name__)


def _previous(folder: Path, expected: dict, force: bool) -> tuple[dict, dict]:
    """Entries and artifact digests of an earlier compatible build whose files are intact."""
    try:
        manifest = read_manifest(folder / MANIFEST_FILE, "compiled engines")
    except EngineError:
        return {}, {}
    diffs = manifest_mismatches(manifest, expected)
    if force or diffs:
        if diffs:
            log.info("discarding the compiled build in %s (%s)", folder, "; ".join(diffs))
        return {}, {}
    digests = {f: d for f, d in manifest.get("artifacts", {}).items()
               if (folder / f).is_file() and sha256_files([folder / f]) == d}
    entries = {name: {b: e for b, e in per.items() if e.get("artifacts_file") in digests}
               for name, per in manifest.get("entries", {}).items()}
    return entries, digests


def _check_placement(module: torch.nn.Module, name: str, device: torch.device, dtype: torch.dtype) -> None:
    param = next(module.parameters())
    if param.device.type != device.type or param.dtype != dtype:
        raise EngineError(f"compiled build: model '{name}' is on {param.device}/{param.dtype}, "
                          f"expected {device}/{dtype}; move the models first (LipSyncModels.to)")


def _save_bucket(folder: Path, file: str) -> tuple[str, dict[str, int]]:
    """Write the artifacts recorded since ``fresh_artifact_recording`` began; return sha256 and per-kind counts."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        raise EngineError("compiled build: torch recorded no compile-cache artifacts to save "
                          "(is the Inductor FX graph cache disabled, e.g. TORCHINDUCTOR_FX_GRAPH_CACHE=0?)")
    blob, info = saved
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (file + ".tmp")
    tmp.write_bytes(blob)
    tmp.replace(folder / file)
    return sha256_files([folder / file]), {kind: len(keys) for kind, keys in info.artifacts.items()}


def _write(folder: Path, expected: dict, entries: dict, digests: dict, extra: dict) -> None:
    """Drop artifact files no entry references, rewrite the manifest."""
    used = {e["artifacts_file"] for per in entries.values() for e in per.values()}
    for stale in set(digests) - used:
        digests.pop(stale)
    for path in folder.glob("artifacts-*.bin"):          # files of discarded or superseded builds
        if path.name not in digests:
            path.unlink()
    write_manifest(folder / MANIFEST_FILE, {
        **expected, **extra, "entries": entries, "artifacts": digests,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })


def build_compiled(cfg: TalkrtConfig, models, *, device: torch.device | str, dtype: torch.dtype,
                   engines_dir: str | Path | None = None, max_batch: int | None = None,
                   buckets: Sequence[int] | None = None, settings: CompileSettings = CompileSettings(),
                   model_names: Sequence[str] = ENGINE_MODELS, force: bool = False) -> Path:
    """Compile ``model_names`` at every bucket and save the caches; return the output folder.

    ``models`` (``LipSyncModels``) must already be on ``device`` in ``dtype``.  Buckets
    default to ``batch_buckets(max_batch)``.
    """
    device = torch.device(device)
    buckets = tuple(sorted(set(buckets or batch_buckets(max_batch or default_max_batch(cfg)))))
    specs = export_specs(cfg, max(buckets))
    folder = compiled_dir(cfg, device, dtype, engines_dir)
    expected = {**expected_manifest(cfg, device, dtype), **settings.manifest_fields()}
    entries, digests = _previous(folder, expected, force)
    todo = [(n, b) for n in model_names for b in buckets if str(b) not in entries.get(n, {})]
    if not todo:
        log.info("compiled engines in %s are up to date for %s at batches %s (use --force to rebuild)",
                 folder, ",".join(model_names), list(buckets))
        return folder
    run_id = time.strftime("%Y%m%d-%H%M%S")
    extra = {"config_name": cfg.name, "weights_identity": models.identity}
    log.info("compiling %d (model, batch) pair(s) into %s (%s); cold compiles take minutes each",
             len(todo), folder, settings.describe())
    build_start = time.perf_counter()
    for name in model_names:
        pending = [b for n, b in todo if n == name]
        if not pending:
            continue
        spec = specs[name]
        module = spec.make_module(models)
        _check_placement(module, name, device, dtype)
        engine = CompiledEngine(name, module, spec.inputs, spec.outputs, pending, device=device, dtype=dtype,
                                settings=settings, cuda_graphs=False, expect_cache_hits=False,
                                warmup=False)
        for bucket in pending:
            done = todo.index((name, bucket)) + 1
            log.info("[%d/%d] compiling %s at batch %d...", done, len(todo), name, bucket)
            file = f"artifacts-{name}-b{bucket}-{run_id}.bin"
            with fresh_artifact_recording():        # this bucket's artifacts only, saved once
                engine.prepare(bucket)
                digests[file], counts = _save_bucket(folder, file)
            seconds = engine.warmup_seconds[bucket]
            entries.setdefault(name, {})[str(bucket)] = {"artifacts_file": file, "compile_seconds": round(seconds, 2),
                                                         "artifact_counts": counts,
                                                         "cache": engine.bucket_cache.get(bucket, {})}
            _write(folder, expected, entries, digests, extra)
            log.info("[%d/%d] %s batch %d compiled in %.1f s (%.0f s elapsed), saved %s %s", done, len(todo),
                     name, bucket, seconds, time.perf_counter() - build_start, file, counts)
        del engine
    log.info("compiled engines saved to %s (%.0f MB of caches, %.0f s)", folder,
             sum((folder / f).stat().st_size for f in digests) / 1e6, time.perf_counter() - build_start)
    return folder
