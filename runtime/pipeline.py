"""``run_pipeline``: avatar video + speech -> lip-synced MP4.

The batch loop walks one numbered list of stages (:class:`talkrt.stages.StageSet`) over a
:class:`~talkrt.stages.FrameBatch`:

    1. frames       source frames for these output frames (decoded once; ping-pong cycled;
                    on the GPU normalized to the output's BT.709 limited range)
    2. audio        Whisper windows for these output frames
    3. unet         the generator: MuseTalk's one t=0 UNet step, LatentSync's denoising loop
    4. vae_decode   VAE decode to S x S uint8 faces
    5. compose      blend each face into its frame (MuseTalk: resize to the box and mask;
                    LatentSync: inverse affine warp and feathered mask)
    6. encode       H.264 + AAC into a temporary MP4, renamed into place at the end

:func:`build_stages` is the one place that picks the CPU or the GPU set; the loop itself never
looks at the device. Stages 2-5 and the batch size come from the config's model family
(:mod:`talkrt.families`); the loop never looks at the family either. On CUDA every stage works
on the one stream the session owns.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from talkrt import __version__
from talkrt.engines.base import Engine
from talkrt.errors import InputError
from talkrt.media.audio import AudioClip, num_video_frames
from talkrt.media.probe import VideoInfo
from talkrt.media.segments import SegmentedMp4Writer
from talkrt.media.writer import Mp4Writer
from talkrt.models.audio import AudioFeatures
from talkrt.profiling import StageClock, nvtx_range
from talkrt.progress import NoProgress, Progress
from talkrt.stages import CpuEncodeStage, FrameBatch, FrameSource, Stage, StageSet
from talkrt.streams import on_stream

if TYPE_CHECKING:
    from talkrt.families import ModelFamily

log = logging.getLogger(__name__)


def ping_pong_index(out_index: np.ndarray, num_source: int) -> np.ndarray:
    """MuseTalk's cycle ``frames + frames[::-1]``: 0..N-1, N-1..0, 0..N-1, ... ([k] int64)."""
    j = np.asarray(out_index) % (2 * num_source)
    return np.where(j < num_source, j, 2 * num_source - 1 - j)



@dataclass(frozen=True)
class RunReport:
    """What one run did. Times in seconds; ``seconds`` is the lip-sync pipeline alone (what
    ``fps`` and the stage table describe), avatar preparation is ``prepare_seconds``."""

    out_path: Path
    frames: int                     # output frames
    seconds: float                  # pipeline wall time, avatar preparation excluded
    prepare_seconds: float          # avatar preparation (a cache hit: loading it)
    faces_found: int                # output frames whose source frame has a face
    no_face_frames: np.ndarray      # [k] int64 output frames without a face (passed through unchanged)
    source_frames: int
    weights: str
    backend: str
    compose: str
    stage_table: list[tuple[str, float, float]]   # (stage, ms per output frame, share of stage time)
    decode_path: str = ""
    encode_path: str = ""
    frame_bytes_to_host: int = 0     # bytes of frame data copied device -> host (GPU path: NV12 only)
    gpu_stage_seconds: dict[str, float] | None = None   # CUDA-event stage times (stage_sync off or TALKRT_GPU_EVENTS=1)
    first_batch_seconds: float = 0.0  # from the pipeline's start to the first batch handed to the encoder
    encode_waits: dict[str, float] = dataclasses.field(default_factory=dict)  # the encode stage's ``waits``

    @property
    def fps(self) -> float:
        """Output frames per second of pipeline time."""
        return self.frames / self.seconds if self.seconds > 0 else 0.0


@dataclass
class PipelineParts:
    """What ``run_pipeline`` needs besides the input files (built by :func:`talkrt.session.build_session`
    through the config's model family, :mod:`talkrt.families`)."""

    cfg: Any                        # the family's config (TalkrtConfig for MuseTalk)
    device: torch.device
    dtype: torch.dtype
    stream: torch.cuda.Stream | None
    family: ModelFamily             # supplies stages 2-5 and the batch size
    preparer: Any                   # video -> prepared avatar (AvatarPreparer for MuseTalk), cached
    weights: str                    # "official" or "synthetic"
    backend: str
    compose: str
    unet: Engine | None = None      # MuseTalk's engines and audio features (None for other families)
    vae_decoder: Engine | None = None
    audio_features: AudioFeatures | None = None
    models: Any = None              # another family's own bundle (e.g. LatentSync's generator and audio)
    load_seconds: dict[str, float] = dataclasses.field(default_factory=dict)   # build_session's steps: weights, engines, ...


