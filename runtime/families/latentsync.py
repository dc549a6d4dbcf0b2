"""LatentSync 1.6 as a model family: aligned S x S crops, a DDIM denoising loop per 16-frame
chunk, inverse-warp restore with the feathered lower-face mask.

Stages (numbered as in :mod:`talkrt.pipeline`):

2. :class:`LatentSyncAudioStage` - 50-token Whisper windows ``[c-4, c+6)`` per output frame
   (:class:`talkrt.models.latentsync.audio.ClipStates`, seam-free across 30-s segments);
3. :class:`DenoiseStage` - the cached per-frame conditions of the batch's source frames and
   the audio through :meth:`LatentSyncGenerator.denoise` (a batch is one chunk of at most
   ``model.frames_per_chunk`` frames; the last one runs short, which the temporal layers allow);
4. :class:`LatentDecodeStage` - the VAE decode to raw ``[f, S, S, 3]`` uint8 faces (the kept
   region is taken from the frame itself by the restore), on the host for ``numpy``, on the
   device for ``gpu``;
5. the restore, inverse affine warp and blend with ``mask.paste``: :class:`RestoreStage`
   (``numpy``: :func:`talkrt.kernels.reference.restore_rgb` into the RGB host frames) or
   :class:`GpuRestoreStage` (``gpu``: :func:`talkrt.kernels.gpu_warp.restore_nv12` straight
   into the device NV12 frames).

``compose`` is ``auto``, ``gpu`` or ``numpy`` (:attr:`LatentSyncFamily.compose_modes`); ``auto``
is ``gpu`` on CUDA with the CuPy kernels, as for MuseTalk. With ``gpu`` the frames take
MuseTalk's GPU media path (:func:`talkrt.pipeline.build_stages`): NVDEC NV12 in device memory,
the restore in place, NVENC or the NV12 download to libx264; with ``numpy`` on CUDA the generator
runs on the GPU and the faces come back to the host.

Engines (:mod:`talkrt.families.latentsync_engines`): ``make engines CONFIG=latentsync16`` compiles
the UNet's full and DeepCache steps at one 16-frame chunk (batch 2 with guidance), the VAE decoder
and encoder; ``--backend compiled`` (or ``auto`` when that build matches) runs every denoising step
through them, CUDA-graph replayed on CUDA, ``eager`` the modules. ONNX / TensorRT are not built for
this family; ``--backend tensorrt`` is refused.
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
from talkrt.families.latentsync_engines import ENGINE_MODELS, generator_networks, latentsync_specs
from talkrt.gpu_stages import OUTPUT_FULL_RANGE, OUTPUT_MATRIX, on_face_rows
from talkrt.kernels import cupy_stream, gpu_warp
from talkrt.kernels import reference as kernels
from talkrt.media.audio import AudioClip
from talkrt.models.latentsync.audio import LatentSyncAudio
from talkrt.models.latentsync.config import LatentSyncConfig
from talkrt.models.latentsync.generator import LatentSyncGenerator
from talkrt.models.latentsync.weights import LatentSyncModels, load_models
from talkrt.pipeline import PipelineParts
from talkrt.stages import FrameBatch, Stage
from talkrt.streams import on_stream, to_device

log = logging.getLogger(__name__)

__all__ = ["FAMILY", "GpuRestoreStage", "LatentSyncFamily", "LatentSyncParts"]


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
    """Stage 4: ``batch.faces`` [f, S, S, 3] uint8 raw decoded faces, a contiguous tensor on the
    generator's device when ``on_device`` (the GPU restore), else a numpy array on the host."""

    def __init__(self, generator: LatentSyncGenerator, on_device: bool = False):
        self.generator, self.on_device = generator, on_device

    def __call__(self, batch: FrameBatch) -> None:
        faces = self.generator.decode(batch.latents).contiguous()
        batch.faces = faces if self.on_device else faces.cpu().numpy()


class RestoreStage:
    """Stage 5 (CPU): warp each face back into its frame with the feathered paste mask, in place."""

    def __init__(self, mask: FaceMask):
        self.paste = mask.paste

    def __call__(self, batch: FrameBatch) -> None:
        rows = batch.face_rows
        to_crop = batch.gather(rows, lambda avatar, src: avatar.to_crop[src])
        for k, row in enumerate(rows):   # frame[None] is a view: restored in place
            kernels.restore_rgb(batch.frames[row][None], batch.faces[k:k + 1], to_crop[k:k + 1], self.paste)


