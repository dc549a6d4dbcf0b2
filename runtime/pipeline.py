"""``run_pipeline``: avatar video + speech -> lip-synced MP4.

The loop reads as numbered stages passing a small :class:`FrameBatch`:

    1. frames   source frames for these output frames (decoded once; ping-pong cycled)
    2. audio    Whisper windows for these output frames
    3. unet     one t=0 UNet step on [masked latent, reference latent] + audio
    4. vae      VAE decode to 256x256 uint8 faces
    5. compose  resize each face to its box and blend it into its frame with the mask
    6. encode   H.264 + AAC into a temporary MP4, renamed into place at the end

Stages are objects that allocate in ``__init__`` and run in ``__call__``; on CUDA every
stage works on the one stream the pipeline owns.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from talkrt import __version__
from talkrt.avatar import AvatarPreparer, PreparedAvatar
from talkrt.compose import compose_numpy, compose_reference
from talkrt.config import TalkrtConfig
from talkrt.engines.base import Engine
from talkrt.errors import InputError, TalkrtError
from talkrt.media.audio import AudioClip
from talkrt.media.frames import iter_video_frames, read_video_frames
from talkrt.media.probe import VideoInfo
from talkrt.media.segments import SegmentedMp4Writer
from talkrt.media.writer import Mp4Writer
from talkrt.models.audio import AudioFeatures, StreamingAudioStates, num_video_frames
from talkrt.profiling import StageClock, nvtx_range

log = logging.getLogger(__name__)


def ping_pong_index(out_index: np.ndarray, num_source: int) -> np.ndarray:
    """MuseTalk's cycle ``frames + frames[::-1]``: 0..N-1, N-1..0, 0..N-1, ..."""
    j = np.asarray(out_index) % (2 * num_source)
    return np.where(j < num_source, j, 2 * num_source - 1 - j)


@dataclass
class FrameBatch:
    index: int                      # batch number
    out_index: np.ndarray           # output frame numbers
    src_index: np.ndarray           # avatar (source) frame numbers
    frames: list[np.ndarray] = field(default_factory=list)   # RGB uint8 frames, composed in place
    found: np.ndarray | None = None           # [b] face found in the source frame
    audio: torch.Tensor | None = None         # [f, tokens, D] windows of the frames with a face
    latents: torch.Tensor | None = None       # [f, 4, h, w] UNet output
    faces: np.ndarray | torch.Tensor | None = None   # [f, S, S, 3] uint8 faces (host, or device on the GPU path)
    nv12: torch.Tensor | None = None          # [b, H*3//2, W] device frames (GPU media path)

    @property
    def size(self) -> int:
        return len(self.out_index)


class FrameSource:
    """Stage 1: source frames by index. Streams when no cycling is needed, else caches (bounded)."""

    def __init__(self, video_path: Path, info: VideoInfo, num_out: int, max_cache_bytes: int):
        self.cycle = num_out > info.num_frames
        self.num_source = info.num_frames
        self.cache: list[np.ndarray] | None = None
        self.stream: Iterator[np.ndarray] | None = None
        self.next_index = 0
        if self.cycle:
            self.cache = read_video_frames(video_path, max_cache_bytes)
            self.num_source = len(self.cache)
        else:
            self.stream = iter_video_frames(video_path)

    def __call__(self, batch: FrameBatch) -> None:
        if self.cache is not None:
            batch.frames = [self.cache[i].copy() for i in batch.src_index]
            return
        for i in batch.src_index:
            if i != self.next_index:
                raise RuntimeError(f"frame stream out of order: wanted {i}, next is {self.next_index}")
            batch.frames.append(next(self.stream))
            self.next_index += 1


class AudioWindows:
    """Stage 2: per-frame Whisper windows; states are encoded a group of 30-s segments at a time
    as the frames advance, so memory does not grow with the clip's length."""

    def __init__(self, features: AudioFeatures, clip: AudioClip, fps: Fraction):
        self.states = StreamingAudioStates(features, clip.samples)
        self.fps = fps

    def __call__(self, batch: FrameBatch) -> None:
        batch.audio = self.states.windows(batch.out_index[batch.found], self.fps)


