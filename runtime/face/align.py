"""LatentSync 1.6 face alignment: a similarity transform of three points onto a template, per frame.

Rules from LatentSync's ``latentsync/utils/affine_transform.py`` (``AlignRestore``, which says it
is adapted from StyleSync) and ``latentsync/utils/image_processor.py``:

* **Points**: brow centre on the image left, brow centre on the image right, nose centre
  (:mod:`talkrt.face.align_points`; per frame in :attr:`TrackResult.align3`).
* **Template** for a model resolution R (512 for 1.6): ``ratio = R / 256 * 2.8`` (5.6), points
  ``(17, 20), (58, 20), (37.5, 40)`` times ``ratio`` = (95.2, 112), (324.8, 112), (210, 224) in a
  face crop of ``face_size = (int(75 * ratio), int(100 * ratio))`` = 420 x 560 (w x h).
* **Fit** (:func:`fit_similarity`): both point sets centred on their means and divided by the
  standard deviation of their six centred coordinates (Bessel-corrected, as ``torch.std``);
  rotation ``R = V U^T`` from the SVD ``U S V^T`` of ``P^T Q`` (P the normalised frame points, Q the
  normalised template), its last column of V negated when ``det R < 0`` (no reflections);
  ``M = [s R | c_Q - s R c_P]`` with ``s = std_Q / std_P`` maps frame pixels to face-crop pixels.
* **Crop**: upstream warps the frame to the 420 x 560 crop (bilinear, outside = 127 grey) and
  resizes that to R x R (Lanczos), so the face is widened by 512/420 and shrunk by 512/560.
  talkrt composes both steps into one affine, frame pixels -> R x R crop pixels (the resize as
  OpenCV's half-pixel mapping ``x' = (x + 0.5) * R / 420 - 0.5``), and samples the frame once
  (``talkrt.kernels`` ``warp_crop_*``).

**Smoothing over time**, two parts:

1. The three points are smoothed like the MuseTalk landmarks by the tracker
   (:func:`talkrt.face.geometry.smooth_landmarks`: centred moving average, 5 frames by default,
   within runs of frames with a face; no lag). This is talkrt's rule; upstream does not smooth
   its InsightFace points.
2. Upstream's translation rule (``transformation_from_points(..., smooth=True)``): the bias
   ``b = Q_n[nose] - P_n[nose]`` (the nose's normalised template position minus its normalised
   frame position, neither rotated) is averaged exponentially, ``b_t = 0.2 * b_(t-1) + 0.8 * b``,
   and added to the translation of M, in face-crop pixels. ``b`` is a difference of normalised
   (unitless, |b| < ~0.5) positions, so this moves the crop by under a pixel; it is kept so the
   crops match the ones the official weights were trained on (upstream's data preparation,
   ``preprocess/affine_transform.py``, uses the same code). talkrt restarts the average after
   every frame without a face (upstream keeps it for the whole process).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from talkrt.errors import TalkrtError
from talkrt.face.align_points import check_align3

if TYPE_CHECKING:
    from talkrt.face.geometry import TrackResult

__all__ = ["AlignSpec", "AlignedFaces", "fit_similarity", "align_transforms", "align_track",
           "invert_affine", "apply_affine", "BIAS_KEEP"]

BIAS_KEEP = 0.2
"""Weight of the previous frame's bias in upstream's exponential average (0.8 for the new one)."""
_TEMPLATE_UNITS = np.array([[17.0, 20.0], [58.0, 20.0], [37.5, 40.0]])  # upstream's (19-2, 30-10), ...
_FACE_UNITS = (75, 100)   # template frame (w, h) before the ratio


@dataclass(frozen=True)
class AlignSpec:
    """Template and crop geometry of LatentSync's alignment for a model resolution.

    Attributes:
        resolution: side of the square model input R (512 for LatentSync 1.6).
    """

    resolution: int = 512

    def __post_init__(self) -> None:
        if not isinstance(self.resolution, (int, np.integer)) or self.resolution < 8:
            raise TalkrtError(f"alignment resolution must be an int >= 8, got {self.resolution!r}")

    @property
    def ratio(self) -> float:
        """Template scale, ``R / 256 * 2.8`` (float64, as upstream computes it)."""
        return self.resolution / 256 * 2.8

    @property
    def face_size(self) -> tuple[int, int]:
        """(width, height) of upstream's intermediate face crop, 420 x 560 at R = 512."""
        return int(_FACE_UNITS[0] * self.ratio), int(_FACE_UNITS[1] * self.ratio)

    @property
    def template(self) -> np.ndarray:
        """float64 [3, 2] template points in face-crop pixels (brow left, brow right, nose)."""
        return _TEMPLATE_UNITS * self.ratio

    @property
    def resize(self) -> np.ndarray:
        """float64 [2, 3] affine face crop -> R x R crop (OpenCV's half-pixel resize mapping)."""
        fw, fh = self.face_size
        sx, sy = self.resolution / fw, self.resolution / fh
        return np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5]])


def _compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """[2, 3] affine ``outer o inner`` (inner applied first)."""
    return np.concatenate([outer[:, :2] @ inner[:, :2], outer[:, :2] @ inner[:, 2:] + outer[:, 2:]], axis=1)


