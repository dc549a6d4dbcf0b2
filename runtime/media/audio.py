"""Loading audio (any container/codec FFmpeg reads, including a video's audio track)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator

import av
import numpy as np
from av.audio.resampler import AudioResampler

from talkrt.errors import InputError

from ._common import PathLike, exc_message, first_audio_stream, open_input, to_fraction

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class AudioClip:
    """Mono float32 audio in [-1, 1].

    ``samples`` is a 1-D array; ``duration_s == len(samples) / sample_rate``.
    (``eq=False``: numpy arrays do not compare with ``==``; compare ``samples`` yourself.)
    """

    samples: np.ndarray
    sample_rate: int
    duration_s: float

    @property
    def num_samples(self) -> int:
        return int(self.samples.shape[0])


def num_video_frames(num_samples: int, fps: Fraction, sample_rate: int) -> int:
    """Output frames for ``num_samples`` of audio at ``sample_rate`` Hz: ``floor(seconds * fps)``, exactly."""
    fps = Fraction(fps)
    return (num_samples * fps.numerator) // (sample_rate * fps.denominator)


def load_audio(path: PathLike, sample_rate: int = 16000) -> AudioClip:
    """Decode the first audio stream of ``path`` to mono float32 at ``sample_rate`` Hz.

    Channels are averaged (as ``librosa.load(mono=True)`` does) after FFmpeg's
    resampler has converted the rate.  All-silent audio is fine; audio with no
    samples is not.  Raises :class:`InputError` for a missing/unreadable file, no
    audio stream, an empty audio stream or undecodable audio.
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    p = Path(path)
    chunks = [chunk.mean(axis=0, dtype=np.float32) for chunk in iter_audio_chunks(p, sample_rate=sample_rate)]
    samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    if samples.size == 0:
        raise InputError(p, "audio stream is empty (zero samples)")
    if not np.all(np.isfinite(samples)):
        raise InputError(p, "audio contains NaN or infinite samples")
    np.clip(samples, -1.0, 1.0, out=samples)
    return AudioClip(
        samples=np.ascontiguousarray(samples, dtype=np.float32),
        sample_rate=int(sample_rate),
        duration_s=samples.size / sample_rate,
    )


def audio_stream_layout(path: PathLike) -> tuple[int, int]:
    """``(sample_rate, channels)`` of the first audio stream; InputError if there is none."""
    p = Path(path)
    with open_input(p) as container:
        stream = _require_audio_stream(container, p)
        cc = stream.codec_context
        return int(cc.sample_rate or 0), int(cc.channels or 0)


def iter_audio_chunks(path: PathLike, *, sample_rate: int, layout: str | None = None) -> Iterator[np.ndarray]:
    """Yield the first audio stream of ``path`` as float32 arrays of shape ``[channels, n]``.

    Audio is resampled to ``sample_rate`` and, if ``layout`` is given ('mono',
    'stereo'), remixed to it; otherwise the source channels are kept.  The file is
    checked (exists, is media, has audio) before this returns; decoding is lazy.
    """
    p = Path(path)
    with open_input(p) as container:
        _require_audio_stream(container, p)
    return _decode_chunks(p, sample_rate, layout)


def _decode_chunks(p: Path, sample_rate: int, layout: str | None) -> Iterator[np.ndarray]:
    with open_input(p) as container:
        stream = _require_audio_stream(container, p)
        stated = _stated_duration_s(stream)
        raw = _resample(container, stream, p, sample_rate, layout)
        if stated is None:
            yield from raw
        else:
            yield from _trim_codec_padding(raw, round(stated * sample_rate), int(PADDING_TOLERANCE_S * sample_rate))


# Lossy codecs (AAC, MP3, ...) decode to whole codec frames, so the last frame's padding
# comes out as extra samples.  MP4 & co. state the real length (edit list); decoded audio
# that runs past it by at most this much is padding and is dropped.  More than that means
# the stated length is an estimate (e.g. MP3 without a header) and all audio is kept.
PADDING_TOLERANCE_S = 0.15


def _stated_duration_s(stream: Any) -> float | None:
    tb = to_fraction(stream.time_base)
    if not stream.duration or tb is None or stream.duration <= 0:
        return None
    return float(stream.duration * tb)


def _trim_codec_padding(chunks: Iterator[np.ndarray], limit: int, tolerance: int) -> Iterator[np.ndarray]:
    """Yield ``chunks`` but drop samples past ``limit`` if there are at most ``tolerance`` of them."""
    emitted = 0
    held: list[np.ndarray] = []
    held_n = 0
    trimming = True
    for chunk in chunks:
        if not trimming:
            yield chunk
            continue
        if emitted < limit:
            take = min(chunk.shape[1], limit - emitted)
            if take:
                yield chunk[:, :take]
                emitted += take
            chunk = chunk[:, take:]
        if chunk.shape[1]:
            held.append(chunk)
            held_n += chunk.shape[1]
            if held_n > tolerance:
                yield from held
                held, trimming = [], False
    if held:
        log.debug("dropped %d samples of codec padding past the stated audio length", held_n)


def _resample(container: Any, stream: Any, p: Path, sample_rate: int, layout: str | None) -> Iterator[np.ndarray]:
    resampler = AudioResampler(format="fltp", layout=layout, rate=sample_rate)
    try:
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                yield _to_array(out)
        for out in resampler.resample(None):
            yield _to_array(out)
    except av.FFmpegError as exc:
        raise InputError(p, f"corrupt audio stream (decoding failed: {exc_message(exc)})") from exc


def _require_audio_stream(container: Any, p: Path) -> Any:
    stream = first_audio_stream(container)
    if stream is None:
        kinds = "video only" if len(container.streams.video) else "no audio or video"
        raise InputError(p, f"no audio stream ({kinds})")
    return stream


def _to_array(frame: av.AudioFrame) -> np.ndarray:
    arr = frame.to_ndarray()
    if arr.ndim == 1:
        arr = arr[np.newaxis, :]
    return np.asarray(arr, dtype=np.float32)
