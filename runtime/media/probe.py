"""Probing input videos (:func:`probe_video`) and finished outputs (:func:`probe_output`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from statistics import median_low
from typing import Any

import av

from talkrt.errors import InputError, TalkrtError

from ._common import (
    PathLike,
    color_matrix_name,
    color_range_name,
    exc_message,
    first_audio_stream,
    first_video_stream,
    log_once,
    open_input,
    pixel_format_traits,
    to_fraction,
)
from .geometry import Orientation, even_size, orientation_from_display_matrix
from .hdr import REFERENCE_WHITE_NITS, SOURCE_PEAK_NITS, HdrSource, hdr_source
from .timing import cfr_rate, fps_filter_plan, fps_text, looks_vfr, nominal_rate, pts_deltas

log = logging.getLogger(__name__)

MAX_FPS = 240   # the highest constant rate ``probe_video(fps=...)`` accepts


@dataclass(frozen=True)
class VideoInfo:
    """An input video as talkrt receives it: the frames that decoding *delivers*.

    Frames are delivered upright (the display matrix applied), at an even size, at a
    constant rate and, for HDR sources, tone-mapped to SDR BT.709; ``width``, ``height``,
    ``fps``, ``num_frames`` and ``duration_s`` (``num_frames / fps``) describe those frames,
    so every consumer of :func:`~talkrt.media.frames.iter_video_frames` may trust them.

    The stored stream: ``source_width`` x ``source_height``, ``source_frames`` frames;
    ``bit_depth``, ``chroma_subsampling`` ('420', '422', '444', ...), ``pix_fmt``,
    ``color_matrix`` ('bt709', 'bt2020nc', ...; None when untagged) and ``color_range``
    ('tv' limited, 'pc' full, None) are the source's.  ``is_vfr``: its frame intervals vary.
    ``frame_map`` (``repr=False``) gives the source index of each delivered frame when
    frames are dropped or repeated to reach ``fps``, else None (every frame once, in order).
    ``orientation`` maps stored pixels to shown ones; ``hdr`` is set for PQ/HLG sources.
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
    source_width: int
    source_height: int
    source_frames: int
    orientation: Orientation
    hdr: HdrSource | None
    frame_map: tuple[int, ...] | None = field(default=None, repr=False)

    @property
    def is_8bit_420(self) -> bool:
        """True when the source already is what talkrt writes (8-bit 4:2:0)."""
        return self.bit_depth == 8 and self.chroma_subsampling == "420"

    @property
    def conversions(self) -> tuple[str, ...]:
        """What decoding does beyond YUV->RGB: 'cfr' (frames dropped/repeated), 'orientation',
        'even-crop', 'tonemap'; empty when the stored frames are delivered as they are."""
        shown = self.orientation.shown_size(self.source_width, self.source_height)
        steps = (("cfr", self.frame_map is not None), ("orientation", not self.orientation.is_identity),
                 ("even-crop", shown != (self.width, self.height)), ("tonemap", self.hdr is not None))
        return tuple(name for name, needed in steps if needed)


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


