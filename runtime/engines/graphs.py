"""Fixed batch buckets, static buffers and per-bucket CUDA graphs: the one implementation every
bucketed backend (eager with graphs, compiled, TensorRT) runs on.

A ``BucketedEngine`` runs its network only at a few fixed batch sizes ("buckets"): a call with
batch ``b`` is copied into preallocated max-batch input buffers, padded up to the smallest
bucket ``>= b``, run (or replayed as a CUDA graph captured for that bucket) and the outputs
are sliced back to ``b`` rows.  Padding rows hold stale but finite data from earlier calls;
every network here treats batch rows independently, so they never affect real rows.
A backend supplies only ``_launch(rows)``: run the network over the first ``rows`` rows of
the input buffers on the current stream and return the outputs.

Preparing a bucket (first call: artifact load, kernel selection; then graph capture) costs
start-up time, so a warm-up policy says which buckets are prepared up front: ``"all"`` (a
server, whose batches vary), ``"max"`` (only the largest: a file run pads its last partial
batch up to it, which costs at most one batch of compute, instead of stalling mid-run to
prepare a small bucket) or ``"none"``.  A call runs at the smallest *prepared* bucket that
holds it; only when none does is the smallest fitting bucket prepared on the spot.

Calls into one engine must be serialised (one stream, or synchronised streams): the input
buffers and graph outputs are reused by the next call.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Callable, Mapping, Sequence

import torch

from talkrt.engines.base import Engine, TensorSpec
from talkrt.errors import EngineError
from talkrt.streams import on_stream

log = logging.getLogger(__name__)


def bucket_for(batch: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``batch`` rows; ``ValueError`` if ``batch < 1`` or none does."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    fitting = [b for b in buckets if b >= batch]
    if not fitting:
        raise ValueError(f"batch {batch} exceeds the largest bucket {max(buckets)}")
    return min(fitting)


WARMUP_POLICIES = ("all", "max", "none")


def check_warmup_policy(policy: str) -> str:
    """``policy`` if it is one of ``WARMUP_POLICIES``, else ``EngineError``."""
    if policy not in WARMUP_POLICIES:
        raise EngineError(f"unknown engine warm-up policy {policy!r}; choose one of {WARMUP_POLICIES}")
    return policy


def warmup_buckets(policy: str, buckets: Sequence[int]) -> tuple[int, ...]:
    """The buckets ``policy`` (one of ``WARMUP_POLICIES``) prepares; ``EngineError`` for an unknown policy."""
    if check_warmup_policy(policy) == "all":
        return tuple(sorted(buckets))
    return (max(buckets),) if policy == "max" else ()


def _as_tuple(result) -> tuple[torch.Tensor, ...]:
    """A network's result (one tensor or a sequence of them) as a tuple."""
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


class _CapturedGraph:
    """One CUDA graph with its static outputs (inputs are the engine's shared buffers)."""

    def __init__(self, graph: torch.cuda.CUDAGraph, outputs: tuple[torch.Tensor, ...]):
        self.graph = graph
        self.outputs = outputs


