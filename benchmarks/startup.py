"""Start-up benchmark: seconds from process start to the first output frame, step by step.

    python -m benchmarks.startup [--backends eager,compiled] [--repeats 3] [--json PATH]

Each backend runs ``run_pipeline`` (the console script, a fresh process every time) on the
bundled sample: one warm-up run fills the avatar cache and the page cache ("warm caches"),
then ``--repeats`` runs are timed. The breakdown is the CLI's own (``--json``'s ``startup``:
interpreter, checks, imports, weights, engines, tracker and audio, avatar, first batch, and
``to_first_frame``, their sum); the table shows the median of every step and the whole
process's wall time. A backend that cannot run here (no engines built) is reported, not fatal.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import default_config_and_device, machine_info, sample_inputs

log = logging.getLogger(__name__)


def run_once(backend: str, config: str, device: str, work: Path, engines_dir: str | None, tag: str) -> dict:
    """One CLI process; its start-up breakdown and wall time, or {"error": ...}."""
    inputs = sample_inputs()
    report = work / f"{backend}-{tag}.json"
    cmd = [sys.executable, "-m", "talkrt.cli", "--config", config, "--device", device, "--backend", backend,
           "--video", str(inputs.video), "--audio", str(inputs.audio), "--out", str(work / f"{backend}-{tag}.mp4"),
           "--cache-dir", str(work / "cache"), "--json", str(report), "--no-progress"]
    if engines_dir:
        cmd += ["--engines-dir", engines_dir]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if "ERROR" in line] or proc.stderr.splitlines()[-3:]
        return {"error": " | ".join(lines)[-400:]}
    doc = json.loads(report.read_text())
    return {**doc["startup"], "process_wall": wall, "pipeline": doc["seconds"]["pipeline"], "frames": doc["frames"]}


def bench(backends: list[str], config: str, device: str, repeats: int, engines_dir: str | None) -> dict:
    work = Path(tempfile.mkdtemp(prefix="talkrt-startup-"))
    rows = []
    for backend in backends:
        warm = run_once(backend, config, device, work, engines_dir, "warm")
        if "error" in warm:
            log.warning("%s: %s", backend, warm["error"])
            rows.append({"backend": backend, "error": warm["error"]})
            continue
        runs = [run_once(backend, config, device, work, engines_dir, f"run{i}") for i in range(repeats)]
        failed = [r["error"] for r in runs if "error" in r]
        if failed:
            rows.append({"backend": backend, "error": failed[0]})
            continue
        median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        rows.append({"backend": backend, "runs": runs, "median": median})
        log.info("%s: first frame after %.2f s (median of %d)", backend, median["to_first_frame"], repeats)
    return {"config": config, "device": device, "repeats": repeats, "rows": rows}


def markdown(results: dict) -> str:
    steps = next((list(r["median"]) for r in results["rows"] if "median" in r), [])
    steps = [s for s in steps if s != "frames"]
    lines = ["| backend | " + " | ".join(f"{s} s" for s in steps) + " |", "|---|" + "---:|" * len(steps)]
    for r in results["rows"]:
        if "median" in r:
            lines.append(f"| {r['backend']} | " + " | ".join(f"{r['median'][s]:.2f}" for s in steps) + " |")
        else:
            lines.append(f"| {r['backend']} | not run: {r['error']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="eager,compiled", help="comma list of engine backends")
    p.add_argument("--config", default=None, help="default: musetalk on CUDA, tiny on the CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--engines-dir", default=None, help="prebuilt engines (default: the CLI's, ./engines)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config, device = default_config_and_device(args.config, args.device)
    results = bench([b.strip() for b in args.backends.split(",") if b.strip()], config, device, args.repeats,
                    args.engines_dir)
    results["machine"] = machine_info()
    print(markdown(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
