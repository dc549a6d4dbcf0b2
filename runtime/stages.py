"""The stage protocol: what a batch carries, the stages every device shares, and the CPU stages.

A stage binds its stream, engines and buffers in ``__init__`` and runs in ``__call__(batch)``,
reading and writing fields of one :class:`FrameBatch`. A batch names, per frame, its avatar and
source frame, and the UNet, VAE and compose stages gather latents, boxes and masks from there,
so those stages take batches that mix avatars. The frame source (1), the audio windows (2) and
the encoder (6) of a run are bound to its video, speech and output; a server that mixes sessions
supplies its own for those.

:func:`talkrt.pipeline.build_stages` builds the CPU set (this module) or the GPU set
(:mod:`talkrt.gpu_stages`); the batch loop only walks the numbered list of a :class:`StageSet`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from talkrt.avatar import PreparedAvatar
from talkrt.compose import compose_musetalk
from talkrt.config import SharpenConfig
from talkrt.engines.base import Engine
from talkrt.errors import TalkrtError
from talkrt.kernels import SharpenParams, reference
from talkrt.media.audio import AudioClip
from talkrt.media.frames import iter_video_frames, read_video_frames
from talkrt.media.probe import VideoInfo
from talkrt.models.audio import AudioFeatures, StreamingAudioStates
from talkrt.streams import on_stream


@dataclass
class FrameBatch:
    """Up to one engine bucket of output frames, filled in stage by stage.

    Per-frame arrays have the batch axis ``b`` first; ``f`` counts the frames with a face
    (``found``), in batch order.
    """

    index: int                      # batch number
    out_index: np.ndarray           # [b] int64 output frame numbers (of each frame's owner)
    src_index: np.ndarray           # [b] int64 source frame within the frame's avatar
    avatars: tuple[PreparedAvatar, ...]   # the avatars this batch draws on (another family's: its own type)
    avatar_index: np.ndarray        # [b] int64 index into ``avatars``
    found: np.ndarray               # [b] bool: the source frame has a face
    frames: list[np.ndarray] = field(default_factory=list)   # CPU: [H, W, 3] uint8 RGB, composed in place
    nv12: torch.Tensor | None = None          # GPU: [b, H*3//2, W] uint8 device NV12, composed in place
    audio: torch.Tensor | None = None         # [f, tokens, D] Whisper windows of the frames with a face
    latents: torch.Tensor | None = None       # [f, 4, h, w] UNet output (LatentSync: [1, 4, f, h, w])
    faces: np.ndarray | torch.Tensor | None = None   # [f, S, S, 3] uint8 faces (host on CPU, device on GPU)

    @classmethod
    def of_avatar(cls, index: int, out_index: np.ndarray, src_index: np.ndarray,
                  avatar: PreparedAvatar) -> FrameBatch:
        """A batch whose frames all come from ``avatar`` (frames ``src_index`` of it)."""
        src = np.asarray(src_index, np.int64)
        return cls(index=index, out_index=np.asarray(out_index, np.int64), src_index=src, avatars=(avatar,),
                   avatar_index=np.zeros(len(src), np.int64), found=avatar.found[src])

    @property
    def size(self) -> int:
        return len(self.out_index)

    @property
    def face_rows(self) -> np.ndarray:
        """[f] int64 batch rows whose source frame has a face."""
        return np.flatnonzero(self.found)

    def gather(self, rows: np.ndarray, take: Callable[[PreparedAvatar, np.ndarray], np.ndarray]) -> np.ndarray:
        """``take(avatar, source_frames)`` for the batch ``rows``, avatar by avatar, in row order.

        Args:
            rows: [k] batch rows.
            take: returns one array row per source frame (e.g. ``lambda a, s: a.boxes[s]``).
        Returns:
            [k, ...] the rows of ``take``'s results, in the order of ``rows``.
        """
        owner, src = self.avatar_index[rows], self.src_index[rows]
        out: np.ndarray | None = None
        for a in np.unique(owner):
            sel = np.flatnonzero(owner == a)
            part = np.asarray(take(self.avatars[int(a)], src[sel]))
            if out is None:
                out = np.empty((len(rows), *part.shape[1:]), part.dtype)
            out[sel] = part
        return out if out is not None else np.empty((0,), np.int64)

    def boxes(self, rows: np.ndarray) -> np.ndarray:
        """[k, 4] int face boxes (x1, y1, x2, y2) of the batch ``rows``."""
        return self.gather(rows, lambda avatar, src: avatar.boxes[src])


class Stage(Protocol):
    """One step of the batch loop: set up in ``__init__``, run on a batch in ``__call__``."""

    def __call__(self, batch: FrameBatch) -> None: ...


class FrameStage(Stage, Protocol):
    """The first stage: fills ``batch.frames`` (CPU) or ``batch.nv12`` (GPU) with the source frames."""

    num_source: int                 # frames it serves
    decode_path: str                # what decodes, for the log and the report

    def close(self) -> None: ...


class EncodeStage(Stage, Protocol):
    """The last stage: hands the batch's frames to the output; ``finish`` drains what it queued."""

    encode_path: str                # what encodes, for the log and the report
    bytes_downloaded: int           # frame bytes copied device -> host so far
    waits: dict[str, float]         # seconds by kind, for an encoder on its own thread (else empty)

    def finish(self) -> None: ...

    def abort(self) -> None: ...


