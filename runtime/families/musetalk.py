"""MuseTalk v1.5 as a model family: one t=0 UNet step on 256x256 crops, VAE decode, mask blend.

Stages 3-5 are :class:`talkrt.stages.UNetStage`, :class:`talkrt.stages.VaeDecodeStage` and the
CPU (:class:`talkrt.stages.CpuComposeStage`) or GPU (:class:`talkrt.gpu_stages.GpuComposeStage`)
compose; the avatar is :class:`talkrt.avatar.AvatarPreparer`'s.
"""

from __future__ import annotations

import logging
import time
from fractions import Fraction
from pathlib import Path

import torch

from talkrt.avatar import AvatarPreparer
from talkrt.config import COMPOSE_MODES, TalkrtConfig
from talkrt.engines.select import create_engines
from talkrt.engines.specs import ENGINE_MODELS, musetalk_specs
from talkrt.face.tracker import create_tracker
from talkrt.media.audio import AudioClip
from talkrt.models.audio import AudioFeatures
from talkrt.models.weights import load_models
from talkrt.pipeline import PipelineParts
from talkrt.stages import (
    AudioWindows,
    CpuComposeStage,
    Stage,
    UNetStage,
    VaeDecodeStage,
)

log = logging.getLogger(__name__)

__all__ = ["FAMILY", "MuseTalkFamily"]


class MuseTalkFamily:
    """MuseTalk v1.5 (``family: musetalk``, the default)."""

    name = "musetalk"
    live = True     # the server's live sessions: one UNet step per frame batch, real time on a GPU
    compose_modes = COMPOSE_MODES       # auto, gpu, numpy and MuseTalk's own PIL paste (reference)
    engine_models = ENGINE_MODELS       # unet, vae_decoder, vae_encoder (Whisper is exported to ONNX only)
    engine_backends = ("onnx", "tensorrt", "compiled")
    unsupported_options = ()        # it runs every pipeline option, sharpening included

    def engine_specs(self, cfg: TalkrtConfig, max_batch: int | None = None):
        return musetalk_specs(cfg, max_batch)

    def load_models(self, cfg: TalkrtConfig, weights_dir: str | None, device: torch.device, dtype: torch.dtype):
        return load_models(cfg, weights_dir, device, dtype)

    def build_parts(self, cfg: TalkrtConfig, *, device: torch.device, dtype: torch.dtype,
                    stream: torch.cuda.Stream | None, weights_dir: str | None, backend: str | None,
                    compose: str | None, cache_dir: Path, engines_dir: str | Path | None, tracker: str,
                    cuda_graphs: bool, warmup: str) -> PipelineParts:
        from talkrt.session import resolve_compose
        start = time.perf_counter()
        models = load_models(cfg, weights_dir, device, dtype, cache_dir)
        weights_done = time.perf_counter()
        engines, chosen = create_engines(cfg, models, backend=backend or cfg.pipeline.backend, device=device,
                                         dtype=dtype, engines_dir=engines_dir, max_batch=cfg.pipeline.batch_size,
                                         cuda_graphs=cuda_graphs, warmup=warmup)
        engines_done = time.perf_counter()
        preparer = AvatarPreparer(cfg, create_tracker(tracker), tracker, engines["vae_encoder"], models.identity,
                                  device, dtype, cache_dir, batch_size=cfg.pipeline.batch_size)
        audio = AudioFeatures(models.whisper, cfg.model.audio, device, dtype)
        log.info("session: family=musetalk device=%s dtype=%s backend=%s weights=%s", device, dtype, chosen,
                 models.source)
        return PipelineParts(cfg=cfg, device=device, dtype=dtype, stream=stream, family=self, unet=engines["unet"],
                             vae_decoder=engines["vae_decoder"], audio_features=audio, preparer=preparer,
                             weights=models.source, backend=chosen,
                             compose=resolve_compose(compose or cfg.pipeline.compose, device, self),
                             load_seconds={"weights": weights_done - start, "engines": engines_done - weights_done,
                                           "tracker_and_audio": time.perf_counter() - engines_done})

    def audio_stage(self, parts: PipelineParts, clip: AudioClip, fps: Fraction) -> Stage:
        return AudioWindows(parts.audio_features, clip, fps)

    def model_stages(self, parts: PipelineParts) -> tuple[Stage, Stage, Stage]:
        on_gpu = parts.compose == "gpu"
        unet = UNetStage(parts.unet, parts.device, parts.dtype, parts.stream)
        vae = VaeDecodeStage(parts.vae_decoder, parts.stream, on_device=on_gpu)
        if not on_gpu:
            return unet, vae, CpuComposeStage(parts.compose, parts.cfg.pipeline.sharpen)
        from talkrt.gpu_stages import GpuComposeStage
        return unet, vae, GpuComposeStage(parts.cfg.pipeline.sharpen, parts.stream)

    def chunk_frames(self, cfg: TalkrtConfig) -> int:
        return cfg.pipeline.batch_size


FAMILY = MuseTalkFamily()
