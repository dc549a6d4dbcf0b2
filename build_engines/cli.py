"""``talkrt-build-engines`` / ``python -m talkrt.build_engines`` (what ``make engines`` runs).

Exports ONNX (fp32 and fp16), builds TensorRT plans when TensorRT and a GPU are present, and
precompiles the ``compiled`` backend on CUDA (on the CPU only with ``--device cpu``).
Everything lands in ``<engines-dir>/<config name>-<model hash>/`` and is skipped when an
up-to-date manifest is already there (``--force`` rebuilds).  Exit status: 0 when every
requested backend was built or is up to date, 1 on any failure, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from talkrt.build_engines.compiled_build import build_compiled
from talkrt.build_engines.onnx_export import DEFAULT_OPSET, export_onnx
from talkrt.build_engines.specs import ENGINE_MODELS, MODEL_NAMES, default_max_batch, export_specs
from talkrt.build_engines.tensorrt_build import DEFAULT_WORKSPACE_GIB, build_plan
from talkrt.config import PRECISIONS, load_config
from talkrt.engines.compiled import DEFAULT_COMPILE_MODE
from talkrt.engines.manifest import config_dir, engines_root
from talkrt.engines.tensorrt import import_tensorrt
from talkrt.errors import EngineError, TalkrtError
from talkrt.models.weights import load_models

log = logging.getLogger("talkrt.build_engines")

ALL_BACKENDS = ("onnx", "tensorrt", "compiled")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="talkrt-build-engines", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="musetalk", help="config name (musetalk, tiny) or YAML path")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--weights", metavar="DIR", help="official MuseTalk v1.5 weights (default: SYNTHETIC weights)")
    p.add_argument("--backends", help=f"comma list of {','.join(ALL_BACKENDS)} (default: all that can run here)")
    p.add_argument("--precision", choices=PRECISIONS, help="engine precision (default: the config's; CPU: float32)")
    p.add_argument("--onnx-precisions", default="float32,float16", help="ONNX variants to export")
    p.add_argument("--max-batch", type=int, help="largest batch engines accept (default: max(batch_size, 32))")
    p.add_argument("--engines-dir", help="output root (default: $TALKRT_ENGINES_DIR or ./engines)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--compile-mode", default=DEFAULT_COMPILE_MODE, help="torch.compile mode for 'compiled'")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--workspace-gib", type=float, default=DEFAULT_WORKSPACE_GIB, help="TensorRT workspace")
    p.add_argument("--force", action="store_true", help="rebuild even when manifests match")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _choose_backends(requested: str | None, device: torch.device, device_forced: bool,
                     parser: argparse.ArgumentParser) -> tuple[list[str], dict[str, str]]:
    """Backends to build, and the reason each skipped one cannot run here."""
    names = [b.strip() for b in requested.split(",") if b.strip()] if requested else list(ALL_BACKENDS)
    unknown = sorted(set(names) - set(ALL_BACKENDS))
    if unknown or not names:
        parser.error(f"--backends: unknown {unknown}; choose from {','.join(ALL_BACKENDS)}")
    skipped = {}
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
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in ("float32", "float16")]
    if bad:
        parser.error(f"--onnx-precisions: {bad} not supported (float32, float16)")
    return [DTYPES[n] for n in names]


def _export_all(cfg, models, specs, dtypes, device, args) -> dict:
    exported = {}
    for dtype in dtypes:
        for name in MODEL_NAMES:
            exported[(name, dtype)] = export_onnx(cfg, specs[name], specs[name].make_module(models), dtype=dtype,
                                                  device=device, weights_identity=models.identity,
                                                  engines_dir=args.engines_dir, opset=args.opset, force=args.force)
    return exported


def build(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    cfg = load_config(args.config, args.override)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError("--device cuda requested but no CUDA GPU is visible")
    backends, skipped = _choose_backends(args.backends, device, args.device is not None, parser)
    for name, reason in skipped.items():
        log.warning("skipping backend %s: %s", name, reason)
    if not backends:
        log.error("nothing to build: every requested backend was skipped")
        return 1
    precision = args.precision or cfg.pipeline.precision
    if device.type == "cpu" and precision != "float32":
        log.info("the CPU runs float32: using float32 instead of %s", precision)
        precision = "float32"
    dtype = DTYPES[precision]
    max_batch = args.max_batch or default_max_batch(cfg)
    if max_batch < 1:
        parser.error("--max-batch must be >= 1")
    specs = export_specs(cfg, max_batch)
    log.info("building %s for config '%s' into %s (device %s, precision %s, max batch %d)", ",".join(backends),
             cfg.name, config_dir(cfg, args.engines_dir or engines_root()), device, precision, max_batch)
    if not args.weights:
        log.warning("NO --weights GIVEN: building engines from SYNTHETIC random weights (seed %d). They run at "
                    "full speed but produce no lip sync; rebuild with --weights DIR for real output.",
                    cfg.pipeline.weights_seed)
    models = load_models(cfg, args.weights, torch.device("cpu"), torch.float32)
    failures = []
    onnx_dtypes = _onnx_dtypes(args.onnx_precisions, parser) if "onnx" in backends else []
    if "tensorrt" in backends and torch.float32 not in onnx_dtypes:
        onnx_dtypes.append(torch.float32)                  # TensorRT plans are built from the fp32 graph
    exported = {}
    if onnx_dtypes:
        try:
            exported = _export_all(cfg, models, specs, onnx_dtypes, device, args)
        except TalkrtError as exc:
            log.error("ONNX export failed: %s", exc)
            failures.append("onnx")
    if "tensorrt" in backends and "onnx" not in failures:
        try:
            for name in ENGINE_MODELS:
                build_plan(cfg, specs[name], exported[(name, torch.float32)], dtype=dtype,
                           weights_identity=models.identity, engines_dir=args.engines_dir,
                           workspace_gib=args.workspace_gib, force=args.force)
        except TalkrtError as exc:
            log.error("TensorRT build failed: %s", exc)
            failures.append("tensorrt")
    if "compiled" in backends:
        try:
            build_compiled(cfg, models.to(device, dtype), device=device, dtype=dtype, engines_dir=args.engines_dir,
                           buckets=specs["unet"].buckets, mode=args.compile_mode, force=args.force)
        except TalkrtError as exc:
            log.error("compiled build failed: %s", exc)
            failures.append("compiled")
    if failures:
        log.error("engine build FAILED for: %s", ", ".join(failures))
        return 1
    log.info("engines ready in %s", config_dir(cfg, args.engines_dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        status = build(args, parser)
    except TalkrtError as exc:
        log.error("%s", exc)
        return 1
    log.info("done in %.0f s", time.perf_counter() - start)
    return status
