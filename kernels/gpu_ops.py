"""CuPy wrappers of the color, crop/resize and blur kernels (see :mod:`talkrt.kernels.gpu`).

Inputs are CuPy arrays or CUDA tensors (adopted through DLPack, never copied); outputs are CuPy
arrays (``torch.from_dlpack(result)`` gives a tensor view). ``out=`` must be a C-contiguous
uint8 device array of the exact output shape; ``stream=None`` uses the current stream.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from . import _cuda, gaussian, launch
from .colorspace import color_spec
from .validate import (SharpenParams, as_image_batch, as_nv12_batch, check_boxes, check_layout,
                       check_order, check_out, check_size)

__all__ = ["nv12_to_rgb", "rgb_to_nv12", "crop_resize", "gaussian_blur", "unsharp_mask"]


def _output(out: Any, shape: tuple[int, ...], single: bool, like: Any) -> tuple[Any, Any]:
    """(batched output view, array to return): allocate when out is None, else validate out."""
    cp = _cuda.require_cupy()
    final_shape = shape[1:] if single else shape
    if out is None:
        result = cp.empty(final_shape, dtype=cp.uint8)
    else:
        result = _cuda.adopt(out, "out")
        check_out(result, final_shape)
        _cuda.same_device(like, {"out": result})
        if _cuda.overlaps(result, like):
            raise ValueError("out must not overlap the input")
    return (result[None] if single else result), result


def nv12_to_rgb(nv12: Any, *, matrix: str = "bt709", full_range: bool = False,
                layout: str = "hwc", order: str = "rgb", out: Any = None,
                stream: Any = None) -> Any:
    """NV12 [B, H*3/2, W] (or [H*3/2, W]) -> RGB/BGR uint8, [B, H, W, 3] (``layout="hwc"``) or
    planar [B, 3, H, W] (``"chw"``). Matrix "bt601"/"bt709", limited or full range. One launch."""
    nv12 = _cuda.adopt(nv12, "nv12")
    batch, single, height, width = as_nv12_batch(nv12)
    planar = check_layout(layout) == "chw"
    bgr = check_order(order) == "bgr"
    spec = color_spec(matrix, full_range)
    n = batch.shape[0]
    shape = (n, 3, height, width) if planar else (n, height, width, 3)
    with _cuda.on_device(batch, stream):
        target, result = _output(out, shape, single, batch)
        kernel = _cuda.get_kernel("color.cu", "nv12_to_rgb_kernel")
        _cuda.launch(kernel, launch.color_grid(height, width, n), launch.BLOCK,
                     (batch, target, height, width, int(planar), int(bgr), spec.decode_struct))
    return result


def rgb_to_nv12(rgb: Any, *, matrix: str = "bt709", full_range: bool = False,
                order: str = "rgb", out: Any = None, stream: Any = None) -> Any:
    """RGB/BGR [B, H, W, 3] (or [H, W, 3]) uint8 -> NV12 [B, H*3/2, W]; H and W even.
    Chroma = conversion of the 2x2 mean RGB. One launch."""
    rgb = _cuda.adopt(rgb, "rgb")
    batch, single = as_image_batch(rgb, "rgb")
    bgr = check_order(order) == "bgr"
    n, height, width, _ = batch.shape
    if height % 2 or width % 2:
        raise ValueError(f"rgb frame size must be even for NV12, got {width}x{height}")
    spec = color_spec(matrix, full_range)
    with _cuda.on_device(batch, stream):
        target, result = _output(out, (n, height * 3 // 2, width), single, batch)
        kernel = _cuda.get_kernel("color.cu", "rgb_to_nv12_kernel")
        _cuda.launch(kernel, launch.color_grid(height, width, n), launch.BLOCK,
                     (batch, target, height, width, int(bgr), spec.encode_struct))
    return result


def crop_resize(frames: Any, boxes: Any, *, size: tuple[int, int] = (256, 256),
                method: str = "area", out: Any = None, stream: Any = None) -> Any:
    """Crop boxes[b] from frames[b] ([B, H, W, 3]) and resize to ``size`` = (w, h), matching
    ``cv2.resize`` INTER_AREA (``method="area"``) or INTER_LANCZOS4 (``"lanczos4"``) of the crop:
    exact, except INTER_AREA enlargement with an output width*3 not a multiple of 16 (+-1).
    Returns [B, h, w, 3]. One launch for the batch; tables are built on the host (cached per
    box size) and uploaded with one copy."""
    frames = _cuda.adopt(frames, "frames")
    batch, single = as_image_batch(frames, "frames")
    n, height, width, _ = batch.shape
    box_arr = check_boxes(boxes, n, height, width)
    out_w, out_h = check_size(size)
    if method not in ("area", "lanczos4"):
        raise ValueError(f"unknown resize method {method!r}; expected 'area' or 'lanczos4'")
    tables = launch.crop_tables(box_arr, out_w, out_h, method)
    with _cuda.on_device(batch, stream):
        target, result = _output(out, (n, out_h, out_w, 3), single, batch)
        device_buffer = _cuda.upload(tables.buffer)
        kernel = _cuda.get_kernel("resize.cu", "crop_resize_kernel")
        _cuda.launch(kernel, launch.grid_2d(out_w, out_h, n), launch.BLOCK, (
            batch, target, height, width, out_h, out_w,
            tables.view("x_index", device_buffer), tables.view("x_weight", device_buffer),
            tables.x_taps,
            tables.view("y_index", device_buffer), tables.view("y_weight", device_buffer),
            tables.y_taps, tables.view("meta", device_buffer)))
    return result


@functools.lru_cache(maxsize=64)
def _filter_taps(ksize: int, sigma: float) -> np.ndarray:
    """filter.cu's FilterTaps (the first ksize of them) for a Gaussian of ``sigma``."""
    taps = launch.filter_taps(gaussian.gaussian_weights_fixed(ksize, sigma))
    taps.flags.writeable = False   # cached: shared by every call
    return taps


