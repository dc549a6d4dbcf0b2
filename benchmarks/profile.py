"""Profile one pipeline run on the bundled sample clip and say where the time went.

    python -m benchmarks.profile --out DIR [--config musetalk|tiny] [--device auto|cpu|cuda]
                                   [--video V --audio A] [--seconds S] [--no-nsys]

A warm-up run first (avatar cache, compilation, allocator), then the profiled run, both on the
first ``--seconds`` of the speech (default: all 6 s on CUDA, 1 s on the CPU).

* ``nsys`` on PATH (and not ``--no-nsys``): the command re-executes itself under
  ``nsys profile --trace cuda,nvtx,osrt --gpu-video-device all -o DIR/talkrt`` with
  ``TALKRT_NVTX=1``; the report ``DIR/talkrt.nsys-rep`` is exported to ``DIR/talkrt.sqlite`` and
  summarised by ``nsys stats`` (``DIR/talkrt_*.csv``); GPU busy time comes from the CUPTI
  kernel / memcpy / memset intervals inside the ``talkrt.run`` NVTX range.
* otherwise: ``torch.profiler`` with CPU (+ CUDA when available) activities; the Chrome trace is
  ``DIR/trace.json`` (open in chrome://tracing or ui.perfetto.dev) and GPU busy time comes from
  its kernel / memcpy / memset events inside the ``talkrt.run`` range.

Either way ``DIR/stages.md`` and ``DIR/profile.json`` (a ``profile`` section for
``benchmarks.report``) are written and a table is printed: per stage ms per frame and share of
the wall time, an ``other`` row for what no stage covers (avatar cache load, setup, mux), and the
GPU idle time over the run's wall time ('n/a' on the CPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RUN_RANGE = "talkrt.run"
GPU_TRACE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
NSYS_GPU_TABLES = ("CUPTI_ACTIVITY_KIND_KERNEL", "CUPTI_ACTIVITY_KIND_MEMCPY", "CUPTI_ACTIVITY_KIND_MEMSET")
CHILD_FLAG = "--nsys-child"


# ------------------------------------------------------------------------------ GPU busy time

def union_length(intervals: Iterable[tuple[float, float]], window: tuple[float, float]) -> float:
    """Total length of the union of ``intervals`` clipped to ``window`` (any time unit)."""
    lo, hi = window
    clipped = sorted((max(a, lo), min(b, hi)) for a, b in intervals if b > lo and a < hi)
    total, cur_a, cur_b = 0.0, None, None
    for a, b in clipped:
        if cur_b is None or a > cur_b:
            if cur_b is not None:
                total += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    if cur_b is not None:
        total += cur_b - cur_a
    return total


@dataclass(frozen=True)
class GpuBusy:
    busy_s: float
    window_s: float
    intervals: int

    @property
    def idle_s(self) -> float:
        return max(self.window_s - self.busy_s, 0.0)

    @property
    def idle_share(self) -> float:
        return self.idle_s / self.window_s if self.window_s > 0 else 0.0


def gpu_busy_from_chrome_trace(trace: dict[str, Any], range_name: str = RUN_RANGE) -> GpuBusy | None:
    """GPU busy time inside the CPU-side ``range_name`` of a torch.profiler Chrome trace (µs)."""
    events = [e for e in trace.get("traceEvents", []) if isinstance(e, dict) and e.get("ph") == "X"]
    windows = [e for e in events if e.get("name") == range_name and e.get("cat") == "user_annotation"]
    if not windows:
        return None
    w = max(windows, key=lambda e: float(e.get("dur", 0)))
    window = (float(w["ts"]), float(w["ts"]) + float(w.get("dur", 0)))
    gpu = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
           for e in events if e.get("cat") in GPU_TRACE_CATEGORIES]
    inside = [iv for iv in gpu if iv[1] > window[0] and iv[0] < window[1]]
    if not inside:
        return None
    return GpuBusy(union_length(inside, window) / 1e6, (window[1] - window[0]) / 1e6, len(inside))


def gpu_busy_from_nsys_sqlite(path: Path, range_name: str = RUN_RANGE) -> GpuBusy | None:
    """GPU busy time inside the NVTX range ``range_name`` of an ``nsys export --type sqlite`` file (ns)."""
    con = sqlite3.connect(str(path))
    try:
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "NVTX_EVENTS" not in tables:
            return None
        if "StringIds" in tables:
            query = ("SELECT n.start, n.end FROM NVTX_EVENTS n LEFT JOIN StringIds s ON n.textId = s.id "
                     "WHERE COALESCE(n.text, s.value) = ? AND n.end IS NOT NULL")
        else:
            query = "SELECT start, end FROM NVTX_EVENTS WHERE text = ? AND end IS NOT NULL"
        ranges = list(con.execute(query, (range_name,)))
        if not ranges:
            return None
        start, end = max(ranges, key=lambda r: r[1] - r[0])
        intervals: list[tuple[float, float]] = []
        for table in NSYS_GPU_TABLES:
            if table in tables:
                intervals += con.execute(f"SELECT start, end FROM {table} WHERE end > ? AND start < ?",  # noqa: S608
                                         (start, end)).fetchall()
    finally:
        con.close()
    if not intervals:
        return None
    return GpuBusy(union_length(intervals, (start, end)) / 1e9, (end - start) / 1e9, len(intervals))


# ------------------------------------------------------------------------------ stage summary

@dataclass(frozen=True)
class StageShare:
    name: str
    ms_per_frame: float
    share: float          # of the run's wall time


@dataclass(frozen=True)
class ProfileSummary:
    config: str
    device: str
    tool: str
    frames: int
    wall_s: float
    stages: tuple[StageShare, ...]
    gpu: GpuBusy | None

    def to_section(self) -> dict[str, Any]:
        """The ``profile`` section of a benchmark JSON (see :mod:`benchmarks.report`)."""
        return {"config": self.config, "device": self.device, "tool": self.tool, "frames": self.frames,
                "wall_s": self.wall_s, "fps": self.frames / self.wall_s if self.wall_s > 0 else 0.0,
                "stages": {s.name: s.ms_per_frame for s in self.stages},
                "gpu": None if self.gpu is None else {**asdict(self.gpu), "idle_s": self.gpu.idle_s,
                                                       "idle_share": self.gpu.idle_share}}


def summarise(stage_table: list[tuple[str, float, float]], frames: int, wall_s: float, *, config: str,
              device: str, tool: str, gpu: GpuBusy | None) -> ProfileSummary:
    """Stage shares of the wall time plus an ``other`` row for time no stage covers."""
    rows = [StageShare(name, ms, ms * frames / 1000.0 / wall_s if wall_s > 0 else 0.0)
            for name, ms, _ in stage_table]
    covered = sum(r.ms_per_frame for r in rows) * frames / 1000.0
    if wall_s > covered:
        other = wall_s - covered
        rows.append(StageShare("other", 1000.0 * other / max(frames, 1), other / wall_s))
    return ProfileSummary(config, device, tool, frames, wall_s, tuple(rows), gpu)


def format_summary(s: ProfileSummary) -> str:
    lines = [f"talkrt profile: config={s.config} device={s.device} tool={s.tool} frames={s.frames} "
             f"wall={s.wall_s:.3f} s ({1000 * s.wall_s / max(s.frames, 1):.2f} ms/frame)",
             f"{'stage':<18}{'ms/frame':>10}{'share':>9}"]
    lines += [f"{r.name:<18}{r.ms_per_frame:>10.2f}{100 * r.share:>8.1f}%" for r in s.stages]
    if s.gpu is None:
        lines.append("GPU idle: n/a" + (" (CPU run)" if not s.device.startswith("cuda") else
                                        " (no GPU activity recorded in the trace)"))
    else:
        lines.append(f"GPU idle: {1000 * s.gpu.idle_s:.1f} ms of {1000 * s.gpu.window_s:.1f} ms wall "
                     f"({100 * s.gpu.idle_share:.1f}%), busy {1000 * s.gpu.busy_s:.1f} ms "
                     f"over {s.gpu.intervals} kernels/copies")
    return "\n".join(lines)


def write_outputs(out: Path, summary: ProfileSummary) -> None:
    from benchmarks.common import machine_info

    (out / "stages.md").write_text("```\n" + format_summary(summary) + "\n```\n")
    payload = {"machine": machine_info(), "profile": summary.to_section()}
    (out / "profile.json").write_text(json.dumps(payload, indent=2))


# ------------------------------------------------------------------------------ running

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks.profile", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (trace, tables, nsys report)")
    p.add_argument("--config", help="musetalk (default on CUDA) or tiny (default on CPU) or a .yaml")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--video", help="avatar video (default: tests/data/sample_avatar.mp4)")
    p.add_argument("--audio", help="speech (default: tests/data/sample_speech.wav)")
    p.add_argument("--seconds", type=float,
                   help="use the first S seconds of the audio (default: all on CUDA, 1 s on the CPU)")
    p.add_argument("--backend", help="engine backend (default: from the config)")
    p.add_argument("--cache-dir", help="avatar cache folder (default: ~/.cache/talkrt/avatars)")
    p.add_argument("--no-nsys", action="store_true", help="use torch.profiler even when nsys is on PATH")
    p.add_argument(CHILD_FLAG, action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _run_twice(args: argparse.Namespace, out: Path, profiled_ctx: Any) -> tuple[Any, str, str]:
    """Warm-up run, then the run inside ``profiled_ctx()``; returns (RunReport, config, device)."""
    from benchmarks.common import default_config_and_device, sample_inputs, trim_clip
    from talkrt.config import load_config
    from talkrt.media.audio import load_audio
    from talkrt.media.probe import probe_video
    from talkrt.pipeline import run_pipeline
    from talkrt.profiling import nvtx_range
    from talkrt.session import build_session

    config, device = default_config_and_device(args.config, args.device)
    inputs = sample_inputs(args.video, args.audio)
    seconds = args.seconds if args.seconds is not None else (None if device.startswith("cuda") else 1.0)
    info = probe_video(inputs.video)
    clip = trim_clip(load_audio(inputs.audio), seconds)
    cfg = load_config(config, ["pipeline.stage_sync=true"])   # stage ranges that match GPU work
    parts = build_session(cfg, device=device, backend=args.backend, cache_dir=args.cache_dir)
    log.info("warm-up run (%s, %.2f s of audio)", config, clip.duration_s)
    warm = out / ".warmup.mp4"
    run_pipeline(parts, inputs.video, info, inputs.audio, clip, warm)
    warm.unlink(missing_ok=True)
    log.info("profiled run")
    with profiled_ctx():
        with nvtx_range(RUN_RANGE):
            report = run_pipeline(parts, inputs.video, info, inputs.audio, clip, out / "profiled.mp4")
    return report, cfg.name, device


def run_torch_profiler(args: argparse.Namespace, out: Path) -> ProfileSummary:
    import contextlib

    import torch
    from torch.profiler import ProfilerActivity, profile

    from talkrt.profiling import torch_profiler_ranges

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    holder: dict[str, Any] = {}

    @contextlib.contextmanager
    def profiled():
        with profile(activities=activities) as prof, torch_profiler_ranges():
            yield
        holder["prof"] = prof

    report, config, device = _run_twice(args, out, profiled)
    trace_path = out / "trace.json"
    holder["prof"].export_chrome_trace(str(trace_path))
    log.info("Chrome trace: %s", trace_path)
    gpu = None
    if device.startswith("cuda"):
        gpu = gpu_busy_from_chrome_trace(json.loads(trace_path.read_text()))
    return summarise(report.stage_table, report.frames, report.seconds, config=config, device=device,
                     tool="torch.profiler", gpu=gpu)


def run_nsys_child(args: argparse.Namespace, out: Path) -> None:
    """Inside nsys: the two runs with NVTX ranges; the parent reads ``child.json``."""
    import contextlib

    report, config, device = _run_twice(args, out, contextlib.nullcontext)
    child = {"stage_table": report.stage_table, "frames": report.frames, "seconds": report.seconds,
             "config": config, "device": device}
    (out / "child.json").write_text(json.dumps(child))


def nsys_command(nsys: str, out: Path, argv: list[str]) -> list[str]:
    return [nsys, "profile", "--trace", "cuda,nvtx,osrt", "--gpu-video-device", "all", "--force-overwrite", "true",
            "-o", str(out / "talkrt"), sys.executable, "-m", "benchmarks.profile", *argv, CHILD_FLAG]


def run_under_nsys(nsys: str, argv: list[str], out: Path) -> ProfileSummary:
    env = {**os.environ, "TALKRT_NVTX": "1"}
    cmd = nsys_command(nsys, out, argv)
    log.info("running under nsys: %s", " ".join(cmd))
    rc = subprocess.run(cmd, env=env, check=False).returncode
    child_path = out / "child.json"
    if rc != 0 or not child_path.is_file():
        raise RuntimeError(f"nsys run failed (exit {rc}); see the output above")
    rep, sqlite_path = out / "talkrt.nsys-rep", out / "talkrt.sqlite"
    for extra in ([nsys, "export", "--type", "sqlite", "--force-overwrite", "true", "--output", str(sqlite_path),
                   str(rep)],
                  [nsys, "stats", "--report", "nvtx_sum,cuda_gpu_kern_sum", "--format", "csv",
                   "--force-export", "true", "--output", str(out / "talkrt"), str(rep)]):
        if subprocess.run(extra, check=False, capture_output=True).returncode != 0:
            log.warning("'%s' failed; continuing", " ".join(extra[:2]))
    child = json.loads(child_path.read_text())
    gpu = gpu_busy_from_nsys_sqlite(sqlite_path) if sqlite_path.is_file() else None
    log.info("nsys report: %s", rep)
    return summarise([tuple(r) for r in child["stage_table"]], child["frames"], child["seconds"],
                     config=child["config"], device=child["device"], tool="nsys", gpu=gpu)


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if getattr(args, CHILD_FLAG.lstrip("-").replace("-", "_")):
        run_nsys_child(args, out)
        return 0
    nsys = None if args.no_nsys else shutil.which("nsys")
    if nsys:
        summary = run_under_nsys(nsys, raw, out)
    else:
        log.info("nsys not on PATH%s: profiling with torch.profiler", " (--no-nsys)" if args.no_nsys else "")
        summary = run_torch_profiler(args, out)
    write_outputs(out, summary)
    print(format_summary(summary))
    print(f"outputs in {out}/ (stages.md, profile.json, {'talkrt.nsys-rep' if nsys else 'trace.json'})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
