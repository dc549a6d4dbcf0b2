"""Face tracker interface: one detection type, one protocol, one factory.

Every tracker returns faces as 68 iBUG-order landmarks in frame pixels, so the
MuseTalk geometry (:mod:`talkrt.face.geometry`) does not care which detector and
landmark model produced them. The default is the offline BlazeFace + face-mesh
pair (:mod:`talkrt.face.blazeface_mesh`); the official MuseTalk DWPose/S3FD path
can be plugged in later as another ``FaceTracker``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from talkrt.errors import TalkrtError

__all__ = ["FaceDetection", "FaceTracker", "create_tracker", "TRACKER_NAMES"]


@dataclass(frozen=True)
class FaceDetection:
    """One face found in one frame.

    Attributes:
        landmarks68: float32 [68, 2] (x, y) pixel coordinates in iBUG-68 order
            (jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, mouth 48-67).
        score: detector confidence in [0, 1].
        bbox: detector box (x1, y1, x2, y2) in pixels, floats.
        align3: float32 [3, 2] LatentSync alignment points (brow centre on the image left,
            brow centre on the image right, nose centre; :mod:`talkrt.face.align_points`),
            or None when the tracker has no better source than ``landmarks68`` (then
            :func:`talkrt.face.align_points.ibug68_to_align3` derives them).
    """

    landmarks68: np.ndarray
    score: float
    bbox: tuple[float, float, float, float]
    align3: np.ndarray | None = None

    def __post_init__(self) -> None:
        lm = np.asarray(self.landmarks68, dtype=np.float32)
        if lm.shape != (68, 2):
            raise TalkrtError(f"FaceDetection.landmarks68 must be [68, 2], got {lm.shape}")
        lm.setflags(write=False)
        object.__setattr__(self, "landmarks68", lm)
        if self.align3 is not None:
            pts = np.array(self.align3, dtype=np.float32)
            if pts.shape != (3, 2):
                raise TalkrtError(f"FaceDetection.align3 must be [3, 2], got {pts.shape}")
            pts.setflags(write=False)
            object.__setattr__(self, "align3", pts)
        object.__setattr__(self, "bbox", tuple(float(v) for v in self.bbox))
        object.__setattr__(self, "score", float(self.score))

    @property
    def bbox_area(self) -> float:
        """Area of the detector box in square pixels (0 for a degenerate box)."""
        x1, y1, x2, y2 = self.bbox
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)


@runtime_checkable
class FaceTracker(Protocol):
    """Anything that finds faces with 68 landmarks in an RGB frame."""

    def detect(self, frame_rgb: np.ndarray, near: Sequence[float] | None = None) -> list[FaceDetection]:
        """Return the faces in ``frame_rgb`` (uint8 [H, W, 3] RGB), any order.

        ``near`` is a hint, (x1, y1, x2, y2) in frame pixels: where a face was
        in a recent frame. A tracker may search there first, at a scale fitted
        to that face, and return only the faces found there; it may ignore it.
        """
        ...


TRACKER_NAMES: tuple[str, ...] = ("blazeface-mesh",)


def create_tracker(name: str = "blazeface-mesh", **kwargs: object) -> FaceTracker:
    """Build the tracker called ``name``; ``kwargs`` go to its constructor.

    Raises:
        TalkrtError: unknown name, or the tracker's model files are missing.
    """
    if name == "blazeface-mesh":
        from talkrt.face.blazeface_mesh import BlazeFaceMeshTracker

        return BlazeFaceMeshTracker(**kwargs)  # type: ignore[arg-type]
    raise TalkrtError(f"unknown face tracker {name!r}; known: {', '.join(TRACKER_NAMES)}")
