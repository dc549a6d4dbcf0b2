"""``TensorRTEngine``: a serialised TensorRT 10+ plan behind the ``Engine`` interface.

Modelled on NVIDIA's TensorRT demo ``engine.py`` but with the named-tensor API only
(``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``): buffers are allocated
once for the max batch and tensor addresses are set once.  Buckets, padding and the per-bucket
CUDA graphs are ``BucketedEngine``'s (``talkrt.engines.graphs``); without graphs a call runs
at its own batch (the plan's profile is dynamic).

``tensorrt`` is imported lazily: without it this module still imports, the manifest logic
still works, and building an engine raises ``EngineError``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from talkrt.config import TalkrtConfig
from talkrt.engines.base import TensorSpec
from talkrt.engines.graphs import BucketedEngine, check_warmup_policy
from talkrt.engines.manifest import (
    check_manifest, config_dir, dtype_name, machine_info, read_manifest, rebuild_hint,
)
from talkrt.errors import EngineError

log = logging.getLogger(__name__)

TIMING_CACHE_FILE = "timing.cache"


def import_tensorrt():
    """The ``tensorrt`` module (10+), or ``EngineError`` explaining how to get it."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise EngineError("TensorRT is not installed: `pip install 'tensorrt>=10'` (NVIDIA's index) to build "
                          "and run TensorRT engines") from exc
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise EngineError(f"TensorRT {trt.__version__} is too old: talkrt needs TensorRT 10 or newer")
    return trt


def tensorrt_available() -> bool:
    try:
        import_tensorrt()
    except EngineError:
        return False
    return True


def tensorrt_dir(cfg: TalkrtConfig, engines_dir: str | Path | None = None) -> Path:
    return config_dir(cfg, engines_dir) / "tensorrt"


def plan_path(cfg: TalkrtConfig, name: str, dtype: torch.dtype, engines_dir: str | Path | None = None) -> Path:
    return tensorrt_dir(cfg, engines_dir) / f"{name}.{dtype_name(dtype)}.plan"


def expected_plan_manifest(cfg: TalkrtConfig, name: str, dtype: torch.dtype, weights_identity: str, *,
                           trt_version: str, device: torch.device | None = None,
                           machine: dict[str, str] | None = None) -> dict[str, Any]:
    """Manifest fields a plan must carry to run here (``machine`` overrides ``machine_info(device)``)."""
    machine = machine if machine is not None else machine_info(device or torch.device("cuda"))
    return {"kind": "tensorrt", "model": name, "tensorrt_version": trt_version,
            "gpu_name": machine["gpu_name"], "compute_capability": machine["compute_capability"],
            "precision": dtype_name(dtype), "config_hash": cfg.model_hash(), "weights_identity": weights_identity}


def check_plan_manifest(manifest: dict[str, Any], expected: dict[str, Any], *, path: Path, max_batch: int,
                        cfg_name: str | None = None) -> None:
    """Refuse a plan built elsewhere or for too small a batch (``EngineError`` saying to rebuild)."""
    check_manifest(manifest, expected, what=f"TensorRT plan '{expected['model']}'", path=path, cfg_name=cfg_name)
    for name, shapes in manifest.get("profiles", {}).items():
        if shapes["max"][0] < max_batch:
            raise EngineError(f"TensorRT plan {path}: input '{name}' supports batch <= {shapes['max'][0]}, "
                              f"this run needs {max_batch}; {rebuild_hint(cfg_name)} with --max-batch {max_batch}")


