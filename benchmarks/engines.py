"""Engine benchmark: ms/call, frames/s and TFLOP/s per backend and batch for the UNet + VAE decoder.

    python -m benchmarks.engines                      # musetalk, fp16, batches 1,4,8,16,32,64
    python -m benchmarks.engines --quick --json out.json
    python -m benchmarks.engines --config tiny --device cpu --quick     # smoke test

Backends: eager, eager+graphs (CUDA graph per batch), compiled and compiled+graphs (from
``make engines`` artifacts when they cover the batches, else compiled here for
``--compiled-batches`` only, within ``--budget-s``), tensorrt (when TensorRT and plans exist).
FLOPs are counted once per batch with ``FlopCounterMode`` on the eager module; the peak is a
large fp16 GEMM measured in the same run.  Prints a Markdown table; ``--json`` writes all numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from talkrt.config import load_config
from talkrt.engines.base import EagerEngine
from talkrt.engines.compiled import CompiledEngine, add_compile_arguments, open_compiled_build, settings_from_args
from talkrt.engines.graphs import EagerGraphEngine
from talkrt.engines.manifest import dtype_name
from talkrt.engines.specs import export_specs
from talkrt.engines.tensorrt import TensorRTEngine, tensorrt_available
from talkrt.errors import EngineError
from talkrt.models.weights import load_models

log = logging.getLogger("benchmarks.engines")

MODELS = ("unet", "vae_decoder")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class Report:
    device: str
    torch_version: str
    dtype: str
    config: str
    gemm_peak_tflops: float
    flops: dict[str, dict[int, int]] = field(default_factory=dict)          # model -> batch -> FLOPs per call
    ms: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)  # backend -> model -> batch -> ms
    startup_s: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, iters: int, warmup: int) -> float:
    """Median wall time per call in ms (each call synchronised; CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def gemm_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: torch.mm(a, b), device, iters=20 if device.type == "cuda" else 3, warmup=3)
    return 2 * n**3 / (ms * 1e-3) / 1e12


@torch.inference_mode()
def count_flops(module: torch.nn.Module, feeds: dict[str, torch.Tensor]) -> int:
    with FlopCounterMode(display=False) as counter:
        module(*feeds.values())
    return int(counter.get_total_flops())


def _bench_engines(report: Report, label: str, engines: dict, feeds: dict, batches, device, iters, warmup) -> None:
    per_model = report.ms.setdefault(label, {})
    for name, engine in engines.items():
        for batch in batches:
            if batch > engine.max_batch or batch not in getattr(engine, "ready", batches):
                continue
            f = feeds[name][batch]
            per_model.setdefault(name, {})[batch] = time_ms(lambda: engine.run(f), device, iters, warmup)
        log.info("%s %s: %s", label, name, {b: round(v, 2) for b, v in per_model.get(name, {}).items()})


def _covered(try_load, batches: list[int]) -> list[int]:
    """The longest prefix of the sorted ``batches`` that ``try_load`` accepts (artifacts built for less)."""
    error = None
    for end in range(len(batches), 0, -1):
        try:
            try_load(batches[:end])
            return batches[:end]
        except EngineError as exc:
            error = error or exc
    raise error


