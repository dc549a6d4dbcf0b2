"""Probing input videos (:func:`probe_video`) and finished outputs (:func:`probe_output`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from statistics import median_low
from typing import Any

import av

from talkrt.errors import InputError

from ._common import (
    PathLike,
    color_matrix_name,
    color_range_name,
    exc_message,
    first_audio_stream,
    first_video_stream,
    open_input,
    pixel_format_traits,
    to_fraction,
)

log = logging.getLogger(__name__)

# A frame-to-frame pts step may differ from the typical step by this fraction of it
# (or by 1.5 time-base ticks, whichever is larger: containers with a 1/1000 time base
# store 29.97 fps as 33/34/33 ms) before the stream is called variable frame rate.
VFR_RELATIVE_TOLERANCE = 0.10
_VFR_TICK_TOLERANCE = Fraction(3, 2)


@dataclass(frozen=True)
class VideoInfo:
    """What talkrt needs to know about an input video.

    ``fps`` is the exact average frame rate; ``duration_s`` is ``num_frames / fps``
    (the length of the output made from it).  ``bit_depth`` and
    ``chroma_subsampling`` ('420', '422', '444', ...) describe the *source*; frames are
    always decoded to 8-bit RGB.  ``color_matrix`` ('bt709', 'smpte170m', ...) and
    ``color_range`` ('tv' limited, 'pc' full) are None when the file does not say.
    """

    path: str
    width: int
    height: int
    fps: Fraction
    num_frames: int
    duration_s: float
    codec: str
    pix_fmt: str
    bit_depth: int
    chroma_subsampling: str
    color_matrix: str | None
    color_range: str | None
    has_audio: bool
    is_vfr: bool

    @property
    def is_8bit_420(self) -> bool:
        """True when the source already is what talkrt writes (8-bit 4:2:0)."""
        return self.bit_depth == 8 and self.chroma_subsampling == "420"


@dataclass(frozen=True)
class OutputInfo:
    """Facts about a written file, for tests and sanity checks (see :func:`probe_output`)."""

    path: str
    width: int
    height: int
    fps: Fraction | None
    num_frames: int
    duration_s: float
    video_codec: str
    pix_fmt: str | None
    color_matrix: str | None
    has_audio: bool
    audio_codec: str | None = None
    audio_sample_rate: int | None = None
    audio_channels: int | None = None
    audio_duration_s: float | None = None
    audio_decoded_samples: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def probe_video(path: PathLike, *, allow_vfr: bool = False, allow_odd_size: bool = False) -> VideoInfo:
    """Describe the video at ``path``, rejecting inputs talkrt cannot process.

    Demuxes (does not decode) every video packet once: this counts frames exactly
    and checks that timestamps are evenly spaced.  Raises :class:`InputError` for a
    missing file, a directory, a file FFmpeg cannot read, no video stream, zero
    frames, unknown frame rate, odd width/height (unless ``allow_odd_size``), a display
    rotation (decoding the first frame tells) and variable frame rate (unless ``allow_vfr``;
    then ``is_vfr`` is reported).
    10-bit and 4:2:2/4:4:4 sources are accepted (decoded to 8-bit RGB).
    """
    p = Path(path)
    with open_input(p) as container:
        stream = first_video_stream(container)
        if stream is None:
            raise InputError(p, "no video stream (is this an audio-only or image file?)")
        cc = stream.codec_context
        width, height = int(cc.width or 0), int(cc.height or 0)
        if width <= 0 or height <= 0:
            raise InputError(p, "video stream has no frame size (unsupported or corrupt video)")
        pix_fmt = cc.pix_fmt or ""
        codec = cc.name or stream.codec.name
        has_audio = first_audio_stream(container) is not None
        matrix = color_matrix_name(cc.colorspace)
        crange = color_range_name(cc.color_range, pix_fmt)
        time_base = to_fraction(stream.time_base)
        avg_rate = to_fraction(stream.average_rate)
        guessed_rate = to_fraction(stream.guessed_rate)
        pts_list = _demux_video_pts(container, stream, p)
        rotation = _display_rotation(container, stream) if pts_list else 0

    num_frames = len(pts_list)
    if num_frames == 0:
        raise InputError(p, "video stream has zero frames")
    deltas = _pts_deltas(pts_list)
    is_vfr = _looks_vfr(deltas, time_base)
    fps = _choose_fps(avg_rate, guessed_rate, deltas, time_base)
    if fps is None:
        raise InputError(p, "unknown frame rate (the file gives no usable frame rate or timestamps)")

    if not allow_odd_size and (width % 2 or height % 2):
        raise InputError(
            p,
            f"odd frame size {width}x{height}: H.264 4:2:0 output needs even width and height; "
            "pad or crop it first, e.g. ffmpeg -i in.mp4 -vf "
            "\"pad=ceil(iw/2)*2:ceil(ih/2)*2\" out.mp4 (or crop=trunc(iw/2)*2:trunc(ih/2)*2)",
        )
    if rotation % 360:
        raise InputError(
            p,
            f"the video carries a {rotation} degree display rotation (phone video?), which talkrt does not "
            "apply: it would process and write the frames sideways; re-encode it upright first, e.g. "
            "ffmpeg -i in.mp4 -c:v libx264 -crf 18 -c:a copy upright.mp4 (ffmpeg applies the rotation)",
        )
    if is_vfr and not allow_vfr:
        lo, hi = min(deltas), max(deltas)
        tb = time_base or Fraction(1)
        raise InputError(
            p,
            "variable frame rate video (frame intervals range from "
            f"{float(lo * tb) * 1000:.1f} ms to {float(hi * tb) * 1000:.1f} ms); "
            "convert it to constant frame rate first, e.g. "
            f"ffmpeg -i in.mp4 -fps_mode cfr -r {_fps_text(fps)} -c:a copy out.mp4",
        )

    bit_depth, chroma = pixel_format_traits(pix_fmt, width, height)
    return VideoInfo(
        path=str(p),
        width=width,
        height=height,
        fps=fps,
        num_frames=num_frames,
        duration_s=float(num_frames / fps),
        codec=codec,
        pix_fmt=pix_fmt,
        bit_depth=bit_depth,
        chroma_subsampling=chroma,
        color_matrix=matrix,
        color_range=crange,
        has_audio=has_audio,
        is_vfr=is_vfr,
    )


def probe_output(path: PathLike) -> OutputInfo:
    """Lenient description of a finished file (typically one :class:`Mp4Writer` wrote).

    Frames are counted by demuxing.  ``audio_duration_s`` is the length the container
    states for the audio stream (MP4: edit-list aware, so AAC priming and padding are
    excluded), or the decoded sample count / rate when it states none;
    ``audio_decoded_samples`` is what the decoder produced (whole AAC frames).  Raises :class:`InputError` only when the file cannot be read or
    has no video stream.
    """
    p = Path(path)
    with open_input(p) as container:
        metadata = {str(k): str(v) for k, v in dict(container.metadata).items()}
        stream = first_video_stream(container)
        if stream is None:
            raise InputError(p, "no video stream")
        cc = stream.codec_context
        width, height = int(cc.width or 0), int(cc.height or 0)
        pix_fmt = cc.pix_fmt
        video_codec = cc.name or stream.codec.name
        matrix = color_matrix_name(cc.colorspace)
        fps = to_fraction(stream.average_rate) or to_fraction(stream.guessed_rate)
        num_frames = len(_demux_video_pts(container, stream, p))

    audio: dict[str, Any] = {}
    with open_input(p) as container:
        astream = first_audio_stream(container)
        if astream is not None:
            acc = astream.codec_context
            rate = int(acc.sample_rate or 0)
            samples = 0
            try:
                for frame in container.decode(astream):
                    samples += int(frame.samples)
            except av.FFmpegError as exc:
                raise InputError(p, f"could not decode audio: {exc_message(exc)}") from exc
            tb = to_fraction(astream.time_base)
            stated = float(astream.duration * tb) if astream.duration and tb else None
            audio = dict(
                audio_codec=acc.name,
                audio_sample_rate=rate,
                audio_channels=int(acc.channels or 0),
                audio_duration_s=stated if stated else (samples / rate if rate else None),
                audio_decoded_samples=samples,
            )
    return OutputInfo(
        path=str(p),
        width=width,
        height=height,
        fps=fps,
        num_frames=num_frames,
        duration_s=float(num_frames / fps) if fps else 0.0,
        video_codec=video_codec,
        pix_fmt=pix_fmt,
        color_matrix=matrix,
        has_audio=bool(audio),
        metadata=metadata,
        **audio,
    )


def _demux_video_pts(container: Any, stream: Any, path: Path) -> list[int | None]:
    """Presentation timestamps of every video packet, in stream order (no decoding)."""
    pts: list[int | None] = []
    try:
        for packet in container.demux(stream):
            if packet.size == 0 and packet.pts is None and packet.dts is None:
                continue  # the demuxer's end-of-stream flush packet
            if getattr(packet, "is_discard", False):
                continue  # before an MP4 edit list's start: decoded but never shown
            pts.append(packet.pts if packet.pts is not None else packet.dts)
    except av.FFmpegError as exc:
        raise InputError(path, f"corrupt or truncated video (demuxing failed: {exc_message(exc)})") from exc
    return pts


def _display_rotation(container: Any, stream: Any) -> int:
    """Degrees of display rotation of the first frame (0 when PyAV cannot tell)."""
    try:
        container.seek(0, stream=stream)
        for frame in container.decode(stream):
            return int(round(getattr(frame, "rotation", 0) or 0))
    except (av.FFmpegError, OSError, ValueError) as exc:   # unseekable/undecodable: decode errors surface later
        log.debug("cannot read the display rotation: %s", exc)
    return 0


def _pts_deltas(pts_list: list[int | None]) -> list[int]:
    """Steps between consecutive presentation times (packets come in decode order)."""
    known = sorted(x for x in pts_list if x is not None)
    return [b - a for a, b in zip(known, known[1:])]


def _looks_vfr(deltas: list[int], time_base: Fraction | None) -> bool:
    """True when some frame interval differs from the typical one by more than the tolerance."""
    if len(deltas) < 2:
        return False
    typical = median_low(deltas)
    if typical <= 0:
        return True  # duplicate timestamps: not a usable constant-rate stream
    tolerance = max(_VFR_TICK_TOLERANCE, Fraction(typical) * Fraction(VFR_RELATIVE_TOLERANCE))
    return any(abs(d - typical) > tolerance for d in deltas)


def _choose_fps(
    avg_rate: Fraction | None,
    guessed_rate: Fraction | None,
    deltas: list[int],
    time_base: Fraction | None,
) -> Fraction | None:
    """Pick the exact frame rate.

    The container's average rate is preferred when it is a 'clean' rate (integer or
    N*1000/1001).  Otherwise, if the typical pts step gives a clean rate within 1 %
    of it (MP4 edit lists can make the average slightly off, e.g. 12500/501), that one
    is used; else the average (or guessed) rate as stored.
    """
    rate = avg_rate or guessed_rate
    step_rate: Fraction | None = None
    if deltas and time_base:
        typical = median_low(deltas)
        if typical > 0:
            step_rate = 1 / (Fraction(typical) * time_base)
    if rate is not None and _is_clean_rate(rate):
        return rate
    if step_rate is not None:
        snapped = step_rate.limit_denominator(1001)
        if (
            _is_clean_rate(snapped)
            and abs(snapped - step_rate) <= step_rate / 1000
            and (rate is None or abs(snapped - rate) <= rate / 100)
        ):
            return snapped
    return rate or step_rate


def _is_clean_rate(rate: Fraction) -> bool:
    return rate > 0 and rate.denominator in (1, 1001)


def _fps_text(fps: Fraction) -> str:
    return str(fps.numerator) if fps.denominator == 1 else f"{fps.numerator}/{fps.denominator}"