class BucketedEngine(Engine):
    """Static max-batch input buffers, bucket padding and optional CUDA graphs around ``_launch``.

    ``input_dtypes`` maps each input name to its buffer dtype (feeds are copied, and cast, into
    the buffers).  A subclass finishes its own set-up, then calls :meth:`warm_up` with its
    warm-up policy (this is where artifacts load, kernels are chosen and graphs are captured).
    ``graph_fallback``: if capture fails, log a warning and run without graphs instead of
    raising ``EngineError``.  Without graphs a call runs at its bucket when ``fixed_shapes``
    (the class attribute) is true, else at its own batch.

    Start-up timing: ``load_seconds`` (artifact loading: plans, compiled functions; 0 for
    eager) and ``warmup_seconds`` (bucket -> seconds of first call + graph capture).
    """

    backend = "bucketed"
    fixed_shapes = True     # False: the backend runs any batch exactly (a dynamic TensorRT profile)

    def __init__(self, name: str, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
                 buckets: Sequence[int], *, device: torch.device | str, input_dtypes: Mapping[str, torch.dtype],
                 cuda_graphs: bool = False, graph_fallback: bool = False):
        buckets = tuple(sorted(set(int(b) for b in buckets)))
        super().__init__(name, inputs, outputs, max(buckets))
        self.buckets = buckets
        self.device = torch.device(device)
        if cuda_graphs and self.device.type != "cuda":
            raise EngineError(f"engine '{name}': CUDA graphs need a CUDA device, got {self.device}")
        self.cuda_graphs = cuda_graphs
        self.graph_fallback = graph_fallback
        self._graphs: dict[int, _CapturedGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if cuda_graphs else None
        with torch.inference_mode():
            self._buffers = {s.name: torch.zeros(s.concrete_shape(self.max_batch), device=self.device,
                                                 dtype=input_dtypes[s.name]) for s in inputs}
        self.load_seconds = 0.0
        self.warmup_seconds: dict[int, float] = {}

    @abc.abstractmethod
    def _launch(self, rows: int) -> tuple[torch.Tensor, ...]:
        """Run the network over ``rows`` rows of the input buffers on the current stream."""

    def _args(self, rows: int) -> tuple[torch.Tensor, ...]:
        """The first ``rows`` rows of every input buffer, in input order."""
        return tuple(self._buffers[s.name][:rows] for s in self.inputs)

    @property
    def prepared_buckets(self) -> tuple[int, ...]:
        """Buckets prepared so far (run once, graph captured when graphs are on), ascending."""
        return tuple(sorted(self.warmup_seconds))

    def warm_up(self, policy: str = "all") -> None:
        """:meth:`prepare` the buckets ``policy`` names (see ``WARMUP_POLICIES``)."""
        for bucket in warmup_buckets(policy, self.buckets):
            self.prepare(bucket)

    @torch.inference_mode()
    def prepare(self, bucket: int) -> None:
        """Run ``bucket`` once (first-use work happens here) and capture its graph if enabled.

        Raises ``EngineError`` for a bucket the engine does not have."""
        if bucket not in self.buckets:
            raise EngineError(f"engine '{self.name}' has no batch bucket {bucket} (buckets: {list(self.buckets)})")
        if bucket in self.warmup_seconds:
            return
        start = time.perf_counter()
        if self.device.type == "cuda":
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                # cuDNN/cuBLAS pick algorithms, TensorRT flushes deferred shape work, on first use
                for _ in range(2 if self.cuda_graphs else 1):
                    self._launch(bucket)
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
        else:
            self._launch(bucket)
        if self.cuda_graphs:
            self._capture(bucket)
        self.warmup_seconds[bucket] = time.perf_counter() - start
        log.info("engine %s (%s%s): batch %d ready in %.2f s", self.name, self.backend,
                 "+graphs" if self.cuda_graphs else "", bucket, self.warmup_seconds[bucket])

    def _capture(self, bucket: int) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                outputs = self._launch(bucket)
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

    def _run_bucket(self, batch: int) -> int:
        """The smallest prepared bucket holding ``batch``; prepares the smallest fitting one if none does."""
        ready = [b for b in self.warmup_seconds if b >= batch]
        if ready:
            return min(ready)
        bucket = bucket_for(batch, self.buckets)
        log.info("engine %s: preparing batch %d on first use", self.name, bucket)
        self.prepare(bucket)
        return bucket

    @torch.inference_mode()
    def run(self, feeds, stream=None):
        batch = self.check_inputs(feeds)
        self._check_shapes(feeds, batch)
        exact = not self.fixed_shapes and not self.cuda_graphs     # a dynamic profile runs the batch as is
        bucket = batch if exact else self._run_bucket(batch)
        with on_stream(stream):
            for spec in self.inputs:
                self._buffers[spec.name][:batch].copy_(feeds[spec.name], non_blocking=True)
            captured = self._graphs.get(bucket) if self.cuda_graphs else None   # None after a capture fallback
            if captured is not None:
                captured.graph.replay()
                results = captured.outputs
            else:
                results = self._launch(bucket)
        return {spec.name: value[:batch] for spec, value in zip(self.outputs, results)}


class CallableEngine(BucketedEngine):
    """Runs ``fn(*inputs)`` (a module or any callable) at fixed buckets, all inputs in ``dtype``.

    ``warmup``: the warm-up policy applied at construction (``WARMUP_POLICIES``).
    """

    def __init__(self, name: str, fn: Callable[..., object], inputs: tuple[TensorSpec, ...],
                 outputs: tuple[TensorSpec, ...], buckets: Sequence[int], *, device: torch.device | str,
                 dtype: torch.dtype, cuda_graphs: bool = False, warmup: str = "all", graph_fallback: bool = False):
        check_warmup_policy(warmup)                     # an unknown policy fails before any work
        super().__init__(name, inputs, outputs, buckets, device=device, input_dtypes={s.name: dtype for s in inputs},
                         cuda_graphs=cuda_graphs, graph_fallback=graph_fallback)
        self.fn = fn
        self.dtype = dtype
        self.warm_up(warmup)

    def _launch(self, rows: int) -> tuple[torch.Tensor, ...]:
        return _as_tuple(self.fn(*self._args(rows)))


class EagerGraphEngine(CallableEngine):
    """PyTorch eager module at fixed buckets, CUDA-graph captured per bucket (closes launch overhead)."""

    backend = "eager"

    def __init__(self, name: str, module: torch.nn.Module, inputs: tuple[TensorSpec, ...],
                 outputs: tuple[TensorSpec, ...], buckets: Sequence[int], *, device, dtype,
                 cuda_graphs: bool = True, warmup: str = "all", graph_fallback: bool = False):
        self.module = module
        super().__init__(name, module, inputs, outputs, buckets, device=device, dtype=dtype,
                         cuda_graphs=cuda_graphs, warmup=warmup, graph_fallback=graph_fallback)