def _filter(images: Any, mode: int, sigma: float, ksize: int | None, amount: float,
            threshold: int, out: Any, stream: Any) -> Any:
    images = _cuda.adopt(images, "images")
    batch, single = as_image_batch(images, "images", channels=(1, 2, 3, 4))
    k = gaussian.default_ksize(sigma) if ksize is None else int(ksize)
    taps = _filter_taps(k, float(sigma))
    n, height, width, channels = batch.shape
    radius = k // 2
    with _cuda.on_device(batch, stream):
        target, result = _output(out, batch.shape, single, batch)
        kernel = _cuda.get_kernel("filter.cu", "gaussian_filter_kernel")
        _cuda.launch(kernel, launch.filter_grid(height, width, channels, n), launch.BLOCK,
                     (batch, target, height, width, channels, taps, radius, mode,
                      np.float32(amount), int(threshold)),
                     shared_mem=launch.filter_smem_bytes(radius, channels))
    return result


def gaussian_blur(images: Any, *, sigma: float = 1.0, ksize: int | None = None, out: Any = None,
                  stream: Any = None) -> Any:
    """Gaussian blur of [B, H, W, C] (or [H, W, C]) uint8, C in 1..4, BORDER_REFLECT_101;
    bit-exact with ``cv2.GaussianBlur``. ``ksize=None``: OpenCV's ``round(6*sigma+1) | 1``."""
    return _filter(images, 0, sigma, ksize, 0.0, 0, out, stream)


def unsharp_mask(images: Any, *, amount: float = 1.2, sigma: float = 1.0, threshold: int = 5,
                 ksize: int | None = None, out: Any = None, stream: Any = None) -> Any:
    """Unsharp mask (see :class:`talkrt.kernels.SharpenParams`) in one launch: blur and
    sharpening fused; equal to the reference bit for bit."""
    SharpenParams(amount, sigma, threshold, ksize)  # validates
    return _filter(images, 1, sigma, ksize, amount, threshold, out, stream)
