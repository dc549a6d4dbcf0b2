"""Where built engines live and the JSON manifests that say what they were built for.

Layout (one folder per config, named by config name + model hash)::

    $TALKRT_ENGINES_DIR or ./engines/
      musetalk-v1.5-<model_hash>/
        onnx/unet.float32.onnx (+ .onnx.data when over 2 GB), unet.float32.json, ...
        tensorrt/unet.float16.plan, unet.float16.json, timing.cache
        compiled/cuda-float16/unet-b16.bin, ..., manifest.json

Every artifact has a manifest; the run time compares the fields that must match this
machine and config and refuses a mismatch with an ``EngineError`` that says to rebuild.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from talkrt.config import TalkrtConfig
from talkrt.errors import EngineError

MANIFEST_VERSION = 1
ENGINES_DIR_ENV = "TALKRT_ENGINES_DIR"
DEFAULT_ENGINES_DIR = "engines"


def rebuild_hint(config: str | None = None) -> str:
    """How to build engines, naming ``config`` as ``--config`` takes it (a shipped name or a path)."""
    name = config or "CONFIG"
    return (f"build them on this machine with `make engines CONFIG={name}` "
            f"(python -m talkrt.build_engines --config {name})")


def engines_root(engines_dir: str | os.PathLike | None = None) -> Path:
    """``engines_dir``, else ``$TALKRT_ENGINES_DIR``, else ``./engines``."""
    if engines_dir is not None:
        return Path(engines_dir)
    return Path(os.environ.get(ENGINES_DIR_ENV) or DEFAULT_ENGINES_DIR)


def config_dir(cfg: TalkrtConfig, engines_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding every engine built for ``cfg``'s model architecture."""
    return engines_root(engines_dir) / f"{cfg.name}-{cfg.model_hash()}"


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"`` (the config's precision spelling)."""
    return str(dtype).removeprefix("torch.")


def machine_info(device: torch.device | str) -> dict[str, str]:
    """What a built artifact depends on about this machine (GPU model and compute capability)."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return {"device_type": "cuda", "gpu_name": torch.cuda.get_device_name(index),
                "compute_capability": f"{major}.{minor}"}
    # Inductor's CPU code is specialised to the thread count, so it is part of the cache key.
    return {"device_type": device.type, "gpu_name": "none", "compute_capability": "none",
            "cpu_arch": platform.machine(), "cpu_threads": str(torch.get_num_threads())}


def write_manifest(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` (plus ``manifest_version``) as indented JSON, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"manifest_version": MANIFEST_VERSION, **data}, indent=2, sort_keys=True))
    tmp.replace(path)
    return path


def read_manifest(path: Path, what: str, cfg_name: str | None = None) -> dict[str, Any]:
    """Load a manifest; a missing or corrupt one is an ``EngineError`` telling how to rebuild."""
    if not path.is_file():
        raise EngineError(f"{what}: no manifest at {path}; {rebuild_hint(cfg_name)}")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EngineError(f"{what}: unreadable manifest {path} ({exc}); {rebuild_hint(cfg_name)}") from exc
    if not isinstance(data, dict):
        raise EngineError(f"{what}: manifest {path} is not a JSON object; {rebuild_hint(cfg_name)}")
    return data


def manifest_mismatches(found: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Human-readable differences for every key of ``expected`` that ``found`` does not match."""
    diffs = []
    for key, want in expected.items():
        have = found.get(key, "<missing>")
        if have != want:
            diffs.append(f"{key}: built for {have!r}, this run needs {want!r}")
    return diffs


def check_manifest(found: dict[str, Any], expected: dict[str, Any], *, what: str, path: Path,
                   cfg_name: str | None = None) -> None:
    """Raise ``EngineError`` listing every mismatch between a manifest and this run."""
    diffs = manifest_mismatches(found, {"manifest_version": MANIFEST_VERSION, **expected})
    if diffs:
        raise EngineError(f"{what} at {path} does not match this machine/config ({'; '.join(diffs)}); "
                          f"{rebuild_hint(cfg_name)}")
