"""Build the ``compiled`` backend: compile every (model, batch bucket) ahead of time, save each.

The build compiles through the very ``CompiledEngine`` the run time uses (same static
inference-mode buffers, same rewrites), so the recorded input specs are the run time's.  Output::

    <engines>/<config>-<hash>/compiled/<device>-<dtype>/manifest.json
    <engines>/<config>-<hash>/compiled/<device>-<dtype>/<model>-b<bucket>.bin

Manifest ``entries`` map model -> bucket -> ``file``, ``sha256``, ``bytes``, ``inputs``
(shape, dtype, device of each argument), ``compile_seconds`` and ``parity`` (the worst output's
``max |compiled - eager| / max |eager|`` on seeded sample inputs).  Parity is checked before a
function is saved: above ``PARITY_TOLERANCE`` for the dtype the build fails (``EngineError``).
The tolerances: float32 1e-3 (Inductor reorders reductions and fuses ops: ~1e-6 seen on the
tiny models; the subpixel rewrite's tap sums add rounding of the same order), float16 5e-2
(as the GPU tests' compiled-vs-eager fp16 check: fp16 rounding only, compounded over the depth
of a 1.27 B-parameter UNet), bfloat16 1e-1 (3 fewer mantissa bits).  A wrong function (rows
mixed up, weights misread) is off by the order of the output itself.

The models and their default buckets come from the config's family (``ModelSpec.buckets``:
MuseTalk's powers of two up to the max batch, LatentSync's one size per model); explicit
``buckets`` apply to every model up to its spec's max batch.  The manifest is rewritten
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

from talkrt.engines.compiled import MANIFEST_FILE, CompiledEngine, CompileSettings, compiled_dir, expected_manifest
from talkrt.engines.manifest import manifest_mismatches, read_manifest, write_manifest
from talkrt.engines.specs import ModelSpec, default_max_batch, engine_models, export_specs
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


PARITY_TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 1e-1}
PARITY_SEED = 4321


def check_parity(engine: CompiledEngine, module: torch.nn.Module, spec: ModelSpec, bucket: int) -> float:
    """``engine`` against ``module`` (eager, without the engine's rewrites) at ``bucket`` rows of seeded
    sample inputs; return the worst output's relative max difference. ``EngineError`` above
    ``PARITY_TOLERANCE[engine.dtype]`` or for a non-finite output."""
    feeds = spec.sample_inputs(bucket, device=engine.device, dtype=engine.dtype, seed=PARITY_SEED)
    with torch.inference_mode():
        got = {k: v.float().clone() for k, v in engine.run(feeds).items()}
        want = module(*feeds.values())
    want = want if isinstance(want, (tuple, list)) else (want,)
    worst, tolerance = 0.0, PARITY_TOLERANCE[engine.dtype]
    for name, ref in zip(spec.output_names, want):
        ref = ref.float()
        rel = (got[name] - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)
        if not torch.isfinite(got[name]).all() or not rel <= tolerance:
            raise EngineError(f"compiled '{spec.name}' batch {bucket}: output '{name}' differs from eager by "
                              f"{rel:.3g} of its range (tolerance {tolerance:g} in {engine.dtype}); not saved")
        worst = max(worst, rel)
    return worst


def _model_buckets(spec: ModelSpec, buckets: Sequence[int] | None) -> tuple[int, ...]:
    """``buckets`` up to the spec's max batch, else the spec's own buckets; ``EngineError`` if none is left."""
    if buckets is None:
        return spec.buckets
    kept = tuple(sorted({b for b in buckets if b <= spec.profile.max}))
    if not kept:
        raise EngineError(f"compiled build: no bucket of {sorted(buckets)} fits '{spec.name}' "
                          f"(at most {spec.profile.max} rows)")
    return kept


def build_compiled(cfg, models, *, device: torch.device | str, dtype: torch.dtype,
                   engines_dir: str | Path | None = None, max_batch: int | None = None,
                   buckets: Sequence[int] | None = None, settings: CompileSettings = CompileSettings(),
                   model_names: Sequence[str] | None = None, force: bool = False) -> Path:
    """Compile ``model_names`` (default: the family's engine models) at their buckets, check each
    against eager, save one function file each; return the folder.

    ``models`` (the family's, e.g. ``LipSyncModels``) must already be on ``device`` in ``dtype``.
    Buckets default to each spec's (``export_specs(cfg, max_batch)``); explicit ``buckets`` apply
    to every model up to its max batch.  Raises ``EngineError`` for misplaced models, a bucket no
    model takes, or a parity failure; torch's own compile errors propagate.
    """
    device = torch.device(device)
    specs = export_specs(cfg, max(buckets) if buckets else max_batch or default_max_batch(cfg))
    model_names = tuple(model_names or engine_models(cfg))
    per_model = {n: _model_buckets(specs[n], buckets) for n in model_names}
    folder = compiled_dir(cfg, device, dtype, engines_dir)
    expected = {**expected_manifest(cfg, device, dtype), **settings.manifest_fields()}
    entries = _previous(folder, expected, force)
    todo = [(n, b) for n in model_names for b in per_model[n] if str(b) not in entries.get(n, {})]
    if not todo:
        log.info("compiled engines in %s are up to date for %s (use --force to rebuild)", folder,
                 ", ".join(f"{n} at batch {list(per_model[n])}" for n in model_names))
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
            parity = check_parity(engine, module, spec, bucket)
            file = f"{name}-b{bucket}.bin"
            engine.function(bucket).save_compiled_function(str(folder / file))
            entries.setdefault(name, {})[str(bucket)] = {
                "file": file, "sha256": sha256_files([folder / file]), "bytes": (folder / file).stat().st_size,
                "inputs": engine.input_specs(bucket), "compile_seconds": round(engine.compile_seconds[bucket], 2),
                "parity": float(f"{parity:.3g}")}
            _write(folder, fields, entries)
            log.info("[%d/%d] %s batch %d compiled in %.1f s (%.0f s elapsed), parity %.2g, saved %s (%.1f MB)",
                     done, len(todo), name, bucket, engine.compile_seconds[bucket], time.perf_counter() - build_start,
                     parity, file, (folder / file).stat().st_size / 1e6)
        del engine
    log.info("compiled engines saved to %s (%.0f MB, %.0f s)", folder,
             sum(e["bytes"] for per in entries.values() for e in per.values()) / 1e6,
             time.perf_counter() - build_start)
    return folder
