"""Compose generated faces back into full frames.

MuseTalk pastes the resized face into a 1.5x crop around the face box and alpha-blends that
crop into the frame with a feathered mask (``get_image_blending``).  Outside the face box
the pasted crop equals the frame, so the blend only changes pixels inside the face box:

    out[box] = frame[box] + mask/255 * (resize_linear(face, box) - frame[box])

Paths (chosen by ``pipeline.compose``):
  * ``reference``: MuseTalk's original CPU post-processing (cv2 resize + PIL crop/paste with
    mask), kept for parity tests and as the benchmark baseline;
  * ``numpy``: the box-only formula above in float32 with round-half-up (CPU default);
  * ``gpu``: the CuPy kernels of ``talkrt.kernels`` on device frames.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image


def resize_face(face: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """MuseTalk's ``cv2.resize(face, (x2-x1, y2-y1))`` (INTER_LINEAR)."""
    x1, y1, x2, y2 = box
    return cv2.resize(face, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)


def compose_numpy(frame: np.ndarray, face: np.ndarray, box: tuple[int, int, int, int],
                  mask: np.ndarray) -> np.ndarray:
    """Blend ``face`` (SxSx3 uint8) into ``frame`` in place inside ``box`` using ``mask`` (box-sized uint8)."""
    x1, y1, x2, y2 = box
    if mask.shape != (y2 - y1, x2 - x1):
        raise ValueError(f"mask shape {mask.shape} does not match box size {(y2 - y1, x2 - x1)}")
    body = frame[y1:y2, x1:x2].astype(np.float32)
    resized = resize_face(face, box).astype(np.float32)
    alpha = mask.astype(np.float32)[..., None] * (1.0 / 255.0)
    frame[y1:y2, x1:x2] = np.floor(body + alpha * (resized - body) + 0.5).astype(np.uint8)
    return frame


def compose_reference(frame: np.ndarray, face: np.ndarray, box: tuple[int, int, int, int],
                      crop_box: tuple[int, int, int, int], mask: np.ndarray) -> np.ndarray:
    """MuseTalk's ``get_image_blending`` with PIL, on RGB arrays; returns a new frame.

    ``mask`` is the box-sized mask; MuseTalk's crop-sized mask is the same values placed at the
    box inside an otherwise irrelevant crop (the pasted crop equals the frame outside the box).
    """
    x1, y1, x2, y2 = box
    xs, ys, xe, ye = crop_box
    body = Image.fromarray(frame)
    crop_mask = np.zeros((ye - ys, xe - xs), np.uint8)
    crop_mask[y1 - ys:y2 - ys, x1 - xs:x2 - xs] = mask
    face_large = body.crop((xs, ys, xe, ye))
    face_large.paste(Image.fromarray(resize_face(face, box)), (x1 - xs, y1 - ys, x2 - xs, y2 - ys))
    body.paste(face_large, (xs, ys), Image.fromarray(crop_mask))
    return np.asarray(body).copy()
