"""The three LatentSync alignment points (brow centres, nose centre) from a face's landmarks.

LatentSync 1.6 (``latentsync/utils/image_processor.py``, ``ImageProcessor.affine_transform``)
aligns a face by three points of InsightFace's 106-point layout, each a mean of several points:

* the brow on the image left (the subject's right brow): mean of points 43, 48, 49, 51, 50;
* the brow on the image right: mean of points 101..105;
* the nose: mean of points 74, 77, 83, 86.

Upstream maps the two five-point brow sets onto iBUG's five brow points (``face_detector.py``,
``LMK_ADAPT_ORIGIN_ORDER``), which lie on the brow's upper edge, and public code that uses the
106-point layout takes point 86 as the nose tip, 74 on the bridge and 77/83 as the two sides of
the nose base. talkrt takes the same anatomical points from the 468-point face mesh:

* brows: the mesh's upper brow contours, subject's right 70, 63, 105, 66, 107 and left
  300, 293, 334, 296, 336 (outer -> inner);
* nose: mean of the bridge vertex 197 (iBUG 28), the alar bases 98 and 327 (iBUG 31, 35) and
  the tip 1 (iBUG 30).

This correspondence is anatomical, not measured against InsightFace's model (whose markup chart
is an image we did not consult), so the points may sit a few percent of the face height from
where InsightFace would put them; the similarity fit absorbs most of such a shift.

Trackers without a mesh get the points from iBUG-68 (:func:`ibug68_to_align3`): brow centres as
the mean of iBUG 17..21 / 22..26 (talkrt's mesh68 puts those on the brow's centre line, half a
brow height lower than the upper contour) and the nose from iBUG 28, 31, 35, 30.
"""

from __future__ import annotations

import numpy as np

from talkrt.errors import TalkrtError

__all__ = ["MESH_BROW_IMAGE_LEFT", "MESH_BROW_IMAGE_RIGHT", "MESH_NOSE", "mesh_to_align3",
           "ibug68_to_align3", "check_align3"]

MESH_BROW_IMAGE_LEFT = (70, 63, 105, 66, 107)      # subject's right brow, upper contour
MESH_BROW_IMAGE_RIGHT = (300, 293, 334, 296, 336)  # subject's left brow, upper contour
MESH_NOSE = (197, 98, 327, 1)                      # bridge, alar bases, tip

_IBUG_BROW_LEFT = slice(17, 22)
_IBUG_BROW_RIGHT = slice(22, 27)
_IBUG_NOSE = (28, 31, 35, 30)


def check_align3(points: np.ndarray, name: str = "align3", dtype: type = np.float32) -> np.ndarray:
    """``points`` as ``dtype`` [3, 2] (finite), else :class:`TalkrtError` naming ``name``."""
    pts = np.asarray(points, dtype=dtype)
    if pts.shape != (3, 2):
        raise TalkrtError(f"{name} must be [3, 2] (brow left, brow right, nose), got {pts.shape}")
    if not np.all(np.isfinite(pts)):
        raise TalkrtError(f"{name} contains NaN or inf")
    return pts


def mesh_to_align3(mesh: np.ndarray) -> np.ndarray:
    """Alignment points float32 [3, 2] (x, y pixels) from face-mesh points [468, 2 or 3].

    Rows: brow centre on the image left, brow centre on the image right, nose centre.

    Raises:
        TalkrtError: the mesh is not [468, 2|3].
    """
    pts = np.asarray(mesh, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[0] != 468 or pts.shape[1] < 2:
        raise TalkrtError(f"face mesh must be [468, 2|3], got {pts.shape}")
    xy = pts[:, :2]
    out = [xy[list(idx)].mean(axis=0) for idx in (MESH_BROW_IMAGE_LEFT, MESH_BROW_IMAGE_RIGHT, MESH_NOSE)]
    return np.asarray(out, dtype=np.float32)


def ibug68_to_align3(landmarks68: np.ndarray) -> np.ndarray:
    """Alignment points float32 [3, 2] from iBUG-68 landmarks [68, 2] (trackers without a mesh).

    Raises:
        TalkrtError: the landmarks are not [68, 2].
    """
    lm = np.asarray(landmarks68, dtype=np.float64)
    if lm.shape != (68, 2):
        raise TalkrtError(f"landmarks must be [68, 2], got {lm.shape}")
    out = [lm[_IBUG_BROW_LEFT].mean(axis=0), lm[_IBUG_BROW_RIGHT].mean(axis=0),
           lm[list(_IBUG_NOSE)].mean(axis=0)]
    return np.asarray(out, dtype=np.float32)
