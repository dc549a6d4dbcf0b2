"""CPU references (numpy / OpenCV) of every talkrt kernel; also the pipeline's CPU fallback.

Signatures match :mod:`talkrt.kernels.gpu` (``stream`` is accepted and ignored), so a caller can
hold either module (see :func:`talkrt.kernels.select_backend`). Inputs are host arrays (numpy, or
anything ``numpy.asarray`` maps without a copy such as CPU torch tensors); the arithmetic is the
definition the CUDA kernels are tested against:

* color conversion: float32 formulas of :mod:`talkrt.kernels.colorspace` (bit-exact on the GPU);
* crop + resize: ``cv2.resize`` of the crop, INTER_AREA or INTER_LANCZOS4;
* face -> box resize: ``cv2.resize(..., INTER_LINEAR)``; ``impl="kernel"`` gives the GPU kernel's
  float32 bilinear (OpenCV's half-pixel mapping, within +-1 of OpenCV);
* blur: ``cv2.GaussianBlur`` (BORDER_REFLECT_101); unsharp mask on top of it in float32;
* blend: ``round(body + mask/255 * (face - body))`` in integers, equal to PIL's ``paste``;
* compose: unsharp (optional, on the 256x256 face) -> resize -> blend, and for NV12 the RGB->NV12
  conversion of the result with the chroma rule documented in :func:`compose_nv12`;
* affine face warps (LatentSync's aligned crop and restore): :mod:`.warp_reference`.
"""

from __future__ import annotations

from typing import Any, Sequence

import cv2
import numpy as np

from . import gaussian
from .colorspace import color_spec
from .packing import Packed, empty_packed, pack_masks, pack_regions
from .validate import (SharpenParams, as_image_batch, as_nv12_batch, check_boxes, check_layout,
                       check_order, check_out, check_size)

__all__ = [
    "nv12_to_rgb", "rgb_to_nv12", "crop_resize", "resize_to_boxes", "gaussian_blur",
    "unsharp_mask", "blend", "compose_rgb", "compose_nv12", "pack_masks", "pack_regions",
    "warp_crop_rgb", "warp_crop_nv12", "restore_rgb", "restore_nv12",
]
_WARP_OPS = ("warp_crop_rgb", "warp_crop_nv12", "restore_rgb", "restore_nv12")


