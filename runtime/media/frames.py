"""Decoding input video to the delivered 8-bit RGB frames (numpy ``uint8`` arrays ``[H, W, 3]``).

"Delivered" as :func:`~talkrt.media.probe.probe_video` describes them: constant rate, upright,
even-sized, SDR BT.709.  Every reader of frames (the CPU stages, avatar preparation, the GPU
path's host-decode fallback) goes through :func:`iter_video_frames`, so they all see the same
sequence.
"""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from talkrt.errors import InputError, TalkrtError

from ._common import PathLike, exc_message, first_video_stream, open_input
from .hdr import frame_to_sdr_rgb
from .probe import VideoInfo, probe_video

log = logging.getLogger(__name__)


def iter_video_frames(path: PathLike, *, start: int = 0, fps: Fraction | int | None = None) -> Iterator[np.ndarray]:
    """Yield the delivered frames of ``path`` from delivered frame ``start`` on, as RGB ``uint8`` [H, W, 3].

    The sequence is exactly what ``probe_video(path, fps=fps)`` describes (``num_frames``
    frames of ``height`` x ``width``): frames dropped or repeated to reach the constant
    rate (a repeat is a separate array), the display orientation applied, an odd last
    column/row dropped, HDR tone-mapped to SDR BT.709.  Pass the same ``fps`` as to
    :func:`~talkrt.media.probe.probe_video`.  SDR YUV is converted with the matrix and range
    the stream is tagged with (BT.601 limited range when untagged, as FFmpeg does).
    Decoding uses FFmpeg's frame+slice threads and releases the GIL, so it runs well in a
    background thread.  Frames before ``start`` are decoded and dropped (exact, no seeking).
    Raises :class:`InputError` at the call for unsuitable inputs (see ``probe_video``) and
    while iterating for corrupt streams.
    """
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    return _decode_frames(probe_video(path, fps=fps), start)


def _decode_frames(info: VideoInfo, start: int) -> Iterator[np.ndarray]:
    p = Path(info.path)
    repeats = _repeats(info)
    convert = _FrameConverter(info)
    with open_input(p) as container:
        stream = first_video_stream(container)
        if stream is None:
            raise InputError(p, "no video stream")
        stream.thread_type = "AUTO"
        delivered, source = 0, 0
        try:
            for frame in container.decode(stream):
                count = 1 if repeats is None else int(repeats[source]) if source < len(repeats) else 0
                source += 1
                if delivered + count <= start:
                    delivered += count
                    continue                      # never shown, or before ``start``: not converted
                rgb = convert(frame)
                for n in range(count):
                    if delivered >= start:
                        yield rgb if n == 0 else rgb.copy()
                    delivered += 1
                if delivered >= info.num_frames:
                    return
        except av.FFmpegError as exc:
            raise InputError(p, f"corrupt video stream (decoding failed at frame {source}: "
                                f"{exc_message(exc)})") from exc


def _repeats(info: VideoInfo) -> np.ndarray | None:
    """How many times each source frame is delivered (None: once each)."""
    if info.frame_map is None:
        return None
    return np.bincount(np.asarray(info.frame_map, np.int64), minlength=info.source_frames)


class _FrameConverter:
    """One decoded frame -> the delivered RGB array (tone map or swscale, orientation, even crop)."""

    def __init__(self, info: VideoInfo):
        self.info = info
        self.reformatter = VideoReformatter()

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        info = self.info
        if info.hdr is not None:
            rgb = frame_to_sdr_rgb(frame, info.hdr)
        else:
            # the source frame's matrix and range tags drive swscale's conversion
            rgb = self.reformatter.reformat(frame, format="rgb24").to_ndarray()
        rgb = info.orientation.apply(rgb)[: info.height, : info.width]
        return np.ascontiguousarray(rgb)


def read_video_frames(path: PathLike, max_bytes: int, *, fps: Fraction | int | None = None) -> list[np.ndarray]:
    """Decode every delivered frame of ``path`` into memory, refusing if they would exceed ``max_bytes``.

    The size is checked from the probe (frame count x H x W x 3) before decoding and
    again while decoding.  ``fps`` as for :func:`iter_video_frames`.  Raises
    :class:`TalkrtError` when over the limit and :class:`InputError` for bad inputs.
    """
    info = probe_video(path, fps=fps)
    frame_bytes = info.width * info.height * 3
    needed = frame_bytes * info.num_frames
    if needed > max_bytes:
        raise TalkrtError(_too_big_message(path, info.num_frames, info.width, info.height, needed, max_bytes))
    frames: list[np.ndarray] = []
    for frame in _decode_frames(info, 0):
        n = len(frames) + 1
        if n * frame_bytes > max_bytes:
            raise TalkrtError(_too_big_message(path, n, info.width, info.height, n * frame_bytes, max_bytes))
        frames.append(frame)
    return frames


def _too_big_message(path: PathLike, n: int, w: int, h: int, needed: int, max_bytes: int) -> str:
    mib = 1024 * 1024
    return (
        f"{Path(path)}: decoding {n} frames of {w}x{h} RGB needs {needed / mib:.1f} MiB, "
        f"over the limit of {max_bytes / mib:.1f} MiB; stream the frames with "
        "iter_video_frames() or use a shorter/smaller video"
    )
