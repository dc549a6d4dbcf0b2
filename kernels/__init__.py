"""talkrt.kernels: CuPy GPU kernels for crop, resize, sharpen, blend and color conversion,
with numpy/OpenCV references that double as the CPU fallback.

Two modules with identical op signatures:

* :mod:`talkrt.kernels.gpu` - CUDA kernels (CuPy ``RawKernel``), batched, one launch per op;
  also re-exported here (``talkrt.kernels.compose_nv12`` is the GPU op);
* :mod:`talkrt.kernels.reference` - numpy/OpenCV, the definition the kernels are tested against.

Pick one with :func:`select_backend`, which logs once per process when it falls back to the
references. See README.md in this folder for the ops, tolerances and the NV12 chroma rule.
"""

from __future__ import annotations

import logging
import threading
from types import ModuleType

from typing import Any

from . import _cuda
from ._cuda import gpu_available, unavailable_reason
from .colorspace import ColorSpec, color_spec
from .gpu import (blend, compose_nv12, compose_rgb, crop_resize, gaussian_blur, nv12_to_rgb,
                  resize_to_boxes, rgb_to_nv12, unsharp_mask)
from .packing import Packed, empty_packed, pack_masks, pack_regions
from .validate import SharpenParams

__all__ = [
    "gpu_available", "unavailable_reason", "select_backend", "note_fallback", "cupy_module",
    "cupy_stream", "Packed", "pack_masks", "pack_regions", "empty_packed", "SharpenParams",
    "ColorSpec", "color_spec", "nv12_to_rgb", "rgb_to_nv12", "crop_resize", "resize_to_boxes",
    "gaussian_blur", "unsharp_mask", "blend", "compose_rgb", "compose_nv12",
]


def cupy_module() -> Any:
    """The ``cupy`` module (RuntimeError with the reason when CuPy/CUDA cannot be used)."""
    return _cuda.require_cupy()


def cupy_stream(stream: Any = None) -> Any:
    """A CuPy stream for ``stream``: None (current), a CuPy stream, or a ``torch.cuda.Stream``
    (any object with a ``cuda_stream`` handle), wrapped without synchronisation."""
    return _cuda.as_stream(stream)

logger = logging.getLogger("talkrt.kernels")
_fallback_lock = threading.Lock()
_fallback_noted = False


def note_fallback(reason: str) -> bool:
    """Log, once per process, that the pipeline runs on the CPU reference kernels.

    Returns True when this call logged (the first one), False afterwards.
    """
    global _fallback_noted
    with _fallback_lock:
        if _fallback_noted:
            return False
        _fallback_noted = True
    logger.warning("GPU kernels unavailable (%s): using the CPU reference kernels "
                   "(numpy/OpenCV), expect much lower throughput", reason)
    return True


def select_backend(prefer: str = "auto") -> ModuleType:
    """The kernel module to use: :mod:`.gpu` or :mod:`.reference` (same op signatures).

    Args:
        prefer: "auto" (GPU when available, else the references, logged once via
            :func:`note_fallback`), "gpu" (RuntimeError when unavailable) or "cpu".
    """
    if prefer not in ("auto", "gpu", "cpu"):
        raise ValueError(f"prefer must be 'auto', 'gpu' or 'cpu', got {prefer!r}")
    if prefer == "cpu":
        from . import reference
        return reference
    reason = unavailable_reason()
    if reason is None:
        from . import gpu
        return gpu
    if prefer == "gpu":
        raise RuntimeError(f"GPU kernels requested but unavailable: {reason}")
    note_fallback(reason)
    from . import reference
    return reference