def _torch_dtype(trt, trt_dtype) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.INT8: torch.int8, trt.DataType.BOOL: torch.bool}
    for name, torch_dtype in (("BF16", torch.bfloat16), ("INT64", torch.int64)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = torch_dtype
    return table[trt_dtype]


class TensorRTEngine(BucketedEngine):
    """Runs a TensorRT plan on the caller's stream; outputs alias buffers reused next call.

    Raises ``EngineError`` when TensorRT is missing, the device is not CUDA, or the plan is
    missing, unreadable or built for another machine, config, precision or a smaller batch.
    """

    backend = "tensorrt"
    fixed_shapes = False

    def __init__(self, cfg: TalkrtConfig, name: str, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
                 *, dtype: torch.dtype, weights_identity: str, max_batch: int, buckets: Sequence[int],
                 engines_dir: str | Path | None = None, device: torch.device | str = "cuda",
                 cuda_graphs: bool = True, warmup: str = "all"):
        check_warmup_policy(warmup)
        device = torch.device(device)
        if device.type != "cuda":
            raise EngineError(f"TensorRT engine '{name}' needs a CUDA device, got {device}")
        path = plan_path(cfg, name, dtype, engines_dir)
        trt = import_tensorrt()
        manifest = read_manifest(path.with_suffix(".json"), f"TensorRT plan '{name}'", cfg.source)
        expected = expected_plan_manifest(cfg, name, dtype, weights_identity, trt_version=trt.__version__,
                                          device=device)
        check_plan_manifest(manifest, expected, path=path, max_batch=max_batch, cfg_name=cfg.source)
        if not path.is_file():
            raise EngineError(f"TensorRT plan {path} is missing; {rebuild_hint(cfg.source)}")
        start = time.perf_counter()
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(device):
            self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if self._engine is None:
                raise EngineError(f"TensorRT could not deserialise {path}; {rebuild_hint(cfg.source)}")
            self._context = self._engine.create_execution_context()
        _check_tensor_names(self._engine, name, inputs, outputs)
        input_dtypes = {s.name: _torch_dtype(trt, self._engine.get_tensor_dtype(s.name)) for s in inputs}
        super().__init__(name, inputs, outputs, {b for b in buckets if b <= max_batch} | {max_batch},
                         device=device, input_dtypes=input_dtypes, cuda_graphs=cuda_graphs)
        self._outputs = self._bind()
        self.load_seconds = time.perf_counter() - start
        self.warm_up(warmup)
        log.info("TensorRT engine %s loaded from %s in %.2f s (batch <= %d%s, prepared %s)", name, path,
                 self.load_seconds, max_batch, ", CUDA graphs" if self.cuda_graphs else "", list(self.prepared_buckets))

    def _bind(self) -> dict[str, torch.Tensor]:
        """Set every input to its max-batch shape, allocate the outputs, set all tensor addresses once."""
        for spec in self.inputs:
            self._context.set_input_shape(spec.name, tuple(self._buffers[spec.name].shape))
        self._rows = self.max_batch
        outputs = {}
        with torch.inference_mode():
            for spec in self.outputs:
                dtype = _torch_dtype(self._trt, self._engine.get_tensor_dtype(spec.name))
                shape = tuple(self._context.get_tensor_shape(spec.name))
                outputs[spec.name] = torch.empty(shape, dtype=dtype, device=self.device)
        for name, buf in {**self._buffers, **outputs}.items():
            self._context.set_tensor_address(name, buf.data_ptr())
        return outputs

    def _launch(self, rows: int) -> tuple[torch.Tensor, ...]:
        if rows != self._rows:      # shape changes are host-side work: never inside a graph capture
            for spec in self.inputs:
                shape = (rows, *self._buffers[spec.name].shape[1:])
                if not self._context.set_input_shape(spec.name, shape):
                    raise EngineError(f"TensorRT engine '{self.name}': shape {shape} rejected for '{spec.name}'")
            self._rows = rows
        if not self._context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise EngineError(f"TensorRT engine '{self.name}': execute_async_v3 failed")
        return tuple(self._outputs[spec.name][:rows] for spec in self.outputs)


def _check_tensor_names(engine, name: str, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> None:
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    want = {s.name for s in inputs} | {s.name for s in outputs}
    if names != want:
        raise EngineError(f"TensorRT plan for '{name}' has tensors {sorted(names)}, expected {sorted(want)}; "
                          f"{rebuild_hint()}")