def invert_affine(affine: np.ndarray) -> np.ndarray:
    """Inverse of [..., 2, 3] affines (float64).

    Raises:
        TalkrtError: a singular transform.
    """
    a = np.asarray(affine, dtype=np.float64)
    lin = a[..., :2]
    det = lin[..., 0, 0] * lin[..., 1, 1] - lin[..., 0, 1] * lin[..., 1, 0]
    if np.any(np.abs(det) < 1e-12):
        raise TalkrtError("cannot invert a singular affine transform")
    inv = np.stack([np.stack([lin[..., 1, 1], -lin[..., 0, 1]], -1),
                    np.stack([-lin[..., 1, 0], lin[..., 0, 0]], -1)], -2) / det[..., None, None]
    shift = -np.einsum("...ij,...j->...i", inv, a[..., 2])
    return np.concatenate([inv, shift[..., None]], axis=-1)


def apply_affine(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points [..., K, 2] mapped by a [2, 3] affine (float64)."""
    a = np.asarray(affine, dtype=np.float64)
    return np.asarray(points, dtype=np.float64) @ a[:, :2].T + a[:, 2]


def fit_similarity(points: np.ndarray, template: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Upstream's normalised Procrustes fit of ``points`` [3, 2] onto ``template`` [3, 2].

    Returns:
        (M float64 [2, 3] mapping frame pixels to template pixels, b float64 [2] the nose bias
        ``Q_n[2] - P_n[2]`` of the normalised point sets; see the module docstring).

    Raises:
        TalkrtError: bad shapes, non-finite or coincident points.
    """
    p = check_align3(points, "alignment points", np.float64)
    q = np.asarray(template, dtype=np.float64)
    pc, qc = p - p.mean(axis=0), q - q.mean(axis=0)
    sp, sq = pc.std(ddof=1), qc.std(ddof=1)
    if not sp > 1e-6:
        raise TalkrtError("alignment points coincide; cannot fit a similarity transform")
    pn, qn = pc / sp, qc / sq
    u, _, vt = np.linalg.svd(pn.T @ qn)
    v = vt.T
    rot = v @ u.T
    if np.linalg.det(rot) < 0:
        v[:, -1] = -v[:, -1]
        rot = v @ u.T
    scale = sq / sp
    shift = q.mean(axis=0) - scale * rot @ p.mean(axis=0)
    return np.concatenate([scale * rot, shift[:, None]], axis=1), qn[2] - pn[2]


def align_transforms(points: np.ndarray, found: np.ndarray, spec: AlignSpec = AlignSpec(),
                     smooth: bool = True) -> np.ndarray:
    """Frame -> R x R crop affines, float64 [N, 2, 3], for per-frame points [N, 3, 2].

    Frames with ``found == False`` get zeros and restart the bias average (module docstring);
    ``smooth=False`` leaves the bias out, as upstream's ``smooth=False`` does.

    Raises:
        TalkrtError: shape mismatches or degenerate points in a found frame.
    """
    pts = np.asarray(points, dtype=np.float64)
    flags = np.asarray(found, dtype=bool)
    if pts.ndim != 3 or pts.shape[1:] != (3, 2) or flags.shape != pts.shape[:1]:
        raise TalkrtError(f"align_transforms wants points [N, 3, 2] and found [N], got {pts.shape} and {flags.shape}")
    out = np.zeros((len(flags), 2, 3))
    template, resize = spec.template, spec.resize
    bias_prev: np.ndarray | None = None
    for i in range(len(flags)):
        if not flags[i]:
            bias_prev = None
            continue
        m, bias = fit_similarity(pts[i], template)
        if smooth:
            if bias_prev is not None:
                bias = BIAS_KEEP * bias_prev + (1.0 - BIAS_KEEP) * bias
            bias_prev = bias
            m[:, 2] += bias
        out[i] = _compose(resize, m)
    return out


@dataclass(frozen=True)
class AlignedFaces:
    """Per-frame alignment of a clip, index-aligned with its frames.

    Attributes:
        found: [N] bool, frames with a face (the others have zero transforms).
        to_crop: float64 [N, 2, 3] affines frame pixels -> R x R crop pixels (pixel centres at
            integer coordinates, as ``cv2.warpAffine``).
        resolution: R.
    """

    found: np.ndarray
    to_crop: np.ndarray
    resolution: int

    def __len__(self) -> int:
        return int(self.found.shape[0])

    @property
    def from_crop(self) -> np.ndarray:
        """float64 [N, 2, 3] inverse affines (crop pixels -> frame pixels); zeros where not found."""
        out = np.zeros_like(self.to_crop)
        out[self.found] = invert_affine(self.to_crop[self.found])
        return out

    def select(self, indices: np.ndarray) -> "AlignedFaces":
        """The alignment of frames ``indices`` (e.g. a batch, or the clip looped back and forth)."""
        idx = np.asarray(indices, dtype=np.int64)
        return AlignedFaces(self.found[idx], self.to_crop[idx], self.resolution)


def align_track(track: "TrackResult", spec: AlignSpec = AlignSpec(), smooth: bool = True) -> AlignedFaces:
    """LatentSync alignment of every frame of a tracked clip (:func:`talkrt.face.track_frames`).

    Raises:
        TalkrtError: the track carries no alignment points (built without them).
    """
    if track.align3 is None:
        raise TalkrtError("this track has no LatentSync alignment points (TrackResult.align3 is None)")
    found = np.asarray(track.found, dtype=bool).copy()
    return AlignedFaces(found, align_transforms(track.align3, found, spec, smooth), int(spec.resolution))