@dataclass
class StageSet:
    """The numbered stages of one run, in order. The stages that need a face are skipped for a
    batch without any (its frames pass through unchanged)."""

    frames: FrameStage
    audio: Stage
    unet: Stage
    vae_decode: Stage
    compose: Stage
    encode: EncodeStage

    def __iter__(self) -> Iterator[tuple[str, Stage, bool]]:
        """(name, stage, needs a face) in loop order; names match the latency baselines."""
        yield "1.frames", self.frames, False
        yield "2.audio", self.audio, True
        yield "3.unet", self.unet, True
        yield "4.vae_decode", self.vae_decode, True
        yield "5.compose", self.compose, True
        yield "6.encode", self.encode, False

    def finish(self) -> None:
        """Drain the encoder (re-raising its failure) and release the decoder."""
        try:
            self.encode.finish()
        finally:
            self.frames.close()

    def abort(self) -> None:
        """After a failure: stop the encoder without draining it and release the decoder."""
        try:
            self.encode.abort()
        finally:
            self.frames.close()


# ------------------------------------------------------------------ stages shared by both sets

class AudioWindows:
    """Stage 2: per-frame Whisper windows of one clip; states are encoded a group of 30-s
    segments at a time as the frames advance, so memory does not grow with the clip's length."""

    def __init__(self, features: AudioFeatures, clip: AudioClip, fps: Fraction):
        self.states = StreamingAudioStates(features, clip.samples)
        self.fps = fps

    def __call__(self, batch: FrameBatch) -> None:
        batch.audio = self.states.windows(batch.out_index[batch.found], self.fps)


class UNetStage:
    """Stage 3: one UNet step for the frames that have a face, latents gathered per avatar."""

    def __init__(self, engine: Engine, device: torch.device, dtype: torch.dtype, stream: torch.cuda.Stream | None):
        self.engine, self.device, self.dtype, self.stream = engine, device, dtype, stream

    def __call__(self, batch: FrameBatch) -> None:
        latents = batch.gather(batch.face_rows, lambda avatar, src: avatar.latents[src])
        with on_stream(self.stream):
            latents = torch.from_numpy(latents).to(self.device, self.dtype, non_blocking=True)
        out = self.engine.run({"latent_input": latents, "audio_features": batch.audio.to(self.dtype)}, self.stream)
        batch.latents = out["pred_latents"]


class VaeDecodeStage:
    """Stage 4: latents -> [f, S, S, 3] uint8 RGB faces, on the device for the GPU compose, else on the host."""

    def __init__(self, engine: Engine, stream: torch.cuda.Stream | None, on_device: bool):
        self.engine, self.stream, self.on_device = engine, stream, on_device

    def __call__(self, batch: FrameBatch) -> None:
        faces = self.engine.run({"latents": batch.latents}, self.stream)["faces"]
        with on_stream(self.stream):
            faces = faces.round().to(torch.uint8).contiguous()     # [f, S, S, 3] in memory order
            batch.faces = faces if self.on_device else faces.cpu().numpy()


