"""LatentSync 1.6's fixed lower-face mask, built procedurally or read from ``DIR/mask.png``.

Upstream (``latentsync/utils/mask.png``, 256 x 256, loaded by ``image_processor.load_fixed_mask``)
is white where the aligned face is kept and black where the model generates it. Its black
region, measured on the file (0-based pixel rows y and columns x, ends exclusive):

* two cheek bands beside the nose, rows [95, 128), columns [9, 78) and [178, 247) (the nose,
  columns 78..177, is kept down to row 128);
* the lower face below row 128: a rounded "U" symmetric about x = 128, 239 px wide at the top
  (|x + 0.5 - 128| < 119.5), narrowing to the chin at row 243 along a superellipse,
  half-width ``119.5 * (1 - t^2.5)^(1/1.8)`` with ``t = (y + 0.5 - 128) / 115``.

:func:`lower_face_mask` draws exactly that (pixel centres tested against the outline); it
differs from the hand-drawn file in 309 of its 26673 black pixels, all on the U's edge (the file
is not quite symmetric), intersection over union 0.988.

Either image becomes the model's mask as upstream loads it (:func:`load_mask`): its first
(red) channel resized to R x R with Lanczos-4 and divided by 255 (so the edge is about two pixels
soft, with OpenCV's slight Lanczos ringing clipped to [0, 255]).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from talkrt.errors import InputError, TalkrtError

__all__ = ["MASK_SOURCE_SIZE", "FaceMask", "lower_face_mask", "load_mask", "mask_file"]

MASK_SOURCE_SIZE = 256
_CHEEK_ROWS = (95, 128)
_CHEEK_COLS = ((9, 78), (178, 247))
_U_TOP, _U_BOTTOM, _U_HALF, _U_CENTRE = 128, 243, 119.5, 128.0
_U_POWER, _U_ROOT = 2.5, 1.8


def lower_face_mask() -> np.ndarray:
    """The procedural mask image, uint8 [256, 256]: 255 where the face is kept, 0 where the
    model generates it (the outline in the module docstring)."""
    size = MASK_SOURCE_SIZE
    generated = np.zeros((size, size), dtype=bool)
    for x1, x2 in _CHEEK_COLS:
        generated[_CHEEK_ROWS[0]:_CHEEK_ROWS[1], x1:x2] = True
    y = np.arange(size, dtype=np.float64)[:, None] + 0.5
    x = np.arange(size, dtype=np.float64)[None, :] + 0.5
    t = np.clip((y - _U_TOP) / (_U_BOTTOM - _U_TOP), 0.0, 1.0)
    half = _U_HALF * np.clip(1.0 - t ** _U_POWER, 0.0, 1.0) ** (1.0 / _U_ROOT)
    generated |= (y >= _U_TOP) & (y < _U_BOTTOM) & (np.abs(x - _U_CENTRE) < half)
    return np.where(generated, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class FaceMask:
    """The mask at the model resolution R, in both conventions the pipeline needs.

    Attributes:
        keep: float32 [R, R] in [0, 1], upstream's mask: 1 keeps the aligned face (the UNet's
            mask channel, and ``masked = pixels * keep``), 0 is generated.
        paste: uint8 [R, R], ``round(255 * (1 - keep))``: the weight of the generated face in
            the restore blend (``talkrt.kernels`` ``restore_*``), 0 where the frame is kept.
        source: "procedural" or the mask file's path.
    """

    keep: np.ndarray
    paste: np.ndarray
    source: str

    @property
    def resolution(self) -> int:
        return int(self.keep.shape[0])

    def latent(self, size: int) -> np.ndarray:
        """float32 [size, size]: ``keep`` at the latent resolution as upstream makes it
        (``torch.nn.functional.interpolate`` with its default ``nearest`` mode: row/column
        ``floor(i * R / size)``), the UNet's mask channel."""
        idx = (np.arange(int(size)) * self.resolution) // int(size)
        return np.ascontiguousarray(self.keep[np.ix_(idx, idx)])


def _from_image(image: np.ndarray, resolution: int, source: str) -> FaceMask:
    resized = cv2.resize(image, (resolution, resolution), interpolation=cv2.INTER_LANCZOS4)
    keep = (resized.astype(np.float32) / np.float32(255.0)).astype(np.float32)
    paste = np.floor((1.0 - keep.astype(np.float64)) * 255.0 + 0.5).astype(np.uint8)
    keep.setflags(write=False)
    paste.setflags(write=False)
    return FaceMask(keep, paste, source)


def mask_file(weights_dir: str | os.PathLike | None) -> Path | None:
    """``DIR/mask.png`` when the official layout in ``weights_dir`` has one, else None.

    Raises:
        InputError: ``mask.png`` exists but is not a file (a folder, a broken link, ...).
    """
    if weights_dir is None:
        return None
    path = Path(weights_dir) / "mask.png"
    if path.is_file():
        return path
    if path.is_symlink() or path.exists():
        raise InputError(path, "exists but is not a file; replace it with LatentSync's mask.png "
                               "(latentsync/utils/mask.png) or remove it to use talkrt's drawing of that mask")
    return None


def load_mask(path: str | os.PathLike | None = None, resolution: int = 512) -> FaceMask:
    """The model's mask from ``path`` (any image size; its first channel, read as RGB, is used
    as upstream does) or, with ``path=None``, from :func:`lower_face_mask`.

    Raises:
        InputError: the file is missing, not an image, or has no kept or no generated pixel.
        TalkrtError: a resolution below 8.
    """
    if not isinstance(resolution, (int, np.integer)) or resolution < 8:
        raise TalkrtError(f"mask resolution must be an int >= 8, got {resolution!r}")
    if path is None:
        return _from_image(lower_face_mask(), int(resolution), "procedural")
    file = Path(path)
    if not file.is_file():
        raise InputError(file, "mask image not found")
    image = cv2.imread(str(file), cv2.IMREAD_COLOR)
    if image is None:
        raise InputError(file, "not an image OpenCV can read (a PNG is expected); replace it with LatentSync's "
                               "mask.png or remove it")
    red = np.ascontiguousarray(image[:, :, 2])   # OpenCV reads BGR; upstream takes RGB channel 0
    if red.max() < 128 or red.min() >= 128:
        raise InputError(file, "mask has no dark (generated) or no light (kept) region; "
                               "it must be white where the face is kept and black where it is generated")
    return _from_image(red, int(resolution), os.fspath(file))
