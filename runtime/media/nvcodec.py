"""NVDEC decode into device memory and NVENC encode from device memory (PyNvVideoCodec).

* :class:`NvdecReader` decodes a file straight into GPU memory as NV12 (``[H*3//2, W]`` uint8,
  exposed through DLPack) and copies every frame into talkrt's own buffers before the
  decoder reuses its surface.  When the delivered frames are not the stored ones (resampled,
  rotated, cropped, tone-mapped: see :class:`~talkrt.media.probe.VideoInfo`) or NVDEC cannot
  serve the file (codec, chroma format, no PyNvVideoCodec), :func:`open_gpu_reader` uses the
  CPU path's decode and one upload per frame instead.
* :class:`NvencMp4Writer` encodes NV12 device frames with NVENC into an H.264 elementary stream
  in a temporary file; :func:`remux_h264` then puts that stream and the audio into the MP4
  without re-encoding.  Datacenter Hopper/Ampere GPUs (H100, H200, A100) have no NVENC:
  :func:`nvenc_available` detects that once, and the pipeline then copies only the NV12
  frame to the host for libx264.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
import threading
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter

from talkrt.errors import TalkrtError
from talkrt.media.frames import iter_video_frames
from talkrt.media.probe import VideoInfo

log = logging.getLogger(__name__)


def _nvc():
    import PyNvVideoCodec as nvc  # noqa: N813 - the vendor's module name
    return nvc


# Opening (or failing to open) an encoder without a context argument makes PyNvVideoCodec
# create a CUDA context of its own and leave it current on the calling thread; torch's streams
# then fail with "invalid resource handle" (seen on an H200, which has no NVENC, 2026-11-22).
# So the capability probe runs in a child process, and the real encoder is handed torch's context.
_NVENC_PROBE = """
import sys
import PyNvVideoCodec as nvc
enc = nvc.CreateEncoder(256, 256, "NV12", False, gpu_id=int(sys.argv[1]), codec="h264")
enc.EndEncode()
"""


@functools.lru_cache(maxsize=None)
def nvenc_available(gpu_id: int = 0) -> bool:
    """True when an NVENC H.264 session can be opened on this GPU (tried once per process, in a
    child process so that this process's CUDA state is untouched)."""
    try:
        _nvc()
    except ImportError as exc:
        log.info("NVENC unavailable (%s): frames will be encoded by libx264 on the CPU", exc)
        return False
    try:
        probe = subprocess.run([sys.executable, "-c", _NVENC_PROBE, str(gpu_id)], capture_output=True,
                               text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.info("NVENC probe on GPU %d failed (%s): frames will be encoded by libx264 on the CPU", gpu_id, exc)
        return False
    if probe.returncode == 0:
        return True
    lines = [line for line in probe.stderr.strip().splitlines() if line.strip()]
    log.info("NVENC unavailable on GPU %d (%s): frames will be encoded by libx264 on the CPU",
             gpu_id, lines[-1] if lines else f"probe exit {probe.returncode}")
    return False


def torch_cuda_context(device: torch.device) -> int:
    """Handle of the CUDA context torch uses on ``device`` (its primary context), for libraries
    that would otherwise create their own."""
    import ctypes
    with torch.cuda.device(device):
        torch.cuda.current_stream().synchronize()          # makes torch's context current here
        context = ctypes.c_void_p()
        status = ctypes.CDLL("libcuda.so.1").cuCtxGetCurrent(ctypes.byref(context))
    if status != 0 or not context.value:
        raise TalkrtError(f"cannot read torch's CUDA context on {device} (cuCtxGetCurrent returned {status})")
    return context.value


class _DecoderPool:
    """Idle NVDEC sessions of this process, by (GPU, stream), reused through
    ``SimpleDecoder.reconfigure_decoder`` (NVIDIA's cached-decoder pattern, PyNvVideoCodec's
    ``benchmarks/cached_decoder_benchmark.py``). Tearing a session down takes about 230 ms and
    holds the GIL (H200, PyNvVideoCodec 2.2.4), so a run that released its decoder spent that at
    its very end; a pooled session is kept, and the next run on the same stream reopens it on
    its own file. At most ``limit`` idle sessions are kept per key."""

    def __init__(self, limit: int = 2):
        self.limit = limit
        self._idle: dict[tuple[int, int], list] = {}
        self._lock = threading.Lock()

    def open(self, path: str, gpu_id: int, stream_handle: int):
        with self._lock:
            idle = self._idle.get((gpu_id, stream_handle))
            decoder = idle.pop() if idle else None
        if decoder is not None:
            try:
                decoder.reconfigure_decoder(path)
                return decoder
            except Exception as exc:  # noqa: BLE001 - a session that cannot take this file: open a new one
                log.info("NVDEC: a pooled session could not reopen %s (%s); opening a new one", path, exc)
        return _nvc().SimpleDecoder(path, gpu_id=gpu_id, cuda_stream=stream_handle, use_device_memory=True)

    def give_back(self, decoder, gpu_id: int, stream_handle: int) -> None:
        with self._lock:
            idle = self._idle.setdefault((gpu_id, stream_handle), [])
            if len(idle) < self.limit:
                idle.append(decoder)


_POOL = _DecoderPool()


class NvdecReader:
    """Sequential NVDEC decode of ``path`` into caller-owned device NV12 buffers; the session
    comes from, and returns to, this process's pool."""

    path_name = "nvdec"

    def __init__(self, path: str | os.PathLike, device: torch.device, stream: torch.cuda.Stream | None):
        self.device = device
        self.stream = stream
        self._key = (device.index or 0, stream.cuda_stream if stream is not None else 0)
        self.decoder = _POOL.open(str(path), *self._key)
        self.num_frames = len(self.decoder)
        self.next_index = 0

    def close(self) -> None:
        """Hand the session back to the pool (idempotent)."""
        decoder, self.decoder = self.decoder, None
        if decoder is not None:
            _POOL.give_back(decoder, *self._key)

    def read_into(self, out: torch.Tensor) -> int:
        """Decode up to ``len(out)`` next frames into ``out`` ([n, H*3//2, W] uint8); returns the count."""
        want = min(out.shape[0], self.num_frames - self.next_index)
        if want <= 0:
            return 0
        frames = self.decoder.get_batch_frames(want)
        for i, frame in enumerate(frames):
            out[i].copy_(torch.from_dlpack(frame), non_blocking=True)
        self.next_index += len(frames)
        return len(frames)


# Y'CbCr matrices of NV12 that the device color kernels convert (BT.601 / BT.709; untagged is BT.601)
NVDEC_MATRICES = (None, "bt709", "smpte170m", "bt470bg")
# what HostDecodeUploadReader's NV12 is: the output's own BT.709 limited range
HOST_UPLOAD_COLOR = ("bt709", False)


class HostDecodeUploadReader:
    """Fallback: the CPU path's frames (:func:`~talkrt.media.frames.iter_video_frames`, so
    resampled, upright, even-sized, tone-mapped exactly as there), converted by swscale to
    BT.709 limited-range NV12 (``HOST_UPLOAD_COLOR``, as the MP4 writer converts RGB) and
    uploaded once each."""

    path_name = "pyav-cpu-upload"

    def __init__(self, path: str | os.PathLike, device: torch.device, stream: torch.cuda.Stream | None,
                 info: VideoInfo):
        self.frames = iter_video_frames(path, fps=info.fps)
        self.reformatter = VideoReformatter()
        self.device, self.stream, self.num_frames = device, stream, info.num_frames
        self.next_index = 0

    def read_into(self, out: torch.Tensor) -> int:
        """Decode up to ``len(out)`` next frames into ``out`` ([n, H*3//2, W] uint8); returns the count."""
        n = 0
        while n < out.shape[0]:
            try:
                rgb = next(self.frames)
            except StopIteration:
                break
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            nv12 = self.reformatter.reformat(frame, format="nv12", dst_colorspace="ITU709",
                                             dst_color_range="MPEG").to_ndarray()
            host = torch.from_numpy(np.ascontiguousarray(nv12)).pin_memory()
            with torch.cuda.stream(self.stream):
                out[n].copy_(host, non_blocking=True)
            n += 1
        self.next_index += n
        return n

    def close(self) -> None:
        self.frames.close()


def nvdec_obstacles(info: VideoInfo) -> list[str]:
    """Why NVDEC's stored frames are not the delivered ones (empty: NVDEC may decode): the
    conversions of ``info`` (resampling, orientation, even crop, tone map), a source that is
    not 8-bit 4:2:0, or a Y'CbCr matrix the device kernels do not convert."""
    reasons = list(info.conversions)
    if not info.is_8bit_420:
        reasons.append(f"{info.bit_depth}-bit {info.chroma_subsampling}")
    if info.color_matrix not in NVDEC_MATRICES:
        reasons.append(f"{info.color_matrix} matrix")
    return reasons


def open_gpu_reader(path: str | os.PathLike, device: torch.device, stream: torch.cuda.Stream | None,
                    info: VideoInfo):
    """NVDEC when it can serve the file and its frames need no conversion, else the host decode +
    upload fallback, :class:`HostDecodeUploadReader` (says which, and why)."""
    obstacles = nvdec_obstacles(info)
    if obstacles:
        log.info("decode path: PyAV on the CPU + one upload per frame, because of %s (%s)",
                 ", ".join(obstacles), path)
        return HostDecodeUploadReader(path, device, stream, info)
    try:
        reader = NvdecReader(path, device, stream)
        log.info("decode path: NVDEC into device memory (%s)", path)
        return reader
    except Exception as exc:  # noqa: BLE001 - missing module, unsupported codec, no decoder
        log.warning("decode path: NVDEC cannot serve %s (%s); using PyAV CPU decode + one upload per frame",
                    path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return HostDecodeUploadReader(path, device, stream, info)


class NvencMp4Writer:
    """NVENC H.264 from device NV12 frames, then remuxed with the audio into an MP4 (atomic).

    The elementary stream goes to a hidden temporary file beside ``out_path``; :meth:`close`
    remuxes it (no re-encode) with the audio and ``metadata`` through :func:`remux_h264`;
    :meth:`abort` or an exception leaves no file. NVENC runs without B-frames, so decode order is
    display order and frame ``i`` gets pts ``i / fps``. (Written against PyNvVideoCodec 2.x; not
    run here: the H100/H200 we test on have no NVENC.)
    """

    def __init__(self, out_path: Path, width: int, height: int, fps: Fraction, *, audio_path: Path | None,
                 metadata: dict[str, str] | None, device: torch.device, stream: torch.cuda.Stream | None,
                 preset: str = "p4", cq: int = 20):
        from talkrt.media.output import create_temp_file
        from talkrt.media.writer import validate_output
        validate_output(Path(out_path), width, height, metadata)
        self.out_path, self.fps, self.audio_path, self.metadata = Path(out_path), Fraction(fps), audio_path, metadata
        self.h264_path = create_temp_file(self.out_path.parent, "nvenc", ".h264")
        self.file = open(self.h264_path, "wb")
        self.frames_written = 0
        self._closed = False
        try:
            self.encoder = _nvc().CreateEncoder(
                width, height, "NV12", False, gpu_id=device.index or 0,
                cuda_context=torch_cuda_context(device), cuda_stream=stream.cuda_stream if stream is not None else 0, codec="h264", preset=preset,
                rc="vbr", cq=str(cq), fps=str(float(fps)), gop=str(int(round(float(fps) * 2))), bf="0")
        except Exception as exc:
            self.abort()
            raise TalkrtError(f"cannot open an NVENC session: {exc}") from exc

    def write_nv12_device(self, frame: torch.Tensor) -> None:
        """Encode one device frame ``[H*3//2, W]`` uint8 (contiguous) straight from GPU memory."""
        bitstream = self.encoder.Encode(frame)
        if bitstream:
            self.file.write(bytes(bitstream))
        self.frames_written += 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            tail = self.encoder.EndEncode()
            if tail:
                self.file.write(bytes(tail))
            self.file.close()
            count = remux_h264(self.h264_path, self.out_path, self.fps, audio_path=self.audio_path,
                               metadata=self.metadata)
            if count != self.frames_written:
                self.out_path.unlink(missing_ok=True)
                raise TalkrtError(f"{self.out_path}: NVENC produced {count} frames for {self.frames_written} sent")
        finally:
            self.h264_path.unlink(missing_ok=True)

    def abort(self) -> None:
        self._closed = True
        if not self.file.closed:
            self.file.close()
        self.h264_path.unlink(missing_ok=True)

    def __enter__(self) -> NvencMp4Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()


def remux_h264(h264_path: Path, out_path: Path, fps: Fraction, *, audio_path: Path | None,
               metadata: dict[str, str] | None) -> int:
    """Put an Annex-B H.264 elementary stream (one frame per access unit, no B-frames) and the
    audio into an MP4 without re-encoding; frame ``i`` gets pts ``i / fps``. Returns the frame count."""
    from talkrt.media.writer import Mp4Writer

    with av.open(str(h264_path), format="h264") as source:
        vstream = source.streams.video[0]
        with Mp4Writer(out_path, vstream.codec_context.width, vstream.codec_context.height, fps,
                       audio_path=audio_path, metadata=metadata, video_template=vstream) as writer:
            for packet in source.demux(vstream):
                if packet.size:
                    writer.write_encoded_packet(packet)
            return writer.frames_written
