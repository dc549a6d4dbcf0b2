"""Synthesise small, real media files with PyAV for tests (no ffmpeg executable needed).

Import from a test module as ``from media_factory import make_video`` (pytest puts
``tests/`` on ``sys.path``).  Everything is deterministic: :func:`pattern_frame` and
:func:`audio_signal` regenerate exactly what was encoded, so tests can compare
decoded output with the source.

* :func:`make_video` - H.264 (or another codec) video with moving, non-constant content,
  any size/fps/pixel format (yuv420p, yuv420p10le, yuv444p, ...).
* :func:`make_vfr_video` - variable-frame-rate video (irregular timestamps).
* :func:`make_audio` - chirp/tone/silence as WAV, M4A/AAC, FLAC, ...
* :func:`make_video_with_audio` - MP4 with H.264 video and AAC audio, interleaved.
* :func:`make_empty_wav`, :func:`make_not_media` - bad inputs.
"""

from __future__ import annotations

import wave
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import av
import numpy as np

_AUDIO_CODEC_BY_SUFFIX = {
    ".wav": "pcm_s16le",
    ".m4a": "aac",
    ".mp4": "aac",
    ".mov": "aac",
    ".aac": "aac",
    ".mka": "aac",
    ".mkv": "aac",
    ".flac": "flac",
    ".mp3": "libmp3lame",
    ".ogg": "libvorbis",
    ".opus": "libopus",
}
_FORMAT_BY_SUFFIX = {".aac": "adts", ".m4a": "mp4", ".mka": "matroska", ".mkv": "matroska", ".opus": "ogg"}


