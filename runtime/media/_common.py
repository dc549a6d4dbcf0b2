"""Shared PyAV helpers for talkrt.media (private).

Everything here works with PyAV 18 and PyAV 19.  The notable difference is that
PyAV 19 returns ``av.AVRational`` (never ``None``; unset is ``AVRational(0, 1)``)
for rational attributes where PyAV 18 returns ``fractions.Fraction`` or
``None``; :func:`to_fraction` normalises both.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator

import av

from talkrt.errors import InputError

PathLike = str | os.PathLike

# AVColorSpace / AVColorRange values (libavutil/pixfmt.h), stable across FFmpeg versions.
_COLOR_MATRIX_NAMES = {
    0: "rgb",
    1: "bt709",
    4: "fcc",
    5: "bt470bg",
    6: "smpte170m",
    7: "smpte240m",
    8: "ycgco",
    9: "bt2020nc",
    10: "bt2020c",
    11: "smpte2085",
    12: "chroma-derived-nc",
    13: "chroma-derived-c",
    14: "ictcp",
}
_COLOR_RANGE_NAMES = {1: "tv", 2: "pc"}

_log = logging.getLogger("talkrt.media")
_logged: set[str] = set()
_logged_lock = threading.Lock()


def log_once(level: int, message: str, *args: Any) -> None:
    """Log ``message % args`` on the ``talkrt.media`` logger unless this process already logged
    the same text (a file is probed again by every reader; what it will undergo is said once)."""
    text = message % args
    with _logged_lock:
        if text in _logged:
            return
        _logged.add(text)
    _log.log(level, "%s", text)


def to_fraction(value: Any) -> Fraction | None:
    """Return ``value`` (Fraction, AVRational, int or None) as a Fraction, or None if unset/zero."""
    if value is None:
        return None
    try:
        num, den = int(value.numerator), int(value.denominator)
    except (AttributeError, TypeError, ValueError):
        return None
    if num == 0 or den == 0:
        return None
    return Fraction(num, den)


def check_input_file(path: PathLike) -> Path:
    """Raise :class:`InputError` unless ``path`` is an existing regular file."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, "file not found")
    if p.is_dir():
        raise InputError(p, "is a directory, not a media file")
    if not p.is_file():
        raise InputError(p, "is not a regular file")
    if p.stat().st_size == 0:
        raise InputError(p, "file is empty (0 bytes), not a media file")
    return p


@contextmanager
def open_input(path: PathLike) -> Iterator[av.container.InputContainer]:
    """Open ``path`` for demuxing; unreadable or non-media files raise :class:`InputError`."""
    p = check_input_file(path)
    try:
        container = av.open(str(p), mode="r")
    except PermissionError as exc:
        raise InputError(p, f"permission denied ({exc.strerror or exc})") from exc
    except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(
            p, f"not a readable media file (FFmpeg could not open it: {exc_message(exc)})"
        ) from exc
    try:
        yield container
    finally:
        container.close()


def exc_message(exc: BaseException) -> str:
    """A short one-line description of a PyAV/OS exception."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())


def is_attached_picture(stream: Any) -> bool:
    """True for cover-art 'video' streams (a still image attached to an audio file)."""
    try:
        return bool(int(stream.disposition) & int(av.stream.Disposition.attached_pic))
    except (AttributeError, TypeError, ValueError):
        return False


def first_video_stream(container: av.container.InputContainer) -> Any | None:
    """The first real (not cover-art) video stream of ``container``, or None."""
    for stream in container.streams.video:
        if not is_attached_picture(stream):
            return stream
    return None


def first_audio_stream(container: av.container.InputContainer) -> Any | None:
    """The first audio stream of ``container``, or None."""
    streams = container.streams.audio
    return streams[0] if len(streams) else None


def color_matrix_name(value: Any) -> str | None:
    """FFmpeg-style name of an AVColorSpace value, None when unspecified/unknown."""
    try:
        return _COLOR_MATRIX_NAMES.get(int(value))
    except (TypeError, ValueError):
        return None


def color_range_name(value: Any, pix_fmt: str | None = None) -> str | None:
    """'tv' (limited) or 'pc' (full) for an AVColorRange value; yuvj* formats imply 'pc'."""
    try:
        name = _COLOR_RANGE_NAMES.get(int(value))
    except (TypeError, ValueError):
        name = None
    if name is None and pix_fmt and pix_fmt.startswith("yuvj"):
        name = "pc"
    return name


def pixel_format_traits(pix_fmt: str | None, width: int, height: int) -> tuple[int, str]:
    """Return ``(bit_depth, chroma_subsampling)`` of a pixel format.

    Subsampling is '420', '422', '440', '411', '410', '444' (also for RGB formats) or
    '400' for grey-only formats.  Unknown formats are reported as ``(8, '420')``.
    """
    if not pix_fmt:
        return 8, "420"
    try:
        fmt = av.VideoFormat(pix_fmt, max(width, 2), max(height, 2))
    except (ValueError, TypeError, av.FFmpegError):
        return 8, "420"
    components = list(fmt.components)
    bit_depth = max((int(c.bits) for c in components), default=8)
    if fmt.is_rgb:
        return bit_depth, "444"
    if len(components) < 3 and not any(bool(c.is_chroma) for c in components):
        return bit_depth, "400"
    w, h = fmt.width, fmt.height
    cw, ch = fmt.chroma_width(), fmt.chroma_height()
    ratio_w = round(w / cw) if cw else 1
    ratio_h = round(h / ch) if ch else 1
    table = {(1, 1): "444", (2, 1): "422", (2, 2): "420", (1, 2): "440", (4, 1): "411", (4, 4): "410"}
    return bit_depth, table.get((ratio_w, ratio_h), f"{ratio_w}x{ratio_h}")
