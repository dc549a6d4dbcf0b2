"""Prepared calls: validate an op's arguments once, then launch it again and again.

``op = prepare(gpu.nv12_to_rgb, nv12, out=rgb)`` runs the wrapper's checks, tables and
allocations once and keeps its kernel launches, each with its own argument block;
``op(stream)`` then only launches them (about 4 us of host time per kernel, against 20-100 us
for a whole wrapper call) and returns what the wrapper returned. This is how a pipeline
converts the same buffers batch after batch, and what CV-CUDA's callers get by wrapping their
buffers as tensors once.

The device arrays passed to ``prepare`` are bound: later calls read and write the same memory,
so refill the inputs in place. Host inputs (boxes, host-packed masks) are read and uploaded
once, while preparing; the uploads are complete before ``prepare`` returns. Only calls whose
GPU work is all kernel launches can be prepared: the ops below, in-place ops (blend, compose_*)
with ``out=None``, and compose_nv12 with faces at least 2 pixels wide (narrower ones are
widened by a copy).
"""

from __future__ import annotations

from typing import Any, Callable

from . import _cuda
from .gpu_compose import blend, compose_nv12, compose_rgb, resize_to_boxes
from .gpu_ops import crop_resize, gaussian_blur, nv12_to_rgb, rgb_to_nv12, unsharp_mask

__all__ = ["Prepared", "prepare"]

_PREPARABLE = (nv12_to_rgb, rgb_to_nv12, crop_resize, gaussian_blur, unsharp_mask,
               resize_to_boxes, blend, compose_rgb, compose_nv12)
_IN_PLACE = (blend, compose_rgb, compose_nv12)   # with out, they copy the frames first


class Prepared:
    """A prepared op: ``prepared(stream=None)`` launches it on ``stream`` (see
    :func:`talkrt.kernels.cupy_stream` for the accepted streams) and returns its result."""

    def __init__(self, name: str, launches: list[Callable[[int], None]], result: Any) -> None:
        self.name = name
        self.result = result
        self._launches = launches

    def __call__(self, stream: Any = None) -> Any:
        handle = _cuda.as_stream(stream).ptr
        for bound in self._launches:
            bound(handle)
        return self.result

    def __repr__(self) -> str:
        return f"Prepared({self.name}, {len(self._launches)} launch(es))"


def prepare(op: Callable[..., Any], *args: Any, **kwargs: Any) -> Prepared:
    """Prepare ``op(*args, **kwargs)`` (a :mod:`talkrt.kernels.gpu` op) without running it.

    Raises what the op raises for bad arguments, and ValueError for an op that cannot be
    prepared. ``stream=`` among ``kwargs`` is where preparation uploads its tables; the
    prepared call takes its own stream.
    """
    if op not in _PREPARABLE:
        raise ValueError(f"{getattr(op, '__name__', op)!r} cannot be prepared; preparable ops: "
                         f"{', '.join(f.__name__ for f in _PREPARABLE)}")
    if op in _IN_PLACE and kwargs.get("out") is not None:
        raise ValueError(f"prepare {op.__name__} in place (out=None): with out it first copies "
                         "the frames, which a prepared call would not repeat")
    if op is compose_nv12:
        faces = args[1] if len(args) > 1 else kwargs.get("faces")
        if getattr(faces, "shape", (2, 2))[-2] < 2:
            raise ValueError("prepare compose_nv12 with faces at least 2 pixels wide: narrower "
                             "faces are widened by a copy, which a prepared call would not repeat")
    with _cuda.record_launches(execute=False) as launches:
        result = op(*args, **kwargs)
    _cuda.synchronize(result if hasattr(result, "shape") else result.data)   # array or Packed
    bound = [kernel.bind(grid, block, kernel_args, shared_mem)
             for kernel, grid, block, kernel_args, shared_mem in launches]
    return Prepared(op.__name__, bound, result)