class UNetStage:
    """Stage 3: one UNet step for the frames that have a face."""

    def __init__(self, engine: Engine, avatar: PreparedAvatar, device: torch.device, dtype: torch.dtype,
                 stream: torch.cuda.Stream | None):
        self.engine, self.avatar, self.device, self.dtype, self.stream = engine, avatar, device, dtype, stream

    def __call__(self, batch: FrameBatch) -> None:
        rows = batch.src_index[batch.found]
        latents = torch.from_numpy(np.ascontiguousarray(self.avatar.latents[rows]))
        latents = latents.to(self.device, self.dtype, non_blocking=True)
        out = self.engine.run({"latent_input": latents, "audio_features": batch.audio.to(self.dtype)}, self.stream)
        batch.latents = out["pred_latents"]


class VaeDecodeStage:
    """Stage 4: latents -> uint8 RGB faces, kept on the device for the GPU compose, else on the host."""

    def __init__(self, engine: Engine, stream: torch.cuda.Stream | None, on_device: bool):
        self.engine, self.stream, self.on_device = engine, stream, on_device

    def __call__(self, batch: FrameBatch) -> None:
        faces = self.engine.run({"latents": batch.latents}, self.stream)["faces"]
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            faces = faces.round().to(torch.uint8)
            batch.faces = faces.contiguous() if self.on_device else faces.cpu().numpy()


class ComposeStage:
    """Stage 5: blend each generated face into its frame ('numpy' or MuseTalk 'reference')."""

    def __init__(self, avatar: PreparedAvatar, mode: str):
        if mode not in ("numpy", "reference"):
            raise TalkrtError(f"compose mode '{mode}' is not available in this pipeline")
        self.avatar, self.mode = avatar, mode

    def __call__(self, batch: FrameBatch) -> None:
        face_rows = np.flatnonzero(batch.found)
        for face, row in zip(batch.faces, face_rows):
            src = int(batch.src_index[row])
            box = tuple(int(v) for v in self.avatar.boxes[src])
            mask = self.avatar.mask(src)
            if self.mode == "reference":
                crop_box = tuple(int(v) for v in self.avatar.crop_boxes[src])
                batch.frames[row] = compose_reference(batch.frames[row], face, box, crop_box, mask)
            else:
                compose_numpy(batch.frames[row], face, box, mask)


@dataclass(frozen=True)
class RunReport:
    out_path: Path
    frames: int
    seconds: float
    faces_found: int
    source_frames: int
    weights: str
    backend: str
    compose: str
    stage_table: list[tuple[str, float, float]]
    decode_path: str = ""
    encode_path: str = ""
    frame_bytes_to_host: int = 0     # bytes of frame data copied device -> host (GPU path: NV12 only)
    gpu_stage_seconds: dict[str, float] | None = None   # CUDA-event stage times (stage_sync off or TALKRT_GPU_EVENTS=1)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (f"frames={self.frames} seconds={self.seconds:.2f} fps={self.fps:.1f} "
                f"faces_found={self.faces_found}/{self.source_frames} weights={self.weights} "
                f"backend={self.backend} compose={self.compose} encode={self.encode_path} out={self.out_path}")


@dataclass
class PipelineParts:
    """What ``run_pipeline`` needs besides the input files (built by :func:`talkrt.session.build_session`)."""

    cfg: TalkrtConfig
    device: torch.device
    dtype: torch.dtype
    stream: torch.cuda.Stream | None
    unet: Engine
    vae_decoder: Engine
    audio_features: AudioFeatures
    preparer: AvatarPreparer
    weights: str
    backend: str
    compose: str


def output_metadata(parts: PipelineParts, avatar: PreparedAvatar) -> dict[str, str]:
    meta = {
        "talkrt_version": __version__, "talkrt_weights": parts.weights, "talkrt_backend": parts.backend,
        "talkrt_config": parts.cfg.name, "talkrt_compose": parts.compose,
        "talkrt_faces": f"{avatar.faces_found}/{avatar.num_frames}",
    }
    if parts.weights == "synthetic":
        meta["comment"] = "talkrt SYNTHETIC WEIGHTS: shapes and timing only, NOT lip-synced"
    return meta


