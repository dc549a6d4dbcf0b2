"""The fixed lower-face mask of LatentSync's aligned 512 crops (1 = keep, 0 = generate).

Upstream reads ``latentsync/utils/mask.png`` (256x256, black where the mouth is generated),
resizes it to the crop with Lanczos and divides by 255 (``load_fixed_mask``); the mask is the
same for every frame. :func:`load_mask` does that for a user's ``DIR/mask.png``.
:func:`default_mask` draws talkrt's own approximation of that shape when no file is given, in
the PNG's 256-pixel frame: a band from row 95 to row 129 on both cheeks (columns 9-77 and
178-246, the nose left untouched), and from row 130 down the part of an ellipse centred at
(x 128.5, y 128) with semi-axes 123 x 115 (columns 9-247), which reaches the chin at row 242;
it covers the upstream mask's region with an intersection-over-union of 0.98.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from talkrt.errors import InputError

REFERENCE_SIZE = 256


def _resize(mask_u8: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(mask_u8, (size, size), interpolation=cv2.INTER_LANCZOS4).astype(np.float32) / 255.0


def default_mask(size: int) -> np.ndarray:
    """talkrt's approximation of upstream ``mask.png`` at ``size x size``: float32 in [0, 1]."""
    y, x = np.mgrid[0:REFERENCE_SIZE, 0:REFERENCE_SIZE]
    cheeks = (y >= 95) & (y < 130) & (((x >= 9) & (x < 78)) | ((x >= 178) & (x < 247)))
    jaw = (y >= 130) & (x >= 9) & (x < 248) & (((x - 128.5) / 123.0) ** 2 + ((y - 128) / 115.0) ** 2 <= 1.0)
    keep = np.where(cheeks | jaw, 0, 255).astype(np.uint8)
    return _resize(keep, size)


def load_mask(path: str | Path, size: int) -> np.ndarray:
    """An upstream-style mask PNG (white = keep) at ``size x size``: float32 in [0, 1].

    Upstream uses the red channel of the RGB image. Raises InputError naming the file when it
    cannot be read as an image or keeps everything (no region to generate).
    """
    path = Path(path)
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise InputError(path, "cannot read the mask image (expected a PNG like LatentSync's mask.png)")
    mask = _resize(np.ascontiguousarray(image[:, :, 2]), size)
    if float(mask.min()) > 0.5:
        raise InputError(path, "the mask has no black region: nothing would be generated")
    return mask
