"""Separable resize weight tables that reproduce OpenCV's ``cv2.resize`` for uint8 images.

The crop-and-resize CUDA kernel (``resize.cu``) is a generic separable filter: for every output
pixel it sums ``wy[j] * (sum_i wx[i] * src[iy[j], ix[i]])`` over per-axis tap tables. This module
builds those tables on the host with the same arithmetic OpenCV uses, so that the kernel output
equals OpenCV's wherever OpenCV itself follows its scalar code:

* ``INTER_AREA``, shrinking on both axes, non-integer scale: float32 area weights
  (``computeResizeAreaTab``), accumulated in OpenCV's order, rounded half to even -> exact.
* ``INTER_AREA``, integer scale on both axes: OpenCV's "fast" path. 2x2 is an integer mean
  ``(a+b+c+d+2) >> 2``; other factors are ``int_sum * (1.f/area)`` rounded half to even -> exact.
* ``INTER_AREA`` enlarging on either axis: OpenCV falls back to a bilinear variant with 11-bit
  fixed-point weights whose vertical pass is vectorised with intermediate truncations
  (``VResizeLinearVec_32s8u``); the kernel reproduces those truncations -> exact wherever OpenCV
  vectorises the whole row (output width * 3 a multiple of the SIMD width: true for 256), else
  within +-1 on the scalar tail.
* ``INTER_LANCZOS4``: OpenCV's (non-antialiased) 8-tap kernel with 11-bit fixed-point weights,
  replicated edges, integer accumulation -> exact.
* Same size: a copy, as in OpenCV.

:func:`apply_plan` is a numpy model of the kernel arithmetic; CI checks it against ``cv2.resize``
so that the tables the GPU uses are tested without a GPU.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["KIND_FIXED", "KIND_FLOAT", "KIND_FIXED_LINEAR", "AxisTable", "ResizePlan", "plan_resize", "apply_plan"]

KIND_FIXED = 0  #: integer weights; result = clamp((acc + round_add) >> shift)
KIND_FLOAT = 1  #: float32 weights; result = clamp(rint(acc * post_scale))
#: integer weights, OpenCV's vectorised bilinear rounding (``VResizeLinearVec_32s8u``):
#: result = clamp((sum_j (((h_j >> 4) * wy_j) >> 16) + 2) >> 2), h_j = sum_i wx_i * src
KIND_FIXED_LINEAR = 2

_COEF_BITS = 11
_COEF_SCALE = 1 << _COEF_BITS
_DBL_EPSILON = np.finfo(np.float64).eps
_FLT_EPSILON = float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class AxisTable:
    """Taps of one axis: output position d reads ``src[index[d, k]]`` with ``weight[d, k]``."""

    index: np.ndarray   # int32 [dst, taps], already clamped into [0, src)
    weight: np.ndarray  # float32 [dst, taps]; integral values for KIND_FIXED

    @property
    def taps(self) -> int:
        return int(self.index.shape[1])


@dataclass(frozen=True)
class ResizePlan:
    """Everything the kernel needs to resize one (src_w, src_h) region to (dst_w, dst_h)."""

    x: AxisTable
    y: AxisTable
    kind: int
    shift: int = 0
    round_add: int = 0
    post_scale: float = 1.0


def _round_half_even(value: float) -> int:
    return int(np.rint(value))


def _fixed(coeffs: np.ndarray) -> np.ndarray:
    """``saturate_cast<short>(coeff * INTER_RESIZE_COEF_SCALE)`` on float32 coefficients."""
    scaled = coeffs.astype(np.float32) * np.float32(_COEF_SCALE)
    return np.clip(np.rint(scaled), -32768, 32767).astype(np.float32)


def _lanczos4(x: float) -> np.ndarray:
    """OpenCV ``interpolateLanczos4`` (float32 result, double trigonometry, float32 sums)."""
    s45 = 0.70710678118654752440084436210485
    cs = ((1, 0), (-s45, -s45), (0, 1), (s45, -s45), (-1, 0), (s45, s45), (0, -1), (-s45, s45))
    x = np.float32(x)
    x3 = np.float32(x + np.float32(3))
    y0 = float(-x3) * math.pi * 0.25
    s0, c0 = math.sin(y0), math.cos(y0)
    coeffs = np.zeros(8, np.float32)
    total = np.float32(0)
    for i in range(8):
        y0_ = np.float32(x3 - np.float32(i))
        if abs(y0_) >= np.float32(1e-6):
            y = float(-y0_) * math.pi * 0.25
            coeffs[i] = np.float32((cs[i][0] * s0 + cs[i][1] * c0) / (y * y))
        else:
            coeffs[i] = np.float32(1e30)
        total = np.float32(total + coeffs[i])
    inv = np.float32(np.float32(1) / total)
    return (coeffs * inv).astype(np.float32)


def _generic_axis(src: int, dst: int, inv_scale: float, method: str) -> AxisTable:
    """OpenCV's generic separable path: INTER_LANCZOS4, or INTER_AREA when enlarging."""
    scale = 1.0 / inv_scale
    taps = 8 if method == "lanczos4" else 2
    half = taps // 2
    index = np.empty((dst, taps), np.int32)
    weight = np.empty((dst, taps), np.float32)
    for d in range(dst):
        if method == "lanczos4":
            f = np.float32((d + 0.5) * scale - 0.5)
            s = math.floor(f)
            f = np.float32(f - np.float32(s))
            coeffs = _lanczos4(f)
        else:  # INTER_AREA emulated by bilinear ("area_mode" in OpenCV)
            s = math.floor(d * scale)
            f = np.float32((d + 1) - (s + 1) * inv_scale)
            f = np.float32(0) if f <= 0 else np.float32(f - np.float32(math.floor(f)))
            if s < 0:
                f, s = np.float32(0), 0
            if s >= src - 1:
                f, s = np.float32(0), src - 1
            coeffs = np.array([np.float32(1) - f, f], np.float32)
        index[d] = np.clip(np.arange(s - half + 1, s - half + 1 + taps), 0, src - 1)
        weight[d] = _fixed(coeffs)
    return AxisTable(index, weight)


