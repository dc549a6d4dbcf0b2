"""MuseTalk v1.5 face geometry: face box, crop box, jaw blend mask, per-video tracking.

Faithful to MuseTalk v1.5 (``musetalk/utils/preprocessing.py`` and
``musetalk/utils/blending.py``):

* face box from 68 landmarks (cast to int32 like MuseTalk): nose = lm[29];
  ``half = max(lm_y) - nose_y``; ``upper = max(0, nose_y - half)``;
  box = (min x, upper, max x, max y); v1.5 adds ``extra_margin`` to y2, clamped
  to the frame height. Where MuseTalk falls back to the detector box for
  ``x1 < 0`` we clamp to the frame instead, and a box that is empty after
  clamping means "no usable face".
* crop box: square of side ``2 * int(max(w, h) // 2 * expand)`` centred on the
  box centre (may extend past the frame, as MuseTalk's PIL crop allows).
* blend mask ("jaw" mode): MuseTalk segments the crop with a face parser; we
  use the landmark polygon instead. See :func:`jaw_mask_crop`.
* over time (:func:`track_frames`): each frame's search starts where the face
  was last seen; detection gaps of up to ``DEFAULT_MAX_GAP`` frames between two
  frames with a face are bridged by linear interpolation
  (:func:`bridge_gaps`); :func:`missing_ranges` lists the frames left without one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from talkrt.errors import TalkrtError
from talkrt.face.align_points import ibug68_to_align3
from talkrt.face.tracker import FaceDetection, FaceTracker

__all__ = [
    "Box",
    "TrackResult",
    "face_box",
    "crop_box",
    "jaw_polygon",
    "jaw_mask_crop",
    "jaw_blend_mask",
    "blur_kernel_size",
    "smooth_landmarks",
    "bridge_gaps",
    "missing_ranges",
    "select_largest",
    "track_frames",
]

log = logging.getLogger(__name__)

Box = tuple[int, int, int, int]
"""(x1, y1, x2, y2) in integer pixels, x2/y2 exclusive."""

NOSE = 29  # iBUG point MuseTalk splits the face at
JAW = slice(0, 17)
DEFAULT_EXTRA_MARGIN = 10
DEFAULT_EXPAND = 1.5
DEFAULT_UPPER_BOUNDARY_RATIO = 0.5
DEFAULT_SMOOTH_WINDOW = 5
DEFAULT_MAX_GAP = 5
"""Longest detection gap bridged, in frames (0.2 s at 25 fps, 0.08 s at 60 fps).

