"""YCbCr <-> RGB conversion coefficients shared by the CPU references and the CUDA kernels.

Both sides evaluate the *same* float32 expressions in the *same* order (the CUDA code uses
``__fmul_rn``/``__fadd_rn`` so the compiler cannot fuse them into FMAs), which makes the GPU
color conversion bit-exact with :mod:`talkrt.kernels.reference`.

Conventions
-----------
* ``matrix`` is ``"bt601"`` (Kr=0.299, Kb=0.114) or ``"bt709"`` (Kr=0.2126, Kb=0.0722).
* ``full_range=False`` ("limited", "TV"): Y in [16, 235], Cb/Cr in [16, 240].
  ``full_range=True`` ("PC", JPEG): Y, Cb, Cr in [0, 255], chroma centred on 128.
* Decoding (YUV -> RGB) evaluates, in float32::

      yv = ys * (Y - y_offset)          # ys == 1 for full range, so yv == Y exactly
      R  = yv + r_v * (V - 128)
      G  = (yv + g_u * (U - 128)) + g_v * (V - 128)
      B  = yv + b_u * (U - 128)

* Encoding (RGB -> YUV) evaluates, in float32::

      Y = ((y_r * R + y_g * G) + y_b * B) + y_offset
      U = ((u_r * R + u_g * G) + u_b * B) + 128
      V = ((v_r * R + v_g * G) + v_b * B) + 128

* Every float result is rounded half up (``floor(x + 0.5)``, in float32) and clamped to [0, 255].
* NV12 chroma is one (U, V) pair per 2x2 pixel block. Decoding replicates it to the four pixels
  (nearest, like OpenCV's ``COLOR_YUV2RGB_NV12``); encoding converts the mean RGB of the block
  (``(p0 + p1 + p2 + p3) * 0.25``, exact in float32).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

__all__ = ["ColorSpec", "MATRICES", "DECODE_COEFFS", "ENCODE_COEFFS", "color_spec"]

#: Luma weights (Kr, Kb) of the supported color matrices.
MATRICES: dict[str, tuple[float, float]] = {
    "bt601": (0.299, 0.114),
    "bt709": (0.2126, 0.0722),
}


#: common.cuh's DecodeCoeffs and EncodeCoeffs, field for field
DECODE_COEFFS = np.dtype([(name, "<f4") for name in
                          ("y_offset", "y_scale", "r_v", "g_u", "g_v", "b_u")])
ENCODE_COEFFS = np.dtype([(name, "<f4") for name in
                          ("y_r", "y_g", "y_b", "u_r", "u_g", "u_b", "v_r", "v_g", "v_b",
                           "y_offset")])


@dataclass(frozen=True)
class ColorSpec:
    """float32 coefficients of one (matrix, range) pair."""

    matrix: str
    full_range: bool
    # decoding
    y_offset: np.float32
    y_scale: np.float32
    r_v: np.float32
    g_u: np.float32
    g_v: np.float32
    b_u: np.float32
    # encoding
    y_r: np.float32
    y_g: np.float32
    y_b: np.float32
    u_r: np.float32
    u_g: np.float32
    u_b: np.float32
    v_r: np.float32
    v_g: np.float32
    v_b: np.float32

    @functools.cached_property
    def decode_struct(self) -> np.ndarray:
        """The YUV -> RGB coefficients as the kernels take them by value: a read-only
        1-element :data:`DECODE_COEFFS` array."""
        return _struct(self, DECODE_COEFFS)

    @functools.cached_property
    def encode_struct(self) -> np.ndarray:
        """The RGB -> YUV coefficients, a read-only 1-element :data:`ENCODE_COEFFS` array."""
        return _struct(self, ENCODE_COEFFS)


def _struct(spec: ColorSpec, dtype: np.dtype) -> np.ndarray:
    array = np.array([tuple(getattr(spec, name) for name in dtype.names)], dtype)
    array.flags.writeable = False
    return array


_SPECS: dict[tuple[str, bool], ColorSpec] = {}


def color_spec(matrix: str = "bt709", full_range: bool = False) -> ColorSpec:
    """Return the coefficients of ``matrix`` ("bt601" or "bt709") in limited or full range.

    Raises:
        ValueError: unknown matrix name.
        TypeError: ``full_range`` is not a bool.
    """
    if not isinstance(full_range, (bool, np.bool_)):
        raise TypeError(f"full_range must be a bool, got {type(full_range).__name__}")
    key = (str(matrix).lower(), bool(full_range))
    if key[0] not in MATRICES:
        raise ValueError(f"unknown color matrix {matrix!r}; expected one of {sorted(MATRICES)}")
    spec = _SPECS.get(key)
    if spec is None:
        spec = _SPECS[key] = _make_spec(*key)
    return spec


def _make_spec(matrix: str, full_range: bool) -> ColorSpec:
    kr, kb = MATRICES[matrix]
    kg = 1.0 - kr - kb
    if full_range:
        y_offset, luma_span, chroma_span = 0.0, 255.0, 255.0
    else:
        y_offset, luma_span, chroma_span = 16.0, 219.0, 224.0
    ys = 255.0 / luma_span          # decode: code value -> [0, 255] RGB scale
    cs = 255.0 / chroma_span
    ye = luma_span / 255.0          # encode: RGB scale -> code value
    ce = chroma_span / 255.0
    f = np.float32
    return ColorSpec(
        matrix=matrix, full_range=full_range,
        y_offset=f(y_offset), y_scale=f(ys),
        r_v=f(cs * 2.0 * (1.0 - kr)),
        g_u=f(-cs * 2.0 * (1.0 - kb) * kb / kg),
        g_v=f(-cs * 2.0 * (1.0 - kr) * kr / kg),
        b_u=f(cs * 2.0 * (1.0 - kb)),
        y_r=f(ye * kr), y_g=f(ye * kg), y_b=f(ye * kb),
        u_r=f(-ce * kr / (2.0 * (1.0 - kb))), u_g=f(-ce * kg / (2.0 * (1.0 - kb))), u_b=f(ce * 0.5),
        v_r=f(ce * 0.5), v_g=f(-ce * kg / (2.0 * (1.0 - kr))), v_b=f(-ce * kb / (2.0 * (1.0 - kr))),
    )
