"""The one CUDA-stream scope used by every stage and engine."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch


def on_stream(stream: torch.cuda.Stream | None) -> ContextManager:
    """Make ``stream`` torch's current stream inside the block; a no-op for None (the CPU path).

    Args:
        stream: a ``torch.cuda.Stream``, or None when there is no device stream.
    """
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def to_device(array, device: torch.device) -> torch.Tensor:
    """A host array (numpy or CPU tensor) on ``device``, copied on the current stream WITHOUT
    blocking the host: through pinned memory with ``non_blocking=True`` (torch's caching host
    allocator keeps the pinned block until the copy is done). A plain ``torch.as_tensor(x,
    device=cuda)`` waits for the stream to drain, i.e. for every kernel queued before it.

    Args:
        array: any shape and dtype numpy array or CPU tensor.
        device: the target device; on the CPU the array is returned as a tensor (no copy when
            numpy allows).
    """
    host = torch.as_tensor(array)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
