"""Face tracking, MuseTalk v1.5 face geometry (boxes, crops, blend masks) and LatentSync 1.6
face alignment (:mod:`talkrt.face.align`, :mod:`talkrt.face.align_mask`)."""

from talkrt.face.align import AlignedFaces, AlignSpec, align_track, align_transforms
from talkrt.face.align_mask import FaceMask, load_mask, lower_face_mask, mask_file
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
    "AlignSpec",
    "AlignedFaces",
    "FaceMask",
    "align_track",
    "align_transforms",
    "load_mask",
    "lower_face_mask",
    "mask_file",
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
