"""Frame geometry on delivery: the display orientation of phone videos and the even-size rule.

* Orientation: an MP4/MOV track (or the codec) may carry a display matrix (FFmpeg's
  ``AV_FRAME_DATA_DISPLAYMATRIX``) saying how the stored picture is shown: a rotation by a
  multiple of 90 degrees, possibly mirrored.  Frames are delivered as they are shown
  (upright), as ``ffmpeg`` does by default (its autorotate).
* Even size: the output is H.264 4:2:0, whose chroma planes need an even width and height.
  A frame with an odd (upright) width or height loses its last column or row: cropping one
  edge line keeps every other pixel where it was and invents nothing, whereas padding would
  add a band of made-up pixels to the output and scaling would resample the whole frame.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Orientation:
    """How stored pixels are shown: ``transpose`` first, then the mirrors of the result.

    With stored pixel ``img[y, x]``, the shown image is ``img.T`` (rows and columns swapped)
    when ``transpose``, then its columns reversed when ``flip_x`` and its rows reversed when
    ``flip_y``.  The identity is ``Orientation()``.
    """

    transpose: bool = False
    flip_x: bool = False
    flip_y: bool = False

    @property
    def is_identity(self) -> bool:
        return not (self.transpose or self.flip_x or self.flip_y)

    def shown_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the shown picture of a stored ``width`` x ``height`` one."""
        return (height, width) if self.transpose else (width, height)

    def describe(self) -> str:
        """E.g. 'rotated 90 degrees clockwise', 'mirrored left-right' (as shown, from stored)."""
        # Proper rotations have det = +1; with transpose, the shown = stored rotated by 90 one way.
        if not self.transpose:
            table = {(False, False): "not rotated", (True, True): "rotated 180 degrees",
                     (True, False): "mirrored left-right", (False, True): "mirrored top-bottom"}
            return table[(self.flip_x, self.flip_y)]
        table = {(True, False): "rotated 90 degrees clockwise", (False, True): "rotated 90 degrees counter-clockwise",
                 (False, False): "transposed (mirrored across the main diagonal)",
                 (True, True): "transposed across the anti-diagonal"}
        return table[(self.flip_x, self.flip_y)]

    def apply(self, frame: np.ndarray) -> np.ndarray:
        """The shown picture of a stored ``[H, W, C]`` frame (a view; no copy)."""
        if self.transpose:
            frame = frame.swapaxes(0, 1)
        if self.flip_x:
            frame = frame[:, ::-1]
        if self.flip_y:
            frame = frame[::-1]
        return frame


class UnsupportedRotation(ValueError):
    """A display matrix that is not a multiple of 90 degrees (with or without a mirror)."""


def orientation_from_display_matrix(data: bytes) -> Orientation:
    """Decode FFmpeg's 3x3 display matrix (9 native int32, 16.16 fixed point for a, b, c, d).

    FFmpeg maps a stored point ``(p, q)`` to the shown point ``(a*p + c*q + x, b*p + d*q + y)``
    (``libavutil/display.h``; matrix order ``a b u c d v x y w``).  Only the signs of the 2x2
    part matter here: ``b, c != 0`` means the axes swap.
    Raises:
        UnsupportedRotation: a rotation that is not a multiple of 90 degrees.
        ValueError: not 36 bytes.
    """
    if len(data) != 36:
        raise ValueError(f"a display matrix has 36 bytes, got {len(data)}")
    a, b, _, c, d, _, _, _, _ = struct.unpack("=9i", data)
    if a == b == c == d == 0:
        return Orientation()                         # an all-zero matrix carries no orientation
    scale = max(abs(a), abs(b), abs(c), abs(d))
    near = [round(v / scale) for v in (a, b, c, d)]
    if any(abs(v / scale - r) > 1e-3 for v, r in zip((a, b, c, d), near)) or (near[0] and near[1]):
        angle = math.degrees(math.atan2(b, a))
        raise UnsupportedRotation(f"display rotation of {-angle:.1f} degrees (only multiples of 90 are supported)")
    na, nb, nc, nd = near
    if na or nd:
        return Orientation(transpose=False, flip_x=na < 0, flip_y=nd < 0)
    # shown column p' = c*q (from stored row q), shown row q' = b*p (from stored column p)
    return Orientation(transpose=True, flip_x=nc < 0, flip_y=nb < 0)


def even_size(width: int, height: int) -> tuple[int, int]:
    """The delivered size for a shown ``width`` x ``height``: each odd dimension loses one line."""
    return width - width % 2, height - height % 2