def _area_axis(src: int, dst: int, scale: float) -> AxisTable:
    """OpenCV ``computeResizeAreaTab`` regrouped per output position (float32 weights)."""
    entries: list[list[tuple[int, float]]] = [[] for _ in range(dst)]
    for d in range(dst):
        fs1 = d * scale
        fs2 = fs1 + scale
        cell = min(scale, src - fs1)
        s1, s2 = math.ceil(fs1), math.floor(fs2)
        s2 = min(s2, src - 1)
        s1 = min(s1, s2)
        if s1 - fs1 > 1e-3:
            entries[d].append((s1 - 1, float(np.float32((s1 - fs1) / cell))))
        for s in range(s1, s2):
            entries[d].append((s, float(np.float32(1.0 / cell))))
        if fs2 - s2 > 1e-3:
            entries[d].append((s2, float(np.float32(min(min(fs2 - s2, 1.0), cell) / cell))))
    taps = max(len(e) for e in entries)
    index = np.empty((dst, taps), np.int32)
    weight = np.zeros((dst, taps), np.float32)
    for d, e in enumerate(entries):
        for k, (s, w) in enumerate(e):
            index[d, k] = s
            weight[d, k] = w
        index[d, len(e):] = e[-1][0]   # padding taps: weight 0, harmless index
    return AxisTable(index, weight)


def _box_axis(src: int, dst: int, factor: int) -> AxisTable:
    index = (np.arange(dst, dtype=np.int32)[:, None] * factor
             + np.arange(factor, dtype=np.int32)[None, :])
    return AxisTable(index, np.ones((dst, factor), np.float32))


