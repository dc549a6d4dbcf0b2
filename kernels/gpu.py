"""GPU (CuPy) implementations of every talkrt kernel; same signatures as
:mod:`talkrt.kernels.reference`. Importing this module never fails; calling an op without CuPy or
a CUDA device raises ``RuntimeError`` (check :func:`talkrt.kernels.gpu_available` first, or use
:func:`talkrt.kernels.select_backend`)."""

from __future__ import annotations

from .gpu_compose import blend, compose_nv12, compose_rgb, resize_to_boxes
from .gpu_ops import crop_resize, gaussian_blur, nv12_to_rgb, rgb_to_nv12, unsharp_mask
from .gpu_warp import restore_nv12, restore_rgb, warp_crop_nv12, warp_crop_rgb
from .packing import pack_masks, pack_regions

__all__ = [
    "nv12_to_rgb", "rgb_to_nv12", "crop_resize", "resize_to_boxes", "gaussian_blur",
    "unsharp_mask", "blend", "compose_rgb", "compose_nv12", "pack_masks", "pack_regions",
    "warp_crop_rgb", "warp_crop_nv12", "restore_rgb", "restore_nv12",
]
