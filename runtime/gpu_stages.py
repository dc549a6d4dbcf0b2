"""GPU media stages: NVDEC frames in device memory, CuPy compose into NV12, NVENC or NV12-only download.

Between decode and encode the frames stay in device memory as NV12 ``[H*3//2, W]`` uint8.
On GPUs with NVENC the encoder reads them there; on GPUs without one (H100, H200, A100)
only the compact NV12 frame is copied, asynchronously, into pinned host memory and a
worker thread hands it to libx264 while the GPU works on the next batch.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from talkrt import kernels
from talkrt.avatar import PreparedAvatar
from talkrt.config import SharpenConfig
from talkrt.errors import TalkrtError
from talkrt.kernels.packing import ALIGN as PACK_ALIGN
from talkrt.media.nvcodec import HOST_UPLOAD_COLOR, open_gpu_reader
from talkrt.media.probe import VideoInfo
from talkrt.profiling import nvtx_range
from talkrt.stages import sharpen_params
from talkrt.streams import on_stream, to_device

log = logging.getLogger(__name__)

OUTPUT_MATRIX, OUTPUT_FULL_RANGE = "bt709", False   # what the MP4 is tagged with


def source_color(info: VideoInfo) -> tuple[str, bool]:
    """(matrix, full range) of the NV12 NVDEC returns: the source's own tags (NVDEC never converts),
    BT.709 or BT.601 (untagged, SMPTE 170M, BT.470BG: BT.601, as FFmpeg assumes); ``open_gpu_reader``
    sends any other matrix to the host path."""
    matrix = "bt709" if info.color_matrix == "bt709" else "bt601"
    return matrix, info.color_range == "pc"


class GpuFrameSource:
    """Stage 1 (GPU): source frames as device NV12, in a ring of preallocated batch buffers.

    NVDEC decodes when the stored frames are the delivered ones; a source that is resampled,
    rotated, cropped or tone-mapped (``info.conversions``) is decoded by the CPU path's
    :func:`~talkrt.media.frames.iter_video_frames` and uploaded, so both paths see the same
    frames. Without cycling the video is decoded once, forward, batch by batch. With cycling (audio
    longer than video) every frame is decoded once into a device cache (bounded by
    ``max_cache_bytes``) and the ping-pong order reads from it: nothing is decoded twice.
    """

    def __init__(self, video_path: Path, info: VideoInfo, num_out: int, batch_size: int, max_cache_bytes: int,
                 device: torch.device, stream: torch.cuda.Stream | None, ring: int = 3):
        self.height, self.width = info.height, info.width
        rows = self.height * 3 // 2
        self.reader = open_gpu_reader(video_path, device, stream, info)
        self.decode_path = self.reader.path_name
        self.color = ColorNormalizer(*(source_color(info) if self.decode_path == "nvdec" else HOST_UPLOAD_COLOR))
        self.cycle = num_out > info.num_frames
        self.stream = stream
        self.cupy_stream = kernels.cupy_stream(stream)
        self.cache: torch.Tensor | None = None
        frame_bytes = rows * self.width
        if self.cycle:
            needed = frame_bytes * info.num_frames
            if needed > max_cache_bytes:
                raise TalkrtError(f"{video_path}: cycling {info.num_frames} frames needs {needed / 1e9:.2f} GB of GPU "
                                  f"memory, over pipeline.max_cycle_cache_bytes={max_cache_bytes}")
            self.cache = torch.empty((info.num_frames, rows, self.width), dtype=torch.uint8, device=device)
            got = 0
            with on_stream(stream), nvtx_range("decode-all"):
                while got < info.num_frames:
                    n = self.reader.read_into(self.cache[got:])
                    if n == 0:
                        break
                    got += n
            self.num_source = got
            self.reader.close()                      # everything is cached: the decoder is done
        else:
            self.ring = torch.empty((ring, batch_size, rows, self.width), dtype=torch.uint8, device=device)
            self.num_source = info.num_frames
        self.calls = 0

    def __call__(self, batch) -> None:
        if self.cache is not None:
            index = torch.as_tensor(batch.src_index, device=self.cache.device)
            batch.nv12 = self.cache.index_select(0, index)   # a copy: the cache stays pristine
        else:
            buf = self.ring[self.calls % self.ring.shape[0], :batch.size]
            with on_stream(self.stream):
                got = self.reader.read_into(buf)
            if got != batch.size:
                raise TalkrtError(f"decoder returned {got} frames, expected {batch.size}")
            batch.nv12 = buf
        self.calls += 1
        self.color(batch.nv12, self.cupy_stream)

    def close(self) -> None:
        """Release the decoder (idempotent)."""
        self.reader.close()


class ColorNormalizer:
    """Converts NV12 of ``matrix`` ('bt601' or 'bt709') and range to the output's BT.709 limited
    range when they differ (GPU kernels)."""

    def __init__(self, matrix: str, full_range: bool):
        self.matrix, self.full_range = matrix, full_range
        self.needed = (self.matrix, self.full_range) != (OUTPUT_MATRIX, OUTPUT_FULL_RANGE)
        if self.needed:
            log.info("color: source %s %s range -> output BT.709 limited range on the GPU",
                     self.matrix, "full" if self.full_range else "limited")

    def __call__(self, nv12: torch.Tensor, stream) -> None:
        """Convert ``nv12`` [b, H*3//2, W] uint8 in place on ``stream`` (a CuPy stream)."""
        if not self.needed:
            return
        rgb = kernels.nv12_to_rgb(nv12, matrix=self.matrix, full_range=self.full_range, stream=stream)
        kernels.rgb_to_nv12(rgb, matrix=OUTPUT_MATRIX, full_range=OUTPUT_FULL_RANGE, out=nv12, stream=stream)


class DeviceMasks:
    """Every avatar's packed blend masks in one device buffer, uploaded once per avatar, so that
    a batch mixing avatars selects its masks as one :class:`talkrt.kernels.Packed`."""

    def __init__(self):
        self.xp = kernels.cupy_module()
        self.first_row: dict[str, int] = {}        # avatar key -> its frame 0's row in ``packed``
        self.packed: kernels.Packed | None = None

    def rows(self, avatar: PreparedAvatar, src: np.ndarray) -> np.ndarray:
        """[k] int64 rows of ``avatar``'s source frames ``src``, uploading its masks on first use."""
        if avatar.key not in self.first_row:
            self._add(avatar)
        return self.first_row[avatar.key] + np.asarray(src, np.int64)

    def _add(self, avatar: PreparedAvatar) -> None:
        masks = [avatar.mask(i) if avatar.found[i] else np.zeros((0, 0), np.uint8) for i in range(avatar.num_frames)]
        new = kernels.pack_masks(masks, xp=np)
        old = self.packed
        if old is None:
            start, data = 0, self.xp.asarray(new.data)
        else:
            start = -(-old.data.shape[0] // PACK_ALIGN) * PACK_ALIGN   # keep offsets aligned
            data = self.xp.zeros(start + new.data.shape[0], np.uint8)
            data[:old.data.shape[0]] = old.data
            data[start:] = self.xp.asarray(new.data)
        self.first_row[avatar.key] = 0 if old is None else len(old)
        self.packed = kernels.Packed(
            data, new.offsets + start if old is None else np.concatenate([old.offsets, new.offsets + start]),
            new.shapes if old is None else np.concatenate([old.shapes, new.shapes]),
            new.row_spans if old is None else np.concatenate([old.row_spans, new.row_spans]))

    def select(self, batch, rows: np.ndarray) -> kernels.Packed:
        """The masks of the batch ``rows``, in row order."""
        index = batch.gather(rows, lambda avatar, src: self.rows(avatar, src))
        return self.packed.select(index)


class GpuComposeStage:
    """Stage 5 (GPU): fused resize + optional unsharp + mask blend straight into the NV12 frames."""

    def __init__(self, sharpen: SharpenConfig, stream: torch.cuda.Stream | None):
        self.masks = DeviceMasks()
        self.sharpen = sharpen_params(sharpen)
        self.cupy_stream = kernels.cupy_stream(stream)

    def __call__(self, batch) -> None:
        rows = batch.face_rows
        masks = self.masks.select(batch, rows)
        boxes = np.ascontiguousarray(batch.boxes(rows))
        on_face_rows(batch, lambda nv12: kernels.compose_nv12(
            nv12, batch.faces, boxes, masks, matrix=OUTPUT_MATRIX, full_range=OUTPUT_FULL_RANGE,
            sharpen=self.sharpen, stream=self.cupy_stream))


def on_face_rows(batch, write: Callable[[torch.Tensor], None]) -> None:
    """Run ``write(nv12)``, an in-place kernel over the NV12 frames [f, H*3//2, W] uint8 of the
    batch's rows with a face (``batch.face_rows``, in order), on ``batch.nv12``: the whole batch
    when every frame has a face, else a gathered copy of those rows, written back after."""
    rows = batch.face_rows
    if len(rows) == batch.size:
        write(batch.nv12)
        return
    index = to_device(rows, batch.nv12.device)
    subset = batch.nv12.index_select(0, index)
    write(subset)
    batch.nv12.index_copy_(0, index, subset)


@dataclass
class _EncodeJob:
    host: torch.Tensor          # pinned [b, rows, W]
    ready: torch.cuda.Event
    count: int


class HostEncodeStage:
    """Stage 6 without NVENC: async NV12 download into pinned buffers, libx264 on a worker thread.

    Only the NV12 frame crosses to the host, once per frame; at most ``depth`` batches are in
    flight, so host memory stays constant whatever the video length.

    ``waits`` (seconds, for the run report and the overlap benchmark): ``producer_wait``, the
    pipeline's thread waiting for a free buffer (the encoder is behind); ``encoder_idle``, the
    encoder thread waiting for a batch (the pipeline is behind); ``download_wait``, the encoder
    thread waiting for a batch's download (the GPU is behind); ``encode``, in libx264.
    """

    def __init__(self, writer, batch_size: int, height: int, width: int, stream: torch.cuda.Stream | None,
                 depth: int = 3):
        self.writer = writer
        self.stream = stream
        self.encode_path = "libx264-nv12"
        self.buffers = [torch.empty((batch_size, height * 3 // 2, width), dtype=torch.uint8).pin_memory()
                        for _ in range(depth)]
        self.free: queue.Queue[int] = queue.Queue()
        for i in range(depth):
            self.free.put(i)
        self.jobs: queue.Queue[tuple[int, _EncodeJob] | None] = queue.Queue()
        self.error: BaseException | None = None
        self.bytes_downloaded = 0
        self.waits = dict.fromkeys(("producer_wait", "encoder_idle", "download_wait", "encode"), 0.0)
        self.worker = threading.Thread(target=self._work, name="talkrt-encode", daemon=True)
        self.worker.start()

    def __call__(self, batch) -> None:
        self._raise_if_failed()
        waited = time.perf_counter()
        slot = self.free.get()
        self.waits["producer_wait"] += time.perf_counter() - waited
        host = self.buffers[slot][:batch.size]
        with on_stream(self.stream):
            host.copy_(batch.nv12[:batch.size], non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        self.bytes_downloaded += host.numel()
        self.jobs.put((slot, _EncodeJob(host, ready, batch.size)))

    def _work(self) -> None:
        waits = self.waits
        while True:
            t0 = time.perf_counter()
            item = self.jobs.get()
            t1 = time.perf_counter()
            waits["encoder_idle"] += t1 - t0
            if item is None:
                break
            slot, job = item
            try:
                if self.error is None:
                    job.ready.synchronize()
                    t2 = time.perf_counter()
                    waits["download_wait"] += t2 - t1
                    with nvtx_range("encode-x264"):
                        frames = job.host.numpy()
                        for i in range(job.count):
                            self.writer.write_nv12(frames[i])
                    waits["encode"] += time.perf_counter() - t2
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                self.error = exc
            finally:
                self.free.put(slot)

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise TalkrtError(f"encoder failed: {self.error}") from self.error

    def finish(self) -> None:
        """Wait for every queued frame to be encoded; re-raise a worker failure."""
        self.jobs.put(None)
        self.worker.join()
        self._raise_if_failed()

    def abort(self) -> None:
        """Stop the worker: frames still queued are dropped (the writer discards its file)."""
        if self.error is None:
            self.error = TalkrtError("encoding aborted")
        self.jobs.put(None)
        self.worker.join()


class NvencEncodeStage:
    """Stage 6 with NVENC: frames are encoded from device memory; nothing crosses to the host."""

    def __init__(self, nvenc_writer, stream: torch.cuda.Stream | None):
        self.nvenc = nvenc_writer
        self.stream = stream
        self.encode_path = "nvenc"
        self.bytes_downloaded = 0
        self.waits: dict[str, float] = {}

    def __call__(self, batch) -> None:
        if self.stream is not None:
            self.stream.synchronize()        # compose must have finished before NVENC reads the frames
        with nvtx_range("encode-nvenc"):
            for i in range(batch.size):
                self.nvenc.write_nv12_device(batch.nv12[i])

    def finish(self) -> None:
        """The writer's close() (at the end of the run) flushes NVENC and muxes."""

    def abort(self) -> None:
        """Nothing is queued here: the writer's abort discards the file."""
