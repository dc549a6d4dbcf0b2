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