class GpuRestoreStage:
    """Stage 5 (GPU): :func:`talkrt.kernels.gpu_warp.restore_nv12` warps the batch's device faces
    [f, S, S, 3] uint8 back into its device NV12 frames [b, H*3//2, W] uint8, in place, on
    ``stream``.

    The paste mask [S, S] uint8 is uploaded to ``device`` once, here; per batch only the frame ->
    crop affines [f, 2, 3] float64 travel, in the launch's parameter block. The frames are in the
    output's BT.709 limited range (stage 1, :class:`talkrt.gpu_stages.GpuFrameSource`, normalises
    them), so the faces are encoded with that matrix, as MuseTalk's GPU compose does.
    """

    def __init__(self, mask: FaceMask, device: torch.device, stream: torch.cuda.Stream | None):
        with on_stream(stream):
            self.paste = to_device(mask.paste.copy(), device)     # [S, S] uint8 (a copy: paste is read-only)
        self.cupy_stream = cupy_stream(stream)       # CuPy's view of the parts' stream (no sync)

    def __call__(self, batch: FrameBatch) -> None:
        to_crop = batch.gather(batch.face_rows, lambda avatar, src: avatar.to_crop[src])
        on_face_rows(batch, lambda nv12: gpu_warp.restore_nv12(
            nv12, batch.faces, to_crop, self.paste, matrix=OUTPUT_MATRIX, full_range=OUTPUT_FULL_RANGE,
            stream=self.cupy_stream))


class LatentSyncFamily:
    """LatentSync 1.6 (``family: latentsync16``)."""

    name = "latentsync16"
    live = False    # a denoising loop per 16-frame chunk is not real time: the server runs its jobs only
    compose_modes = ("auto", "gpu", "numpy")
    engine_models = ENGINE_MODELS       # unet, unet_shallow (with DeepCache), vae_decoder, vae_encoder
    engine_backends = ("compiled",)
    unsupported_options = (("pipeline.sharpen", "the LatentSync restore does not sharpen"),)

    def engine_specs(self, cfg: LatentSyncConfig, max_batch: int | None = None):
        return latentsync_specs(cfg, max_batch)

    def load_models(self, cfg: LatentSyncConfig, weights_dir: str | None, device: torch.device,
                    dtype: torch.dtype) -> LatentSyncModels:
        return load_models(cfg, weights_dir, device, dtype)

    def build_parts(self, cfg: LatentSyncConfig, *, device: torch.device, dtype: torch.dtype,
                    stream: torch.cuda.Stream | None, weights_dir: str | None, backend: str | None,
                    compose: str | None, cache_dir: Path, engines_dir: str | Path | None, tracker: str,
                    cuda_graphs: bool, warmup: str) -> PipelineParts:
        from talkrt.session import resolve_compose
        mode = resolve_compose(compose or cfg.pipeline.compose, device, self)
        if cfg.pipeline.sharpen.enabled:
            raise TalkrtError("pipeline.sharpen.enabled=true: the LatentSync restore does not sharpen")
        if device.type == "cuda" and mode != "gpu":
            log.info("LatentSync on CUDA with compose %s: the generator runs on the GPU; frames, restore and "
                     "encode on the CPU", mode)
        start = time.perf_counter()
        models = load_models(cfg, weights_dir, device, dtype)
        loaded = time.perf_counter()
        nets = generator_networks(cfg, models, backend=backend or cfg.pipeline.backend, device=device, dtype=dtype,
                                  engines_dir=engines_dir, cuda_graphs=cuda_graphs, warmup=warmup)
        engines_done = time.perf_counter()
        generator = LatentSyncGenerator(nets.unet, nets.vae_encoder, nets.vae_decoder, cfg.model, device, dtype)
        audio = LatentSyncAudio(models.whisper, cfg.model.audio, device, dtype)
        preparer = LatentSyncPreparer(cfg, create_tracker(tracker), tracker, generator, models.mask,
                                      models.identity, cache_dir)
        log.info("session: family=latentsync16 device=%s dtype=%s backend=%s weights=%s steps=%d guidance=%g "
                 "deepcache=%s", device, dtype, nets.backend, models.source, cfg.model.denoise.steps,
                 cfg.model.denoise.guidance_scale, cfg.model.denoise.deepcache)
        return PipelineParts(cfg=cfg, device=device, dtype=dtype, stream=stream, family=self, preparer=preparer,
                             weights=models.source, backend=nets.backend, compose=mode,
                             models=LatentSyncParts(generator, audio, models.mask),
                             load_seconds={"weights": loaded - start, "engines": engines_done - loaded,
                                           "tracker_and_audio": time.perf_counter() - engines_done})

    def audio_stage(self, parts: PipelineParts, clip: AudioClip, fps: Fraction) -> Stage:
        return LatentSyncAudioStage(parts.models.audio, clip, fps)

    def model_stages(self, parts: PipelineParts) -> tuple[Stage, Stage, Stage]:
        g, on_gpu = parts.models.generator, parts.compose == "gpu"
        restore = (GpuRestoreStage(parts.models.mask, parts.device, parts.stream) if on_gpu
                   else RestoreStage(parts.models.mask))
        return DenoiseStage(g), LatentDecodeStage(g, on_device=on_gpu), restore

    def chunk_frames(self, cfg: LatentSyncConfig) -> int:
        return cfg.model.frames_per_chunk


FAMILY = LatentSyncFamily()
