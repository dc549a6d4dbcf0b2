"""Decoding input video to 8-bit RGB frames (numpy ``uint8`` arrays of shape ``[H, W, 3]``)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Iterator

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from talkrt.errors import InputError, TalkrtError

from ._common import PathLike, exc_message, first_video_stream, open_input, pixel_format_traits

log = logging.getLogger(__name__)

_warned_paths: set[str] = set()
_warned_lock = threading.Lock()


def iter_video_frames(path: PathLike, *, start: int = 0) -> Iterator[np.ndarray]:
    """Yield the frames of ``path`` from frame index ``start`` on, as RGB ``uint8`` [H, W, 3].

    Decoding uses FFmpeg's frame+slice threads (``thread_type="AUTO"``) and releases
    the GIL, so it runs well in a background thread.  YUV is converted with the matrix
    and range the stream is tagged with (BT.601 limited range when untagged, as
    FFmpeg does).  10-bit and 4:2:2/4:4:4 sources are converted to 8-bit RGB; a
    warning is logged once per file that the output will be 8-bit 4:2:0.  Frames
    before ``start`` are decoded and dropped (exact, no seeking).  Run
    :func:`~talkrt.media.probe.probe_video` first to reject unsuitable inputs.
    Raises :class:`InputError` for unreadable files or corrupt streams.
    """
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    p = Path(path)
    # Validate eagerly so a bad path fails at the call, not at the first next().
    with open_input(p) as container:
        if first_video_stream(container) is None:
            raise InputError(p, "no video stream")
    return _decode_frames(p, start)


def _decode_frames(p: Path, start: int) -> Iterator[np.ndarray]:
    with open_input(p) as container:
        stream = first_video_stream(container)
        if stream is None:
            raise InputError(p, "no video stream")
        stream.thread_type = "AUTO"
        reformatter = VideoReformatter()
        cc = stream.codec_context
        _warn_if_not_8bit_420(p, cc.pix_fmt, int(cc.width or 0), int(cc.height or 0))
        index = 0
        try:
            for frame in container.decode(stream):
                if index >= start:
                    yield _frame_to_rgb(frame, reformatter)
                index += 1
        except av.FFmpegError as exc:
            raise InputError(p, f"corrupt video stream (decoding failed at frame {index}: {exc_message(exc)})") from exc


def read_video_frames(path: PathLike, max_bytes: int) -> list[np.ndarray]:
    """Decode every frame of ``path`` into memory, refusing if they would exceed ``max_bytes``.

    The size is checked from a probe (frame count x H x W x 3) before decoding and
    again while decoding.  Raises :class:`TalkrtError` when over the limit and
    :class:`InputError` for bad inputs (see :func:`~talkrt.media.probe.probe_video`).
    """
    from .probe import probe_video

    info = probe_video(path)
    frame_bytes = info.width * info.height * 3
    needed = frame_bytes * info.num_frames
    if needed > max_bytes:
        raise TalkrtError(_too_big_message(path, info.num_frames, info.width, info.height, needed, max_bytes))
    frames: list[np.ndarray] = []
    for frame in iter_video_frames(path):
        if (len(frames) + 1) * frame_bytes > max_bytes:
            raise TalkrtError(
                _too_big_message(path, len(frames) + 1, info.width, info.height, (len(frames) + 1) * frame_bytes, max_bytes)
            )
        frames.append(frame)
    return frames


def _too_big_message(path: PathLike, n: int, w: int, h: int, needed: int, max_bytes: int) -> str:
    mib = 1024 * 1024
    return (
        f"{Path(path)}: decoding {n} frames of {w}x{h} RGB needs {needed / mib:.1f} MiB, "
        f"over the limit of {max_bytes / mib:.1f} MiB; stream the frames with "
        "iter_video_frames() or use a shorter/smaller video"
    )


def _frame_to_rgb(frame: av.VideoFrame, reformatter: VideoReformatter) -> np.ndarray:
    """Convert a decoded frame to a C-contiguous RGB uint8 array.

    The source frame's color matrix and range tags drive the conversion.
    """
    rgb = reformatter.reformat(frame, format="rgb24").to_ndarray()
    return np.ascontiguousarray(rgb)


def _warn_if_not_8bit_420(path: Path, pix_fmt: str | None, width: int, height: int) -> None:
    bit_depth, chroma = pixel_format_traits(pix_fmt, width, height)
    if bit_depth == 8 and chroma == "420":
        return
    key = str(path.resolve())
    with _warned_lock:
        if key in _warned_paths:
            return
        _warned_paths.add(key)
    log.warning(
        "%s: source is %d-bit %s (%s); frames are converted to 8-bit RGB and the output "
        "will be 8-bit 4:2:0 H.264",
        path,
        bit_depth,
        chroma,
        pix_fmt,
    )
