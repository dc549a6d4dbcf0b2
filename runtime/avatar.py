"""Avatar preparation: track the face in every frame, encode reference and masked latents,
build the blend masks, and cache the result on disk keyed by content.

Everything is indexed by source frame number; frames where no face was found keep their
slot (``found[i] = False``), so frames, boxes, masks and latents never drift apart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import cv2
import numpy as np
import torch

from talkrt import __version__
from talkrt.config import PipelineConfig, TalkrtConfig
from talkrt.errors import InputError
from talkrt.face.geometry import TrackResult, track_frames
from talkrt.face.tracker import FaceTracker
from talkrt.hashing import sha256_files
from talkrt.media.frames import iter_video_frames
from talkrt.media.probe import VideoInfo
from talkrt.progress import NoProgress, Progress

log = logging.getLogger(__name__)

MISSING_FRAMES_TOLERATED = 2    # frames that may fail to decode before a video counts as damaged

PREP_VERSION = 2  # bump when the preparation output changes for the same inputs (2: small faces, bridged gaps)


@dataclass(frozen=True)
class PreparedAvatar:
    """Per-source-frame face data for one avatar video (all arrays share the frame axis)."""

    num_frames: int
    width: int
    height: int
    fps: Fraction
    found: np.ndarray          # [N] bool
    boxes: np.ndarray          # [N, 4] int32 face boxes (x1, y1, x2, y2), zeros where not found
    crop_boxes: np.ndarray     # [N, 4] int32 MuseTalk 1.5x crop boxes
    latents: np.ndarray        # [N, 2*C, h, w] float16: [masked-face latent, reference latent]
    mask_data: np.ndarray      # flat uint8: box-sized blend masks, concatenated
    mask_offsets: np.ndarray   # [N + 1] int64 offsets into mask_data
    key: str

    ARRAYS: ClassVar[tuple[str, ...]] = ("found", "boxes", "crop_boxes", "latents", "mask_data", "mask_offsets")
    MMAP: ClassVar[tuple[str, ...]] = ("latents",)     # arrays loaded memory-mapped from the cache
    PREP_VERSION: ClassVar[int] = PREP_VERSION

    def mask(self, i: int) -> np.ndarray:
        x1, y1, x2, y2 = (int(v) for v in self.boxes[i])
        return self.mask_data[self.mask_offsets[i]:self.mask_offsets[i + 1]].reshape(y2 - y1, x2 - x1)

    @property
    def faces_found(self) -> int:
        return int(self.found.sum())


def avatar_key(video_digest: str, cfg: Any, weights_identity: str, tracker_name: str,
               info: VideoInfo, prep_version: int | str = PREP_VERSION) -> str:
    """The cache key of a prepared avatar: everything that changes its content (the file, the
    model, the weights, the tracker, the preparation settings and the frames delivered from the
    file: rate, size and conversions). ``cfg``: any family's config (``model_hash()``, ``pipeline``);
    ``prep_version``: the family's preparation version."""
    p = cfg.pipeline
    parts = {
        "video": video_digest, "model": cfg.model_hash(), "weights": weights_identity, "tracker": tracker_name,
        "extra_margin": p.extra_margin, "crop_expand": p.crop_expand, "upper": p.upper_boundary_ratio,
        "smooth": p.smooth_window, "prep_version": prep_version,
        "frames": [str(info.fps), info.width, info.height, info.num_frames, list(info.conversions)],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def crop_to_model_input(frame: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """MuseTalk's crop: ``frame[y1:y2, x1:x2]`` resized to ``size`` with INTER_LANCZOS4."""
    x1, y1, x2, y2 = (int(v) for v in box)
    return cv2.resize(frame[y1:y2, x1:x2], (size, size), interpolation=cv2.INTER_LANCZOS4)


def vae_inputs(crops: np.ndarray, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B,S,S,3]`` uint8 RGB -> (masked, reference), each ``[B,3,S,S]`` in [-1,1].

    As in MuseTalk, the lower half is zeroed in [0,1] space before normalising (so it is -1).
    """
    x = torch.from_numpy(crops).to(device).permute(0, 3, 1, 2).to(dtype) / 255.0
    masked = x.clone()
    masked[:, :, x.shape[2] // 2:, :] = 0
    return masked * 2.0 - 1.0, x * 2.0 - 1.0


def track_video(video_path, info: VideoInfo, tracker: FaceTracker, p: PipelineConfig,
                progress: Progress) -> TrackResult:
    """Track the face through every frame of ``video_path`` with the ``pipeline`` settings
    (margin, smoothing, crop expansion); ``progress`` gets the phase "tracking".

    Raises:
        InputError: no face in any frame, a decode failure, or more than
            :data:`MISSING_FRAMES_TOLERATED` frames (or 1%) fewer decoded than the file holds
            (a truncated or damaged file; a couple may legitimately not decode, e.g. the
            open-GOP leading frames of a clip cut without re-encoding).
    """
    log.info("preparing avatar from %s (%d frames): face tracking", video_path, info.num_frames)
    progress.phase("tracking", info.num_frames)

    def counted(frames):
        for frame in frames:
            yield frame
            progress.advance()
    track = track_frames(counted(iter_video_frames(video_path, fps=info.fps)), tracker, extra_margin=p.extra_margin,
                         smooth_window=p.smooth_window, expand=p.crop_expand)
    decoded, expected = len(track.found), info.num_frames
    if expected - decoded > max(MISSING_FRAMES_TOLERATED, expected // 100):
        raise InputError(video_path, f"only {decoded} of its {expected} frames could be decoded: the file is "
                                     f"truncated or damaged (re-export or re-download it)")
    if decoded != expected:
        log.warning("%s: decoded %d frames, container said %d", video_path, decoded, expected)
    if not track.found.any():
        raise InputError(video_path, "no face found in any frame")
    return track


class AvatarPreparer:
    """Stage object: video -> :class:`PreparedAvatar`, cached under ``cache_dir/<key>``."""

    prep_version: ClassVar[int] = PREP_VERSION     # the cache key's preparation version (avatar_key)

    def __init__(self, cfg: TalkrtConfig, tracker: FaceTracker, tracker_name: str, vae_encoder,
                 weights_identity: str, device: torch.device, dtype: torch.dtype, cache_dir: Path,
                 batch_size: int = 16):
        self.cfg = cfg
        self.tracker = tracker
        self.tracker_name = tracker_name
        self.vae_encoder = vae_encoder   # Engine: {'images'} -> {'latents'}
        self.weights_identity = weights_identity
        self.device = device
        self.dtype = dtype
        self.cache_dir = Path(cache_dir)
        self.batch_size = batch_size

    def __call__(self, video_path: str | os.PathLike, info: VideoInfo, progress: Progress | None = None) -> PreparedAvatar:
        """The prepared avatar of ``video_path``: from the cache, else tracked, encoded and cached.

        ``progress`` gets the phases "tracking" (source frames) and "encoding" (face crops).
        Raises:
            InputError: the video cannot be decoded or has no face in any frame.
        """
        key = avatar_key(sha256_files([video_path]), self.cfg, self.weights_identity, self.tracker_name, info)
        return load_or_prepare(self.cache_dir / key, PreparedAvatar,
                               lambda: self._prepare(video_path, info, key, progress or NoProgress()))

    def _encode(self, crops: list[np.ndarray]) -> np.ndarray:
        masked, reference = vae_inputs(np.stack(crops), self.device, self.dtype)
        with torch.inference_mode():
            encoded = [self.vae_encoder.run({"images": images})["latents"].clone() for images in (masked, reference)]
        return torch.cat(encoded, dim=1).to(torch.float16).cpu().numpy()

    def _prepare(self, video_path, info: VideoInfo, key: str, progress: Progress) -> PreparedAvatar:
        p = self.cfg.pipeline
        track = track_video(video_path, info, self.tracker, p, progress)
        n = len(track.found)
        size, latent = self.cfg.model.crop_size, self.cfg.model.latent_size
        channels = 2 * self.cfg.model.vae.latent_channels
        latents = np.zeros((n, channels, latent, latent), np.float16)
        masks = [track.blend_mask(i, p.upper_boundary_ratio).reshape(-1) if track.found[i] else np.zeros(0, np.uint8)
                 for i in range(n)]
        log.info("preparing avatar: encoding %d face crops", int(track.found.sum()))
        encode_face_crops(video_path, info, track.found,
                          lambda i, frame: crop_to_model_input(frame, track.boxes[i], size),
                          self._encode, latents, self.batch_size, progress)
        offsets = np.zeros(n + 1, np.int64)
        offsets[1:] = np.cumsum([m.size for m in masks])
        return PreparedAvatar(
            num_frames=n, width=info.width, height=info.height, fps=info.fps, found=track.found.copy(),
            boxes=track.boxes.astype(np.int32), crop_boxes=track.crop_boxes.astype(np.int32), latents=latents,
            mask_data=np.concatenate(masks) if masks else np.zeros(0, np.uint8), mask_offsets=offsets, key=key)


def encode_face_crops(video_path, info: VideoInfo, found: np.ndarray, crop: Callable[[int, np.ndarray], np.ndarray],
                      encode: Callable[[list[np.ndarray]], np.ndarray], out: np.ndarray, batch: int,
                      progress: Progress) -> None:
    """Decode ``video_path`` once and set ``out[i]`` for every frame ``i`` with ``found[i]``:
    ``crop(i, frame)`` (the frame [H, W, 3] uint8 RGB) goes to ``encode`` (a list of crops -> an
    array of one row per crop) in batches of ``batch``; ``progress`` gets the phase "encoding"."""
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if pending:
            out[[i for i, _ in pending]] = encode([c for _, c in pending])
            progress.advance(len(pending))
            pending.clear()

    progress.phase("encoding", int(found.sum()))
    for i, frame in enumerate(iter_video_frames(video_path, fps=info.fps)):
        if i >= len(found):
            break
        if found[i]:
            pending.append((i, crop(i, frame)))
            if len(pending) == batch:
                flush()
    flush()


A = TypeVar("A")


def load_or_prepare(folder: Path, cls: type[A], prepare: Callable[[], A]) -> A:
    """The avatar cached in ``folder`` (a dataclass of type ``cls``, see :func:`save_avatar`), else
    ``prepare()``'s result, saved there."""
    if (folder / "meta.json").is_file():
        log.info("avatar cache hit: %s", folder)
        return load_avatar(folder, cls)
    avatar = prepare()
    save_avatar(avatar, folder)
    return avatar


def save_avatar(avatar: Any, folder: Path) -> None:
    """Write a prepared avatar (any family's: a dataclass with ``ARRAYS``, ``num_frames``, ``width``,
    ``height``, ``fps``, ``key``) atomically: a temp folder renamed into place, so a crash leaves no
    half cache."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for name in type(avatar).ARRAYS:
            np.save(tmp / f"{name}.npy", getattr(avatar, name))
        meta = {"num_frames": avatar.num_frames, "width": avatar.width, "height": avatar.height,
                "fps": [avatar.fps.numerator, avatar.fps.denominator], "key": avatar.key,
                "talkrt_version": __version__, "prep_version": type(avatar).PREP_VERSION}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("avatar cached at %s", folder)


def load_avatar(folder: Path, cls: type[A] = PreparedAvatar) -> A:
    """The avatar :func:`save_avatar` wrote to ``folder``, as ``cls``."""
    meta = json.loads((folder / "meta.json").read_text())
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r" if name in cls.MMAP else None)
              for name in cls.ARRAYS}
    fields = {f.name for f in dataclasses.fields(cls)}
    meta_fields = {k: v for k, v in meta.items() if k in fields}
    meta_fields["fps"] = Fraction(*meta["fps"])
    return cls(**meta_fields, **arrays)