def probe_video(path: PathLike, *, fps: Fraction | int | None = None) -> VideoInfo:
    """Describe the video at ``path`` as it will be delivered, refusing what talkrt cannot read.

    Demuxes (does not decode) every video packet once, which counts frames exactly and
    gives their timestamps, and decodes the first frame for its display matrix and
    transfer characteristic.  What delivery does (each said once per file in the log):

    * frame rate: a constant-rate stream keeps its rate and every frame; a variable-rate
      one is resampled to its nominal rate (:func:`~talkrt.media.timing.nominal_rate`);
      ``fps`` asks for another constant rate.  Resampling picks frames by timestamp as
      FFmpeg's ``fps`` filter does (:func:`~talkrt.media.timing.fps_filter_plan`);
    * display rotation/mirroring: applied, frames are upright (:mod:`~talkrt.media.geometry`);
    * odd width/height: the last column/row is dropped (H.264 4:2:0 needs even sizes);
    * HDR (PQ or HLG): tone-mapped to SDR BT.709 (:mod:`~talkrt.media.hdr`);
    * 10-bit and 4:2:2/4:4:4 sources: decoded to 8-bit RGB, with a warning.

    Raises:
        InputError: a missing file, a directory, a file FFmpeg cannot read, no video stream,
            zero frames, unknown frame rate, frames without timestamps that would need
            resampling, a display rotation that is not a multiple of 90 degrees, a 1-pixel
            wide or high picture, an unsupported HDR matrix.
        TalkrtError: ``fps`` not a positive rate of at most ``MAX_FPS``.
    """
    p = Path(path)
    wanted = _check_fps(fps)
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
        packets = _demux_video_packets(container, stream, p)
        first = _first_frame_facts(container, stream) if packets else _FirstFrame()

    if not packets:
        raise InputError(p, "video stream has zero frames")
    pts = [t for t, _ in packets if t is not None]
    deltas = pts_deltas(pts)
    is_vfr = looks_vfr(deltas)
    native = nominal_rate(deltas, time_base) if is_vfr and time_base else cfr_rate(avg_rate, guessed_rate, deltas,
                                                                                    time_base)
    if native is None:
        raise InputError(p, "unknown frame rate (the file gives no usable frame rate or timestamps)")
    out_fps = wanted or native
    frame_map = None
    if is_vfr or out_fps != native:
        frame_map = _resample(p, packets, deltas, time_base, native, out_fps, is_vfr)
    num_frames = len(frame_map) if frame_map is not None else len(packets)

    orientation = _orientation(p, first.display_matrix)
    shown_w, shown_h = orientation.shown_size(width, height)
    out_w, out_h = even_size(shown_w, shown_h)
    if out_w == 0 or out_h == 0:
        raise InputError(p, f"a {shown_w}x{shown_h} picture has no even-sized part to process")
    hdr = _hdr_source(p, first.color_trc if first.color_trc is not None else cc.color_trc,
                      first.color_primaries if first.color_primaries is not None else cc.color_primaries,
                      matrix, crange)
    bit_depth, chroma = pixel_format_traits(pix_fmt, width, height)
    info = VideoInfo(
        path=str(p), width=out_w, height=out_h, fps=out_fps, num_frames=num_frames,
        duration_s=float(num_frames / out_fps), codec=codec, pix_fmt=pix_fmt, bit_depth=bit_depth,
        chroma_subsampling=chroma, color_matrix=matrix, color_range=crange, has_audio=has_audio, is_vfr=is_vfr,
        source_width=width, source_height=height, source_frames=len(packets), orientation=orientation, hdr=hdr,
        frame_map=tuple(frame_map) if frame_map is not None else None,
    )
    _log_delivery(p, info, deltas, time_base, (shown_w, shown_h))
    return info


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


def _demux_video_packets(container: Any, stream: Any, path: Path) -> list[tuple[int | None, int]]:
    """(presentation time, duration) of every video packet, in stream order (no decoding)."""
    packets: list[tuple[int | None, int]] = []
    try:
        for packet in container.demux(stream):
            if packet.size == 0 and packet.pts is None and packet.dts is None:
                continue  # the demuxer's end-of-stream flush packet
            if getattr(packet, "is_discard", False):
                continue  # before an MP4 edit list's start: decoded but never shown
            packets.append((packet.pts if packet.pts is not None else packet.dts, int(packet.duration or 0)))
    except av.FFmpegError as exc:
        raise InputError(path, f"corrupt or truncated video (demuxing failed: {exc_message(exc)})") from exc
    return packets


@dataclass(frozen=True)
class _FirstFrame:
    display_matrix: bytes | None = None
    color_trc: int | None = None
    color_primaries: int | None = None


def _first_frame_facts(container: Any, stream: Any) -> _FirstFrame:
    """Display matrix and transfer/primaries tags of the first decoded frame (empty when
    PyAV cannot tell: an undecodable stream fails later, at decoding, with its own message)."""
    try:
        container.seek(0, stream=stream)
        for frame in container.decode(stream):
            side = frame.side_data.get("DISPLAYMATRIX")
            return _FirstFrame(bytes(side) if side is not None else None,
                               _int_or_none(getattr(frame, "color_trc", None)),
                               _int_or_none(getattr(frame, "color_primaries", None)))
    except (av.FFmpegError, OSError, ValueError) as exc:
        log.debug("cannot decode the first frame: %s", exc)
    return _FirstFrame()


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) or None       # 0 is AVCOL_*_RESERVED0: no information
    except (TypeError, ValueError):
        return None


def _check_fps(fps: Fraction | int | None) -> Fraction | None:
    if fps is None:
        return None
    try:
        rate = Fraction(fps)
    except (TypeError, ValueError) as exc:
        raise TalkrtError(f"frame rate {fps!r} is not a number") from exc
    if not 0 < rate <= MAX_FPS:
        raise TalkrtError(f"frame rate {fps_text(rate)} is out of range (0 < fps <= {MAX_FPS})")
    return rate


