"""LatentSync avatar preparation: track, align, crop and encode each source frame's condition.

Per source frame (index-aligned; frames without a face keep their slot with ``found = False``):
the tracker's three alignment points (:attr:`talkrt.face.geometry.TrackResult.align3`) give the
frame -> crop affine (:func:`talkrt.face.align.align_track`); the aligned ``S x S`` crop
(:func:`talkrt.kernels.reference.warp_crop_rgb`) goes through
:meth:`talkrt.models.latentsync.generator.LatentSyncGenerator.encode_condition` to the UNet's per-frame
condition ``[9, h, w]`` (mask, masked latent, reference latent), which depends only on the
face, so it is computed once and cached by content like MuseTalk's latents
(:func:`talkrt.avatar.load_or_prepare`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from talkrt.avatar import avatar_key, encode_face_crops, load_or_prepare, track_video
from talkrt.face.align import AlignSpec, align_track
from talkrt.face.align_mask import FaceMask
from talkrt.face.tracker import FaceTracker
from talkrt.hashing import sha256_files
from talkrt.kernels import reference as kernels
from talkrt.media.probe import VideoInfo
from talkrt.models.latentsync.config import LatentSyncConfig
from talkrt.models.latentsync.generator import LatentSyncGenerator
from talkrt.progress import NoProgress, Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlignedAvatar:
    """Per-source-frame LatentSync face data of one avatar video (arrays share the frame axis)."""

    num_frames: int
    width: int
    height: int
    fps: Fraction
    found: np.ndarray          # [N] bool
    to_crop: np.ndarray        # [N, 2, 3] float64 frame -> S x S crop affines, zeros where not found
    conditions: np.ndarray     # [N, 9, h, w] float16 UNet conditions (mask, masked latent, reference latent)
    key: str

    ARRAYS: ClassVar[tuple[str, ...]] = ("found", "to_crop", "conditions")
    MMAP: ClassVar[tuple[str, ...]] = ("conditions",)
    PREP_VERSION: ClassVar[str] = "latentsync-1"

    @property
    def faces_found(self) -> int:
        return int(self.found.sum())


class LatentSyncPreparer:
    """Stage object: video -> :class:`AlignedAvatar`, cached under ``cache_dir/<key>``."""

    prep_version: ClassVar[str] = AlignedAvatar.PREP_VERSION     # the cache key's (avatar_key)

    def __init__(self, cfg: LatentSyncConfig, tracker: FaceTracker, tracker_name: str,
                 generator: LatentSyncGenerator, mask: FaceMask, weights_identity: str, cache_dir: Path):
        self.cfg, self.tracker, self.tracker_name = cfg, tracker, tracker_name
        self.generator, self.mask, self.weights_identity = generator, mask, weights_identity
        self.cache_dir = Path(cache_dir)

    def __call__(self, video_path: str | os.PathLike, info: VideoInfo,
                 progress: Progress | None = None) -> AlignedAvatar:
        """The prepared avatar of ``video_path``: from the cache, else tracked, aligned, encoded and cached.

        ``progress`` gets the phases "tracking" (source frames) and "encoding" (face crops).
        Raises:
            InputError: the video cannot be decoded or has no face in any frame.
        """
        key = avatar_key(sha256_files([video_path]), self.cfg, self.weights_identity, self.tracker_name, info,
                         prep_version=AlignedAvatar.PREP_VERSION)
        return load_or_prepare(self.cache_dir / key, AlignedAvatar,
                               lambda: self._prepare(video_path, info, key, progress or NoProgress()))

    def _encode(self, crops: list[np.ndarray]) -> np.ndarray:
        faces = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2)          # [f, 3, S, S] uint8
        return self.generator.encode_condition(faces, self.mask.keep).to(torch.float16).cpu().numpy()

    def _prepare(self, video_path, info: VideoInfo, key: str, progress: Progress) -> AlignedAvatar:
        size = self.cfg.model.crop_size
        track = track_video(video_path, info, self.tracker, self.cfg.pipeline, progress)
        n = len(track.found)
        aligned = align_track(track, AlignSpec(size))
        channels = 2 * self.cfg.model.vae.latent_channels + 1
        h = self.cfg.model.latent_size
        conditions = np.zeros((n, channels, h, h), np.float16)
        log.info("preparing LatentSync avatar: encoding %d aligned faces", int(aligned.found.sum()))
        encode_face_crops(video_path, info, aligned.found,
                          lambda i, frame: kernels.warp_crop_rgb(frame, aligned.to_crop[i:i + 1], size=size),
                          self._encode, conditions, self.cfg.model.frames_per_chunk, progress)
        return AlignedAvatar(num_frames=n, width=info.width, height=info.height, fps=info.fps,
                             found=aligned.found.copy(), to_crop=aligned.to_crop.astype(np.float64),
                             conditions=conditions, key=key)