class CpuMediaStages:
    """Stages 1, 5, 6 on the host: PyAV decode to RGB, numpy/reference compose, libx264 from RGB."""

    def __init__(self, parts: PipelineParts, video_path: Path, info: VideoInfo, num_out: int,
                 avatar: PreparedAvatar, writer):
        self.frames = FrameSource(video_path, info, num_out, parts.cfg.pipeline.max_cycle_cache_bytes)
        self.compose_stage = ComposeStage(avatar, parts.compose)
        self.writer = writer
        self.num_source = self.frames.num_source
        self.decode_path = "pyav-cpu"
        self.encode_path = "libx264 (RGB)"
        self.frame_bytes_to_host = 0

    def compose(self, batch: FrameBatch) -> None:
        self.compose_stage(batch)

    def encode(self, batch: FrameBatch) -> None:
        for frame in batch.frames:
            self.writer.write_rgb(frame)

    def finish(self) -> None:
        """Nothing queued: frames were encoded synchronously."""


class GpuMediaStages:
    """Stages 1, 5, 6 on the GPU: NVDEC (or upload) to NV12, fused compose kernel, NVENC or NV12 download."""

    def __init__(self, parts: PipelineParts, video_path: Path, info: VideoInfo, num_out: int,
                 avatar: PreparedAvatar, writer):
        from talkrt.gpu_stages import (ColorNormalizer, GpuComposeStage, GpuFrameSource, HostEncodeStage,
                                       NvencEncodeStage)
        from talkrt.kernels import cupy_stream
        from talkrt.media.nvcodec import NvencMp4Writer
        p = parts.cfg.pipeline
        self.frames = GpuFrameSource(video_path, info, num_out, p.batch_size, p.max_cycle_cache_bytes,
                                     parts.device, parts.stream)
        self.color = ColorNormalizer(info)
        self.cupy_stream = cupy_stream(parts.stream)
        self.compose_stage = GpuComposeStage(avatar, p.sharpen, parts.device)
        if isinstance(writer, NvencMp4Writer):
            self.encoder = NvencEncodeStage(writer, parts.stream)
            self.encode_path = "nvenc (device NV12)"
        else:
            self.encoder = HostEncodeStage(writer, p.batch_size, info.height, info.width, parts.stream)
            self.encode_path = "libx264 (NV12 from the GPU)"
        self.num_source = self.frames.num_source
        self.decode_path = self.frames.decode_path

    def compose(self, batch: FrameBatch) -> None:
        self.compose_stage(batch, batch.faces, self.cupy_stream)

    def encode(self, batch: FrameBatch) -> None:
        self.encoder(batch)

    @property
    def frame_bytes_to_host(self) -> int:
        return self.encoder.bytes_downloaded

    def finish(self) -> None:
        self.encoder.finish()
        self.frames.close()


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
        return Mp4Writer(out_path, info.width, info.height, info.fps, **common)
    segment_frames = max(1, round(enc.segment_seconds * info.fps))
    return SegmentedMp4Writer(out_path, info.width, info.height, info.fps, workers=enc.workers,
                              segment_frames=segment_frames, **common)