@functools.lru_cache(maxsize=1024)
def plan_resize(src_w: int, src_h: int, dst_w: int, dst_h: int, method: str) -> ResizePlan:
    """Tables that make the kernel reproduce ``cv2.resize(src, (dst_w, dst_h), interpolation)``.

    Args:
        src_w, src_h: size of the source region (the crop), >= 1.
        dst_w, dst_h: output size, >= 1.
        method: ``"area"`` (``cv2.INTER_AREA``) or ``"lanczos4"`` (``cv2.INTER_LANCZOS4``).
    """
    if method not in ("area", "lanczos4"):
        raise ValueError(f"unknown resize method {method!r}; expected 'area' or 'lanczos4'")
    if min(src_w, src_h, dst_w, dst_h) < 1:
        raise ValueError(f"resize sizes must be >= 1, got {src_w}x{src_h} -> {dst_w}x{dst_h}")
    if (src_w, src_h) == (dst_w, dst_h):
        ident_x = AxisTable(np.arange(dst_w, dtype=np.int32)[:, None], np.ones((dst_w, 1), np.float32))
        ident_y = AxisTable(np.arange(dst_h, dtype=np.int32)[:, None], np.ones((dst_h, 1), np.float32))
        return ResizePlan(ident_x, ident_y, KIND_FIXED, 0, 0)
    inv_x, inv_y = dst_w / src_w, dst_h / src_h
    scale_x, scale_y = 1.0 / inv_x, 1.0 / inv_y
    if method == "area" and scale_x >= 1 and scale_y >= 1:
        ix, iy = _round_half_even(scale_x), _round_half_even(scale_y)
        if abs(scale_x - ix) < _DBL_EPSILON and abs(scale_y - iy) < _DBL_EPSILON:
            x, y = _box_axis(src_w, dst_w, ix), _box_axis(src_h, dst_h, iy)
            if ix == 2 and iy == 2:
                return ResizePlan(x, y, KIND_FIXED, shift=2, round_add=2)
            post = float(np.float32(1) / np.float32(ix * iy))
            return ResizePlan(x, y, KIND_FLOAT, post_scale=post)
        return ResizePlan(_area_axis(src_w, dst_w, scale_x), _area_axis(src_h, dst_h, scale_y),
                          KIND_FLOAT)
    x = _generic_axis(src_w, dst_w, inv_x, method)
    y = _generic_axis(src_h, dst_h, inv_y, method)
    if method == "area":
        return ResizePlan(x, y, KIND_FIXED_LINEAR, shift=2, round_add=2)
    shift = 2 * _COEF_BITS
    return ResizePlan(x, y, KIND_FIXED, shift=shift, round_add=1 << (shift - 1))


def apply_plan(src: np.ndarray, plan: ResizePlan) -> np.ndarray:
    """numpy model of the CUDA kernel: resize ``src`` [h, w, c] uint8 with ``plan``."""
    if plan.kind in (KIND_FIXED, KIND_FIXED_LINEAR):
        s = src.astype(np.int64)
        wx = plan.x.weight.astype(np.int64)
        wy = plan.y.weight.astype(np.int64)
        # horizontal: [h, dst_w, c]
        horiz = np.einsum("hdkc,dk->hdc", s[:, plan.x.index, :], wx)
        if plan.kind == KIND_FIXED_LINEAR:
            terms = ((horiz[plan.y.index, :, :] >> 4) * wy[:, :, None, None]) >> 16
            acc = terms.sum(axis=1)
        else:
            acc = np.einsum("dkwc,dk->dwc", horiz[plan.y.index, :, :], wy)
        assert np.abs(acc).max(initial=0) < 2**31, "kernel accumulates in int32"
        out = (acc + plan.round_add) >> plan.shift
        return np.clip(out, 0, 255).astype(np.uint8)
    # float path, OpenCV's order: buf = sum_i s*wx (in tap order), acc += wy*buf (in tap order)
    s = src.astype(np.float32)
    buf = np.zeros((src.shape[0], plan.x.index.shape[0], src.shape[2]), np.float32)
    for k in range(plan.x.taps):
        buf = buf + s[:, plan.x.index[:, k], :] * plan.x.weight[None, :, k, None]
    acc = np.zeros((plan.y.index.shape[0],) + buf.shape[1:], np.float32)
    for k in range(plan.y.taps):
        acc = acc + plan.y.weight[:, k, None, None] * buf[plan.y.index[:, k], :, :]
    if plan.post_scale != 1.0:
        acc = acc * np.float32(plan.post_scale)
    return np.clip(np.rint(acc), 0, 255).astype(np.uint8)
