"""One combined benchmark result: JSON + Markdown summary + PNG plots.

Benchmarks write a JSON dict each (:func:`save_benchmark`), ``write_report`` renders one dict
and ``python -m benchmarks.report --inputs out/bench_*.json --out out/report`` merges files
written by separate runs first.  Every section is optional; rows missing a needed key are
skipped with a warning.  Canonical shapes (``ms`` milliseconds per call, ``fps`` frames/s):

``machine``   :func:`benchmarks.common.machine_info` (filled in when absent)
``engines``   ``{"rows": [{"model": str, "backend": str, "batch": int, "ms": float, "fps": float?}]}``
``kernels``   ``{"rows": [{"kernel": str, "impl": str, "batch": int, "ms": float, "fps": float?}]}``
              (``fps`` defaults to ``batch * 1000 / ms``; plotted as fps against batch, one line per
              backend / impl, one panel per model / kernel)
``pipeline``  ``{"stages": {stage: ms_per_frame}, "label": str?, "fps": float?}``, or several runs as
              ``{"runs": [<that>, ...]}`` (one stacked bar of stage ms/frame per run)
``profile``   one pipeline run as written by :mod:`benchmarks.profile` (also stacked)
``realtime``  ``{"rows": [{"batch": int, "p50_ms": float, "p95_ms": float, "p99_ms": float}],
              "target_p95_ms": float?, "lookahead_ms": float?}`` as written by :mod:`benchmarks.realtime`

The native outputs of the other benchmarks are accepted too: ``benchmarks.engines``
(``{"ms": {backend: {model: {batch: ms}}}}``), ``benchmarks.kernels`` (rows with ``op``,
``resolution``, ``batch`` and ``gpu_us`` / ``gpu_call_us`` / ``cpu_us`` / ``cvcuda_us`` per frame) and
``benchmarks.pipeline`` (``{"rows": [{"resolution", "path", "fps", "stages_ms_per_frame"}]}``).
A file without a section key is taken as the section its name names (``bench_engines.json``).
Any other top-level key is kept in the JSON and listed in the Markdown.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCHEMA = "talkrt-bench/1"
ROW_SECTIONS = {"engines": ("model", "backend"), "kernels": ("kernel", "impl")}
STAGE_SECTIONS = ("pipeline", "profile")
SECTIONS = (*ROW_SECTIONS, *STAGE_SECTIONS, "realtime")
META_KEYS = ("schema", "machine", "sources")
KERNEL_IMPLS = {"gpu_us": "gpu kernels", "gpu_call_us": "gpu call", "cpu_us": "cpu", "cvcuda_us": "cv-cuda"}


def save_benchmark(path: str | Path, section: str, data: dict[str, Any], **extra: Any) -> Path:
    """Write ``{"machine": ..., section: data, **extra}`` for :func:`merge_results` to pick up."""
    from benchmarks.common import machine_info

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema": SCHEMA, "machine": machine_info(), section: data, **extra}, indent=2))
    return path


# ------------------------------------------------------------------------------ normalising

def _native_rows(key: str, section: dict[str, Any]) -> list[dict[str, Any]]:
    """Canonical rows from the engines / kernels benchmarks' own JSON."""
    rows: list[dict[str, Any]] = []
    if key == "engines" and isinstance(section.get("ms"), dict):
        for backend, models in section["ms"].items():
            for model, batches in (models or {}).items():
                rows += [{"model": model, "backend": backend, "batch": batch, "ms": ms}
                         for batch, ms in (batches or {}).items()]
    if key == "kernels":
        for row in section.get("rows") or []:
            if "kernel" in row or "op" not in row:
                continue
            label = f"{row['op']} {row.get('resolution', '')}".strip()
            for field_name, impl in KERNEL_IMPLS.items():
                us = row.get(field_name)
                if isinstance(us, (int, float)) and us > 0:
                    rows.append({"kernel": label, "impl": impl, "batch": row.get("batch"),
                                 "ms": us * float(row.get("batch") or 0) / 1000.0, "fps": 1e6 / us})
    return rows


def fps_rows(section: dict[str, Any] | None, group_key: str, series_key: str,
             key: str | None = None) -> list[dict[str, Any]]:
    """Valid rows with numeric ``batch`` and ``fps`` (derived from ``ms`` when absent)."""
    section = section if isinstance(section, dict) else {}
    candidates = [r for r in (section.get("rows") or []) if isinstance(r, dict) and "op" not in r]
    candidates += _native_rows(key, section) if key else []
    rows, skipped = [], 0
    for row in candidates:
        try:
            batch = int(row["batch"])
            fps = float(row["fps"]) if row.get("fps") is not None else batch * 1000.0 / float(row["ms"])
            rows.append({**row, "batch": batch, "fps": fps, group_key: str(row.get(group_key, "?")),
                         series_key: str(row.get(series_key, row.get("backend", "?")))})
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            skipped += 1
    if skipped:
        log.warning("skipped %d row(s) without a usable batch and fps/ms", skipped)
    return rows