def output_metadata(parts: PipelineParts, with_face: np.ndarray) -> dict[str, str]:
    """MP4 tags of a run; ``with_face`` [n] bool per output frame (``talkrt_faces`` counts the
    output frames with a face, as the summary does)."""
    meta = {
        "talkrt_version": __version__, "talkrt_weights": parts.weights, "talkrt_backend": parts.backend,
        "talkrt_config": parts.cfg.name, "talkrt_compose": parts.compose,
        "talkrt_faces": f"{int(with_face.sum())}/{len(with_face)}",
    }
    if parts.weights == "synthetic":
        meta["comment"] = "talkrt SYNTHETIC WEIGHTS: shapes and timing only, NOT lip-synced"
    return meta


def open_writer(parts: PipelineParts, out_path: Path, info: VideoInfo, audio_path: Path, metadata: dict[str, str],
                nv12_input: bool):
    """The MP4 writer: NVENC on a GPU that has one (GPU path), else one libx264, or
    ``encoder.workers`` of them on segments of the output."""
    enc = parts.cfg.pipeline.encoder
    if nv12_input:
        from talkrt.media.nvcodec import NvencMp4Writer, nvenc_available
        if nvenc_available(parts.device.index or 0):
            return NvencMp4Writer(out_path, info.width, info.height, info.fps, audio_path=audio_path,
                                  metadata=metadata, device=parts.device, stream=parts.stream)
    common = dict(audio_path=audio_path, video_codec=enc.codec, preset=enc.preset, crf=enc.crf, metadata=metadata,
                  pix_fmt="nv12" if nv12_input else "yuv420p")
    if enc.workers == 1:
        return Mp4Writer(out_path, info.width, info.height, info.fps, **common,
                         encoder_options={"threads": str(enc.threads)} if enc.threads else None)
    segment_frames = max(1, round(enc.segment_seconds * info.fps))
    return SegmentedMp4Writer(out_path, info.width, info.height, info.fps, workers=enc.workers,
                              segment_frames=segment_frames, threads_per_worker=enc.threads or None, **common)


def build_stages(parts: PipelineParts, video_path: Path, info: VideoInfo, num_out: int, writer,
                 audio: Stage, overrides: Mapping[str, Stage] | None = None) -> StageSet:
    """The CPU or the GPU stage set for one run (the only place that chooses).

    ``audio`` is the stage-2 callable that sets ``batch.audio`` (whole-clip windows in
    :func:`run_pipeline`, a streaming Whisper in ``benchmarks.realtime``). ``overrides`` replaces
    stages by field name of :class:`StageSet` (e.g. the server's jobs hand ``unet`` and
    ``vae_decode`` to its shared scheduler).
    """
    stages = _device_stages(parts, video_path, info, num_out, writer, audio)
    return dataclasses.replace(stages, **overrides) if overrides else stages


def _device_stages(parts: PipelineParts, video_path: Path, info: VideoInfo, num_out: int, writer,
                   audio: Stage) -> StageSet:
    p = parts.cfg.pipeline
    unet, vae, compose = parts.family.model_stages(parts)
    if parts.compose != "gpu":
        return StageSet(frames=FrameSource(video_path, info, num_out, p.max_cycle_cache_bytes), audio=audio,
                        unet=unet, vae_decode=vae, compose=compose, encode=CpuEncodeStage(writer))
    from talkrt.gpu_stages import GpuFrameSource, HostEncodeStage, NvencEncodeStage
    from talkrt.media.nvcodec import NvencMp4Writer
    bs = parts.family.chunk_frames(parts.cfg)
    frames = GpuFrameSource(video_path, info, num_out, bs, p.max_cycle_cache_bytes, parts.device, parts.stream)
    encode = (NvencEncodeStage(writer, parts.stream) if isinstance(writer, NvencMp4Writer)
              else HostEncodeStage(writer, bs, info.height, info.width, parts.stream))
    return StageSet(frames=frames, audio=audio, unet=unet, vae_decode=vae, compose=compose, encode=encode)


