"""Per-stage timing, NVTX / torch-profiler ranges and GPU event timing.

``StageClock.stage(name, batch_index, frames)`` wraps one stage of one batch: it opens a range
(only when ranges are on, so it costs nothing otherwise) and adds the stage's wall time to a
per-stage total.  On CUDA the clock synchronises the pipeline's stream at the end of a stage
when ``sync=True`` so that GPU work is charged to the stage that issued it.

Ranges go to NVTX when ``TALKRT_NVTX=1`` and CUDA is available (what ``nsys`` records), and to
``torch.profiler`` (``record_function``) inside :func:`torch_profiler_ranges`.  Code outside
``StageClock`` (decode, color conversion, copies, encode, mux) uses :func:`nvtx_range`::

    with nvtx_range("decode batch=%d", b):   # formatted only when ranges are on
        ...

Environment:
  * ``TALKRT_NVTX=1``: NVTX ranges (read on first use; :func:`configure_ranges` overrides);
  * ``TALKRT_GPU_EVENTS=1``: every StageClock also records CUDA events on its stream, see
    :meth:`StageClock.gpu_seconds`.
"""

from __future__ import annotations

import collections
import contextlib
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any, ContextManager

import torch

ENV_NVTX = "TALKRT_NVTX"
ENV_GPU_EVENTS = "TALKRT_GPU_EVENTS"

_nvtx_on: bool | None = None     # None: resolve from the environment on first use
_torch_on: bool = False          # record_function ranges (inside torch_profiler_ranges)
_NULL: ContextManager[None] = contextlib.nullcontext()


def nvtx_enabled() -> bool:
    """``TALKRT_NVTX=1`` in the environment and a CUDA device to annotate."""
    return os.environ.get(ENV_NVTX, "0") == "1" and torch.cuda.is_available()


def _nvtx() -> bool:
    global _nvtx_on
    if _nvtx_on is None:
        _nvtx_on = nvtx_enabled()
    return _nvtx_on


def configure_ranges(*, nvtx: bool | None = None, reset: bool = False) -> None:
    """Force NVTX ranges on/off for the process; ``reset=True`` re-reads the environment later."""
    global _nvtx_on
    _nvtx_on = None if reset else (_nvtx_on if nvtx is None else bool(nvtx))


def ranges_enabled() -> bool:
    return _torch_on or _nvtx()


@contextlib.contextmanager
def torch_profiler_ranges() -> Iterator[None]:
    """Inside this block, stages and :func:`nvtx_range` also emit ``torch.profiler`` ranges."""
    global _torch_on
    previous, _torch_on = _torch_on, True
    try:
        yield
    finally:
        _torch_on = previous


class _Range:
    """One range pushed to NVTX and/or opened as a torch.profiler ``record_function``."""

    __slots__ = ("label", "nvtx", "record")

    def __init__(self, label: str, nvtx: bool, torch_ranges: bool):
        self.label = label
        self.nvtx = nvtx
        self.record: Any = torch.autograd.profiler.record_function(label) if torch_ranges else None

    def __enter__(self) -> None:
        if self.nvtx:
            torch.cuda.nvtx.range_push(self.label)
        if self.record is not None:
            self.record.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self.record is not None:
            self.record.__exit__(None, None, None)
        if self.nvtx:
            torch.cuda.nvtx.range_pop()


def nvtx_range(name: str, *args: object) -> ContextManager[None]:
    """A range named ``name % args``; a shared no-op context (no formatting) when ranges are off."""
    nvtx = _nvtx()
    if not (nvtx or _torch_on):
        return _NULL
    return _Range(name % args if args else name, nvtx, _torch_on)


class StageEventTotals:
    """Summed time between (begin, end) CUDA event pairs per stage, in constant memory.

    Pairs are recorded in order on one stream, so they complete in order: each ``add`` folds the
    completed pairs at the front of the stage's queue into its total and drops them, and only
    pairs still in flight are kept, however long the run.
    """

    def __init__(self):
        self.totals_ms: dict[str, float] = defaultdict(float)
        self.pending: dict[str, collections.deque] = defaultdict(collections.deque)

    def add(self, name: str, begin, end) -> None:
        self.pending[name].append((begin, end))
        self._fold(name, wait=False)

    def _fold(self, name: str, wait: bool) -> None:
        queue = self.pending[name]
        while queue:
            begin, end = queue[0]
            if wait:
                end.synchronize()
            elif not end.query():
                return
            self.totals_ms[name] += begin.elapsed_time(end)
            queue.popleft()

    def in_flight(self) -> int:
        return sum(len(q) for q in self.pending.values())

    def seconds(self) -> dict[str, float]:
        """Every stage's total in seconds, after waiting for the pairs still in flight."""
        for name in list(self.pending):
            self._fold(name, wait=True)
        return {name: ms / 1000.0 for name, ms in self.totals_ms.items()}


class StageClock:
    """Per-stage wall seconds and call counts, with optional ranges and GPU events.

    ``stream``: the pipeline's CUDA stream (None on the CPU); ``sync``: synchronise it at the end
    of every stage; ``nvtx`` / ``gpu_events``: None reads ``TALKRT_NVTX`` / ``TALKRT_GPU_EVENTS``.
    """

    def __init__(self, stream: torch.cuda.Stream | None = None, sync: bool = True, nvtx: bool | None = None,
                 gpu_events: bool | None = None):
        self.stream = stream
        self.sync = sync and stream is not None
        self.nvtx = _nvtx() if nvtx is None else nvtx
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        want_events = os.environ.get(ENV_GPU_EVENTS, "0") == "1" if gpu_events is None else gpu_events
        self.gpu_events = bool(want_events) and stream is not None
        self._events = StageEventTotals()

    @contextlib.contextmanager
    def stage(self, name: str, batch_index: int = -1, frames: int = 0) -> Iterator[None]:
        """Time the block as stage ``name`` (``frames`` output frames of batch ``batch_index``).

        Wall seconds are added to ``seconds[name]`` (after synchronising the stream when
        ``sync``), ``calls[name]`` counts the blocks; the range is labelled with all three.
        """
        ranged = self.nvtx or _torch_on
        if ranged:
            rng = _Range(f"{name} batch={batch_index} frames={frames}", self.nvtx, _torch_on)
            rng.__enter__()
        if self.gpu_events:
            begin = torch.cuda.Event(enable_timing=True)
            begin.record(self.stream)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.gpu_events:
                end = torch.cuda.Event(enable_timing=True)
                end.record(self.stream)
                self._events.add(name, begin, end)
            if self.sync:
                self.stream.synchronize()
            self.seconds[name] += time.perf_counter() - start
            self.calls[name] += 1
            if ranged:
                rng.__exit__(None, None, None)

    def gpu_seconds(self) -> dict[str, float]:
        """Per stage, the stream time between its start and end CUDA events (``gpu_events`` only).

        This is GPU time spanned by the stage on the pipeline's stream: it includes gaps where
        the host did not keep the stream fed, and excludes work issued on other streams.
        """
        return self._events.seconds()

    def ms_per_frame(self, frames: int) -> dict[str, float]:
        """``{stage: ms per output frame}`` in first-use order."""
        return {name: 1000.0 * s / max(frames, 1) for name, s in self.seconds.items()}

    def table(self, frames: int) -> list[tuple[str, float, float]]:
        """``(stage, ms per frame, share of the total)`` in first-use order."""
        total = sum(self.seconds.values()) or 1.0
        return [(name, 1000.0 * s / max(frames, 1), s / total) for name, s in self.seconds.items()]