class BatchRunner:
    """Stages 1-6 for one batch, shared by :func:`run_pipeline` and the real-time benchmark.

    ``audio_stage`` is any callable that sets ``batch.audio`` (whole-clip windows here, a
    streaming Whisper in ``benchmarks.realtime``).
    """

    def __init__(self, parts: PipelineParts, avatar: PreparedAvatar, media: CpuMediaStages | GpuMediaStages,
                 audio_stage: Callable[[FrameBatch], None], clock: StageClock):
        self.avatar, self.media, self.audio_stage, self.clock = avatar, media, audio_stage, clock
        self.stream = parts.stream
        self.on_gpu = isinstance(media, GpuMediaStages)
        self.unet = UNetStage(parts.unet, avatar, parts.device, parts.dtype, parts.stream)
        self.vae = VaeDecodeStage(parts.vae_decoder, parts.stream, on_device=self.on_gpu)

    def new_batch(self, index: int, out_index: np.ndarray) -> FrameBatch:
        batch = FrameBatch(index=index, out_index=out_index, src_index=ping_pong_index(out_index, self.media.num_source))
        batch.found = self.avatar.found[batch.src_index]
        return batch

    def __call__(self, batch: FrameBatch) -> None:
        clock, media, b, n = self.clock, self.media, batch.index, batch.size
        # Every torch op of the batch (frame-cache gathers, uploads, index copies) is queued on the
        # pipeline's one stream, like the kernels, engines and copies that consume its results;
        # torch's streams do not synchronise with the default stream, so work left there races.
        on_stream = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with on_stream, nvtx_range("batch %d frames=%d", b, n):
            with clock.stage("1.frames", b, n):
                media.frames(batch)
                if self.on_gpu:
                    media.color(batch, media.cupy_stream)
            if batch.found.any():
                with clock.stage("2.audio", b, n):
                    self.audio_stage(batch)
                with clock.stage("3.unet", b, n):
                    self.unet(batch)
                with clock.stage("4.vae_decode", b, n):
                    self.vae(batch)
                with clock.stage("5.compose", b, n):
                    media.compose(batch)
            with clock.stage("6.encode", b, n):
                media.encode(batch)


def run_pipeline(parts: PipelineParts, video_path: Path, info: VideoInfo, audio_path: Path, clip: AudioClip,
                 out_path: Path, progress: Callable[[int], None] | None = None) -> RunReport:
    """Run the six stages over every output frame; the MP4 appears at ``out_path`` only on success."""
    cfg = parts.cfg
    num_out = num_video_frames(len(clip.samples), info.fps, clip.sample_rate)
    if num_out == 0:
        raise InputError(audio_path, f"audio ({clip.duration_s:.3f} s) is shorter than one video frame")
    start = time.perf_counter()
    avatar = parts.preparer(video_path, info)
    clock = StageClock(parts.stream, sync=cfg.pipeline.stage_sync,
                       gpu_events=None if cfg.pipeline.stage_sync else parts.stream is not None)
    with clock.stage("audio_features"):     # set-up only now: Whisper runs lazily inside "2.audio"
        audio_stage = AudioWindows(parts.audio_features, clip, info.fps)
    on_gpu = parts.compose == "gpu"
    bs = cfg.pipeline.batch_size
    with open_writer(parts, out_path, info, audio_path, output_metadata(parts, avatar), on_gpu) as writer:
        media = (GpuMediaStages if on_gpu else CpuMediaStages)(parts, video_path, info, num_out, avatar, writer)
        log.info("media path: decode=%s compose=%s encode=%s", media.decode_path, parts.compose, media.encode_path)
        if media.num_source != avatar.num_frames:
            raise InputError(video_path, f"decoded {media.num_source} frames but the prepared avatar has "
                                         f"{avatar.num_frames}")
        runner = BatchRunner(parts, avatar, media, audio_stage, clock)
        for b, first in enumerate(range(0, num_out, bs)):
            out_index = np.arange(first, min(first + bs, num_out))
            runner(runner.new_batch(b, out_index))
            if progress:
                progress(len(out_index))
        with clock.stage("6.encode-drain"):
            media.finish()
    seconds = time.perf_counter() - start
    return RunReport(out_path=out_path, frames=num_out, seconds=seconds, faces_found=avatar.faces_found,
                     source_frames=avatar.num_frames, weights=parts.weights, backend=parts.backend,
                     compose=parts.compose, stage_table=clock.table(num_out), decode_path=media.decode_path,
                     encode_path=media.encode_path,
                     frame_bytes_to_host=media.frame_bytes_to_host,
                     gpu_stage_seconds=clock.gpu_seconds() if clock.gpu_events else None)