def _run_label(run: dict[str, Any], key: str, i: int, n: int) -> str:
    if run.get("label"):
        return str(run["label"])
    named = " ".join(str(run[k]) for k in ("resolution", "path") if run.get(k))
    return named or (key if n == 1 else f"{key} {i + 1}")


def stage_runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every run with a stages dict (``stages`` or ``stages_ms_per_frame``) of the pipeline and profile."""
    runs = []
    for key in STAGE_SECTIONS:
        section = results.get(key)
        if not isinstance(section, dict):
            continue
        items = next((section[k] for k in ("runs", "rows") if isinstance(section.get(k), list)), [section])
        for i, run in enumerate(items):
            stages = (run.get("stages") or run.get("gpu_stages_ms_per_frame")
                      or run.get("stages_ms_per_frame")) if isinstance(run, dict) else None
            if not isinstance(stages, dict) or not stages:
                continue
            clean = {str(k): float(v) for k, v in stages.items() if isinstance(v, (int, float))}
            runs.append({**run, "label": _run_label(run, key, i, len(items)), "stages": clean})
    return runs


def _merge_section(old: Any, new: Any, name: str) -> Any:
    if not (isinstance(old, dict) and isinstance(new, dict)):
        log.warning("section '%s' appears twice; keeping the later one", name)
        return new
    if name in STAGE_SECTIONS:
        def runs(section: dict[str, Any]) -> list[Any]:
            return section.get("runs") or section.get("rows") or [section]
        return {"runs": runs(old) + runs(new)}
    merged = {**old, **new}
    if isinstance(old.get("rows"), list) or isinstance(new.get("rows"), list):
        merged["rows"] = list(old.get("rows") or []) + list(new.get("rows") or [])
    return merged


def merge_results(inputs: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Merge ``(source name, dict)`` pairs: rows and runs concatenate, the first ``machine`` wins."""
    from benchmarks.common import gpu_name

    merged: dict[str, Any] = {"schema": SCHEMA, "sources": []}
    for source, data in inputs:
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object")
        if not any(k in data for k in SECTIONS):
            guess = next((s for s in SECTIONS if s in Path(source).stem), None)
            if guess is None:
                raise ValueError(f"{source}: no known section {SECTIONS} and its name does not say which")
            data = {"machine": data.get("machine"), guess: {k: v for k, v in data.items() if k != "machine"}}
        machine = data.get("machine")
        merged["sources"].append({"path": source, "gpu": gpu_name(machine) if machine else None})
        if machine:
            if "machine" not in merged:
                merged["machine"] = machine
            elif gpu_name(machine) != gpu_name(merged["machine"]):
                log.warning("%s was measured on %s, the report's machine is %s", source, gpu_name(machine),
                            gpu_name(merged["machine"]))
        for key, value in data.items():
            if key in META_KEYS:
                continue
            merged[key] = _merge_section(merged[key], value, key) if key in merged else value
    return merged


# ------------------------------------------------------------------------------ plots

def _pyplot() -> Any | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: skipping plots (pip install matplotlib)")
        return None
    return plt


def plot_fps_vs_batch(plt: Any, rows: list[dict[str, Any]], group_key: str, series_key: str, title: str,
                      path: Path) -> Path | None:
    groups: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        groups[row[group_key]][row[series_key]].append((row["batch"], row["fps"]))
    if not groups:
        return None
    ncols = min(4, len(groups))
    nrows = -(-len(groups) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 4 * nrows), squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for ax, (group, series) in zip(axes.flat, sorted(groups.items())):
        for name, points in sorted(series.items()):
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=name)
        ax.set(title=f"{title}: {group}", xlabel="batch size", ylabel="frames/s")
        ax.set_xscale("log", base=2)
        batches = sorted({b for points in series.values() for b, _ in points})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_stage_bars(plt: Any, runs: list[dict[str, Any]], path: Path) -> Path | None:
    if not runs:
        return None
    stages: list[str] = []
    for run in runs:
        stages += [s for s in run["stages"] if s not in stages]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(runs) + 3), 4.5))
    bottoms = [0.0] * len(runs)
    labels = [run["label"] for run in runs]
    for stage in stages:
        heights = [run["stages"].get(stage, 0.0) for run in runs]
        ax.bar(labels, heights, bottom=bottoms, label=stage)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.set(ylabel="ms per frame", title="where the time goes, per stage")
    ax.legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ markdown

def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows] + [""]


def _num(value: Any) -> Any:
    return float(value) if isinstance(value, (int, float)) else "-"