def _compiled(cfg, models, specs, args, batches, device, dtype, started: float, report: Report) -> dict | None:
    """Compiled engines (from artifacts, else compiled here within the budget) with ``.ready`` batches."""
    settings, build = settings_from_args(args), None
    try:
        build = open_compiled_build(cfg, device=device, dtype=dtype, models=MODELS, max_batch=None,
                                    engines_dir=args.engines_dir)
        wanted = [b for b in batches if all(b in build.buckets[m] for m in MODELS)]
        if not wanted:
            raise EngineError(f"the artifacts hold batches {build.buckets}, none of {batches}")
        settings = None
        report.notes.append(f"compiled: from `make engines` artifacts ({build.settings.describe()}), batches {wanted}")
    except EngineError as exc:
        build = None
        if args.quick or device.type != "cuda":
            report.notes.append(f"compiled skipped (no usable artifacts; no cold compiles with --quick or on "
                                f"the CPU): {exc}")
            return None
        wanted = [b for b in args.compiled_batches if b in batches]
        report.notes.append(f"compiled: no usable artifacts, compiled in this run ({settings.describe()}) for "
                            f"batches {wanted} only, cold")
    engines = {}
    for name in MODELS:
        spec = specs[name]
        engine = CompiledEngine(name, spec.make_module(models), spec.inputs, spec.outputs, wanted, device=device,
                                dtype=dtype, build=build, settings=settings, warmup="none")
        engine.ready = []
        for batch in wanted:
            if build is None and time.perf_counter() - started > args.budget_s:
                report.notes.append(f"compiled {name} batch {batch} skipped: time budget {args.budget_s:.0f} s spent")
                continue
            engine.prepare(batch)
            engine.ready.append(batch)
        engines[name] = engine
    return engines


def _tensorrt(cfg, models, specs, args, batches, device, dtype) -> dict:
    """TensorRT engines (CUDA graphs) for the batches the plans' profiles cover."""
    built: dict = {}

    def attempt(bs: list[int]) -> None:
        built["engines"] = {m: TensorRTEngine(cfg, m, specs[m].inputs, specs[m].outputs, dtype=dtype,
                                              weights_identity=models.identity, max_batch=max(bs), buckets=bs,
                                              engines_dir=args.engines_dir, device=device) for m in MODELS}

    _covered(attempt, batches)
    return built["engines"]


def _graphs_of(engines: dict, specs, device, dtype) -> dict:
    """CUDA-graph versions of compiled engines (sharing their functions, so this is capture only)."""
    out = {}
    for name, engine in engines.items():
        if not engine.ready:
            continue
        spec = specs[name]
        graphed = CompiledEngine(name, engine.module, spec.inputs, spec.outputs, engine.ready,
                                 device=device, dtype=dtype, settings=engine.settings,
                                 functions=engine.functions, cuda_graphs=True)
        graphed.ready = list(engine.ready)
        out[name] = graphed
    return out


def run(args: argparse.Namespace) -> Report:
    started = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.precision] if device.type == "cuda" else torch.float32
    cfg = load_config(args.config)
    batches = sorted(set(args.batches))
    specs = export_specs(cfg, max(batches))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = Report(name, torch.__version__, dtype_name(dtype), cfg.name, gemm_peak_tflops(device, dtype))
    log.info("GEMM peak on %s: %.1f TFLOP/s", name, report.gemm_peak_tflops)
    models = load_models(cfg, args.weights, device, dtype)
    feeds = {m: {b: specs[m].sample_inputs(b, device=device, dtype=dtype) for b in batches} for m in MODELS}
    report.flops = {m: {b: count_flops(specs[m].make_module(models), feeds[m][b]) for b in batches} for m in MODELS}
    bench = dict(feeds=feeds, batches=batches, device=device, iters=args.iters, warmup=args.warmup)

    def timed_build(label, factory):
        t0 = time.perf_counter()
        engines = factory()
        _sync(device)
        if engines:
            report.startup_s[label] = round(time.perf_counter() - t0, 2)
        return engines

    eager = timed_build("eager", lambda: {m: EagerEngine(m, specs[m].make_module(models), specs[m].inputs,
                                                         specs[m].outputs, max(batches)) for m in MODELS})
    _bench_engines(report, "eager", eager, **bench)
    on_cuda = device.type == "cuda"
    if on_cuda:
        graphs = timed_build("eager+graphs", lambda: {
            m: EagerGraphEngine(m, specs[m].make_module(models), specs[m].inputs, specs[m].outputs, batches,
                                device=device, dtype=dtype) for m in MODELS})
        _bench_engines(report, "eager+graphs", graphs, **bench)
        del graphs
        torch.cuda.empty_cache()
    else:
        report.notes.append("CUDA graphs and TensorRT need CUDA; on the CPU compiled runs from artifacts only")
    compiled = timed_build("compiled", lambda: _compiled(cfg, models, specs, args, batches, device, dtype,
                                                         started, report))
    if compiled:
        _bench_engines(report, "compiled", compiled, **bench)
        if on_cuda:
            compiled_graphs = timed_build("compiled+graphs", lambda: _graphs_of(compiled, specs, device, dtype))
            _bench_engines(report, "compiled+graphs", compiled_graphs, **bench)
            del compiled_graphs
        del compiled
        if on_cuda:
            torch.cuda.empty_cache()
    if not on_cuda:
        return report
    if tensorrt_available():
        try:
            trt = timed_build("tensorrt+graphs", lambda: _tensorrt(cfg, models, specs, args, batches, device, dtype))
            _bench_engines(report, "tensorrt+graphs", trt, **bench)
        except EngineError as exc:
            report.notes.append(f"tensorrt skipped: {exc}")
    else:
        report.notes.append("tensorrt skipped: TensorRT is not installed")
    report.notes.append(f"total bench time {time.perf_counter() - started:.0f} s")
    return report


