"""talkrt's CPU compose (kernels.reference.compose_rgb) vs MuseTalk's PIL `get_image_blending`."""
import cv2
import numpy as np
import pytest

from talkrt.compose import compose_musetalk
from talkrt.kernels import SharpenParams, reference


def _case(rng, h, w, box, crop_box):
    frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    face = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    x1, y1, x2, y2 = box
    mask = rng.integers(0, 256, (y2 - y1, x2 - x1), dtype=np.uint8)
    mask[: mask.shape[0] // 3] = 0
    mask[-3:] = 255
    return frame, face, mask


def _compose(frame, face, box, mask, sharpen=None):
    out = frame.copy()
    reference.compose_rgb(out[None], face[None], np.array([box]), [mask], sharpen=sharpen)
    return out


@pytest.mark.parametrize("h, w, box, crop_box", [
    (200, 300, (50, 40, 170, 180), (20, 10, 200, 210)),          # inside
    (240, 320, (0, 0, 101, 97), (-25, -25, 126, 126)),            # touches the corner, crop leaves the frame
    (240, 320, (219, 140, 320, 240), (194, 115, 345, 266)),       # touches the bottom-right edge
    (97, 131, (10, 11, 13, 14), (9, 10, 14, 15)),                 # tiny odd box
])
def test_compose_matches_musetalk(h, w, box, crop_box):
    rng = np.random.default_rng(sum(box))
    frame, face, mask = _case(rng, h, w, box, crop_box)
    ref = compose_musetalk(frame, face, box, crop_box, mask)
    out = _compose(frame, face, box, mask)
    # PIL's paste blends in 8-bit fixed point (its own rounding); talkrt rounds the exact
    # (body*(255-m) + face*m)/255 half up: they agree but for rare off-by-one levels.
    diff = np.abs(out.astype(int) - ref.astype(int))
    assert diff.max() <= 1
    assert (diff > 0).mean() < 0.01
    x1, y1, x2, y2 = box
    outside = np.ones((h, w), bool)
    outside[y1:y2, x1:x2] = False
    assert np.array_equal(out[outside], frame[outside])        # only the face box changes
    assert not np.array_equal(out[y1:y2, x1:x2], frame[y1:y2, x1:x2])


def test_mask_extremes():
    rng = np.random.default_rng(0)
    frame, face, _ = _case(rng, 120, 160, (20, 20, 84, 84), (4, 4, 100, 100))
    assert np.array_equal(_compose(frame, face, (20, 20, 84, 84), np.zeros((64, 64), np.uint8)), frame)
    out = _compose(frame, face, (20, 20, 84, 84), np.full((64, 64), 255, np.uint8))
    assert np.array_equal(out[20:84, 20:84], cv2.resize(face, (64, 64), interpolation=cv2.INTER_LINEAR))


def test_sharpen_raises_local_contrast_inside_the_face_box_only():
    rng = np.random.default_rng(1)
    frame, _, _ = _case(rng, 120, 160, (20, 20, 84, 84), (4, 4, 100, 100))
    face = cv2.GaussianBlur(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), (0, 0), 3)   # soft detail
    full = np.full((64, 64), 255, np.uint8)
    plain = _compose(frame, face, (20, 20, 84, 84), full)
    sharp = _compose(frame, face, (20, 20, 84, 84), full, sharpen=SharpenParams(1.2, 1.0, 0))
    outside = np.ones((120, 160), bool)
    outside[20:84, 20:84] = False
    assert np.array_equal(sharp[outside], plain[outside])

    def detail(image):
        return cv2.Laplacian(image[20:84, 20:84].astype(np.float32), cv2.CV_32F).var()
    assert detail(sharp) > 1.2 * detail(plain)


def test_mask_shape_is_checked():
    rng = np.random.default_rng(0)
    frame, face, _ = _case(rng, 120, 160, (20, 20, 84, 84), (4, 4, 100, 100))
    with pytest.raises(ValueError, match="masks"):
        _compose(frame, face, (20, 20, 84, 84), np.zeros((10, 10), np.uint8))
