"""Faces tracked through clips (CPU): small faces, bridged gaps, frames left without a face.

Clips are the bundled astronaut face (``benchmarks.sample.moving_face_frames``) scaled and
pasted into wider frames, plus ``tests/data/b20a_small_face_640x360.mp4`` (a ~38 px
box in a 640x360 wide shot, 50 frames).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from talkrt.face import FaceDetection, bridge_gaps, create_tracker, missing_ranges, track_frames
from talkrt.face.blazeface import quiet_native_stderr, tile_levels
from talkrt.face.blazeface_mesh import BlazeFaceMeshTracker
from talkrt.face.geometry import DEFAULT_MAX_GAP
from talkrt.media.frames import iter_video_frames
from benchmarks.sample import moving_face_frames

pytest.importorskip("skimage.data")

DATA = Path(__file__).parent / "data"
BACKGROUND = (80, 60, 45)


@pytest.fixture(scope="module")
def tracker() -> BlazeFaceMeshTracker:
    return create_tracker(num_threads=2)  # type: ignore[return-value]


def wide_clip(
    face_px: int, width: int, height: int, frames: int, start: tuple[float, float], step: tuple[float, float]
) -> list[np.ndarray]:
    """The moving astronaut rendered at ``face_px`` square, pasted with its centre at
    ``start`` (x, y pixels) moving by ``step`` pixels per frame, on a flat background.
    The MuseTalk box height comes out at about ``0.56 * face_px + 10`` px."""
    render = max(face_px, 320)  # render large, then downscale with area averaging (no aliasing)
    out = []
    for i, frame in enumerate(moving_face_frames(size=render, seconds=frames / 25)):
        if render != face_px:
            frame = cv2.resize(frame, (face_px, face_px), interpolation=cv2.INTER_AREA)
        canvas = np.full((height, width, 3), BACKGROUND, np.uint8)
        x = round(start[0] + step[0] * i - face_px / 2)
        y = round(start[1] + step[1] * i - face_px / 2)
        canvas[y : y + face_px, x : x + face_px] = frame
        out.append(canvas)
    return out


def _heights(boxes: np.ndarray) -> np.ndarray:
    return boxes[:, 3] - boxes[:, 1]


def _max_jump(boxes: np.ndarray) -> int:
    """Largest frame-to-frame change of any box coordinate, pixels."""
    return int(np.abs(np.diff(boxes.astype(np.int64), axis=0)).max())


# ------------------------------------------------------------------ clips


def test_b20a_small_face_is_tracked_in_every_frame(tracker: BlazeFaceMeshTracker) -> None:
    frames = list(iter_video_frames(DATA / "b20a_small_face_640x360.mp4"))
    assert len(frames) == 50 and frames[0].shape == (360, 640, 3)
    result = track_frames(iter(frames), tracker)
    assert result.found.all(), missing_ranges(result.found)
    assert int((result.found & ~result.bridged).sum()) >= 45  # detected, not only bridged
    boxes = result.boxes
    assert 28 <= _heights(boxes).min() and _heights(boxes).max() <= 44
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    assert np.all(np.abs(centres - (312, 164)).max(axis=0) <= (15, 12))  # where the face is
    assert _max_jump(boxes) <= 4  # temporally smooth: no frame-to-frame jump over 4 px
    # the cheap search around the previous frame's face is what finds it (no whole-frame or tile search)
    lo, hi = result.landmarks68.min(axis=1), result.landmarks68.max(axis=1)
    hits = [bool(next(tracker.finder.stages(frames[i], (*lo[i - 1], *hi[i - 1])))) for i in range(1, 50)]
    assert sum(hits) >= 45


@pytest.mark.parametrize(
    ("face_px", "frame_wh", "box_height"),
    [(30, (640, 360), (22, 28)), (44, (640, 360), (30, 38)), (80, (640, 360), (48, 60)),
     (160, (640, 360), (90, 112)), (320, (640, 360), (175, 205)), (690, (1280, 720), (380, 420))],
)
def test_face_sizes_24_to_400_px_are_tracked(
    tracker: BlazeFaceMeshTracker, face_px: int, frame_wh: tuple[int, int], box_height: tuple[int, int]
) -> None:
    width, height = frame_wh
    n, step = 10, (1.5, -0.5)
    start = (0.62 * width, 0.5 * height)
    result = track_frames(iter(wide_clip(face_px, width, height, n, start, step)), tracker)
    assert result.found.all(), missing_ranges(result.found)
    heights = _heights(result.boxes)
    assert box_height[0] <= heights.min() and heights.max() <= box_height[1]
    # the box covers the pasted square's centre and follows its motion (the rendered head
    # also sways a little inside its square)
    x_paste = start[0] + step[0] * np.arange(n)
    assert np.all((result.boxes[:, 0] < x_paste) & (x_paste < result.boxes[:, 2]))
    dx = (result.boxes[:, 0] + result.boxes[:, 2]) / 2 - x_paste
    assert np.abs(dx - dx[0]).max() <= 2 + 0.03 * face_px
    assert _max_jump(result.boxes) <= max(4, 0.05 * heights.max())


def test_three_blank_frames_are_bridged(tracker: BlazeFaceMeshTracker) -> None:
    frames = wide_clip(60, 640, 360, 20, start=(400, 170), step=(1.0, 0.5))
    blank = [8, 9, 10]
    for i in blank:
        frames[i] = np.full_like(frames[i], BACKGROUND)
    result = track_frames(iter(frames), tracker)
    assert result.found.all() and missing_ranges(result.found) == []
    np.testing.assert_array_equal(np.flatnonzero(result.bridged), blank)
    assert not result.scores[blank].any() and result.scores[7] > 0.5
    # the bridged boxes lie on the line between the detected neighbours (smoothing moves them a little)
    b7, b11 = result.boxes[7].astype(float), result.boxes[11].astype(float)
    for k, i in enumerate(blank, start=1):
        assert np.abs(result.boxes[i] - (b7 + (b11 - b7) * k / 4)).max() <= 2


def test_thirty_blank_frames_stay_without_a_face(tracker: BlazeFaceMeshTracker) -> None:
    frames = wide_clip(60, 320, 240, 46, start=(180, 120), step=(0.5, 0.0))
    for i in range(8, 38):
        frames[i] = np.full_like(frames[i], BACKGROUND)
    result = track_frames(iter(frames), tracker)
    assert missing_ranges(result.found) == [(8, 38)]
    assert not result.bridged.any()
    assert not result.boxes[8:38].any() and not result.landmarks68[8:38].any()
    assert result.found[:8].all() and result.found[38:].all()


class _WholeFrameOnly:
    """The same tracker without the previous frame's hint: every frame searched on its own."""

    def __init__(self, inner: BlazeFaceMeshTracker) -> None:
        self.inner = inner

    def detect(self, frame_rgb: np.ndarray, near=None) -> list[FaceDetection]:
        return self.inner.detect(frame_rgb)


