"""Default (numpy, box-only) compose vs MuseTalk's PIL `get_image_blending` reference."""
import numpy as np
import pytest

from talkrt.compose import compose_numpy, compose_reference


def _case(rng, h, w, box, crop_box):
    frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    face = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    x1, y1, x2, y2 = box
    mask = rng.integers(0, 256, (y2 - y1, x2 - x1), dtype=np.uint8)
    mask[: mask.shape[0] // 3] = 0
    mask[-3:] = 255
    return frame, face, mask


@pytest.mark.parametrize("h, w, box, crop_box", [
    (200, 300, (50, 40, 170, 180), (20, 10, 200, 210)),          # inside
    (240, 320, (0, 0, 101, 97), (-25, -25, 126, 126)),            # touches the corner, crop leaves the frame
    (240, 320, (219, 140, 320, 240), (194, 115, 345, 266)),       # touches the bottom-right edge
    (97, 131, (10, 11, 13, 14), (9, 10, 14, 15)),                 # tiny odd box
])
def test_numpy_compose_matches_musetalk_reference(h, w, box, crop_box):
    rng = np.random.default_rng(hash(box) % 2**32)
    frame, face, mask = _case(rng, h, w, box, crop_box)
    ref = compose_reference(frame, face, box, crop_box, mask)
    out = compose_numpy(frame.copy(), face, box, mask)
    # PIL blends as (a*m + b*(255-m)) / 255 with rounding; the float32 formula with
    # round-half-up gives the same integers except possibly at exact .5 ties: allow 1 level.
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
    zero = np.zeros((64, 64), np.uint8)
    assert np.array_equal(compose_numpy(frame.copy(), face, (20, 20, 84, 84), zero), frame)
    full = np.full((64, 64), 255, np.uint8)
    out = compose_numpy(frame.copy(), face, (20, 20, 84, 84), full)
    import cv2
    assert np.array_equal(out[20:84, 20:84], cv2.resize(face, (64, 64), interpolation=cv2.INTER_LINEAR))


def test_mask_shape_is_checked():
    rng = np.random.default_rng(0)
    frame, face, _ = _case(rng, 120, 160, (20, 20, 84, 84), (4, 4, 100, 100))
    with pytest.raises(ValueError, match="mask shape"):
        compose_numpy(frame, face, (20, 20, 84, 84), np.zeros((10, 10), np.uint8))