Counted in frames, not seconds, so the result does not depend on a container's
frame-rate metadata. Five frames cover detector dropouts (blur, a hand or a
turn for a moment) while a head barely moves, so a straight line between the
two sides is accurate to a few pixels; longer gaps are more likely a real
occlusion or a cut, where a pasted mouth would be wrong, so those frames stay
without a face and pass through unchanged.
"""
BRIDGE_MAX_SHIFT = 1.0
"""Bridge only if the face centre moved at most this many face sizes across the gap."""
BRIDGE_MAX_SCALE = 1.5
"""Bridge only if the face size changed at most by this factor across the gap."""


def _check_landmarks(landmarks68: np.ndarray) -> np.ndarray:
    lm = np.asarray(landmarks68, dtype=np.float32)
    if lm.shape != (68, 2):
        raise TalkrtError(f"landmarks must be [68, 2], got {lm.shape}")
    if not np.all(np.isfinite(lm)):
        raise TalkrtError("landmarks contain NaN or inf")
    return lm


def face_box(
    landmarks68: np.ndarray, frame_hw: tuple[int, int], extra_margin: int = DEFAULT_EXTRA_MARGIN
) -> Box | None:
    """MuseTalk v1.5 face box from 68 landmarks, or None if it is degenerate.

    Args:
        landmarks68: [68, 2] (x, y) pixel coordinates, iBUG order.
        frame_hw: (height, width) of the frame, for clamping.
        extra_margin: pixels added below the chin (v1.5; v1 used 0).
    """
    lm = _check_landmarks(landmarks68).astype(np.int32)  # MuseTalk truncates to int32
    height, width = int(frame_hw[0]), int(frame_hw[1])
    nose_y = int(lm[NOSE, 1])
    max_y = int(lm[:, 1].max())
    half_face_dist = max_y - nose_y
    upper = max(0, nose_y - half_face_dist)
    x1 = max(0, int(lm[:, 0].min()))
    x2 = min(width, int(lm[:, 0].max()))
    y2 = min(height, max_y + int(extra_margin))
    y1 = min(upper, height)
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        return None
    return (x1, y1, x2, y2)


def crop_box(box: Sequence[int], expand: float = DEFAULT_EXPAND) -> Box:
    """MuseTalk's enlarged square crop around a face box (may leave the frame)."""
    x1, y1, x2, y2 = (int(v) for v in box)
    x_c, y_c = (x1 + x2) // 2, (y1 + y2) // 2
    s = int(max(x2 - x1, y2 - y1) // 2 * expand)
    return (x_c - s, y_c - s, x_c + s, y_c + s)


def blur_kernel_size(crop_width: int) -> int:
    """MuseTalk's feathering kernel: ``int(0.1 * crop_w // 2 * 2) + 1`` (always odd)."""
    return int(0.1 * crop_width // 2 * 2) + 1


def jaw_polygon(landmarks68: np.ndarray) -> np.ndarray:
    """Lower-face polygon [17, 2] float32 in frame pixels: jaw contour 0..16.

    Closed by the straight segment 16 -> 0 (at about eye height); the region
    above the nose line is removed separately in :func:`jaw_mask_crop`, so the
    filled area is "jaw contour closed across the face at nose height".
    """
    return _check_landmarks(landmarks68)[JAW].copy()


def jaw_mask_crop(
    landmarks68: np.ndarray,
    box: Sequence[int],
    expand: float = DEFAULT_EXPAND,
    upper_boundary_ratio: float = DEFAULT_UPPER_BOUNDARY_RATIO,
) -> np.ndarray:
    """Full crop-size blend mask, uint8 [crop_h, crop_w] (for debugging and tests).

    Steps, in crop-box coordinates (crop = ``crop_box(box, expand)``):

    1. fill the jaw polygon (:func:`jaw_polygon`, vertices rounded half-up to
       pixels) with 255 and clear every row above the nose line
       ``floor(lm[29].y + 0.5)``;
    2. keep only the part inside the face box (MuseTalk crops its parsing mask
       to the face box and pastes it back into a blank crop);
    3. clear the rows above ``int(crop_h * upper_boundary_ratio)``;
    4. ``cv2.GaussianBlur(mask, (k, k), 0)`` with ``k = blur_kernel_size(crop_w)``.
    """
    lm = _check_landmarks(landmarks68)
    x1, y1, x2, y2 = (int(v) for v in box)
    cx1, cy1, cx2, cy2 = crop_box((x1, y1, x2, y2), expand)
    crop_w, crop_h = cx2 - cx1, cy2 - cy1
    if crop_w <= 0 or crop_h <= 0:
        raise TalkrtError(f"face box {tuple(box)} is too small for a blend mask")
    mask = np.zeros((crop_h, crop_w), dtype=np.uint8)
    # round half up (floor(v + 0.5)) so the result does not depend on the crop offset
    poly = np.floor(jaw_polygon(lm).astype(np.float64) + 0.5).astype(np.int32) - np.array([cx1, cy1], np.int32)
    cv2.fillPoly(mask, [poly], 255)
    nose_row = math.floor(float(lm[NOSE, 1]) + 0.5) - cy1
    mask[: max(0, min(crop_h, nose_row))] = 0
    keep = np.zeros_like(mask)
    bx1, by1 = max(0, x1 - cx1), max(0, y1 - cy1)
    bx2, by2 = min(crop_w, x2 - cx1), min(crop_h, y2 - cy1)
    if bx2 > bx1 and by2 > by1:
        keep[by1:by2, bx1:bx2] = mask[by1:by2, bx1:bx2]
    keep[: int(crop_h * upper_boundary_ratio)] = 0
    k = blur_kernel_size(crop_w)
    return cv2.GaussianBlur(keep, (k, k), 0)


def jaw_blend_mask(
    landmarks68: np.ndarray,
    box: Sequence[int],
    expand: float = DEFAULT_EXPAND,
    upper_boundary_ratio: float = DEFAULT_UPPER_BOUNDARY_RATIO,
) -> np.ndarray:
    """Blend mask for the face box only, uint8 [y2 - y1, x2 - x1].

    This is :func:`jaw_mask_crop` sliced to the face box; outside the face box
    MuseTalk's paste is a no-op (the crop there is the original frame), so this
    is all the compose step needs: ``out = frame*(1-m) + generated*m`` on the box.
    """
    x1, y1, x2, y2 = (int(v) for v in box)
    full = jaw_mask_crop(landmarks68, (x1, y1, x2, y2), expand, upper_boundary_ratio)
    cx1, cy1, _, _ = crop_box((x1, y1, x2, y2), expand)
    out = np.zeros((y2 - y1, x2 - x1), dtype=np.uint8)
    # the box lies inside its crop for any box wider/taller than 3 px; stay safe anyway
    sx1, sy1 = max(0, x1 - cx1), max(0, y1 - cy1)
    sx2, sy2 = min(full.shape[1], x2 - cx1), min(full.shape[0], y2 - cy1)
    if sx2 > sx1 and sy2 > sy1:
        ox, oy = sx1 - (x1 - cx1), sy1 - (y1 - cy1)
        out[oy : oy + sy2 - sy1, ox : ox + sx2 - sx1] = full[sy1:sy2, sx1:sx2]
    return out


def _runs(found: np.ndarray) -> list[tuple[int, int]]:
    """Half-open [start, end) index ranges of consecutive True values."""
    padded = np.concatenate([[False], found.astype(bool), [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def missing_ranges(found: np.ndarray) -> list[tuple[int, int]]:
    """Frame ranges without a face, half-open ``[start, end)`` (end exclusive), in order.

    E.g. ``found = [T, F, F, T, F]`` gives ``[(1, 3), (4, 5)]``: frames 1-2 and 4.

    Args:
        found: [N] bool (or anything ``astype(bool)`` takes), per frame.
    """
    return _runs(~np.asarray(found, dtype=bool).reshape(-1))


def _centre_and_size(landmarks68: np.ndarray) -> tuple[np.ndarray, float]:
    lo, hi = landmarks68.min(axis=0), landmarks68.max(axis=0)
    return (lo + hi) / 2.0, float(max(hi - lo))


def bridge_gaps(
    landmarks: np.ndarray, found: np.ndarray, max_gap: int = DEFAULT_MAX_GAP
) -> tuple[np.ndarray, np.ndarray]:
    """Fill short detection gaps by linear interpolation between the frames on either side.

    A gap (run of ``found == False``) is filled when it has at most ``max_gap``
    frames, a face on both sides (gaps at the clip's start or end are not),
    and the two sides agree: the face centre moved at most ``BRIDGE_MAX_SHIFT``
    face sizes and its size changed at most ``BRIDGE_MAX_SCALE`` times (face
    size = long side of the landmarks' extent), so a cut to another face is
    not bridged.

    Args:
        landmarks: [N, 68, 2] float pixels; rows where ``found`` is False are ignored.
        found: [N] bool.
        max_gap: longest gap filled, frames; 0 fills nothing.

    Returns:
        (landmarks float32 [N, 68, 2] with the filled rows, filled [N] bool).

    Raises:
        TalkrtError: mismatched shapes or a negative ``max_gap``.
    """
    lms = np.asarray(landmarks, dtype=np.float32).copy()
    flags = np.asarray(found, dtype=bool)
    if max_gap < 0:
        raise TalkrtError(f"max_gap must be >= 0 frames, got {max_gap}")
    if lms.ndim != 3 or lms.shape[1:] != (68, 2) or flags.shape != lms.shape[:1]:
        raise TalkrtError(f"bridge_gaps wants landmarks [N, 68, 2] and found [N], got {lms.shape} and {flags.shape}")
    filled = np.zeros(len(flags), dtype=bool)
    for start, end in missing_ranges(flags):
        if start == 0 or end == len(flags) or end - start > max_gap:
            continue
        before, after = lms[start - 1].astype(np.float64), lms[end].astype(np.float64)
        (c0, s0), (c1, s1) = _centre_and_size(before), _centre_and_size(after)
        small, large = min(s0, s1), max(s0, s1)
        if small <= 0 or large > BRIDGE_MAX_SCALE * small:
            continue
        if float(np.hypot(*(c1 - c0))) > BRIDGE_MAX_SHIFT * (s0 + s1) / 2:
            continue
        _lerp_gap(lms, start, end)
        filled[start:end] = True
    return lms, filled


def _lerp_gap(values: np.ndarray, start: int, end: int) -> None:
    """Fill ``values[start:end]`` in place on the straight line from frame start-1 to frame end."""
    before, after = values[start - 1].astype(np.float64), values[end].astype(np.float64)
    t = ((np.arange(start, end) - (start - 1)) / (end - (start - 1))).reshape((-1,) + (1,) * before.ndim)
    values[start:end] = (before[None] + t * (after - before)[None]).astype(values.dtype)


def _fill_bridged(values: np.ndarray, bridged: np.ndarray) -> np.ndarray:
    """float32 copy of per-frame points [N, ...] with the runs that :func:`bridge_gaps` filled
    (``bridged`` [N] bool, never at a clip end) interpolated the same way."""
    out = np.asarray(values, dtype=np.float32).copy()
    for start, end in _runs(bridged):
        _lerp_gap(out, start, end)
    return out


def smooth_landmarks(landmarks: np.ndarray, found: np.ndarray, window: int = DEFAULT_SMOOTH_WINDOW) -> np.ndarray:
    """Centred moving average of landmarks over time, within runs of found frames.

    Each run of consecutive found frames is smoothed on its own (a gap is an
    occlusion or a cut); near a run's ends the window shrinks symmetrically so
    no frame is pulled towards one side. Frames with ``found == False`` are
    returned unchanged, and the output is index-aligned with the input.

    Args:
        landmarks: [N, ...] per-frame points.
        found: [N] bool.
        window: odd window length in frames; 1 disables smoothing.
    """
    lms = np.asarray(landmarks, dtype=np.float32)
    flags = np.asarray(found, dtype=bool)
    if window < 1 or window % 2 == 0:
        raise TalkrtError(f"smoothing window must be a positive odd number, got {window}")
    if flags.shape != lms.shape[:1]:
        raise TalkrtError(f"found {flags.shape} does not match landmarks {lms.shape}")
    out = lms.copy()
    radius = window // 2
    if radius == 0:
        return out
    for start, end in _runs(flags):
        seg = lms[start:end].astype(np.float64)
        csum = np.concatenate([np.zeros((1,) + seg.shape[1:]), np.cumsum(seg, axis=0)])
        idx = np.arange(end - start)
        r = np.minimum(radius, np.minimum(idx, end - start - 1 - idx))
        sums = csum[idx + r + 1] - csum[idx - r]
        out[start:end] = (sums / (2 * r + 1).reshape((-1,) + (1,) * (seg.ndim - 1))).astype(np.float32)
    return out


def select_largest(faces: Sequence[FaceDetection]) -> FaceDetection | None:
    """The face whose landmark extent has the largest area (ties: higher score)."""
    best, best_key = None, (-math.inf, -math.inf)
    for face in faces:
        lm = face.landmarks68
        span = lm.max(axis=0) - lm.min(axis=0)
        key = (float(span[0] * span[1]), face.score)
        if key > best_key:
            best, best_key = face, key
    return best


@dataclass(frozen=True)
class TrackResult:
    """Per-frame face geometry for a whole clip, index-aligned with its frames.

    Attributes:
        found: [N] bool, a usable face in that frame (detected or bridged).
        landmarks68: [N, 68, 2] float32 (smoothed); zeros where not found.
        boxes: [N, 4] int32 MuseTalk v1.5 face boxes (x1, y1, x2, y2); zeros where not found.
        crop_boxes: [N, 4] int32 enlarged crops (``crop_box(box, expand)``); zeros where not found.
        scores: [N] float32 detector scores; 0 where not found or bridged.
        bridged: [N] bool, found by interpolation across a detection gap (:func:`bridge_gaps`).
        frame_hw: (height, width) of the frames.
        expand: crop expansion the crop boxes were made with.
        align3: [N, 3, 2] float32 LatentSync alignment points (brow centres, nose centre;
            :mod:`talkrt.face.align_points`), bridged and smoothed like ``landmarks68``;
            zeros where not found. None for results built without them.
    """

    found: np.ndarray
    landmarks68: np.ndarray
    boxes: np.ndarray
    crop_boxes: np.ndarray
    scores: np.ndarray
    bridged: np.ndarray
    frame_hw: tuple[int, int]
    expand: float = DEFAULT_EXPAND
    align3: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.found.shape[0])

    def blend_mask(self, index: int, upper_boundary_ratio: float = DEFAULT_UPPER_BOUNDARY_RATIO) -> np.ndarray:
        """Face-box blend mask of frame ``index`` (see :func:`jaw_blend_mask`)."""
        if not self.found[index]:
            raise TalkrtError(f"frame {index} has no face")
        return jaw_blend_mask(self.landmarks68[index], self.boxes[index], self.expand, upper_boundary_ratio)


def track_frames(
    frames: Iterable[np.ndarray],
    tracker: FaceTracker,
    extra_margin: int = DEFAULT_EXTRA_MARGIN,
    smooth_window: int = DEFAULT_SMOOTH_WINDOW,
    expand: float = DEFAULT_EXPAND,
    max_gap: int = DEFAULT_MAX_GAP,
) -> TrackResult:
    """Track the largest face through ``frames`` (uint8 RGB [H, W, 3], all one size).

    Frames are consumed one at a time and not kept. Each frame is searched
    first where the face was last detected (``tracker.detect(frame, near=...)``,
    which lets small faces be searched at a fitting scale), so once a face is
    followed it is kept even if a larger one appears elsewhere. Detection gaps
    of at most ``max_gap`` frames (default ``DEFAULT_MAX_GAP`` = 5 frames)
    between two frames with a face are filled by linear interpolation of the
    landmarks (:func:`bridge_gaps`); longer gaps and gaps at the clip's ends
    stay without a face (those frames pass through unchanged;
    :func:`missing_ranges` lists them). Landmarks are then smoothed over time
    (:func:`smooth_landmarks`) and boxes computed from the smoothed landmarks;
    a frame whose box is degenerate counts as not found.

    Raises:
        TalkrtError: no frames, frames of differing size/shape, or a negative ``max_gap``.
    """
    found: list[bool] = []
    landmarks: list[np.ndarray] = []
    points3: list[np.ndarray] = []
    scores: list[float] = []
    frame_hw: tuple[int, int] | None = None
    near: tuple[float, float, float, float] | None = None
    blank = np.zeros((68, 2), dtype=np.float32)
    for i, frame in enumerate(frames):
        if frame.ndim != 3 or frame.shape[2] != 3:
            raise TalkrtError(f"frame {i}: expected an RGB image [H, W, 3], got shape {frame.shape}")
        hw = (int(frame.shape[0]), int(frame.shape[1]))
        if frame_hw is None:
            frame_hw = hw
        elif hw != frame_hw:
            raise TalkrtError(f"frame {i} is {hw[1]}x{hw[0]}, earlier frames are {frame_hw[1]}x{frame_hw[0]}")
        face = select_largest(tracker.detect(frame, near=near))
        ok = face is not None and face_box(face.landmarks68, hw, extra_margin) is not None
        found.append(ok)
        landmarks.append(face.landmarks68 if ok and face is not None else blank)
        points3.append(_align3_of(face) if ok and face is not None else blank[:3])
        scores.append(face.score if ok and face is not None else 0.0)
        if ok and face is not None:
            lo, hi = face.landmarks68.min(axis=0), face.landmarks68.max(axis=0)
            near = (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1]))
    if frame_hw is None:
        raise TalkrtError("track_frames() got no frames")
    n = len(found)
    detected = np.array(found, dtype=bool)
    lms, bridged = bridge_gaps(np.stack(landmarks), detected, max_gap)
    found_arr = detected | bridged
    lms = smooth_landmarks(lms, found_arr, smooth_window)
    align3 = smooth_landmarks(_fill_bridged(np.stack(points3), bridged), found_arr, smooth_window)
    boxes = np.zeros((n, 4), dtype=np.int32)
    crops = np.zeros((n, 4), dtype=np.int32)
    for i in np.flatnonzero(found_arr):
        box = face_box(lms[i], frame_hw, extra_margin)
        if box is None:  # smoothing can, in principle, push a marginal box out of the frame
            found_arr[i] = False
            continue
        boxes[i] = box
        crops[i] = crop_box(box, expand)
    lms[~found_arr] = 0.0
    align3[~found_arr] = 0.0
    bridged &= found_arr
    score_arr = np.where(detected & found_arr, np.array(scores, dtype=np.float32), 0.0).astype(np.float32)
    log.info("track_frames: face in %d of %d frames (%d bridged across gaps of <= %d frames)",
             int(found_arr.sum()), n, int(bridged.sum()), max_gap)
    return TrackResult(found_arr, lms, boxes, crops, score_arr, bridged, frame_hw, float(expand), align3)


def _align3_of(face: FaceDetection) -> np.ndarray:
    """The tracker's alignment points, or those derived from its 68 landmarks."""
    return face.align3 if face.align3 is not None else ibug68_to_align3(face.landmarks68)