def test_bundled_sample_keeps_its_boxes(tracker: BlazeFaceMeshTracker) -> None:
    frames = list(iter_video_frames(DATA / "sample_avatar.mp4"))
    result = track_frames(iter(frames), tracker)
    assert result.found.all() and not result.bridged.any() and len(result) == 100
    # a large face is searched on the whole frame, as without tracking: identical boxes
    alone = track_frames(iter(frames), _WholeFrameOnly(tracker))
    np.testing.assert_array_equal(result.boxes, alone.boxes)
    np.testing.assert_array_equal(result.landmarks68, alone.landmarks68)
    assert result.boxes[[0, 50, 99]].tolist() == [[118, 59, 268, 249], [122, 59, 274, 251], [112, 62, 259, 246]]


# ----------------------------------------------------------- search parts


def test_search_around_a_face_only_when_it_is_small(tracker: BlazeFaceMeshTracker) -> None:
    frame = wide_clip(44, 640, 360, 1, start=(420, 150), step=(0, 0))[0]
    near = tracker.finder.around(frame, (410, 140, 430, 165))
    assert len(near) == 1 and abs((near[0].box[0] + near[0].box[2]) / 2 - 420) < 6
    assert tracker.finder.around(frame, (100, 20, 330, 300)) == []  # 3x the box would exceed the frame
    assert tracker.finder.around(frame, (100, 100, 120, 125)) == []  # nothing there
    faces = tracker.detect(frame, near=(100, 100, 120, 125))  # a wrong hint falls back to the full search
    assert len(faces) == 1 and abs(faces[0].landmarks68[:, 0].mean() - 420) < 6