def __getattr__(name: str) -> Any:
    """The affine face warps live in :mod:`.warp_reference`, which builds on this module."""
    if name in _WARP_OPS:
        from . import warp_reference
        return getattr(warp_reference, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

_HALF = np.float32(0.5)


def _host(array: Any, name: str) -> np.ndarray:
    if isinstance(array, np.ndarray):
        return array
    if type(array).__module__.split(".")[0] == "cupy":
        raise TypeError(f"{name}: the reference (CPU) kernels take host arrays, got a CuPy array; "
                        "use talkrt.kernels.gpu or copy it with .get()")
    return np.asarray(array)


def _round_u8(values: np.ndarray) -> np.ndarray:
    """floor(x + 0.5) in float32, clamped to [0, 255]."""
    return np.clip(np.floor(values + _HALF), 0, 255).astype(np.uint8)


def _finish(result: np.ndarray, out: Any, single: bool) -> np.ndarray:
    result = result[0] if single else result
    if out is None:
        return result
    out_arr = _host(out, "out")
    check_out(out_arr, result.shape)
    out_arr[...] = result
    return out_arr


# ----------------------------------------------------------------------------- color conversion

def _decode(y: np.ndarray, u: np.ndarray, v: np.ndarray, matrix: str, full_range: bool):
    """float32 YUV -> (R, G, B) uint8 planes; u, v already replicated to the luma grid."""
    spec = color_spec(matrix, full_range)
    yv = spec.y_scale * (y.astype(np.float32) - spec.y_offset)
    uc = u.astype(np.float32) - np.float32(128)
    vc = v.astype(np.float32) - np.float32(128)
    r = yv + spec.r_v * vc
    g = (yv + spec.g_u * uc) + spec.g_v * vc
    b = yv + spec.b_u * uc
    return _round_u8(r), _round_u8(g), _round_u8(b)


def _encode(r: np.ndarray, g: np.ndarray, b: np.ndarray, matrix: str, full_range: bool):
    """uint8 RGB planes [..., H, W] (H, W even) -> (Y [..., H, W], UV [..., H/2, W]) uint8."""
    spec = color_spec(matrix, full_range)
    rf, gf, bf = (c.astype(np.float32) for c in (r, g, b))
    y = ((spec.y_r * rf + spec.y_g * gf) + spec.y_b * bf) + spec.y_offset

    def block_mean(c: np.ndarray) -> np.ndarray:
        return (c[..., 0::2, 0::2] + c[..., 0::2, 1::2] + c[..., 1::2, 0::2]
                + c[..., 1::2, 1::2]) * np.float32(0.25)

    ra, ga, ba = block_mean(rf), block_mean(gf), block_mean(bf)
    u = ((spec.u_r * ra + spec.u_g * ga) + spec.u_b * ba) + np.float32(128)
    v = ((spec.v_r * ra + spec.v_g * ga) + spec.v_b * ba) + np.float32(128)
    uv = np.stack([_round_u8(u), _round_u8(v)], axis=-1)
    return _round_u8(y), uv.reshape(*uv.shape[:-2], -1)


def _split_nv12(batch: np.ndarray, height: int):
    y = batch[:, :height, :]
    uv = batch[:, height:, :]
    u = np.repeat(np.repeat(uv[:, :, 0::2], 2, axis=1), 2, axis=2)
    v = np.repeat(np.repeat(uv[:, :, 1::2], 2, axis=1), 2, axis=2)
    return y, u, v


def nv12_to_rgb(nv12: Any, *, matrix: str = "bt709", full_range: bool = False,
                layout: str = "hwc", order: str = "rgb", out: Any = None,
                stream: Any = None) -> np.ndarray:
    """NV12 [B, H*3/2, W] (or [H*3/2, W]) -> RGB/BGR uint8, [B, H, W, 3] (hwc) or [B, 3, H, W] (chw)."""
    batch, single, height, _ = as_nv12_batch(_host(nv12, "nv12"))
    check_layout(layout)
    check_order(order)
    r, g, b = _decode(*_split_nv12(batch, height), matrix, full_range)
    planes = (r, g, b) if order == "rgb" else (b, g, r)
    result = np.stack(planes, axis=-1 if layout == "hwc" else 1)
    return _finish(result, out, single)


def rgb_to_nv12(rgb: Any, *, matrix: str = "bt709", full_range: bool = False,
                order: str = "rgb", out: Any = None, stream: Any = None) -> np.ndarray:
    """RGB/BGR [B, H, W, 3] (or [H, W, 3]) uint8 -> NV12 [B, H*3/2, W]; H, W even."""
    batch, single = as_image_batch(_host(rgb, "rgb"), "rgb")
    check_order(order)
    _, height, width, _ = batch.shape
    if height % 2 or width % 2:
        raise ValueError(f"rgb frame size must be even for NV12, got {width}x{height}")
    c0, c1, c2 = batch[..., 0], batch[..., 1], batch[..., 2]
    r, g, b = (c0, c1, c2) if order == "rgb" else (c2, c1, c0)
    y, uv = _encode(r, g, b, matrix, full_range)
    return _finish(np.concatenate([y, uv], axis=1), out, single)


# ----------------------------------------------------------------------------------- resizing

def crop_resize(frames: Any, boxes: Any, *, size: tuple[int, int] = (256, 256),
                method: str = "area", out: Any = None, stream: Any = None) -> np.ndarray:
    """Crop boxes[b] from frames[b] ([B, H, W, 3]) and resize to ``size`` (w, h) -> [B, h, w, 3].

    method: "area" (cv2.INTER_AREA) or "lanczos4" (cv2.INTER_LANCZOS4).
    """
    batch, single = as_image_batch(_host(frames, "frames"), "frames")
    n, height, width, _ = batch.shape
    box_arr = check_boxes(boxes, n, height, width)
    out_w, out_h = check_size(size)
    interp = {"area": cv2.INTER_AREA, "lanczos4": cv2.INTER_LANCZOS4}.get(method)
    if interp is None:
        raise ValueError(f"unknown resize method {method!r}; expected 'area' or 'lanczos4'")
    result = np.empty((n, out_h, out_w, 3), np.uint8)
    for i, (x1, y1, x2, y2) in enumerate(box_arr):
        result[i] = cv2.resize(batch[i, y1:y2, x1:x2], (out_w, out_h), interpolation=interp)
    return _finish(result, out, single)


def linear_axis_model(src_len: int, dst_len: int):
    """float32 bilinear taps of the GPU kernel: (i0, i1, frac) for OpenCV's half-pixel mapping
    ``src = (dst + 0.5) * (src_len / dst_len) - 0.5``, clamped at 0 and src_len - 1."""
    scale = np.float32(src_len) / np.float32(dst_len)
    pos = (np.arange(dst_len, dtype=np.float32) + _HALF) * scale - _HALF
    pos = np.maximum(pos, np.float32(0))
    i0 = np.minimum(np.floor(pos).astype(np.int64), src_len - 1)
    i1 = np.minimum(i0 + 1, src_len - 1)
    return i0, i1, pos - i0.astype(np.float32)


def resize_linear_model(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """The GPU kernel's float32 bilinear resize of one [h, w, c] uint8 image (within +-1 of cv2)."""
    x0, x1, fx = linear_axis_model(image.shape[1], width)
    y0, y1, fy = linear_axis_model(image.shape[0], height)
    src = image.astype(np.float32)
    fx = fx[None, :, None]
    top = src[y0][:, x0] + fx * (src[y0][:, x1] - src[y0][:, x0])
    bottom = src[y1][:, x0] + fx * (src[y1][:, x1] - src[y1][:, x0])
    return _round_u8(top + fy[:, None, None] * (bottom - top))


def _resize_linear(image: np.ndarray, width: int, height: int, impl: str) -> np.ndarray:
    if impl == "opencv":
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    if impl == "kernel":
        return resize_linear_model(image, width, height)
    raise ValueError(f"impl must be 'opencv' or 'kernel', got {impl!r}")


def resize_to_boxes(faces: Any, boxes: Any, *, out: Packed | None = None, stream: Any = None,
                    impl: str = "opencv") -> Packed:
    """Bilinear-resize faces[b] ([B, fh, fw, 3]) to the size of boxes[b] -> :class:`Packed`."""
    batch, _ = as_image_batch(_host(faces, "faces"), "faces")
    box_arr = check_boxes(boxes, batch.shape[0], None, None)
    shapes = np.stack([box_arr[:, 3] - box_arr[:, 1], box_arr[:, 2] - box_arr[:, 0],
                       np.full(len(box_arr), 3)], axis=1)
    if out is None:
        out = empty_packed(shapes, np)
    else:
        out.check_matches(box_arr, 3, "out")
    for i, (h, w, _) in enumerate(shapes):
        out.region(i)[...] = _resize_linear(batch[i], int(w), int(h), impl)
    return out


# ---------------------------------------------------------------------------------- sharpening

def _ksize(sigma: float, ksize: int | None) -> int:
    k = gaussian.default_ksize(sigma) if ksize is None else int(ksize)
    gaussian.gaussian_weights_fixed(k, float(sigma))  # validates
    return k


def gaussian_blur(images: Any, *, sigma: float = 1.0, ksize: int | None = None, out: Any = None,
                  stream: Any = None) -> np.ndarray:
    """Gaussian blur of [B, H, W, C] (or [H, W, C]) uint8, C in 1..4, BORDER_REFLECT_101."""
    batch, single = as_image_batch(_host(images, "images"), "images", channels=(1, 2, 3, 4))
    k = _ksize(sigma, ksize)
    result = np.empty_like(batch)
    for i in range(batch.shape[0]):
        blurred = cv2.GaussianBlur(batch[i], (k, k), sigma, sigmaY=sigma,
                                   borderType=cv2.BORDER_REFLECT_101)
        result[i] = blurred.reshape(batch.shape[1:])
    return _finish(result, out, single)


def unsharp_from_blur(image: np.ndarray, blurred: np.ndarray, amount: float,
                      threshold: int) -> np.ndarray:
    """``image + amount*(image - blurred)`` (float32, rounded half up, clipped) where
    ``|image - blurred| >= threshold``, else ``image``."""
    diff = image.astype(np.int16) - blurred.astype(np.int16)
    sharp = _round_u8(image.astype(np.float32) + np.float32(amount) * diff.astype(np.float32))
    return np.where(np.abs(diff) >= threshold, sharp, image)


def unsharp_mask(images: Any, *, amount: float = 1.2, sigma: float = 1.0, threshold: int = 5,
                 ksize: int | None = None, out: Any = None, stream: Any = None) -> np.ndarray:
    """Unsharp mask of [B, H, W, C] (or [H, W, C]) uint8 (see :class:`SharpenParams`)."""
    SharpenParams(amount, sigma, threshold, ksize)  # validates
    batch, single = as_image_batch(_host(images, "images"), "images", channels=(1, 2, 3, 4))
    blurred = gaussian_blur(batch, sigma=sigma, ksize=ksize)
    return _finish(unsharp_from_blur(batch, blurred, amount, threshold), out, single)


# ------------------------------------------------------------------------------ blend / compose

def _as_packed(regions: Packed | Sequence[Any], channels: int, name: str) -> Packed:
    packed = regions if isinstance(regions, Packed) else pack_regions(regions, channels, np)
    if packed.channels != channels:
        raise ValueError(f"{name} must have {channels} channel(s), got {packed.channels}")
    if not isinstance(packed.data, np.ndarray):
        raise TypeError(f"{name}: the reference kernels need host data, got "
                        f"{type(packed.data).__name__}")
    return packed


def _target(frames: np.ndarray, single: bool, out: Any) -> tuple[np.ndarray, np.ndarray]:
    """In place on ``frames`` when out is None, else copy frames into ``out``.

    Returns (batched view of the array to write, the array to return to the caller).
    """
    if out is None:
        result = frames
    else:
        result = _host(out, "out")
        check_out(result, frames.shape)
        same = (result.__array_interface__["data"][0] == frames.__array_interface__["data"][0])
        if not same:
            if np.shares_memory(result, frames):
                raise ValueError("out partially overlaps the frames; pass the frames themselves "
                                 "or a separate array")
            result[...] = frames
    return (result[None] if single else result), result


def blend(frames: Any, faces_in_boxes: Packed | Sequence[Any], boxes: Any,
          masks: Packed | Sequence[Any], *, out: Any = None, stream: Any = None) -> np.ndarray:
    """Alpha-blend box-sized faces into frames [B, H, W, 3] inside boxes, alpha = mask/255.

    ``out=None`` blends in place into ``frames`` (and returns it); pixels outside the boxes are
    never written. out = round_half_up((body*(255-m) + face*m) / 255), exact integers.
    """
    frames = _host(frames, "frames")
    batch, single = as_image_batch(frames, "frames")
    n, height, width, _ = batch.shape
    box_arr = check_boxes(boxes, n, height, width)
    faces_p = _as_packed(faces_in_boxes, 3, "faces_in_boxes")
    masks_p = _as_packed(masks, 1, "masks")
    faces_p.check_matches(box_arr, 3, "faces_in_boxes")
    masks_p.check_matches(box_arr, 1, "masks")
    target, result = _target(frames, single, out)
    for i, (x1, y1, x2, y2) in enumerate(box_arr):
        region = target[i, y1:y2, x1:x2]
        region[...] = blend_region(region, faces_p.region(i), masks_p.region(i))
    return result


def blend_region(body: np.ndarray, face: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Integer alpha blend of same-size [h, w, 3] regions with an [h, w] mask."""
    m = mask.astype(np.int32)[..., None]
    mixed = body.astype(np.int32) * (255 - m) + face.astype(np.int32) * m
    return ((2 * mixed + 255) // 510).astype(np.uint8)


def _prepare_faces(faces: Any, n: int, sharpen: SharpenParams | None) -> np.ndarray:
    face_batch, _ = as_image_batch(_host(faces, "faces"), "faces")
    if face_batch.shape[0] != n:
        raise ValueError(f"faces has {face_batch.shape[0]} images for {n} frames")
    if sharpen is None:
        return face_batch
    if not isinstance(sharpen, SharpenParams):
        raise TypeError(f"sharpen must be SharpenParams or None, got {type(sharpen).__name__}")
    return unsharp_mask(face_batch, amount=sharpen.amount, sigma=sharpen.sigma,
                        threshold=sharpen.threshold, ksize=sharpen.ksize)


def compose_rgb(frames: Any, faces: Any, boxes: Any, masks: Packed | Sequence[Any], *,
                sharpen: SharpenParams | None = None, out: Any = None, stream: Any = None,
                resize_impl: str = "opencv") -> np.ndarray:
    """Sharpen (optional) the faces [B, fh, fw, 3], resize each to its box and blend it into
    frames [B, H, W, 3] with its mask; ``out=None`` works in place."""
    batch, _ = as_image_batch(_host(frames, "frames"), "frames")
    face_batch = _prepare_faces(faces, batch.shape[0], sharpen)
    resized = resize_to_boxes(face_batch, boxes, impl=resize_impl)
    return blend(frames, resized, boxes, masks, out=out)


def compose_nv12(nv12: Any, faces: Any, boxes: Any, masks: Packed | Sequence[Any], *,
                 matrix: str = "bt709", full_range: bool = False,
                 sharpen: SharpenParams | None = None, out: Any = None, stream: Any = None,
                 resize_impl: str = "opencv") -> np.ndarray:
    """:func:`compose_rgb` on NV12 frames [B, H*3/2, W]; ``out=None`` works in place.

    Per frame, on the box grown to even coordinates: decode to RGB, blend as compose_rgb does,
    encode back with :func:`rgb_to_nv12` (chroma = conversion of the 2x2 mean of the blended
    RGB). Then a pixel whose mask is 0 keeps its original Y, and a 2x2 block none of whose pixels
    has a mask > 0 keeps its original UV, so nothing outside the mask's support changes.
    """
    nv12 = _host(nv12, "nv12")
    batch, single, height, width = as_nv12_batch(nv12)
    n = batch.shape[0]
    box_arr = check_boxes(boxes, n, height, width)
    face_batch = _prepare_faces(faces, n, sharpen)
    masks_p = _as_packed(masks, 1, "masks")
    masks_p.check_matches(box_arr, 1, "masks")
    resized = resize_to_boxes(face_batch, box_arr, impl=resize_impl)
    target, result = _target(nv12, single, out)
    for i, box in enumerate(box_arr):
        blend_nv12_box(target[i], height, box, resized.region(i), masks_p.region(i), matrix,
                       full_range)
    return result


def blend_nv12_box(frame: np.ndarray, height: int, box: Sequence[int], face: np.ndarray,
                   mask: np.ndarray, matrix: str, full_range: bool) -> None:
    """Blend a box-sized face [h, w, 3] with its mask [h, w] into one NV12 frame [H*3/2, W] in
    place, with :func:`compose_nv12`'s chroma rule on the box grown to even coordinates."""
    x1, y1, x2, y2 = (int(v) for v in box)
    ex1, ey1, ex2, ey2 = x1 & ~1, y1 & ~1, (x2 + 1) & ~1, (y2 + 1) & ~1
    y_old = frame[ey1:ey2, ex1:ex2].copy()
    uv_old = frame[height + ey1 // 2:height + ey2 // 2, ex1:ex2].copy()
    region = nv12_to_rgb(np.concatenate([y_old, uv_old], axis=0), matrix=matrix,
                         full_range=full_range)
    mask_full = np.zeros(y_old.shape, np.uint8)
    mask_full[y1 - ey1:y2 - ey1, x1 - ex1:x2 - ex1] = mask
    inner = region[y1 - ey1:y2 - ey1, x1 - ex1:x2 - ex1]
    inner[...] = blend_region(inner, face, mask)
    encoded = rgb_to_nv12(region, matrix=matrix, full_range=full_range)
    y_new, uv_new = encoded[:ey2 - ey1], encoded[ey2 - ey1:]
    touched = mask_full > 0
    block = touched.reshape(touched.shape[0] // 2, 2, touched.shape[1] // 2, 2).any(axis=(1, 3))
    frame[ey1:ey2, ex1:ex2] = np.where(touched, y_new, y_old)
    frame[height + ey1 // 2:height + ey2 // 2, ex1:ex2] = np.where(
        np.repeat(block, 2, axis=1), uv_new, uv_old)
