"""Bit-exact 8-bit Gaussian kernels: the integer weights OpenCV's ``cv2.GaussianBlur`` uses for uint8.

For uint8 images OpenCV blurs in fixed point (``GaussianBlurFixedPoint``): an odd 1-D kernel of
8-bit fractions that sum to exactly 256 (error-diffused from the float kernel), a horizontal pass
``h = sum_i k[i] * src`` and a vertical pass ``out = (sum_j k[j] * h + 2**15) >> 16``, with
``BORDER_REFLECT_101``. Integer arithmetic is order-independent, so the CUDA kernel
(``filter.cu``) and :func:`blur_model` reproduce ``cv2.GaussianBlur`` bit for bit; CI checks
:func:`blur_model` against OpenCV.
"""

from __future__ import annotations

import functools
import math

import numpy as np

__all__ = ["default_ksize", "gaussian_weights_fixed", "blur_model", "reflect101_index"]

FRACTION_BITS = 8
MAX_KSIZE = 31


def default_ksize(sigma: float) -> int:
    """OpenCV's kernel size for uint8 when ksize is (0, 0): ``cvRound(sigma*3*2 + 1) | 1``."""
    return int(np.rint(sigma * 3 * 2 + 1)) | 1


def _bitexact_float_kernel(n: int, sigma: float) -> list[float]:
    """OpenCV ``getGaussianKernelBitExact`` (sigma > 0), in IEEE double arithmetic."""
    scale2x = -0.125 / (sigma * sigma)
    half = (n - 1) // 2
    values = []
    total = 0.0
    x = 1 - n
    for _ in range(half):
        t = math.exp(float(x * x) * scale2x)
        values.append(t)
        total += t
        x += 2
    total *= 2.0
    total += 1.0
    total = 1.0 / total
    kernel = [0.0] * n
    for i in range(half):
        kernel[i] = kernel[n - 1 - i] = values[i] * total
    kernel[half] = total
    return kernel


@functools.lru_cache(maxsize=64)
def gaussian_weights_fixed(ksize: int, sigma: float) -> tuple[int, ...]:
    """Integer weights (sum 256) of OpenCV's 8-bit Gaussian; ``getGaussianKernelFixedPoint_ED``.

    Raises:
        ValueError: ksize not odd / out of [1, 31], or sigma not > 0.
    """
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")
    if ksize < 1 or ksize % 2 == 0 or ksize > MAX_KSIZE:
        raise ValueError(f"ksize must be odd and in [1, {MAX_KSIZE}], got {ksize}")
    kernel = _bitexact_float_kernel(ksize, float(sigma))
    mult = float(1 << FRACTION_BITS)
    half = ksize // 2
    result = [0] * ksize
    err = 0.0
    total = 0
    for i in range(half):
        adj = kernel[i] * mult + err
        v0 = int(np.rint(adj))
        err = adj - v0
        result[i] = result[ksize - 1 - i] = v0
        total += v0
    result[half] = (1 << FRACTION_BITS) - 2 * total
    return tuple(result)


def reflect101_index(index: np.ndarray, size: int) -> np.ndarray:
    """``cv::borderInterpolate(i, size, BORDER_REFLECT_101)`` for integer arrays (any distance)."""
    index = np.asarray(index, np.int64)
    if size == 1:
        return np.zeros_like(index)
    period = 2 * size - 2
    index = np.mod(index, period)
    return np.where(index >= size, period - index, index)


def blur_model(images: np.ndarray, ksize: int, sigma: float) -> np.ndarray:
    """numpy model of the CUDA blur: [B, H, W, C] uint8 -> blurred [B, H, W, C] uint8."""
    weights = np.asarray(gaussian_weights_fixed(ksize, sigma), np.int64)
    radius = ksize // 2
    b, h, w, c = images.shape
    src = images.astype(np.int64)
    xs = reflect101_index(np.arange(-radius, w + radius), w)
    ys = reflect101_index(np.arange(-radius, h + radius), h)
    padded = src[:, :, xs, :]
    horiz = np.zeros((b, h, w, c), np.int64)
    for k in range(ksize):
        horiz += weights[k] * padded[:, :, k:k + w, :]
    padded = horiz[:, ys, :, :]
    vert = np.zeros((b, h, w, c), np.int64)
    for k in range(ksize):
        vert += weights[k] * padded[:, k:k + h, :, :]
    return ((vert + (1 << 15)) >> 16).astype(np.uint8)
