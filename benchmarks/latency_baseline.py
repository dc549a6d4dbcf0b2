"""Latency regression: measure per-stage and end-to-end ms per frame, compare with a baseline.

    python -m benchmarks.latency_baseline            # measure and compare (exit 1 on a regression)
    python -m benchmarks.latency_baseline --update   # record tests/latency_baselines/<gpu-slug>.json

The measurement runs the full-size synthetic model (``musetalk``) on CUDA over the first
``clip_seconds`` (2 s) of the bundled sample, after ``warmup`` untimed runs, ``repeats`` times,
and keeps the median of every figure.  ``pytest -m latency`` (tests/test_latency.py) does the
same against the committed baseline of the GPU it runs on.

A figure regresses when ``measured > baseline * (1 + relative) + absolute_ms``; the tolerance is
read from the baseline file (``"tolerance": {"relative": 0.25, "absolute_ms": 2.0}``) and may be
overridden per stage (``"stage_tolerance": {"6.encode": {"relative": 0.5, "absolute_ms": 3}}``).
The baseline also records the setup (config, backend, compose, batch size, clip length); a run
with a different setup fails rather than comparing unlike things.  tests/test_latency.py's
``--slowdown`` option slows a stage on purpose to show that the comparison catches it.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, gpu_slug

log = logging.getLogger(__name__)

BASELINE_DIR = REPO_ROOT / "tests" / "latency_baselines"
TOTAL = "total"                     # the end-to-end figure's name in comparisons
SETUP_KEYS = ("config", "backend", "compose", "batch_size", "clip_seconds")
UPDATE_HINT = "python -m benchmarks.latency_baseline --update"


@dataclass(frozen=True)
class Tolerance:
    relative: float = 0.25
    absolute_ms: float = 2.0

    def limit(self, baseline_ms: float) -> float:
        return baseline_ms * (1.0 + self.relative) + self.absolute_ms

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, default: Tolerance | None = None) -> Tolerance:
        base = default or cls()
        data = data or {}
        return cls(relative=float(data.get("relative", base.relative)),
                   absolute_ms=float(data.get("absolute_ms", base.absolute_ms)))


@dataclass(frozen=True)
class Measurement:
    """Median ms per output frame of every stage and of the whole ``run_pipeline`` call."""

    gpu: str
    config: str
    backend: str
    compose: str
    batch_size: int
    clip_seconds: float
    frames: int
    stages_ms: dict[str, float]
    total_ms: float
    repeats: int = 1

    def setup(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in SETUP_KEYS}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        return cls(gpu=str(data["gpu"]), config=str(data["config"]), backend=str(data["backend"]),
                   compose=str(data["compose"]), batch_size=int(data["batch_size"]),
                   clip_seconds=float(data["clip_seconds"]), frames=int(data["frames"]),
                   stages_ms={str(k): float(v) for k, v in data["stages_ms"].items()},
                   total_ms=float(data["total_ms"]), repeats=int(data.get("repeats", 1)))


@dataclass(frozen=True)
class Baseline:
    measurement: Measurement
    tolerance: Tolerance = field(default_factory=Tolerance)
    stage_tolerance: dict[str, Tolerance] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)

    def tolerance_for(self, name: str) -> Tolerance:
        return self.stage_tolerance.get(name, self.tolerance)

    def to_dict(self) -> dict[str, Any]:
        return {"measurement": self.measurement.to_dict(), "tolerance": asdict(self.tolerance),
                "stage_tolerance": {k: asdict(v) for k, v in self.stage_tolerance.items()},
                "machine": self.machine}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Baseline:
        tol = Tolerance.from_dict(data.get("tolerance"))
        return cls(measurement=Measurement.from_dict(data["measurement"]), tolerance=tol,
                   stage_tolerance={k: Tolerance.from_dict(v, tol) for k, v in (data.get("stage_tolerance") or {}).items()},
                   machine=dict(data.get("machine") or {}))


@dataclass(frozen=True)
class Check:
    name: str
    baseline_ms: float
    measured_ms: float
    limit_ms: float

    @property
    def ok(self) -> bool:
        return self.measured_ms <= self.limit_ms


@dataclass(frozen=True)
class Comparison:
    checks: tuple[Check, ...]
    failures: tuple[str, ...]
    notes: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.failures

    def failures_for(self, *, total: bool) -> list[str]:
        """Failure messages of the end-to-end figure (``total=True``) or of the rest."""
        prefix = f"'{TOTAL}'"
        return [f for f in self.failures if f.startswith(prefix) == total]

    def table(self) -> str:
        lines = [f"{'figure':<18}{'baseline':>10}{'measured':>10}{'limit':>10}  ms/frame"]
        lines += [f"{c.name:<18}{c.baseline_ms:>10.2f}{c.measured_ms:>10.2f}{c.limit_ms:>10.2f}  "
                  f"{'ok' if c.ok else 'SLOWER'}" for c in self.checks]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def compare(baseline: Baseline, measured: Measurement) -> Comparison:
    """Every baseline stage and the total must be within tolerance; setups must match."""
    failures: list[str] = []
    notes: list[str] = []
    checks: list[Check] = []
    base = baseline.measurement
    for key in SETUP_KEYS:
        want, got = getattr(base, key), getattr(measured, key)
        if want != got:
            failures.append(f"setup: baseline has {key}={want!r}, this run has {key}={got!r}; "
                            f"re-record with `{UPDATE_HINT}` if the change is deliberate")
    figures = [(name, ms, measured.stages_ms.get(name)) for name, ms in base.stages_ms.items()]
    figures.append((TOTAL, base.total_ms, measured.total_ms))
    for name, base_ms, got_ms in figures:
        if got_ms is None:
            failures.append(f"'{name}': stage is in the baseline ({base_ms:.2f} ms/frame) but was not measured")
            continue
        tol = baseline.tolerance_for(name)
        check = Check(name, base_ms, got_ms, tol.limit(base_ms))
        checks.append(check)
        if not check.ok:
            failures.append(f"'{name}': {got_ms:.2f} ms/frame, baseline {base_ms:.2f} ms/frame, limit "
                            f"{check.limit_ms:.2f} (+{100 * tol.relative:g}% +{tol.absolute_ms:g} ms)")
    new = [name for name in measured.stages_ms if name not in base.stages_ms]
    if new:
        notes.append(f"stages without a baseline (only the total covers them): {new}; `{UPDATE_HINT}`")
    if base.gpu != measured.gpu:
        notes.append(f"baseline recorded on '{base.gpu}', measured on '{measured.gpu}'")
    return Comparison(tuple(checks), tuple(failures), tuple(notes))


# ------------------------------------------------------------------------------ files

def baseline_path(gpu: str, root: Path = BASELINE_DIR) -> Path:
    return Path(root) / f"{gpu_slug(gpu)}.json"


def load_baseline(path: Path) -> Baseline:
    try:
        return Baseline.from_dict(json.loads(Path(path).read_text()))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a latency baseline ({exc}); re-record with `{UPDATE_HINT}`") from exc


def save_baseline(path: Path, measured: Measurement, machine: dict[str, Any],
                  previous: Baseline | None = None) -> Path:
    """Write the new figures, keeping the tolerances of the previous baseline (if any)."""
    keep = previous or Baseline(measured)
    baseline = Baseline(measured, keep.tolerance, keep.stage_tolerance, machine)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(baseline.to_dict(), indent=2) + "\n")
    return path


# ------------------------------------------------------------------------------ measuring

def measure_latency(*, config: str = "musetalk", device: str = "cuda", backend: str | None = None,
                    compose: str | None = None, seconds: float = 2.0, warmup: int = 1, repeats: int = 3,
                    cache_dir: str | Path | None = None) -> Measurement:
    """Median per-stage and end-to-end ms/frame of ``run_pipeline`` on the bundled sample."""
    import torch

    from benchmarks.common import sample_inputs, trim_clip
    from talkrt.config import load_config
    from talkrt.media.audio import load_audio
    from talkrt.media.probe import probe_video
    from talkrt.pipeline import run_pipeline
    from talkrt.session import build_session

    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    inputs = sample_inputs()
    info = probe_video(inputs.video)
    clip = trim_clip(load_audio(inputs.audio), seconds)
    cfg = load_config(config, ["pipeline.stage_sync=true"])   # per-stage wall times are what it compares
    with tempfile.TemporaryDirectory(prefix="talkrt-latency-") as tmp:
        parts = build_session(cfg, device=device, backend=backend, compose=compose, cache_dir=cache_dir or tmp)
        reports = []
        for i in range(warmup + repeats):
            report = run_pipeline(parts, inputs.video, info, inputs.audio, clip, Path(tmp) / f"run{i}.mp4")
            stage_names = [name for name, _, _ in report.stage_table]
            if i >= warmup:
                reports.append(report)
    stages = {name: statistics.median(dict((n, ms) for n, ms, _ in r.stage_table).get(name, 0.0) for r in reports)
              for name in stage_names}
    total = statistics.median(1000.0 * r.seconds / max(r.frames, 1) for r in reports)
    gpu = torch.cuda.get_device_name(parts.device) if parts.device.type == "cuda" else "cpu"
    return Measurement(gpu=gpu, config=config, backend=parts.backend, compose=parts.compose,
                       batch_size=cfg.pipeline.batch_size, clip_seconds=float(seconds), frames=reports[0].frames,
                       stages_ms=stages, total_ms=total, repeats=repeats)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.latency_baseline", description=__doc__.splitlines()[0])
    p.add_argument("--update", action="store_true", help="record the baseline for this GPU")
    p.add_argument("--config", help="default: the baseline's, else musetalk")
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", help="engine backend (default: the baseline's, else the config's)")
    p.add_argument("--seconds", type=float, help="audio seconds of the sample (default: the baseline's, else 2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", type=Path, default=BASELINE_DIR, help="baseline folder")
    p.add_argument("--cache-dir", help="avatar cache folder (default: a fresh temporary one)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from benchmarks.common import machine_info

    machine = machine_info()
    gpu = (machine.get("gpu") or {}).get("name") or "cpu"
    path = baseline_path(gpu, args.dir)
    previous = load_baseline(path) if path.is_file() else None
    if previous is None and not args.update:
        print(f"no baseline for '{gpu}' at {path}; record one with `{UPDATE_HINT}`")
        return 2
    same = previous.measurement if previous and not args.update else None
    try:
        measured = measure_latency(config=args.config or (same.config if same else "musetalk"), device=args.device,
                                   backend=args.backend or (same.backend if same else None),
                                   compose=same.compose if same else None,
                                   seconds=args.seconds or (same.clip_seconds if same else 2.0),
                                   repeats=args.repeats, cache_dir=args.cache_dir)
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    if args.update:
        save_baseline(path, measured, machine, previous)
        print(f"recorded {path}:\n" + "\n".join(f"  {k:<18}{v:8.2f} ms/frame" for k, v in
                                                 {**measured.stages_ms, TOTAL: measured.total_ms}.items()))
        return 0
    result = compare(previous, measured)
    print(result.table())
    for failure in result.failures:
        print(f"REGRESSION {failure}")
    return 0 if result.ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
