"""Fixed batch buckets, static buffers and per-bucket CUDA graphs, shared by the backends.

A ``BucketedEngine`` runs a callable only at a few fixed batch sizes ("buckets"): a call with
batch ``b`` is copied into preallocated max-batch input buffers, padded up to the smallest
bucket ``>= b``, run (or replayed as a CUDA graph captured for that bucket) and the outputs
are sliced back to ``b`` rows.  Padding rows hold stale but finite data from earlier calls;
every network here treats batch rows independently, so they never affect real rows.

Calls into one engine must be serialised (one stream, or synchronised streams): the input
buffers and graph outputs are reused by the next call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from talkrt.engines.base import Engine, TensorSpec
from talkrt.streams import on_stream
from talkrt.errors import EngineError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PaddingPlan:
    batch: int      # rows the caller passed
    bucket: int     # rows actually run

    @property
    def pad(self) -> int:
        return self.bucket - self.batch


def bucket_for(batch: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``batch`` rows."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    fitting = [b for b in buckets if b >= batch]
    if not fitting:
        raise ValueError(f"batch {batch} exceeds the largest bucket {max(buckets)}")
    return min(fitting)


def plan_padding(batch: int, buckets: Sequence[int]) -> PaddingPlan:
    return PaddingPlan(batch, bucket_for(batch, buckets))


def _as_tuple(result) -> tuple[torch.Tensor, ...]:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


class _CapturedGraph:
    """One CUDA graph with its static outputs (inputs are the engine's shared buffers)."""

    def __init__(self, graph: torch.cuda.CUDAGraph, outputs: tuple[torch.Tensor, ...]):
        self.graph = graph
        self.outputs = outputs


class BucketedEngine(Engine):
    """Runs ``fn(*inputs)`` at fixed batch buckets with static input buffers and optional CUDA graphs.

    ``warmup`` runs every bucket once at construction (this is where ``torch.compile``
    compiles or loads from its cache) and captures the graphs, so no call pays that later.
    ``graph_fallback``: if capture fails, log a warning and run without graphs instead of
    raising ``EngineError``.
    """

    backend = "bucketed"

    def __init__(self, name: str, fn: Callable[..., object], inputs: tuple[TensorSpec, ...],
                 outputs: tuple[TensorSpec, ...], buckets: Sequence[int], *, device: torch.device | str,
                 dtype: torch.dtype, cuda_graphs: bool = False, warmup: bool = True,
                 graph_fallback: bool = False):
        buckets = tuple(sorted(set(int(b) for b in buckets)))
        super().__init__(name, inputs, outputs, max(buckets))
        self.fn = fn
        self.buckets = buckets
        self.device = torch.device(device)
        self.dtype = dtype
        if cuda_graphs and self.device.type != "cuda":
            raise EngineError(f"engine '{name}': CUDA graphs need a CUDA device, got {self.device}")
        self.cuda_graphs = cuda_graphs
        self.graph_fallback = graph_fallback
        self._graphs: dict[int, _CapturedGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if cuda_graphs else None
        with torch.inference_mode():
            self._buffers = {s.name: torch.zeros(_max_shape(s, self.max_batch), device=self.device, dtype=dtype)
                             for s in inputs}
        self.warmup_seconds: dict[int, float] = {}
        if warmup:
            for bucket in self.buckets:
                self.prepare(bucket)

    def _args(self, bucket: int) -> tuple[torch.Tensor, ...]:
        return tuple(self._buffers[s.name][:bucket] for s in self.inputs)

    @torch.inference_mode()
    def prepare(self, bucket: int) -> None:
        """Run ``bucket`` once (compile / autotune happen here) and capture its graph if enabled."""
        if bucket in self._graphs or (bucket in self.warmup_seconds and not self.cuda_graphs):
            return
        start = time.perf_counter()
        if self.device.type == "cuda":
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2 if self.cuda_graphs else 1):   # cuDNN/cuBLAS pick algorithms on first use
                    self.fn(*self._args(bucket))
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
        else:
            self.fn(*self._args(bucket))
        if self.cuda_graphs:
            self._capture(bucket)
        self.warmup_seconds[bucket] = time.perf_counter() - start
        log.info("engine %s (%s%s): batch %d ready in %.1f s", self.name, self.backend,
                 "+graphs" if self.cuda_graphs else "", bucket, self.warmup_seconds[bucket])

    def _capture(self, bucket: int) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                outputs = _as_tuple(self.fn(*self._args(bucket)))
        except Exception as exc:  # noqa: BLE001 - capture failures come as many types
            torch.cuda.synchronize(self.device)
            if not self.graph_fallback:
                raise EngineError(f"engine '{self.name}': CUDA graph capture failed at batch {bucket}: {exc}") from exc
            log.warning("engine %s: CUDA graph capture failed at batch %d (%s); running without CUDA graphs",
                        self.name, bucket, exc)
            self.cuda_graphs = False
            self._graphs.clear()
            return
        self._graphs[bucket] = _CapturedGraph(graph, outputs)

    def _check_shapes(self, feeds: dict[str, torch.Tensor], batch: int) -> None:
        for spec in self.inputs:
            got, want = tuple(feeds[spec.name].shape), self._buffers[spec.name].shape[1:]
            if got[0] != batch or got[1:] != tuple(want):
                raise ValueError(f"engine '{self.name}': input '{spec.name}' has shape {got}, "
                                 f"expected ({batch}, {', '.join(map(str, want))})")

    @torch.inference_mode()
    def run(self, feeds, stream=None):
        batch = self.check_inputs(feeds)
        self._check_shapes(feeds, batch)
        plan = plan_padding(batch, self.buckets)
        with on_stream(stream):
            for spec in self.inputs:
                self._buffers[spec.name][:batch].copy_(feeds[spec.name], non_blocking=True)
            if self.cuda_graphs:
                if plan.bucket not in self._graphs:
                    self.prepare(plan.bucket)
                captured = self._graphs.get(plan.bucket)
            else:
                captured = None
            if captured is not None:
                captured.graph.replay()
                results = captured.outputs
            else:
                results = _as_tuple(self.fn(*self._args(plan.bucket)))
        return {spec.name: value[:batch] for spec, value in zip(self.outputs, results)}


def _max_shape(spec: TensorSpec, max_batch: int) -> tuple[int, ...]:
    return tuple(max_batch if d == "batch" else int(d) for d in spec.shape)


class EagerGraphEngine(BucketedEngine):
    """PyTorch eager module at fixed buckets, CUDA-graph captured per bucket (closes launch overhead)."""

    backend = "eager"

    def __init__(self, name: str, module: torch.nn.Module, inputs: tuple[TensorSpec, ...],
                 outputs: tuple[TensorSpec, ...], buckets: Sequence[int], *, device, dtype,
                 cuda_graphs: bool = True, warmup: bool = True, graph_fallback: bool = False):
        self.module = module
        super().__init__(name, module, inputs, outputs, buckets, device=device, dtype=dtype,
                         cuda_graphs=cuda_graphs, warmup=warmup, graph_fallback=graph_fallback)