def _resample(path: Path, packets: list[tuple[int | None, int]], deltas: list[int], time_base: Fraction | None,
              native: Fraction, fps: Fraction, is_vfr: bool) -> list[int]:
    """The source index of each delivered frame at ``fps`` (FFmpeg's fps filter rule)."""
    if time_base is None or any(t is None for t, _ in packets):
        raise InputError(path, "frames without timestamps cannot be resampled to a constant frame rate"
                         + ("" if is_vfr else f"; leave the rate at {fps_text(native)} fps"))
    pts = sorted(t for t, _ in packets)           # type: ignore[type-var]
    last = max(packets, key=lambda item: item[0])  # type: ignore[arg-type, return-value]
    duration = last[1] or (median_low(deltas) if deltas else 0) or round(1 / (native * time_base))
    plan = fps_filter_plan(pts, pts[-1] + duration, time_base, fps)
    if not plan:
        raise InputError(path, f"no frames remain at {fps_text(fps)} fps")
    return plan


def _orientation(path: Path, display_matrix: bytes | None) -> Orientation:
    if display_matrix is None:
        return Orientation()
    try:
        return orientation_from_display_matrix(display_matrix)
    except ValueError as exc:     # UnsupportedRotation, or a malformed matrix
        raise InputError(path, f"{exc}; re-encode it upright first (ffmpeg applies the rotation)") from exc


def _hdr_source(path: Path, color_trc: Any, primaries: Any, matrix: str | None, crange: str | None) -> HdrSource | None:
    try:
        return hdr_source(color_trc, primaries, matrix, crange == "pc")
    except ValueError as exc:
        raise InputError(path, f"{exc}; convert it to SDR first") from exc


def _log_delivery(path: Path, info: VideoInfo, deltas: list[int], time_base: Fraction | None,
                  shown: tuple[int, int]) -> None:
    """One line (once per file and process) for each conversion decoding will do."""
    if info.frame_map is not None:
        kept = len(set(info.frame_map))
        if info.is_vfr:
            lo, hi = min(deltas), max(deltas)
            tb = time_base or Fraction(1)
            why = f"variable frame rate (frame intervals {float(lo * tb) * 1000:.1f}-{float(hi * tb) * 1000:.1f} ms)"
        else:
            why = "constant frame rate at another rate"
        log_once(logging.INFO, "%s: %s: resampled to a constant %s fps as FFmpeg's fps filter does: %d source "
                 "frames -> %d frames (%d dropped, %d repeated)", path, why, fps_text(info.fps), info.source_frames,
                 info.num_frames, info.source_frames - kept, info.num_frames - kept)
    if not info.orientation.is_identity:
        log_once(logging.INFO, "%s: display matrix: the stored %dx%d picture is shown %s; frames are delivered "
                 "upright (%dx%d)", path, info.source_width, info.source_height, info.orientation.describe(), *shown)
    if shown != (info.width, info.height):
        log_once(logging.INFO, "%s: odd frame size %dx%d: H.264 4:2:0 needs even sizes, so the last %s dropped: "
                 "frames are %dx%d", path, *shown, _dropped_lines(shown), info.width, info.height)
    if info.hdr is not None:
        log_once(logging.INFO, "%s: HDR source (%s, %d-bit): tone-mapped to SDR BT.709 (reference white %g cd/m2 "
                 "-> SDR white, highlights rolled off up to %g cd/m2 by the BT.2390 curve; talkrt.media.hdr)", path,
                 info.hdr.describe(), info.bit_depth, REFERENCE_WHITE_NITS, SOURCE_PEAK_NITS)
    elif not info.is_8bit_420:
        log_once(logging.WARNING, "%s: source is %d-bit %s (%s); frames are converted to 8-bit RGB and the output "
                 "will be 8-bit 4:2:0 H.264", path, info.bit_depth, info.chroma_subsampling, info.pix_fmt)


def _dropped_lines(shown: tuple[int, int]) -> str:
    w, h = shown
    return {(True, True): "column and row are", (True, False): "column is", (False, True): "row is"}[(w % 2 == 1,
                                                                                                   h % 2 == 1)]


def _demux_video_pts(container: Any, stream: Any, path: Path) -> list[int | None]:
    """Presentation timestamps of every video packet, in stream order (no decoding)."""
    return [t for t, _ in _demux_video_packets(container, stream, path)]