def machine_lines(machine: dict[str, Any]) -> list[str]:
    gpu = machine.get("gpu") or {}
    rows = [["GPU", f"{gpu.get('name', 'none')} x{gpu.get('count', 0)}" if gpu else "none (CPU)"],
            ["driver", machine.get("driver") or "n/a"], ["CUDA (torch)", machine.get("cuda") or "n/a"],
            ["torch", machine.get("torch", "?")], ["python", machine.get("python", "?")],
            ["CPU count", machine.get("cpu_count", "?")], ["talkrt", machine.get("talkrt", "?")]]
    rows += [[name, version] for name, version in sorted((machine.get("packages") or {}).items())]
    return _table(["", ""], rows)


def markdown(results: dict[str, Any], pngs: dict[str, Path]) -> str:
    out = ["# talkrt benchmark report", "", "## Machine", ""] + machine_lines(results.get("machine") or {})
    for key, (group, series) in ROW_SECTIONS.items():
        rows = fps_rows(results.get(key), group, series, key)
        if rows:
            out += [f"## {key.capitalize()}", ""]
            out += _table([group, series, "batch", "ms", "frames/s"],
                          [[r[group], r[series], r["batch"], float(r.get("ms") or r["batch"] * 1000 / r["fps"]),
                            r["fps"]] for r in sorted(rows, key=lambda r: (r[group], r[series], r["batch"]))])
            if key in pngs:
                out += [f"![{key}]({pngs[key].name})", ""]
    runs = stage_runs(results)
    if runs:
        out += ["## Pipeline stages (ms per frame)", ""]
        stages = list(dict.fromkeys(s for run in runs for s in run["stages"]))
        out += _table(["stage", *[run["label"] for run in runs]],
                      [[s, *[float(run["stages"].get(s, 0.0)) for run in runs]] for s in stages] +
                      [["**total**", *[float(sum(run["stages"].values())) for run in runs]]] +
                      ([["frames/s", *[_num(run.get("fps")) for run in runs]]]
                       if any(run.get("fps") is not None for run in runs) else []))
        if "stages" in pngs:
            out += [f"![stages]({pngs['stages'].name})", ""]
    realtime = results.get("realtime")
    if isinstance(realtime, dict) and realtime.get("rows"):
        target = realtime.get("target_p95_ms")
        out += ["## Real-time latency (audio arrived -> frame encoded)", ""]
        if isinstance(target, (int, float)):
            lookahead = realtime.get("lookahead_ms")
            out += [f"Target: p95 < {target:g} ms on top of the audio look-ahead "
                    f"({lookahead:.0f} ms)." if isinstance(lookahead, (int, float)) else
                    f"Target: p95 < {target:g} ms on top of the audio look-ahead.", ""]
        keys = ["batch", "p50_ms", "p95_ms", "p99_ms", "compute_p95_ms"]
        out += _table(keys, [[row.get(k, "") for k in keys] for row in realtime["rows"]])
    others = [k for k in results if k not in (*SECTIONS, *META_KEYS)]
    if others:
        out += ["## Other sections (in the JSON, not rendered)", "", ", ".join(sorted(others)), ""]
    sources = results.get("sources") or []
    if sources:
        out += ["Sources: " + ", ".join(str(s.get("path")) for s in sources), ""]
    return "\n".join(out)


def write_report(results: dict[str, Any], out_dir: str | Path, *, plots: bool = True) -> tuple[Path, Path, list[Path]]:
    """Write ``report.json``, ``report.md`` and the PNG plots into ``out_dir``."""
    from benchmarks.common import machine_info

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"schema": SCHEMA, **results}
    if not results.get("machine"):
        results["machine"] = machine_info()
    pngs: dict[str, Path] = {}
    plt = _pyplot() if plots else None
    if plt is not None:
        for key, (group, series) in ROW_SECTIONS.items():
            path = plot_fps_vs_batch(plt, fps_rows(results.get(key), group, series, key), group, series, key,
                                     out / f"{key}_fps.png")
            if path:
                pngs[key] = path
        path = plot_stage_bars(plt, stage_runs(results), out / "stages.png")
        if path:
            pngs["stages"] = path
    json_path, md_path = out / "report.json", out / "report.md"
    json_path.write_text(json.dumps(results, indent=2, default=str))
    md_path.write_text(markdown(results, pngs))
    return json_path, md_path, list(pngs.values())


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Shell-expanded paths, or glob patterns the shell left alone; raises if nothing matches."""
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        paths += [Path(m) for m in matches]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing or not paths:
        raise FileNotFoundError(f"benchmark JSON not found: {missing or patterns}")
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.report", description="merge benchmark JSON files into one report")
    p.add_argument("--inputs", nargs="+", required=True, help="benchmark JSON files (globs allowed)")
    p.add_argument("--out", required=True, help="output folder (report.json, report.md, *.png)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    paths = expand_inputs(args.inputs)
    results = merge_results([(str(path), json.loads(path.read_text())) for path in paths])
    json_path, md_path, pngs = write_report(results, args.out, plots=not args.no_plots)
    print(f"report: {json_path} {md_path} " + " ".join(str(p) for p in pngs))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