def markdown(report: Report) -> str:
    lines = [f"Device: {report.device} | torch {report.torch_version} | {report.dtype} | config {report.config} | "
             f"GEMM peak {report.gemm_peak_tflops:.1f} TFLOP/s", "",
             "| backend | batch | unet ms | vae_decoder ms | sum ms | frames/s | TFLOP/s | % GEMM peak |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for backend, per_model in report.ms.items():
        batches = sorted(set().union(*(d.keys() for d in per_model.values()))) if per_model else []
        for b in batches:
            unet, vae = per_model.get("unet", {}).get(b), per_model.get("vae_decoder", {}).get(b)
            cells = [f"{v:.2f}" if v is not None else "n/a" for v in (unet, vae)]
            if unet is not None and vae is not None:
                total = unet + vae
                tflops = (report.flops["unet"][b] + report.flops["vae_decoder"][b]) / (total * 1e-3) / 1e12
                cells += [f"{total:.2f}", f"{b / total * 1e3:.0f}", f"{tflops:.1f}",
                          f"{100 * tflops / report.gemm_peak_tflops:.0f}%"]
            else:
                cells += ["n/a"] * 4
            lines.append(f"| {backend} | {b} | " + " | ".join(cells) + " |")
    lines += ["", "| backend | start-up s |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report.startup_s.items()]
    lines += [""] + [f"- {note}" for note in report.notes]
    return "\n".join(lines) + "\n"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.engines", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="musetalk")
    p.add_argument("--weights", help="official weights dir (default: synthetic; same speed)")
    p.add_argument("--batches", type=_ints, default=None, help="default 1,4,8,16,32,64 (--quick: 1,16)")
    p.add_argument("--precision", choices=tuple(DTYPES), default="float16")
    p.add_argument("--device", choices=("cuda", "cpu"))
    p.add_argument("--engines-dir", help="where `make engines` put artifacts (default ./engines)")
    add_compile_arguments(p)
    p.add_argument("--compiled-batches", type=_ints, default=[16],
                   help="batches to compile in this run when no artifacts exist (cold compiles take minutes)")
    p.add_argument("--budget-s", type=float, default=300.0, help="stop starting cold compiles after this")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="batches 1,16, fewer iterations, no cold compiles")
    p.add_argument("--json", metavar="PATH", help="write every number as JSON")
    args = p.parse_args(argv)
    args.batches = args.batches or ([1, 16] if args.quick else [1, 4, 8, 16, 32, 64])
    args.iters = args.iters or (5 if args.quick else 20)
    args.warmup = args.warmup or (2 if args.quick else 5)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        report = run(args)
    except Exception:  # noqa: BLE001 - a CLI: report and exit non-zero
        log.exception("benchmark failed")
        return 1
    sys.stdout.write(markdown(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(report), f, indent=2)
        log.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
