"""Shared helpers of the benchmarks: machine description, sample inputs, percentiles.

:func:`machine_info` is what every benchmark JSON carries under ``"machine"`` (no host name):
Python, OS, CPU count, torch / CUDA / cuDNN versions, GPU name, memory, compute capability and
driver, and the versions of the optional GPU packages when installed.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_VIDEO = "sample_avatar.mp4"
SAMPLE_AUDIO = "sample_speech.wav"
_OPTIONAL_PACKAGES = ("cupy-cuda13x", "cupy-cuda12x", "PyNvVideoCodec", "tensorrt", "onnxruntime", "onnxruntime-gpu")


def gpu_slug(name: str) -> str:
    """``'NVIDIA H100 80GB HBM3'`` -> ``'nvidia-h100-80gb-hbm3'`` (file-name safe)."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not slug:
        raise ValueError(f"cannot make a file name from GPU name {name!r}")
    return slug


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def driver_version() -> str | None:
    """NVIDIA driver version from pynvml when installed, else ``nvidia-smi``; None without one."""
    try:
        import pynvml  # type: ignore[import-not-found]
        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001 - pynvml missing or no driver: try nvidia-smi
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("nvidia-smi failed: %s", exc)
        return None
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    return lines[0] if lines else None


def gpu_info(index: int = 0) -> dict[str, Any] | None:
    """Name, memory, compute capability and SM count of CUDA device ``index``; None on CPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(index)
    return {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
            "compute_capability": f"{props.major}.{props.minor}", "sm_count": props.multi_processor_count,
            "count": torch.cuda.device_count()}


def machine_info() -> dict[str, Any]:
    """Everything a benchmark figure depends on besides the code (no host name)."""
    import torch

    from talkrt import __version__

    gpu = gpu_info()
    info: dict[str, Any] = {
        "talkrt": __version__,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpu": gpu,
        "driver": driver_version() if gpu else None,
        "packages": {name: v for name in _OPTIONAL_PACKAGES if (v := _package_version(name))},
    }
    return info


def gpu_name(machine: dict[str, Any] | None) -> str:
    """The GPU name of a :func:`machine_info` dict, or ``'cpu'``."""
    gpu = (machine or {}).get("gpu") or {}
    return str(gpu.get("name") or "cpu")


@dataclass(frozen=True)
class SampleInputs:
    video: Path
    audio: Path


def sample_inputs(video: str | Path | None = None, audio: str | Path | None = None) -> SampleInputs:
    """The checkout's sample clip (``tests/data``) unless paths are given; ``FileNotFoundError`` if absent."""
    root = REPO_ROOT / "tests" / "data"

    def find(given: str | Path | None, name: str) -> Path:
        if given is not None:
            return Path(given)
        if not (root / name).is_file():
            raise FileNotFoundError(f"sample {name} not found in {root}; pass --video/--audio or run `make sample`")
        return root / name

    return SampleInputs(video=find(video, SAMPLE_VIDEO), audio=find(audio, SAMPLE_AUDIO))


def trim_clip(clip: Any, seconds: float | None) -> Any:
    """The first ``seconds`` of an :class:`talkrt.media.audio.AudioClip` (all of it when None)."""
    from talkrt.media.audio import AudioClip

    if seconds is None or seconds * clip.sample_rate >= clip.num_samples:
        return clip
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    samples = clip.samples[: int(round(seconds * clip.sample_rate))]
    return AudioClip(samples=samples, sample_rate=clip.sample_rate, duration_s=len(samples) / clip.sample_rate)


def percentiles(values: Any, qs: tuple[float, ...] = (50, 95, 99)) -> dict[str, float]:
    """``{"p50": .., "p95": .., "p99": ..}`` (linear interpolation); NaN for no values."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {f"p{q:g}": float("nan") for q in qs}
    return {f"p{q:g}": float(np.percentile(arr, q)) for q in qs}


def default_config_and_device(config: str | None, device: str) -> tuple[str, str]:
    """``musetalk`` on CUDA, ``tiny`` on the CPU unless given; ``auto`` resolved."""
    import torch

    dev = device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    return (config or ("musetalk" if dev.startswith("cuda") else "tiny")), dev


class HostCores:
    """Mean host CPU cores this process used inside the block: CPU seconds of all its threads
    (libx264's included: PyAV runs it in-process) over wall seconds. ``cores`` after the block;
    ``available``: the cores this process may run on."""

    def __init__(self):
        self.cores = float("nan")
        self.available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    def __enter__(self) -> HostCores:
        import time
        self._cpu, self._wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        import time
        wall = time.perf_counter() - self._wall
        self.cores = (time.process_time() - self._cpu) / wall if wall > 0 else float("nan")