class BatchRunner:
    """Runs a :class:`StageSet` over one batch, timing each stage with the clock."""

    def __init__(self, stages: StageSet, clock: StageClock, stream: torch.cuda.Stream | None):
        self.stages, self.clock, self.stream = stages, clock, stream

    def __call__(self, batch: FrameBatch) -> None:
        b, n = batch.index, batch.size
        # Every torch op of the batch (frame-cache gathers, uploads, index copies) is queued on the
        # session's one stream, like the kernels, engines and copies that consume its results;
        # torch's streams do not synchronise with the default stream, so work left there races.
        with on_stream(self.stream), nvtx_range("batch %d frames=%d", b, n):
            has_face = bool(batch.found.any())
            for name, stage, needs_face in self.stages:
                if needs_face and not has_face:
                    continue
                with self.clock.stage(name, b, n):
                    stage(batch)


def run_pipeline(parts: PipelineParts, video_path: Path, info: VideoInfo, audio_path: Path, clip: AudioClip,
                 out_path: Path, progress: Progress | None = None,
                 overrides: Mapping[str, Stage] | None = None) -> RunReport:
    """Prepare the avatar (or load it from the cache), then run the six stages over every output
    frame; the MP4 appears at ``out_path`` only on success.

    ``progress`` gets the phases "tracking" and "encoding" (preparation) and "lip-sync" (frames);
    an exception raised by ``progress.advance`` (e.g. a cancelled job) aborts the run and leaves no
    output. ``overrides``: see :func:`build_stages`.
    Raises:
        InputError: audio shorter than one video frame, a video without faces, a decode failure.
        TalkrtError: an encoder or engine failure.
    """
    cfg = parts.cfg
    progress = progress or NoProgress()
    num_out = num_video_frames(len(clip.samples), info.fps, clip.sample_rate)
    if num_out == 0:
        raise InputError(audio_path, f"audio ({clip.duration_s:.3f} s) is shorter than one video frame")
    prepare_start = time.perf_counter()
    avatar = parts.preparer(video_path, info, progress)
    start = time.perf_counter()
    if avatar.num_frames != info.num_frames:      # a truncated file: trust the frames that decoded
        log.warning("%s: %d frames decoded where the container says %d; using %d", video_path,
                    avatar.num_frames, info.num_frames, avatar.num_frames)
        info = dataclasses.replace(info, num_frames=avatar.num_frames)
    with_face = avatar.found[ping_pong_index(np.arange(num_out), avatar.num_frames)]
    clock = StageClock(parts.stream, sync=cfg.pipeline.stage_sync,
                       gpu_events=None if cfg.pipeline.stage_sync else parts.stream is not None)
    with clock.stage("audio_features"):     # set-up only now: Whisper runs lazily inside "2.audio"
        audio_stage = parts.family.audio_stage(parts, clip, info.fps)
    bs = parts.family.chunk_frames(cfg)
    with open_writer(parts, out_path, info, audio_path, output_metadata(parts, with_face), parts.compose == "gpu") as writer:
        stages = build_stages(parts, video_path, info, num_out, writer, audio_stage, overrides)
        log.info("media path: decode=%s compose=%s encode=%s", stages.frames.decode_path, parts.compose,
                 stages.encode.encode_path)
        if stages.frames.num_source != avatar.num_frames:
            raise InputError(video_path, f"decoded {stages.frames.num_source} frames but the prepared avatar has "
                                         f"{avatar.num_frames}")
        runner = BatchRunner(stages, clock, parts.stream)
        progress.phase("lip-sync", num_out)
        first_batch = 0.0
        try:
            for b, first in enumerate(range(0, num_out, bs)):
                out_index = np.arange(first, min(first + bs, num_out))
                runner(FrameBatch.of_avatar(b, out_index, ping_pong_index(out_index, avatar.num_frames), avatar))
                first_batch = first_batch or time.perf_counter() - start
                progress.advance(len(out_index))
        except BaseException:
            stages.abort()          # no encoder thread or decoder outlives a failed run
            raise
        with clock.stage("6.encode-drain"):
            stages.finish()
    seconds = time.perf_counter() - start
    return RunReport(out_path=out_path, frames=num_out, seconds=seconds, prepare_seconds=start - prepare_start,
                     faces_found=int(with_face.sum()), no_face_frames=np.flatnonzero(~with_face),
                     source_frames=avatar.num_frames, weights=parts.weights, backend=parts.backend,
                     compose=parts.compose, stage_table=clock.table(num_out), decode_path=stages.frames.decode_path,
                     encode_path=stages.encode.encode_path, frame_bytes_to_host=stages.encode.bytes_downloaded,
                     gpu_stage_seconds=clock.gpu_seconds() if clock.gpu_events else None,
                     first_batch_seconds=first_batch, encode_waits=dict(stages.encode.waits))
