"""Writing the output MP4: H.264 yuv420p video plus the original audio re-encoded as AAC.

Audio rule (what :class:`Mp4Writer` does with ``audio_path``): the first audio
stream is decoded from its beginning (its own start timestamp is ignored, so audio
t=0 is video frame 0, matching how audio features are computed), resampled to its
own rate when AAC supports it (else 48 kHz), kept mono if the source is mono
(else stereo), and encoded as AAC-LC.  If the audio is longer than the video by
MORE than one video frame duration it is cut to exactly the video duration
(``frames_written / fps``, sample accurate); if it is longer by at most one frame it
is kept whole; shorter audio is kept as it is (never padded with silence).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any, Iterator

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from talkrt.errors import InputError, TalkrtError

from ._common import PathLike, exc_message
from .audio import audio_stream_layout, iter_audio_chunks
from .output import check_file_path, create_temp_file

log = logging.getLogger(__name__)

# Sample rates the AAC encoder accepts (other sources are resampled to 48 kHz).
AAC_SAMPLE_RATES = frozenset({96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000})
DEFAULT_AUDIO_RATE = 48000
_AAC_BIT_RATE = {"mono": 96_000, "stereo": 160_000}
# AVColorPrimaries / AVColorTransferCharacteristic / AVColorSpace value for BT.709, AVColorRange for 'tv'.
_BT709 = 1
_RANGE_TV = 1


class Mp4Writer:
    """Context manager that writes an H.264 (yuv420p, BT.709 limited range) MP4 atomically.

    Frames go to a hidden temporary file next to ``out_path``
    (``.talkrt-partial-<random>.mp4``); a successful :meth:`close` (or leaving the
    ``with`` block normally) flushes the encoder, muxes the audio (see the module
    docstring for the length rule), writes ``metadata`` as MP4 container tags,
    moves the index to the front (``+faststart``) and ``os.replace``-s the temporary
    file onto ``out_path``.  An exception inside the ``with`` block, or
    :meth:`abort`, deletes the temporary file and leaves no output.

    Frame ``i`` gets pts ``i`` in time base ``1/fps`` (exact), so long outputs do not drift.
    """

    def __init__(
        self,
        out_path: PathLike,
        width: int,
        height: int,
        fps: Fraction | int,
        *,
        audio_path: PathLike | None = None,
        video_codec: str = "libx264",
        preset: str = "veryfast",
        crf: int = 20,
        metadata: dict[str, str] | None = None,
        video_template: Any = None,
        pix_fmt: str = "yuv420p",
        encoder_options: dict[str, str] | None = None,
    ) -> None:
        """``video_template``: an input video stream whose packets will be copied with
        :meth:`write_encoded_packet` instead of encoding frames (e.g. NVENC's H.264).
        ``pix_fmt``: the encoder's input format, ``yuv420p`` or ``nv12`` (then :meth:`write_nv12`
        hands frames to libx264 without a repack; the bitstream is 4:2:0 either way)."""
        if pix_fmt not in ("yuv420p", "nv12"):
            raise ValueError(f"pix_fmt must be yuv420p or nv12, got {pix_fmt!r}")
        self.pix_fmt = pix_fmt
        self._encoder_options = dict(encoder_options or {})
        self.out_path = Path(out_path)
        self.width, self.height = int(width), int(height)
        self.fps = _exact_fps(fps)
        self.audio_path = Path(audio_path) if audio_path is not None else None
        validate_output(self.out_path, self.width, self.height, metadata)

        self._frames_written = 0
        self._closed = False
        self._time_base = Fraction(self.fps.denominator, self.fps.numerator)
        self._reformatter = VideoReformatter()
        self._audio: _AudioTrack | None = None
        self._container: Any = None
        self._temp_path = create_temp_file(self.out_path.parent, "partial", ".mp4")
        try:
            self._container = av.open(
                str(self._temp_path),
                mode="w",
                format="mp4",
                options={"movflags": "+faststart+use_metadata_tags"},
            )
            for key, value in (metadata or {}).items():
                self._container.metadata[key] = value
            self._copying = video_template is not None
            if self._copying:
                self._video = self._container.add_stream_from_template(video_template)
                self._video.time_base = self._time_base
            else:
                self._video = self._add_video_stream(video_codec, preset, crf)
            if self.audio_path is not None:
                self._audio = _AudioTrack(self._container, self.audio_path)
        except BaseException:
            self._closed = True
            self._discard()
            raise

    # ------------------------------------------------------------------ public API
    @property
    def frames_written(self) -> int:
        """Number of frames handed to the encoder so far."""
        return self._frames_written

    @property
    def temp_path(self) -> Path:
        """Where the file is being written until :meth:`close` renames it."""
        return self._temp_path

    def write_rgb(self, frame: np.ndarray) -> None:
        """Append one RGB ``uint8`` frame of shape ``[height, width, 3]``."""
        self._check_open()
        arr = np.asarray(frame)
        if arr.dtype != np.uint8 or arr.shape != (self.height, self.width, 3):
            raise ValueError(
                f"write_rgb expects uint8 [{self.height}, {self.width}, 3], got {arr.dtype} {list(arr.shape)}"
            )
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")
        yuv = self._reformatter.reformat(vf, format=self.pix_fmt, dst_colorspace="ITU709", dst_color_range="MPEG")
        self._encode(yuv)

    def write_nv12(self, nv12: np.ndarray) -> None:
        """Append one NV12 frame: ``uint8`` array ``[height * 3 // 2, width]`` (Y plane, then interleaved UV).

        The samples are taken as BT.709 limited range (what the GPU color kernels emit)
        and are only repacked to yuv420p, not color converted.
        """
        self._check_open()
        arr = np.asarray(nv12)
        if arr.dtype != np.uint8 or arr.shape != (self.height * 3 // 2, self.width):
            raise ValueError(
                f"write_nv12 expects uint8 [{self.height * 3 // 2}, {self.width}], got {arr.dtype} {list(arr.shape)}"
            )
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="nv12")
        self._encode(vf if self.pix_fmt == "nv12" else self._reformatter.reformat(vf, format="yuv420p"))

    def write_encoded_packet(self, packet: av.Packet, pts: int | None = None, dts: int | None = None) -> None:
        """Append one already-encoded video packet (one frame).

        ``pts``/``dts`` are in frames (time base ``1/fps``); when omitted the packet is taken to be
        in display order without reordering (pts = dts = its index), as NVENC without B-frames emits.
        """
        self._check_open()
        if not self._copying:
            raise TalkrtError(f"{self.out_path}: write_encoded_packet needs a writer opened with video_template")
        packet.stream = self._video
        packet.time_base = self._time_base
        packet.pts = self._frames_written if pts is None else pts
        packet.dts = packet.pts if dts is None else dts
        packet.duration = 1
        self._container.mux(packet)
        self._frames_written += 1
        if self._audio is not None:
            self._audio.advance(int(self._frames_written * self._audio.rate / self.fps))

    def close(self) -> None:
        """Finish the file and move it onto ``out_path`` (idempotent).

        Raises :class:`TalkrtError` (and leaves no output) if no frame was written.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if self._frames_written == 0:
                raise TalkrtError(f"{self.out_path}: no video frames were written; refusing to create an empty MP4")
            if not self._copying:
                for packet in self._video.encode(None):
                    self._container.mux(packet)
            if self._audio is not None:
                video_samples = self._frames_written * self._audio.rate / self.fps
                one_frame = self._audio.rate / self.fps
                kept = self._audio.finish(video_samples=int(video_samples), one_frame_samples=one_frame)
                log.debug("%s: muxed %d audio samples at %d Hz", self.out_path, kept, self._audio.rate)
            container, self._container = self._container, None
            container.close()  # writes the trailer; +faststart moves the index to the front
            os.replace(self._temp_path, self.out_path)
        except BaseException:
            self._discard()
            raise
        log.info("wrote %s (%d frames at %s fps)", self.out_path, self._frames_written, self.fps)

    def abort(self) -> None:
        """Stop writing and delete the temporary file; no output file is created (idempotent)."""
        self._closed = True
        self._discard()

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()

    def __del__(self) -> None:
        try:
            if not self._closed:
                log.warning("%s: Mp4Writer dropped without close(); discarding the partial file", self.out_path)
                self.abort()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass

    # ------------------------------------------------------------------ internals
    def _add_video_stream(self, codec: str, preset: str, crf: int) -> Any:
        options: dict[str, str] = {}
        if codec in ("libx264", "libx265"):
            options = {"preset": str(preset), "crf": str(crf), **self._encoder_options}
        try:
            stream = self._container.add_stream(codec, rate=self.fps, options=options)
        except (av.FFmpegError, ValueError) as exc:
            raise TalkrtError(f"video encoder {codec!r} is not available in this FFmpeg: {exc_message(exc)}") from exc
        stream.width = self.width
        stream.height = self.height
        stream.pix_fmt = self.pix_fmt
        cc = stream.codec_context
        cc.time_base = self._time_base
        for attr, value in (
            ("color_primaries", _BT709),
            ("color_trc", _BT709),
            ("colorspace", _BT709),
            ("color_range", _RANGE_TV),
        ):
            try:
                setattr(cc, attr, value)
            except (AttributeError, TypeError, ValueError) as exc:  # older/newer PyAV
                log.debug("cannot tag %s on the video stream: %s", attr, exc)
        return stream

    def _encode(self, frame: av.VideoFrame) -> None:
        frame.pts = self._frames_written
        frame.time_base = self._time_base
        for packet in self._video.encode(frame):
            self._container.mux(packet)
        self._frames_written += 1
        if self._audio is not None:
            self._audio.advance(int(self._frames_written * self._audio.rate / self.fps))

    def _check_open(self) -> None:
        if self._closed:
            raise TalkrtError(f"{self.out_path}: Mp4Writer is already closed")

    def _discard(self) -> None:
        """Close everything without publishing and remove the temporary file."""
        if self._audio is not None:
            self._audio.discard()
        if self._container is not None:
            try:
                self._container.close()
            except Exception as exc:  # noqa: BLE001 - best effort while failing
                log.debug("ignoring error while discarding %s: %s", self._temp_path, exc)
            self._container = None
        try:
            os.unlink(self._temp_path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not delete temporary file %s: %s", self._temp_path, exc)


def validate_output(out_path: Path, width: int, height: int, metadata: dict[str, str] | None = None) -> None:
    """Refuse an output path/size/metadata that cannot work, before any work is done."""
    check_file_path(out_path, ".mp4")
    if width <= 0 or height <= 0 or width % 2 or height % 2:
        raise InputError(
            out_path,
            f"frame size {width}x{height} is not allowed: H.264 4:2:0 output needs "
            "positive, even width and height",
        )
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not key or not isinstance(value, str):
            raise ValueError(f"metadata must map non-empty str to str, got {key!r}: {value!r}")


class _AudioTrack:
    """Decodes the source audio lazily and muxes it as AAC, interleaved with the video."""

    def __init__(self, container: Any, audio_path: Path) -> None:
        src_rate, src_channels = audio_stream_layout(audio_path)  # InputError if unusable
        self.rate = src_rate if src_rate in AAC_SAMPLE_RATES else DEFAULT_AUDIO_RATE
        self.layout = "mono" if src_channels == 1 else "stereo"
        self.path = audio_path
        self._container = container
        self.stream = container.add_stream("aac", rate=self.rate)
        self.stream.layout = self.layout
        self.stream.codec_context.bit_rate = _AAC_BIT_RATE[self.layout]
        self._time_base = Fraction(1, self.rate)
        self._chunks: Iterator[np.ndarray] = iter_audio_chunks(audio_path, sample_rate=self.rate, layout=self.layout)
        self._buffer: deque[np.ndarray] = deque()
        self._buffered = 0  # samples in _buffer
        self._emitted = 0  # samples sent to the encoder
        self._eof = False

    def advance(self, sample_pos: int) -> None:
        """Encode whole AAC frames that end at or before ``sample_pos``."""
        size = self._frame_size()
        self._pull(sample_pos - self._emitted)
        while self._buffered >= size and self._emitted + size <= sample_pos:
            self._emit(size)

    def finish(self, video_samples: int, one_frame_samples: Fraction) -> int:
        """Apply the length rule, encode what is left, flush. Returns the samples kept."""
        self._pull(video_samples - self._emitted + int(one_frame_samples) + 2)
        available = self._emitted + self._buffered
        if self._eof and available <= video_samples + one_frame_samples:
            limit = available  # not longer than video by more than one frame: keep it all
        else:
            limit = min(available, video_samples)
        size = self._frame_size()
        while self._emitted < limit:
            self._emit(min(size, limit - self._emitted))
        for packet in self.stream.encode(None):
            self._container.mux(packet)
        self._close_source()
        return limit

    def discard(self) -> None:
        self._close_source()

    def _frame_size(self) -> int:
        return int(self.stream.codec_context.frame_size or 1024)

    def _pull(self, wanted: int) -> None:
        while not self._eof and self._buffered < wanted:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                self._eof = True
                break
            if chunk.shape[1]:
                self._buffer.append(chunk)
                self._buffered += chunk.shape[1]

    def _emit(self, n: int) -> None:
        parts, need = [], n
        while need:
            head = self._buffer[0]
            take = min(need, head.shape[1])
            parts.append(head[:, :take])
            if take == head.shape[1]:
                self._buffer.popleft()
            else:
                self._buffer[0] = head[:, take:]
            need -= take
        data = np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(data, format="fltp", layout=self.layout)
        frame.sample_rate = self.rate
        frame.pts = self._emitted
        frame.time_base = self._time_base
        for packet in self.stream.encode(frame):
            self._container.mux(packet)
        self._buffered -= n
        self._emitted += n

    def _close_source(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()


def _exact_fps(fps: Any) -> Fraction:
    """Exact positive frame rate; floats such as 29.97 snap to the nearest N/1001-style fraction."""
    if isinstance(fps, float):
        value = Fraction(fps).limit_denominator(1001)
    elif isinstance(fps, (int, Fraction)):
        value = Fraction(fps)
    else:  # e.g. av.AVRational (PyAV 19)
        value = Fraction(int(fps.numerator), int(fps.denominator))
    if value <= 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    return value
