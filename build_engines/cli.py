"""``talkrt-build-engines`` / ``python -m talkrt.build_engines`` (what ``make engines`` runs).

Exports ONNX (fp32 and fp16), builds TensorRT plans when TensorRT and a GPU are present, and
precompiles the ``compiled`` backend on CUDA (on the CPU only with ``--device cpu``), for the
networks of the config's model family (``ModelFamily.engine_specs``); a backend the family does
not build (LatentSync: ONNX and TensorRT) is skipped with a warning.
Everything lands in ``<engines-dir>/<config name>-<model hash>/`` and is skipped when an
up-to-date manifest is already there (``--force`` rebuilds).  Exit status: 0 when every
requested backend was built or is up to date, 1 on any failure, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass

import torch

from talkrt.build_engines.compiled_build import build_compiled
from talkrt.build_engines.onnx_export import DEFAULT_OPSET, export_onnx
from talkrt.build_engines.tensorrt_build import DEFAULT_WORKSPACE_GIB, build_plan
from talkrt.config import PRECISIONS
from talkrt.families import config_family, get_family, load_family_config
from talkrt.engines.compiled import add_compile_arguments, settings_from_args
from talkrt.engines.manifest import config_dir, dtype_name
from talkrt.engines.specs import MODEL_NAMES, default_max_batch, engine_backends, engine_models, export_specs
from talkrt.engines.tensorrt import import_tensorrt
from talkrt.errors import EngineError, TalkrtError

log = logging.getLogger("talkrt.build_engines")

ALL_BACKENDS = ("onnx", "tensorrt", "compiled")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="talkrt-build-engines", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="musetalk",
                   help="config name (musetalk, tiny, latentsync16, latentsync16-tiny) or YAML path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set pipeline.batch_size=16 (repeatable)")
    p.add_argument("--weights", metavar="DIR",
                   help="official weights of the config's family (default: SYNTHETIC weights)")
    p.add_argument("--backends", help=f"comma list of {','.join(ALL_BACKENDS)} (default: all that can run here)")
    p.add_argument("--precision", choices=PRECISIONS, help="engine precision (default: the config's; CPU: float32)")
    p.add_argument("--onnx-precisions", default="float32,float16", help="ONNX variants to export")
    p.add_argument("--max-batch", type=int, help="largest batch engines accept (default: max(batch_size, 32); "
                                                 "LatentSync's sizes are fixed by its config)")
    p.add_argument("--models", help=f"comma subset of the family's networks, e.g. {','.join(MODEL_NAMES)} "
                                    f"(default: all; whisper is ONNX only)")
    p.add_argument("--buckets", help="compiled backend batch buckets, e.g. 1,4,16 (default: each model's own: "
                                     "1,2,4,... max batch for MuseTalk)")
    p.add_argument("--engines-dir", help="output root (default: $TALKRT_ENGINES_DIR or ./engines)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    add_compile_arguments(p)
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--workspace-gib", type=float, default=DEFAULT_WORKSPACE_GIB, help="TensorRT workspace")
    p.add_argument("--force", action="store_true", help="rebuild even when manifests match")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _choose_backends(requested: str | None, device: torch.device, device_forced: bool,
                     parser: argparse.ArgumentParser, supported: tuple[str, ...] = ALL_BACKENDS,
                     family: str = "musetalk") -> tuple[list[str], dict[str, str]]:
    """Backends to build, and the reason each skipped one cannot run here (or for this family)."""
    names = [b.strip() for b in requested.split(",") if b.strip()] if requested else list(ALL_BACKENDS)
    unknown = sorted(set(names) - set(ALL_BACKENDS))
    if unknown or not names:
        parser.error(f"--backends: unknown {unknown}; choose from {','.join(ALL_BACKENDS)}")
    skipped = {b: f"the {family} family builds {', '.join(supported)} engines only (no {b} export for it)"
               for b in names if b not in supported}
    names = [b for b in names if b in supported]
    if "tensorrt" in names:
        try:
            import_tensorrt()
            if device.type != "cuda":
                raise EngineError("TensorRT plans need a CUDA GPU")
        except EngineError as exc:
            skipped["tensorrt"] = str(exc)
    if "compiled" in names and device.type != "cuda" and not device_forced:
        skipped["compiled"] = "no CUDA GPU here; pass --device cpu to compile for the CPU"
    return [b for b in names if b not in skipped], skipped


def _onnx_dtypes(text: str, parser: argparse.ArgumentParser) -> list[torch.dtype]:
    return [DTYPES[n] for n in _csv(text, ("float32", "float16"), "--onnx-precisions", parser)]


def _csv(text: str | None, allowed: tuple, what: str, parser: argparse.ArgumentParser) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()] if text else list(allowed)
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        parser.error(f"{what}: {bad or 'empty'} not in {','.join(allowed)}")
    return names


def _export_all(cfg, models, specs, names, dtypes, device, args) -> dict:
    exported = {}
    for dtype in dtypes:
        for name in names:
            exported[(name, dtype)] = export_onnx(cfg, specs[name], specs[name].make_module(models), dtype=dtype,
                                                  device=device, weights_identity=models.identity,
                                                  engines_dir=args.engines_dir, opset=args.opset, force=args.force)
    return exported


@dataclass(frozen=True)
class BuildRequest:
    """Validated command line: what to build, where, how."""

    cfg: object                        # the family's config (TalkrtConfig, LatentSyncConfig)
    device: torch.device
    dtype: torch.dtype
    backends: tuple[str, ...]
    names: tuple[str, ...]             # models for ONNX
    engine_names: tuple[str, ...]      # models for TensorRT / compiled
    max_batch: int
    buckets: tuple[int, ...] | None    # compiled buckets (None: each model's own)
    onnx_dtypes: tuple[torch.dtype, ...]


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> BuildRequest | None:
    """Check the arguments (``parser.error`` on bad ones); None when nothing can be built here."""
    cfg = load_family_config(args.config, args.set)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError("--device cuda requested but no CUDA GPU is visible")
    backends, skipped = _choose_backends(args.backends, device, args.device is not None, parser,
                                         engine_backends(cfg), config_family(cfg))
    for name, reason in skipped.items():
        log.warning("skipping backend %s: %s", name, reason)
    if not backends:
        log.error("nothing to build: every requested backend was skipped")
        return None
    precision = args.precision or cfg.pipeline.precision
    if device.type == "cpu" and precision != "float32":
        log.info("the CPU runs float32: using float32 instead of %s", precision)
        precision = "float32"
    max_batch = args.max_batch or default_max_batch(cfg)
    if max_batch < 1:
        parser.error("--max-batch must be >= 1")
    names = _csv(args.models, tuple(export_specs(cfg, max_batch)), "--models", parser)
    buckets = None
    if args.buckets:
        try:
            buckets = tuple(sorted({int(b) for b in args.buckets.split(",")}))
        except ValueError:
            parser.error(f"--buckets: expected comma-separated integers, got {args.buckets!r}")
        if buckets[0] < 1 or buckets[-1] > max_batch:
            parser.error(f"--buckets must lie in 1..{max_batch} (--max-batch)")
    onnx_dtypes = _onnx_dtypes(args.onnx_precisions, parser) if "onnx" in backends else []
    if "tensorrt" in backends and torch.float32 not in onnx_dtypes:
        onnx_dtypes.append(torch.float32)                  # TensorRT plans are built from the fp32 graph
    engine_names = tuple(n for n in names if n in engine_models(cfg))
    return BuildRequest(cfg, device, DTYPES[precision], tuple(backends),
                        tuple(names) if "onnx" in backends else engine_names, engine_names, max_batch,
                        buckets, tuple(onnx_dtypes))


def build(req: BuildRequest, args: argparse.Namespace) -> int:
    """Run the requested builds; return the exit status (library errors are logged, not raised)."""
    cfg, specs = req.cfg, export_specs(req.cfg, req.max_batch)
    log.info("building %s for config '%s' into %s (device %s, %s, max batch %d)", ",".join(req.backends), cfg.name,
             config_dir(cfg, args.engines_dir), req.device, dtype_name(req.dtype), req.max_batch)
    if not args.weights:
        log.warning("NO --weights GIVEN: building engines from SYNTHETIC random weights (seed %d). They run at "
                    "full speed but produce no lip sync; rebuild with --weights DIR for real output.",
                    cfg.pipeline.weights_seed)
    models = get_family(config_family(cfg)).load_models(cfg, args.weights, torch.device("cpu"), torch.float32)
    failures, exported = [], {}
    if req.onnx_dtypes:
        try:
            exported = _export_all(cfg, models, specs, req.names, req.onnx_dtypes, req.device, args)
        except TalkrtError as exc:
            log.error("ONNX export failed: %s", exc)
            failures.append("onnx")
    if "tensorrt" in req.backends:
        try:
            if "onnx" in failures:
                raise EngineError("no ONNX to build from (the export failed)")
            for name in req.engine_names:
                build_plan(cfg, specs[name], exported[(name, torch.float32)], dtype=req.dtype,
                           weights_identity=models.identity, engines_dir=args.engines_dir,
                           workspace_gib=args.workspace_gib, force=args.force)
        except TalkrtError as exc:
            log.error("TensorRT build failed: %s", exc)
            failures.append("tensorrt")
    if "compiled" in req.backends:
        try:
            build_compiled(cfg, models.to(req.device, req.dtype), device=req.device, dtype=req.dtype,
                           engines_dir=args.engines_dir, max_batch=req.max_batch, buckets=req.buckets,
                           settings=settings_from_args(args),
                           model_names=req.engine_names, force=args.force)
        except TalkrtError as exc:
            log.error("compiled build failed: %s", exc)
            failures.append("compiled")
    if failures:
        log.error("engine build FAILED for: %s", ", ".join(failures))
        return 1
    runtime = [b for b in req.backends if b in ("tensorrt", "compiled")]
    if not runtime:
        log.warning("built ONNX only, in %s: no engine that run_pipeline loads was built on this machine, so it "
                    "runs the models eagerly; pass --device cpu to precompile torch.compile engines for the CPU "
                    "(minutes), or build on a CUDA GPU", config_dir(cfg, args.engines_dir))
        return 0
    log.info("engines ready in %s: %s", config_dir(cfg, args.engines_dir), ", ".join(runtime))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        request = resolve(args, parser)
        status = 1 if request is None else build(request, args)
    except TalkrtError as exc:
        log.error("%s", exc)
        return 1
    log.info("done in %.0f s", time.perf_counter() - start)
    return status
