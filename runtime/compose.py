"""MuseTalk's own post-processing, kept as the ``reference`` compose mode and benchmark baseline.

MuseTalk pastes the resized face into a 1.5x crop around the face box and alpha-blends that
crop into the frame with a feathered mask (``get_image_blending`` in MuseTalk's
``musetalk/utils/blending.py``). Outside the face box the pasted crop equals the frame, so the
blend only changes pixels inside the box:

    out[box] = frame[box] + mask/255 * (resize_linear(face, box) - frame[box])

which is what talkrt's compose computes everywhere else: on the CPU
:func:`talkrt.kernels.reference.compose_rgb`, on the GPU the fused ``compose_nv12`` kernel.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image


def compose_musetalk(frame: np.ndarray, face: np.ndarray, box: tuple[int, int, int, int],
                     crop_box: tuple[int, int, int, int], mask: np.ndarray) -> np.ndarray:
    """MuseTalk's ``get_image_blending`` with PIL, on RGB arrays; returns a new frame.

    Args:
        frame: [H, W, 3] uint8 RGB.
        face: [S, S, 3] uint8 generated face, resized to the box with ``cv2.resize``
            (INTER_LINEAR) as MuseTalk does.
        box: face box (x1, y1, x2, y2) in pixels.
        crop_box: MuseTalk's 1.5x crop box around it (xs, ys, xe, ye).
        mask: [y2-y1, x2-x1] uint8 box-sized blend mask; MuseTalk's crop-sized mask is these
            values placed at the box inside an otherwise irrelevant crop.
    Returns:
        [H, W, 3] uint8, a new array.
    """
    x1, y1, x2, y2 = (int(v) for v in box)
    xs, ys, xe, ye = (int(v) for v in crop_box)
    resized = cv2.resize(face, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
    body = Image.fromarray(frame)
    crop_mask = np.zeros((ye - ys, xe - xs), np.uint8)
    crop_mask[y1 - ys:y2 - ys, x1 - xs:x2 - xs] = mask
    face_large = body.crop((xs, ys, xe, ye))
    face_large.paste(Image.fromarray(resized), (x1 - xs, y1 - ys, x2 - xs, y2 - ys))
    body.paste(face_large, (xs, ys), Image.fromarray(crop_mask))
    return np.asarray(body).copy()
