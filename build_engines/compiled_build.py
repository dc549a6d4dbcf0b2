"""Build the ``compiled`` backend: compile every (model, batch bucket) ahead of time, save each.

The build compiles through the very ``CompiledEngine`` the run time uses (same static
inference-mode buffers, same rewrites), so the recorded input specs are the run time's.  Output::

    <engines>/<config>-<hash>/compiled/<device>-<dtype>/manifest.json
    <engines>/<config>-<hash>/compiled/<device>-<dtype>/<model>-b<bucket>.bin

Manifest ``entries`` map model -> bucket -> ``file``, ``sha256``, ``bytes``, ``inputs``
(shape, dtype, device of each argument) and ``compile_seconds``.  The manifest is rewritten
after every bucket, so an interrupted build keeps what it finished and the next run compiles
only the missing (model, bucket) pairs; runs can also be split with ``model_names`` /
``buckets``.  A build for another format, machine, torch, dtype, config or compile settings
is discarded and rebuilt; ``force`` rebuilds everything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from talkrt.config import TalkrtConfig
from talkrt.engines.compiled import MANIFEST_FILE, CompiledEngine, CompileSettings, compiled_dir, expected_manifest
from talkrt.engines.manifest import manifest_mismatches, read_manifest, write_manifest
from talkrt.engines.specs import ENGINE_MODELS, batch_buckets, default_max_batch, export_specs
from talkrt.errors import EngineError
from talkrt.hashing import sha256_files

log = logging.getLogger(__name__)


def _intact(folder: Path, entry: dict) -> bool:
    path = folder / str(entry.get("file", ""))
    return path.is_file() and path.stat().st_size == entry.get("bytes") and sha256_files([path]) == entry.get("sha256")


def _previous(folder: Path, expected: dict, force: bool) -> dict:
    """Entries of an earlier compatible build whose files are intact."""
    try:
        manifest = read_manifest(folder / MANIFEST_FILE, "compiled engines")
    except EngineError:
        return {}
    diffs = manifest_mismatches(manifest, expected)
    if force or diffs:
        if diffs:
            log.info("discarding the compiled build in %s (%s)", folder, "; ".join(diffs))
        return {}
    return {name: {b: e for b, e in per.items() if isinstance(e, dict) and _intact(folder, e)}
            for name, per in manifest.get("entries", {}).items()}


def _check_placement(module: torch.nn.Module, name: str, device: torch.device, dtype: torch.dtype) -> None:
    param = next(module.parameters())
    if param.device.type != device.type or param.dtype != dtype:
        raise EngineError(f"compiled build: model '{name}' is on {param.device}/{param.dtype}, "
                          f"expected {device}/{dtype}; move the models first (LipSyncModels.to)")


def _write(folder: Path, fields: dict, entries: dict) -> None:
    """Rewrite the manifest, then drop function files no entry references (discarded or superseded builds)."""
    write_manifest(folder / MANIFEST_FILE, {**fields, "entries": entries,
                                            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    used = {e["file"] for per in entries.values() for e in per.values()}
    for path in folder.glob("*.bin"):
        if path.name not in used:
            path.unlink()


def build_compiled(cfg: TalkrtConfig, models, *, device: torch.device | str, dtype: torch.dtype,
                   engines_dir: str | Path | None = None, max_batch: int | None = None,
                   buckets: Sequence[int] | None = None, settings: CompileSettings = CompileSettings(),
                   model_names: Sequence[str] = ENGINE_MODELS, force: bool = False) -> Path:
    """Compile ``model_names`` at every bucket and save one function file each; return the folder.

    ``models`` (``LipSyncModels``) must already be on ``device`` in ``dtype``.  Buckets
    default to ``batch_buckets(max_batch)``.  Raises ``EngineError`` for misplaced models;
    torch's own compile errors propagate.
    """
    device = torch.device(device)
    buckets = tuple(sorted(set(buckets or batch_buckets(max_batch or default_max_batch(cfg)))))
    specs = export_specs(cfg, max(buckets))
    folder = compiled_dir(cfg, device, dtype, engines_dir)
    expected = {**expected_manifest(cfg, device, dtype), **settings.manifest_fields()}
    entries = _previous(folder, expected, force)
    todo = [(n, b) for n in model_names for b in buckets if str(b) not in entries.get(n, {})]
    if not todo:
        log.info("compiled engines in %s are up to date for %s at batches %s (use --force to rebuild)",
                 folder, ",".join(model_names), list(buckets))
        return folder
    fields = {**expected, "config_name": cfg.name, "weights_identity": models.identity}
    folder.mkdir(parents=True, exist_ok=True)
    _write(folder, fields, entries)                 # what is kept, before any file is replaced
    log.info("compiling %d (model, batch) pair(s) into %s (%s); each takes seconds to minutes",
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
                                settings=settings, warmup="none")
        for bucket in pending:
            done = todo.index((name, bucket)) + 1
            log.info("[%d/%d] compiling %s at batch %d...", done, len(todo), name, bucket)
            engine.prepare(bucket)                  # compile, then one call: a broken function fails here
            file = f"{name}-b{bucket}.bin"
            engine.function(bucket).save_compiled_function(str(folder / file))
            entries.setdefault(name, {})[str(bucket)] = {
                "file": file, "sha256": sha256_files([folder / file]), "bytes": (folder / file).stat().st_size,
                "inputs": engine.input_specs(bucket), "compile_seconds": round(engine.compile_seconds[bucket], 2)}
            _write(folder, fields, entries)
            log.info("[%d/%d] %s batch %d compiled in %.1f s (%.0f s elapsed), saved %s (%.1f MB)", done, len(todo),
                     name, bucket, engine.compile_seconds[bucket], time.perf_counter() - build_start, file,
                     (folder / file).stat().st_size / 1e6)
        del engine
    log.info("compiled engines saved to %s (%.0f MB, %.0f s)", folder,
             sum(e["bytes"] for per in entries.values() for e in per.values()) / 1e6,
             time.perf_counter() - build_start)
    return folder