def test_tile_levels_cover_the_frame_with_overlap() -> None:
    levels = tile_levels(360, 640, 192)
    assert [len(level) for level in levels] == [2, 15]
    assert {side for _, _, side in levels[0]} == {384} and {side for _, _, side in levels[1]} == {192}
    for level in levels:
        side = level[0][2]
        covered = np.zeros((360, 640), bool)
        for x, y, s in level:
            covered[max(0, y) : y + s, max(0, x) : x + s] = True
        assert covered.all()
        xs = sorted({x for x, _, _ in level})
        assert all(b - a <= 0.75 * side for a, b in itertools.pairwise(xs))
    assert tile_levels(320, 320, 192) == [[(0, 0, 192), (128, 0, 192), (0, 128, 192), (128, 128, 192)]]
    # large frames stop at coarser tiles: 30% of the long side at least
    assert [(len(level), level[0][2]) for level in tile_levels(1080, 1920, 192)] == [(2, 1536), (6, 768), (28, 384)]
    assert tile_levels(180, 190, 192) == []  # the whole frame is already the finest scale


# ------------------------------------------------------- gaps and ranges


def _face(shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 68, endpoint=False)
    return np.stack([100 + 20 * scale * np.cos(t) + shift, 80 + 25 * scale * np.sin(t)], axis=1).astype(np.float32)


def test_bridge_gaps_interpolates_linearly() -> None:
    found = np.array([1, 0, 0, 1, 1], bool)
    lms = np.stack([_face(0), _face(), _face(), _face(3), _face(9)])
    lms[1:3] = 1e6  # rows without a face are ignored
    out, filled = bridge_gaps(lms, found)
    np.testing.assert_array_equal(filled, [0, 1, 1, 0, 0])
    np.testing.assert_allclose(out[1], _face(1), atol=1e-4)
    np.testing.assert_allclose(out[2], _face(2), atol=1e-4)
    np.testing.assert_array_equal(out[[0, 3, 4]], lms[[0, 3, 4]])


def test_bridge_gaps_limits() -> None:
    def gap(length: int, after: np.ndarray | None = None, edge: bool = False) -> np.ndarray:
        found = np.array(([0] if edge else [1]) + [0] * length + [1], bool)
        lms = np.stack([_face()] * (length + 1) + [_face() if after is None else after])
        return bridge_gaps(lms, found)[1]

    assert gap(DEFAULT_MAX_GAP).sum() == DEFAULT_MAX_GAP == 5
    assert not gap(DEFAULT_MAX_GAP + 1).any()
    assert not gap(2, edge=True).any()  # no face before: nothing to interpolate from
    assert not gap(2, after=_face(shift=60)).any()  # moved more than a face size: a cut, not a dropout
    assert not gap(2, after=_face(scale=1.6)).any()
    assert gap(2, after=_face(shift=20, scale=1.3)).sum() == 2
    found = np.array([1, 0, 1], bool)
    assert not bridge_gaps(np.stack([_face()] * 3), found, max_gap=0)[1].any()
    with pytest.raises(Exception, match="max_gap"):
        bridge_gaps(np.stack([_face()] * 3), found, max_gap=-1)
    with pytest.raises(Exception, match="landmarks"):
        bridge_gaps(np.zeros((3, 5, 2)), found)


def test_missing_ranges_are_half_open() -> None:
    assert missing_ranges(np.array([1, 0, 0, 1, 0], bool)) == [(1, 3), (4, 5)]
    assert missing_ranges(np.ones(4, bool)) == []
    assert missing_ranges(np.zeros(3, bool)) == [(0, 3)]
    assert missing_ranges(np.zeros(0, bool)) == []
    assert missing_ranges([True, False]) == [(1, 2)]


# ------------------------------------------------------------ quiet stderr


def test_model_loading_prints_nothing_to_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    code = "from talkrt.face import create_tracker; create_tracker(num_threads=1); print('loaded')"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    out, err = capfd.readouterr()
    assert out.strip() == "loaded"
    assert "XNNPACK" not in err and "TensorFlow Lite" not in err, err


def test_quiet_native_stderr_restores_fd2_on_error(capfd: pytest.CaptureFixture[str]) -> None:
    os.write(2, b"before\n")
    with pytest.raises(ValueError), quiet_native_stderr():
        os.write(2, b"hidden\n")
        raise ValueError("boom")
    os.write(2, b"after\n")
    err = capfd.readouterr().err
    assert "before" in err and "after" in err and "hidden" not in err
