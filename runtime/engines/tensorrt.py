"""``TensorRTEngine``: a serialised TensorRT 10+ plan behind the ``Engine`` interface.

Modelled on NVIDIA's TensorRT demo ``engine.py`` but with the named-tensor API only
(``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``): buffers are allocated
once for the max batch, tensor addresses are set once, and with ``cuda_graphs`` one graph
per batch bucket is captured (a smaller batch is padded up to its bucket).

``tensorrt`` is imported lazily: without it this module still imports, the manifest logic
still works, and building an engine raises ``EngineError``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from talkrt.config import TalkrtConfig
from talkrt.engines.base import Engine, TensorSpec
from talkrt.engines.graphs import plan_padding
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


class TensorRTEngine(Engine):
    """Runs a TensorRT plan on the caller's stream; outputs alias buffers reused next call."""

    backend = "tensorrt"

    def __init__(self, cfg: TalkrtConfig, name: str, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
                 *, dtype: torch.dtype, weights_identity: str, max_batch: int, buckets: Sequence[int],
                 engines_dir: str | Path | None = None, device: torch.device | str = "cuda",
                 cuda_graphs: bool = True, warmup: bool = True):
        super().__init__(name, inputs, outputs, max_batch)
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise EngineError(f"TensorRT engine '{name}' needs a CUDA device, got {self.device}")
        path = plan_path(cfg, name, dtype, engines_dir)
        manifest_path = path.with_suffix(".json")
        trt = import_tensorrt()
        manifest = read_manifest(manifest_path, f"TensorRT plan '{name}'", cfg.name)
        expected = expected_plan_manifest(cfg, name, dtype, weights_identity, trt_version=trt.__version__,
                                          device=self.device)
        check_plan_manifest(manifest, expected, path=path, max_batch=max_batch, cfg_name=cfg.name)
        if not path.is_file():
            raise EngineError(f"TensorRT plan {path} is missing; {rebuild_hint(cfg.name)}")
        self.buckets = tuple(sorted({b for b in buckets if b <= max_batch} | {max_batch}))
        self.cuda_graphs = cuda_graphs
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if self._engine is None:
                raise EngineError(f"TensorRT could not deserialise {path}; {rebuild_hint(cfg.name)}")
            self._context = self._engine.create_execution_context()
            self._allocate()
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, int]] = {}
        self._pool = torch.cuda.graph_pool_handle() if cuda_graphs else None
        if warmup and cuda_graphs:
            for bucket in self.buckets:
                self._capture(bucket)
        log.info("TensorRT engine %s loaded from %s (batch <= %d%s)", name, path, max_batch,
                 f", CUDA graphs at {self.buckets}" if cuda_graphs else "")

    def _allocate(self) -> None:
        engine, trt = self._engine, self._trt
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        want = {s.name for s in self.inputs} | {s.name for s in self.outputs}
        if set(names) != want:
            raise EngineError(f"TensorRT plan for '{self.name}' has tensors {sorted(names)}, expected {sorted(want)}; "
                              f"{rebuild_hint()}")
        self._buffers: dict[str, torch.Tensor] = {}
        for spec in self.inputs:
            shape = tuple(self.max_batch if d == "batch" else int(d) for d in spec.shape)
            self._context.set_input_shape(spec.name, shape)
            dtype = _torch_dtype(trt, engine.get_tensor_dtype(spec.name))
            self._buffers[spec.name] = torch.zeros(shape, dtype=dtype, device=self.device)
        for spec in self.outputs:
            shape = tuple(self._context.get_tensor_shape(spec.name))
            dtype = _torch_dtype(trt, engine.get_tensor_dtype(spec.name))
            self._buffers[spec.name] = torch.empty(shape, dtype=dtype, device=self.device)
        for name, buf in self._buffers.items():
            self._context.set_tensor_address(name, buf.data_ptr())

    def _set_batch(self, batch: int) -> None:
        for spec in self.inputs:
            shape = (batch, *self._buffers[spec.name].shape[1:])
            if not self._context.set_input_shape(spec.name, shape):
                raise EngineError(f"TensorRT engine '{self.name}': shape {shape} rejected for '{spec.name}'")

    def _execute(self, stream: torch.cuda.Stream) -> None:
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise EngineError(f"TensorRT engine '{self.name}': execute_async_v3 failed")

    def _capture(self, bucket: int) -> None:
        """Run once (flushes deferred shape work), then capture ``execute_async_v3`` for ``bucket``."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        self._set_batch(bucket)
        with torch.cuda.stream(side):
            self._execute(side)
        side.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=side):
            self._execute(side)
        torch.cuda.synchronize(self.device)
        self._graphs[bucket] = (graph, bucket)

    @torch.inference_mode()
    def run(self, feeds, stream=None):
        batch = self.check_inputs(feeds)
        stream = stream or torch.cuda.current_stream(self.device)
        with torch.cuda.stream(stream):
            for spec in self.inputs:
                self._buffers[spec.name][:batch].copy_(feeds[spec.name], non_blocking=True)
            if self.cuda_graphs:
                bucket = plan_padding(batch, self.buckets).bucket
                if bucket not in self._graphs:
                    self._capture(bucket)
                self._graphs[bucket][0].replay()
            else:
                self._set_batch(batch)
                self._execute(stream)
        return {spec.name: self._buffers[spec.name][:batch] for spec in self.outputs}
