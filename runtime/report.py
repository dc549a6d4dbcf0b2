"""A run's report: the one-line ``key=value`` summary and the JSON document of ``--json``."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from talkrt import __version__
from talkrt.face.geometry import missing_ranges
from talkrt.media.output import create_temp_file
from talkrt.pipeline import RunReport

REPORT_VERSION = 1
_PACKAGES = ("torch", "av", "numpy", "diffusers", "transformers", "cupy-cuda13x", "PyNvVideoCodec")


def no_face_ranges(report: RunReport) -> list[tuple[int, int]]:
    """Output frames without a face as inclusive (first, last) ranges."""
    found = np.ones(report.frames, bool)
    found[report.no_face_frames] = False
    return [(start, end - 1) for start, end in missing_ranges(found)]


def format_ranges(ranges: list[tuple[int, int]]) -> str:
    """``[(0, 12), (40, 40)]`` -> ``"0-12,40"`` (no spaces)."""
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in ranges)


def startup_breakdown(report: RunReport, load_seconds: dict[str, float], *, before_main: float, checks: float,
                      imports: float) -> dict[str, float]:
    """Seconds from process start to the first output frame, step by step, in order: interpreter
    start-up (``before_main``), input checks, imports, ``build_session``'s steps (weights,
    engines, ...), the avatar (preparation or cache load) and the first batch (Whisper on the
    first audio segment, model, compose, handed to the encoder); ``to_first_frame`` is their sum."""
    steps = {"interpreter": before_main, "checks": checks, "imports": imports, **load_seconds,
             "avatar": report.prepare_seconds, "first_batch": report.first_batch_seconds}
    return {**steps, "to_first_frame": sum(steps.values())}


def summary_line(report: RunReport, startup_seconds: float, first_frame_seconds: float | None = None) -> str:
    """One line of ``key=value`` fields with no spaces in any value (the output path is in the
    log and the JSON report, not here, since paths may hold spaces)."""
    fields = {
        "frames": report.frames, "fps": f"{report.fps:.1f}", "seconds": f"{report.seconds:.2f}",
        "startup_s": f"{startup_seconds:.2f}", "prepare_s": f"{report.prepare_seconds:.2f}",
        **({"first_frame_s": f"{first_frame_seconds:.2f}"} if first_frame_seconds is not None else {}),
        "faces": f"{report.faces_found}/{report.frames}", "weights": report.weights, "backend": report.backend,
        "compose": report.compose, "decode": report.decode_path, "encode": report.encode_path,
    }
    return " ".join(f"{k}={str(v).replace(' ', '_')}" for k, v in fields.items())


def versions() -> dict[str, str]:
    """Versions of Python, talkrt and the packages that shape the output (absent ones left out)."""
    found = {"python": platform.python_version(), "talkrt": __version__}
    for name in _PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def report_document(report: RunReport, *, startup_seconds: float, config: str, config_hash: str, device: str,
                    video: Path, audio: Path, startup: dict[str, float] | None = None) -> dict[str, Any]:
    """The JSON report of one run (``--json``): paths absolute, times in seconds, stage times in
    ms per output frame, ``config_hash`` the hash of the model settings (as in engine manifests),
    ``startup`` the :func:`startup_breakdown`."""
    return {
        "report_version": REPORT_VERSION,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": {"video": str(video.resolve()), "audio": str(audio.resolve())},
        "output": str(report.out_path.resolve()),
        "config": config, "config_hash": config_hash, "device": device, "weights": report.weights, "backend": report.backend,
        "compose": report.compose, "decode": report.decode_path, "encode": report.encode_path,
        "frames": report.frames,
        "faces": {"output_frames_with_face": report.faces_found, "output_frames": report.frames,
                  "source_frames": report.source_frames, "no_face_ranges": no_face_ranges(report)},
        "seconds": {"startup": startup_seconds, "preparation": report.prepare_seconds,
                    "pipeline": report.seconds,
                    "total": startup_seconds + report.prepare_seconds + report.seconds},
        "startup": startup or {},
        "fps": report.fps,
        "stages": [{"stage": name, "ms_per_frame": ms, "share": share} for name, ms, share in report.stage_table],
        "frame_bytes_to_host": report.frame_bytes_to_host,
        "encoder_thread_seconds": report.encode_waits,
        "versions": versions(),
    }


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Write ``document`` to ``path`` atomically (a temporary file renamed into place)."""
    temp = create_temp_file(path.parent, "report", ".json")
    try:
        temp.write_text(json.dumps(document, indent=2) + "\n")
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