# ---------------------------------------------------------------------------- content
def pattern_frame(index: int, width: int, height: int, pattern: str = "gradient") -> np.ndarray:
    """Frame ``index`` of a moving test pattern, RGB uint8 ``[height, width, 3]``.

    'gradient': smooth color ramps that scroll plus a bright box that moves (compresses
    well, so lossy round trips stay close); 'bars': scrolling color bars;
    'noise': seeded random pixels (worst case for the encoder).
    """
    if pattern == "noise":
        rng = np.random.default_rng(index)
        return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    if pattern == "gradient":
        r = 40 + 170 * ((x / max(width - 1, 1) + index * 0.02) % 1.0)
        g = 40 + 170 * (y / max(height - 1, 1))
        b = 128 + 80 * np.sin((x + y) / max(width, height) * 2 * np.pi + index * 0.3)
        img = np.stack([r, g, b], axis=-1)
        bw, bh = max(width // 6, 2), max(height // 6, 2)
        bx = int((index * 3) % max(width - bw, 1))
        by = int((index * 2) % max(height - bh, 1))
        img[by : by + bh, bx : bx + bw] = (235, 235, 60)
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if pattern == "bars":
        colors = np.array(
            [[235, 235, 235], [235, 235, 16], [16, 235, 235], [16, 235, 16],
             [235, 16, 235], [235, 16, 16], [16, 16, 235], [16, 16, 16]],
            dtype=np.uint8,
        )
        bar = ((x + index * 4) // max(width // 8, 1)).astype(np.int64) % 8
        return colors[bar]
    raise ValueError(f"unknown pattern {pattern!r}")


def audio_signal(
    seconds: float,
    sample_rate: int = 16000,
    channels: int = 1,
    kind: str = "chirp",
    amplitude: float = 0.5,
) -> np.ndarray:
    """Float32 ``[channels, n]`` test audio, ``n = round(seconds * sample_rate)``.

    'chirp' sweeps 200 Hz -> 2 kHz, 'tone' is 440 Hz, 'silence' is zeros.  Channel c is
    scaled by ``1 - 0.25 * c`` so channels differ (mono downmix = their mean).
    """
    n = int(round(seconds * sample_rate))
    t = np.arange(n, dtype=np.float64) / sample_rate
    if kind == "chirp":
        f0, f1 = 200.0, 2000.0
        k = (f1 - f0) / max(seconds, 1e-9)
        mono = np.sin(2 * np.pi * (f0 * t + 0.5 * k * t * t))
    elif kind == "tone":
        mono = np.sin(2 * np.pi * 440.0 * t)
    elif kind == "silence":
        mono = np.zeros(n)
    else:
        raise ValueError(f"unknown audio kind {kind!r}")
    gains = np.array([1.0 - 0.25 * c for c in range(channels)])[:, None]
    return (amplitude * gains * mono[None, :]).astype(np.float32)


# ---------------------------------------------------------------------------- video
def x264_supports(pix_fmt: str) -> bool:
    """True if the bundled libx264 can encode ``pix_fmt`` (e.g. 'yuv420p10le')."""
    try:
        codec = av.codec.Codec("libx264", "w")
    except Exception:  # noqa: BLE001
        return False
    return any(f.name == pix_fmt for f in (codec.video_formats or ()))


def make_video(
    path: str | Path,
    width: int = 64,
    height: int = 48,
    fps: Fraction | int = 25,
    seconds: float = 1.0,
    *,
    num_frames: int | None = None,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    pattern: str = "gradient",
    crf: int = 18,
) -> Path:
    """Write a video of ``num_frames`` (default ``round(seconds * fps)``) pattern frames.

    Frame i is :func:`pattern_frame(i, width, height, pattern)`, converted by FFmpeg's
    default RGB->YUV (BT.601, untagged).  The container follows the suffix (.mp4, .mkv, .mov).
    """
    path = Path(path)
    rate = Fraction(fps)
    n = num_frames if num_frames is not None else int(round(seconds * rate))
    options = {"crf": str(crf), "preset": "ultrafast"} if codec.startswith("libx264") else {}
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(pattern_frame(i, width, height, pattern), format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(rate.denominator, rate.numerator)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def make_vfr_video(
    path: str | Path,
    width: int = 64,
    height: int = 48,
    frame_durations_ms: Sequence[int] = (33, 50, 33, 100, 40, 33, 66, 33, 50, 33, 40, 33),
    *,
    codec: str = "libx264",
) -> Path:
    """Write a variable-frame-rate video: frame i lasts ``frame_durations_ms[i]`` ms (time base 1/1000)."""
    path = Path(path)
    tb = Fraction(1, 1000)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=30, options={"preset": "ultrafast"} if codec == "libx264" else {})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = tb
        pts = 0
        for i, dur in enumerate(frame_durations_ms):
            frame = av.VideoFrame.from_ndarray(pattern_frame(i, width, height), format="rgb24")
            frame.pts, frame.time_base = pts, tb
            container.mux(stream.encode(frame))
            pts += int(dur)
        container.mux(stream.encode(None))
    return path


# ---------------------------------------------------------------------------- audio
def _audio_frames(signal: np.ndarray, sample_rate: int, chunk: int = 1024):
    layout = "mono" if signal.shape[0] == 1 else "stereo"
    for start in range(0, signal.shape[1], chunk):
        part = np.ascontiguousarray(signal[:, start : start + chunk])
        frame = av.AudioFrame.from_ndarray(part, format="fltp", layout=layout)
        frame.sample_rate = sample_rate
        frame.pts = start
        frame.time_base = Fraction(1, sample_rate)
        yield frame


def _add_audio_stream(container, codec: str, sample_rate: int, channels: int):
    stream = container.add_stream(codec, rate=sample_rate)
    stream.layout = "mono" if channels == 1 else "stereo"
    return stream


def make_audio(
    path: str | Path,
    seconds: float = 1.0,
    *,
    sample_rate: int = 16000,
    channels: int = 1,
    codec: str | None = None,
    kind: str = "chirp",
    amplitude: float = 0.5,
) -> np.ndarray:
    """Write :func:`audio_signal` to ``path`` and return that float32 ``[channels, n]`` signal.

    The codec follows the suffix unless given: .wav = 16-bit PCM, .m4a/.mp4/.aac = AAC,
    .flac = FLAC, .mp3 = MP3, .ogg = Vorbis.  ``channels`` is 1 or 2.
    """
    path = Path(path)
    if channels not in (1, 2):
        raise ValueError("channels must be 1 or 2")
    codec = codec or _AUDIO_CODEC_BY_SUFFIX[path.suffix.lower()]
    signal = audio_signal(seconds, sample_rate, channels, kind, amplitude)
    with av.open(str(path), mode="w", format=_FORMAT_BY_SUFFIX.get(path.suffix.lower())) as container:
        stream = _add_audio_stream(container, codec, sample_rate, channels)
        for frame in _audio_frames(signal, sample_rate):
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return signal


def make_video_with_audio(
    path: str | Path,
    width: int = 64,
    height: int = 48,
    fps: Fraction | int = 25,
    seconds: float = 1.0,
    *,
    audio_seconds: float | None = None,
    sample_rate: int = 48000,
    channels: int = 2,
    pattern: str = "gradient",
    kind: str = "chirp",
    video_codec: str = "libx264",
    audio_codec: str = "aac",
) -> np.ndarray:
    """Write an MP4/MOV/MKV with pattern video and (interleaved) audio; returns the audio signal.

    ``audio_seconds`` (default ``seconds``) may differ from the video length.  With
    ``seconds=0`` and a .mkv path this makes a video stream with zero frames (MP4
    drops an empty stream).
    """
    path = Path(path)
    rate = Fraction(fps)
    n_frames = int(round(seconds * rate))
    signal = audio_signal(audio_seconds if audio_seconds is not None else seconds, sample_rate, channels, kind)
    with av.open(str(path), mode="w") as container:
        vstream = container.add_stream(video_codec, rate=rate, options={"preset": "ultrafast", "crf": "18"})
        vstream.width, vstream.height, vstream.pix_fmt = width, height, "yuv420p"
        astream = _add_audio_stream(container, audio_codec, sample_rate, channels)
        audio_frames = list(_audio_frames(signal, sample_rate))
        a = 0
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(pattern_frame(i, width, height, pattern), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(rate.denominator, rate.numerator)
            container.mux(vstream.encode(frame))
            while a < len(audio_frames) and audio_frames[a].pts < (i + 1) * sample_rate / rate:
                container.mux(astream.encode(audio_frames[a]))
                a += 1
        container.mux(vstream.encode(None))
        for frame in audio_frames[a:]:
            container.mux(astream.encode(frame))
        container.mux(astream.encode(None))
    return signal


# ---------------------------------------------------------------------------- bad inputs
def make_empty_wav(path: str | Path, sample_rate: int = 16000, channels: int = 1) -> Path:
    """A valid WAV header with zero samples (stdlib ``wave``; PyAV cannot mux zero frames)."""
    path = Path(path)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(b"")
    return path


def make_not_media(path: str | Path, text: str = "this is a text file, not a video\n" * 20) -> Path:
    """A text file (typically given a media suffix such as .mp4)."""
    path = Path(path)
    path.write_text(text)
    return path
