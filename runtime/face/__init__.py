"""Face tracking and MuseTalk v1.5 face geometry (boxes, crops, blend masks)."""

from talkrt.face.geometry import (
    TrackResult,
    bridge_gaps,
    crop_box,
    face_box,
    jaw_blend_mask,
    jaw_mask_crop,
    missing_ranges,
    select_largest,
    smooth_landmarks,
    track_frames,
)
from talkrt.face.tracker import FaceDetection, FaceTracker, create_tracker

__all__ = [
    "FaceDetection",
    "FaceTracker",
    "TrackResult",
    "bridge_gaps",
    "create_tracker",
    "crop_box",
    "face_box",
    "jaw_blend_mask",
    "jaw_mask_crop",
    "missing_ranges",
    "select_largest",
    "smooth_landmarks",
    "track_frames",
]
