"""ONNX export of one ``ModelSpec`` (dynamic batch axis, fp32 or fp16, external data over 2 GB).

Uses the TorchScript exporter (``dynamo=False``): it handles the diffusers UNet / VAE and the
Whisper encoder on torch 2.11 and 2.13 alike without ``onnxscript``.  The tracer specialises
Python branches on the sample batch (e.g. diffusers' ``if batch >= 64: contiguous()``), none
of which changes numerics, and ``dynamic_axes`` keeps the batch axis symbolic.

Files, beside a JSON manifest::

    onnx/<model>.<dtype>.onnx           graph (+ weights when under 2 GB)
    onnx/<model>.<dtype>.onnx.data      weights, only when the model is over 2 GB
    onnx/<model>.<dtype>.json
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from talkrt.config import TalkrtConfig
from talkrt.engines.manifest import (
    config_dir, dtype_name, manifest_mismatches, read_manifest, write_manifest,
)
from talkrt.engines.specs import ModelSpec
from talkrt.errors import EngineError
from talkrt.hashing import sha256_files

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
PROTOBUF_LIMIT = 2_000_000_000       # a single ONNX protobuf must stay under 2 GiB; keep a margin
EXPORT_BATCH = 2                     # trace batch: not 1, so nothing specialises on a singleton axis


@dataclass(frozen=True)
class OnnxModel:
    """An exported model on disk."""

    name: str
    dtype: str
    path: Path
    manifest_path: Path
    sha256: str
    external_data: bool

    @property
    def files(self) -> list[Path]:
        return [self.path] + ([external_data_path(self.path)] if self.external_data else [])


def onnx_dir(cfg: TalkrtConfig, engines_dir: str | Path | None = None) -> Path:
    return config_dir(cfg, engines_dir) / "onnx"


def onnx_path(cfg: TalkrtConfig, name: str, dtype: torch.dtype, engines_dir: str | Path | None = None) -> Path:
    return onnx_dir(cfg, engines_dir) / f"{name}.{dtype_name(dtype)}.onnx"


def external_data_path(path: Path) -> Path:
    return path.with_name(path.name + ".data")


def onnx_digest(path: Path) -> str:
    """SHA-256 of the graph file and, when present, its external-data file."""
    data = external_data_path(path)
    return sha256_files([path] + ([data] if data.is_file() else []))


def check_onnx(path: Path) -> None:
    """``onnx.checker`` by path (works for models with external data over 2 GB)."""
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise EngineError(f"{path}: ONNX checker failed: {exc}") from exc


def _expected(cfg: TalkrtConfig, spec: ModelSpec, dtype: torch.dtype, opset: int, identity: str) -> dict:
    return {"kind": "onnx", "model": spec.name, "dtype": dtype_name(dtype), "opset": opset,
            "config_hash": cfg.model_hash(), "weights_identity": identity,
            "inputs": list(spec.input_names), "outputs": list(spec.output_names)}


def _existing(path: Path, manifest_path: Path, expected: dict, name: str, dtype: torch.dtype) -> OnnxModel | None:
    try:
        manifest = read_manifest(manifest_path, "onnx")
    except EngineError:
        return None
    if manifest_mismatches(manifest, expected) or not path.is_file():
        return None
    digest = onnx_digest(path)
    if digest != manifest.get("sha256"):
        return None
    return OnnxModel(name, dtype_name(dtype), path, manifest_path, digest, bool(manifest.get("external_data")))


def export_onnx(cfg: TalkrtConfig, spec: ModelSpec, module: torch.nn.Module, *, dtype: torch.dtype,
                device: torch.device | str = "cpu", weights_identity: str, engines_dir: str | Path | None = None,
                opset: int = DEFAULT_OPSET, force: bool = False) -> OnnxModel:
    """Export ``module`` (any device/dtype; a converted copy is traced) and check the result."""
    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    path = onnx_path(cfg, spec.name, dtype, engines_dir)
    manifest_path = path.with_suffix(".json")
    expected = _expected(cfg, spec, dtype, opset, weights_identity)
    if not force and (found := _existing(path, manifest_path, expected, spec.name, dtype)) is not None:
        log.info("onnx %s (%s) is up to date: %s", spec.name, dtype_name(dtype), path)
        return found
    device = torch.device(device)
    start = time.perf_counter()
    param = next(module.parameters())
    if param.device != device or param.dtype != dtype:
        module = copy.deepcopy(module).to(device=device, dtype=dtype)
    module = module.eval()
    feeds = spec.sample_inputs(EXPORT_BATCH, device=device, dtype=dtype)
    names = list(spec.input_names) + list(spec.output_names)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.stem}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        traced = staging / "model.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")       # TracerWarnings on static-shape branches, deprecation notes
            torch.onnx.export(module, tuple(feeds[n] for n in spec.input_names), str(traced),
                              input_names=list(spec.input_names), output_names=list(spec.output_names),
                              dynamic_axes={n: {0: "batch"} for n in names}, opset_version=opset,
                              do_constant_folding=True, dynamo=False)
        external = _finalise(traced, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    check_onnx(path)
    digest = onnx_digest(path)
    write_manifest(manifest_path, {
        **expected, "config_name": cfg.name, "torch_version": torch.__version__, "onnx_version": onnx.__version__,
        "file": path.name, "external_data": external, "sha256": digest,
        "batch_profile": {"min": spec.profile.min, "opt": spec.profile.opt, "max": spec.profile.max},
        "export_seconds": round(time.perf_counter() - start, 2),
    })
    log.info("exported %s (%s) to %s in %.1f s%s", spec.name, dtype_name(dtype), path, time.perf_counter() - start,
             " (external data)" if external else "")
    return OnnxModel(spec.name, dtype_name(dtype), path, manifest_path, digest, external)


def _finalise(traced: Path, path: Path) -> bool:
    """Move the traced model to ``path``: one file, or graph + one ``.data`` file over 2 GB."""
    model = onnx.load(str(traced), load_external_data=True)
    data = external_data_path(path)
    data.unlink(missing_ok=True)
    size = sum(t.ByteSize() for t in model.graph.initializer)
    if size < PROTOBUF_LIMIT:
        onnx.save_model(model, str(path))
        return False
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    data.chmod(path.stat().st_mode & 0o777)               # onnx creates it owner-only
    return True