# ------------------------------------------------------------------ CPU set

class FrameSource:
    """Stage 1 (CPU): source frames as RGB by index; streams when no cycling is needed, else
    caches every frame (bounded). PyAV converts from the source's color matrix and range."""

    decode_path = "pyav-cpu"

    def __init__(self, video_path: Path, info: VideoInfo, num_out: int, max_cache_bytes: int):
        self.num_source = info.num_frames
        self.cache: list[np.ndarray] | None = None
        self.stream: Iterator[np.ndarray] | None = None
        self.next_index = 0
        if num_out > info.num_frames:
            self.cache = read_video_frames(video_path, max_cache_bytes, fps=info.fps)
            self.num_source = len(self.cache)
        else:
            self.stream = iter_video_frames(video_path, fps=info.fps)

    def __call__(self, batch: FrameBatch) -> None:
        if self.cache is not None:
            batch.frames = [self.cache[i].copy() for i in batch.src_index]
            return
        for i in batch.src_index:
            if i != self.next_index:
                raise RuntimeError(f"frame stream out of order: wanted {i}, next is {self.next_index}")
            batch.frames.append(next(self.stream))
            self.next_index += 1

    def close(self) -> None:
        """Stop the decoder (idempotent)."""
        if self.stream is not None:
            self.stream.close()


def sharpen_params(cfg: SharpenConfig) -> SharpenParams | None:
    """The kernels' unsharp-mask parameters of ``pipeline.sharpen`` (None when disabled)."""
    return SharpenParams(cfg.amount, cfg.sigma, cfg.threshold) if cfg.enabled else None


class CpuComposeStage:
    """Stage 5 (CPU): blend each face into its frame.

    ``numpy``: :func:`talkrt.kernels.reference.compose_rgb` (optional unsharp mask, OpenCV
    bilinear resize to the box, integer alpha blend) on the frames with a face. ``reference``:
    MuseTalk's own PIL paste (:func:`talkrt.compose.compose_musetalk`), the benchmark baseline,
    which has no sharpening.
    """

    def __init__(self, mode: str, sharpen: SharpenConfig):
        if mode not in ("numpy", "reference"):
            raise TalkrtError(f"compose mode '{mode}' does not run on the CPU (use numpy or reference)")
        if mode == "reference" and sharpen.enabled:
            raise TalkrtError("pipeline.sharpen.enabled=true needs compose 'numpy' or 'gpu': "
                              "'reference' reproduces MuseTalk's post-processing, which does not sharpen")
        self.mode, self.sharpen = mode, sharpen_params(sharpen)

    def __call__(self, batch: FrameBatch) -> None:
        rows = batch.face_rows
        boxes = batch.boxes(rows)
        masks = [batch.avatars[int(a)].mask(int(s)) for a, s in zip(batch.avatar_index[rows], batch.src_index[rows])]
        if self.mode == "reference":
            crop_boxes = batch.gather(rows, lambda avatar, src: avatar.crop_boxes[src])
            for k, row in enumerate(rows):
                batch.frames[row] = compose_musetalk(batch.frames[row], batch.faces[k], tuple(boxes[k]),
                                                     tuple(crop_boxes[k]), masks[k])
            return
        for k, row in enumerate(rows):   # frame[None] is a view: composed in place, nothing copied
            reference.compose_rgb(batch.frames[row][None], batch.faces[k:k + 1], boxes[k:k + 1], [masks[k]],
                                  sharpen=self.sharpen)


class CpuEncodeStage:
    """Stage 6 (CPU): RGB frames to the writer (libx264), synchronously."""

    encode_path = "libx264-rgb"
    bytes_downloaded = 0

    def __init__(self, writer: Any):
        self.writer = writer
        self.waits: dict[str, float] = {}

    def __call__(self, batch: FrameBatch) -> None:
        for frame in batch.frames:
            self.writer.write_rgb(frame)

    def finish(self) -> None:
        """Nothing is queued: frames were encoded as they came."""

    def abort(self) -> None:
        """Nothing is queued: nothing to stop."""
