"""Input validation shared by the CPU references and the GPU wrappers (numpy or CuPy arrays).

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape,
layout or values) with a message that names the argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "SharpenParams", "check_uint8", "as_image_batch", "as_nv12_batch", "check_boxes",
    "check_out", "check_layout", "check_order", "check_size", "nv12_height",
]


@dataclass(frozen=True)
class SharpenParams:
    """Unsharp-mask settings: ``img + amount * (img - gaussian(img, sigma))`` where the
    difference is at least ``threshold`` (else ``img``), rounded half up and clipped to [0, 255].

    ``ksize=None`` picks OpenCV's size for uint8 (``round(6*sigma + 1) | 1``).
    """

    amount: float = 1.2
    sigma: float = 1.0
    threshold: int = 5
    ksize: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.amount, (int, float)) and math.isfinite(self.amount)
                and self.amount >= 0):
            raise ValueError(f"amount must be a finite number >= 0, got {self.amount!r}")
        if not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma)
                and self.sigma > 0):
            raise ValueError(f"sigma must be a finite number > 0, got {self.sigma!r}")
        if not isinstance(self.threshold, (int, np.integer)) or not 0 <= self.threshold <= 255:
            raise ValueError(f"threshold must be an int in [0, 255], got {self.threshold!r}")


def _shape_str(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def check_uint8(array: Any, name: str) -> None:
    """Require a C-contiguous uint8 array (numpy or CuPy)."""
    dtype = getattr(array, "dtype", None)
    if dtype is None or not hasattr(array, "shape"):
        raise TypeError(f"{name} must be an array, got {type(array).__name__}")
    if np.dtype(dtype) != np.uint8:
        raise TypeError(f"{name} must have dtype uint8, got {np.dtype(dtype)}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (got strides {tuple(array.strides)}); "
                         "make a contiguous copy first")


def as_image_batch(images: Any, name: str, channels: tuple[int, ...] = (3,)) -> tuple[Any, bool]:
    """Validate HWC images: [H, W, C] or [B, H, W, C] uint8, C in ``channels``.

    Returns:
        (4-D view [B, H, W, C], True if the input was a single image).
    """
    check_uint8(images, name)
    single = images.ndim == 3
    if images.ndim not in (3, 4):
        raise ValueError(f"{name} must be [H, W, C] or [B, H, W, C], got shape "
                         f"{_shape_str(images.shape)}")
    batch = images[None] if single else images
    if batch.shape[-1] not in channels:
        raise ValueError(f"{name} must have {' or '.join(map(str, channels))} channels "
                         f"(last axis), got shape {_shape_str(images.shape)}")
    if 0 in batch.shape:
        raise ValueError(f"{name} is empty: shape {_shape_str(images.shape)}")
    return batch, single


def nv12_height(rows: int, name: str = "nv12") -> int:
    """Frame height of an NV12 buffer with ``rows`` rows (H*3/2); H must be even."""
    if rows % 3 != 0 or rows == 0:
        raise ValueError(f"{name} must have H*3/2 rows with H even, got {rows} rows "
                         "(odd frame height?)")
    return rows // 3 * 2


def as_nv12_batch(nv12: Any, name: str = "nv12") -> tuple[Any, bool, int, int]:
    """Validate NV12: [H*3/2, W] or [B, H*3/2, W] uint8 with H and W even.

    Returns:
        (3-D view, single-frame flag, H, W).
    """
    check_uint8(nv12, name)
    if nv12.ndim not in (2, 3):
        raise ValueError(f"{name} must be [H*3/2, W] or [B, H*3/2, W], got shape "
                         f"{_shape_str(nv12.shape)}")
    single = nv12.ndim == 2
    batch = nv12[None] if single else nv12
    if 0 in batch.shape:
        raise ValueError(f"{name} is empty: shape {_shape_str(nv12.shape)}")
    height = nv12_height(batch.shape[1], name)
    width = int(batch.shape[2])
    if width % 2:
        raise ValueError(f"{name} width must be even for NV12, got {width}")
    return batch, single, height, width


def check_boxes(boxes: Any, batch: int, height: int | None, width: int | None,
                name: str = "boxes") -> np.ndarray:
    """Validate integer (x1, y1, x2, y2) boxes, end exclusive, inside a height x width frame.

    ``boxes`` may be a list/tuple, numpy array or CuPy array ([4] when batch == 1, or [B, 4]).
    ``height``/``width`` None: only require non-empty boxes (no frame to lie in).

    Returns:
        int64 numpy array [B, 4] (host copy).
    """
    if hasattr(boxes, "get") and not isinstance(boxes, np.ndarray):  # CuPy -> host
        boxes = boxes.get()
    arr = np.asarray(boxes)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise TypeError(f"{name} must hold integers (x1, y1, x2, y2), got dtype {arr.dtype}")
    if arr.ndim == 1 and arr.shape == (4,) and batch == 1:
        arr = arr[None]
    if arr.shape != (batch, 4):
        raise ValueError(f"{name} must have shape [{batch}, 4] (one box per frame), got "
                         f"{_shape_str(arr.shape)}")
    arr = arr.astype(np.int64)
    low, high = arr[:, :2], arr[:, 2:]
    bad = (high <= low).any(axis=1)
    if height is not None and width is not None:
        bad |= (low < 0).any(axis=1) | (high > (width, height)).any(axis=1)
        where = f"inside the {width}x{height} frame (0 <= x1 < x2 <= W, 0 <= y1 < y2 <= H)"
    else:
        where = "(x1 < x2, y1 < y2)"
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name}[{i}] = {tuple(int(v) for v in arr[i])} is not a non-empty box "
                         f"{where}; boxes are end exclusive")
    if height is None and (np.abs(arr) >= 2**31).any():
        raise ValueError(f"{name} coordinates must fit in int32")
    return arr


def check_out(out: Any, shape: tuple[int, ...], name: str = "out") -> None:
    """Require ``out`` to be a C-contiguous uint8 array of exactly ``shape``."""
    check_uint8(out, name)
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {_shape_str(shape)}, got {_shape_str(out.shape)}")


def check_layout(layout: str) -> str:
    if layout not in ("hwc", "chw"):
        raise ValueError(f"layout must be 'hwc' (interleaved) or 'chw' (planar), got {layout!r}")
    return layout


def check_order(order: str) -> str:
    if order not in ("rgb", "bgr"):
        raise ValueError(f"channel order must be 'rgb' or 'bgr', got {order!r}")
    return order


def check_size(size: Any) -> tuple[int, int]:
    """Validate an output size (width, height) of positive ints."""
    try:
        w, h = (int(v) for v in size)
    except (TypeError, ValueError):
        raise TypeError(f"size must be (width, height), got {size!r}") from None
    if w < 1 or h < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return w, h
