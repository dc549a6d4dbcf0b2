"""LatentSync 1.6 as a model family: aligned S x S crops, a DDIM denoising loop per 16-frame
chunk, inverse-warp restore with the feathered lower-face mask.

Stages (numbered as in :mod:`talkrt.pipeline`):

2. :class:`LatentSyncAudioStage` - 50-token Whisper windows ``[c-4, c+6)`` per output frame
   (:class:`talkrt.models.latentsync.audio.ClipStates`, seam-free across 30-s segments);
3. :class:`DenoiseStage` - the cached per-frame conditions of the batch's source frames and
   the audio through :meth:`LatentSyncGenerator.denoise` (a batch is one chunk of at most
   ``model.frames_per_chunk`` frames; the last one runs short, which the temporal layers allow);
4. :class:`LatentDecodeStage` - the VAE decode to raw ``[f, S, S, 3]`` uint8 faces (the kept
   region is taken from the frame itself by the restore);
5. :class:`RestoreStage` - :func:`talkrt.kernels.reference.restore_rgb`: inverse affine warp
   and blend with ``mask.paste`` into the RGB frames.

Runs on the CPU set of stages only (``compose`` ``numpy``): on CUDA the generator runs on the
GPU and the faces come back to the host for the restore; the NV12 GPU path (compiled UNet per
step, ``restore_nv12``) is not wired, so ``--compose gpu`` is refused. Models run eager; other
backends are refused.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch

from talkrt.errors import TalkrtError
from talkrt.face.align_mask import FaceMask
from talkrt.face.tracker import create_tracker
from talkrt.families.latentsync_avatar import LatentSyncPreparer
from talkrt.kernels import reference as kernels
from talkrt.media.audio import AudioClip
from talkrt.models.latentsync.audio import LatentSyncAudio
from talkrt.models.latentsync.config import LatentSyncConfig
from talkrt.models.latentsync.generator import LatentSyncGenerator
from talkrt.models.latentsync.weights import load_models
from talkrt.pipeline import PipelineParts
from talkrt.stages import FrameBatch, Stage

log = logging.getLogger(__name__)

__all__ = ["FAMILY", "LatentSyncFamily", "LatentSyncParts"]


@dataclass
class LatentSyncParts:
    """The family's own part of :class:`PipelineParts` (``parts.models``)."""

    generator: LatentSyncGenerator
    audio: LatentSyncAudio
    mask: FaceMask


class LatentSyncAudioStage:
    """Stage 2: ``batch.audio`` [f, 50, D] for the frames with a face (states encoded lazily)."""

    def __init__(self, audio: LatentSyncAudio, clip: AudioClip, fps: Fraction):
        self.states, self.fps = audio.clip(clip.samples), fps

    def __call__(self, batch: FrameBatch) -> None:
        batch.audio = self.states.windows(batch.out_index[batch.found], self.fps)


class DenoiseStage:
    """Stage 3: the denoising loop over one chunk: ``batch.latents`` [1, 4, f, h, w]."""

    def __init__(self, generator: LatentSyncGenerator):
        self.generator = generator

    def __call__(self, batch: FrameBatch) -> None:
        conditions = batch.gather(batch.face_rows, lambda avatar, src: avatar.conditions[src])
        chunk = self.generator.chunk(torch.from_numpy(conditions), batch.audio)
        batch.latents = self.generator.denoise(chunk)


class LatentDecodeStage:
    """Stage 4: ``batch.faces`` [f, S, S, 3] uint8 on the host (raw decoded faces)."""

    def __init__(self, generator: LatentSyncGenerator):
        self.generator = generator

    def __call__(self, batch: FrameBatch) -> None:
        batch.faces = self.generator.decode(batch.latents).cpu().numpy()


class RestoreStage:
    """Stage 5 (CPU): warp each face back into its frame with the feathered paste mask, in place."""

    def __init__(self, mask: FaceMask):
        self.paste = mask.paste

    def __call__(self, batch: FrameBatch) -> None:
        rows = batch.face_rows
        to_crop = batch.gather(rows, lambda avatar, src: avatar.to_crop[src])
        for k, row in enumerate(rows):   # frame[None] is a view: restored in place
            kernels.restore_rgb(batch.frames[row][None], batch.faces[k:k + 1], to_crop[k:k + 1], self.paste)


class LatentSyncFamily:
    """LatentSync 1.6 (``family: latentsync16``)."""

    name = "latentsync16"

    def build_parts(self, cfg: LatentSyncConfig, *, device: torch.device, dtype: torch.dtype,
                    stream: torch.cuda.Stream | None, weights_dir: str | None, backend: str | None,
                    compose: str | None, cache_dir: Path, engines_dir: str | Path | None, tracker: str,
                    cuda_graphs: bool, warmup: str) -> PipelineParts:
        chosen = backend or cfg.pipeline.backend
        if chosen not in ("auto", "eager"):
            raise TalkrtError(f"--backend {chosen}: the LatentSync family runs eager PyTorch only (use eager or auto)")
        mode = compose or cfg.pipeline.compose
        if mode not in ("auto", "numpy"):
            raise TalkrtError(f"--compose {mode}: the LatentSync family composes with the CPU restore only "
                              "(use numpy or auto); its GPU NV12 path is not built yet")
        if cfg.pipeline.sharpen.enabled:
            raise TalkrtError("pipeline.sharpen.enabled=true: the LatentSync restore does not sharpen")
        if device.type == "cuda":
            log.info("LatentSync on CUDA: the generator runs on the GPU; decode, restore and encode on the CPU "
                     "(the family's NV12 GPU path is not built)")
        start = time.perf_counter()
        models = load_models(cfg, weights_dir, device, dtype)
        loaded = time.perf_counter()
        generator = LatentSyncGenerator(models.unet, models.vae_encoder, models.vae_decoder, cfg.model, device, dtype)
        audio = LatentSyncAudio(models.whisper, cfg.model.audio, device, dtype)
        preparer = LatentSyncPreparer(cfg, create_tracker(tracker), tracker, generator, models.mask,
                                      models.identity, cache_dir)
        log.info("session: family=latentsync16 device=%s dtype=%s weights=%s steps=%d guidance=%g deepcache=%s",
                 device, dtype, models.source, cfg.model.denoise.steps, cfg.model.denoise.guidance_scale,
                 cfg.model.denoise.deepcache)
        return PipelineParts(cfg=cfg, device=device, dtype=dtype, stream=stream, family=self, preparer=preparer,
                             weights=models.source, backend="eager", compose="numpy",
                             models=LatentSyncParts(generator, audio, models.mask),
                             load_seconds={"weights": loaded - start,
                                           "tracker_and_audio": time.perf_counter() - loaded})

    def audio_stage(self, parts: PipelineParts, clip: AudioClip, fps: Fraction) -> Stage:
        return LatentSyncAudioStage(parts.models.audio, clip, fps)

    def model_stages(self, parts: PipelineParts) -> tuple[Stage, Stage, Stage]:
        g = parts.models.generator
        return DenoiseStage(g), LatentDecodeStage(g), RestoreStage(parts.models.mask)

    def chunk_frames(self, cfg: LatentSyncConfig) -> int:
        return cfg.model.frames_per_chunk


FAMILY = LatentSyncFamily()
