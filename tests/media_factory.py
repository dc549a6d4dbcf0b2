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


# ---------------------------------------------------------------------------- frame markers
MARKER_BLOCK = 8          # each digit is one 8x8 grey block (aligned to the codec's transform blocks)
MARKER_DIGITS = 3         # base-8 digits, most significant first: indices 0..511


def draw_marker(frame: np.ndarray, index: int) -> np.ndarray:
    """A copy of RGB ``frame`` carrying ``index`` in three grey blocks at its top-left corner.

    Digit d is the grey level ``16 + 32 * d``; the blocks sit side by side at x = 0, 8, 16
    (y = 0..8), so they survive 4:2:0 lossy coding and tell a frame's index after any
    processing that keeps the top-left corner of the upright picture.
    """
    if not 0 <= index < 8 ** MARKER_DIGITS:
        raise ValueError(f"marker index {index} out of range")
    out = frame.copy()
    for k in range(MARKER_DIGITS):
        digit = (index // 8 ** (MARKER_DIGITS - 1 - k)) % 8
        out[:MARKER_BLOCK, k * MARKER_BLOCK:(k + 1) * MARKER_BLOCK] = 16 + 32 * digit
    return out


def read_marker(frame: np.ndarray) -> int:
    """The index :func:`draw_marker` wrote into ``frame``'s top-left corner.

    Raises ValueError when a block is not a clean grey of one of the eight levels (no
    marker there: e.g. a picture shown sideways or mirrored).
    """
    index = 0
    for k in range(MARKER_DIGITS):
        block = frame[2:MARKER_BLOCK - 2, k * MARKER_BLOCK + 2:(k + 1) * MARKER_BLOCK - 2].astype(np.float64)
        level = block.mean()
        digit = int(round((level - 16) / 32))
        if block.max() - block.min() > 24 or not 0 <= digit <= 7 or abs(level - (16 + 32 * digit)) > 12:
            raise ValueError(f"no marker digit in block {k} (mean {level:.1f}, spread {block.max() - block.min():.0f})")
        index = index * 8 + digit
    return index


# ---------------------------------------------------------------------------- phone-style inputs
def write_frames(
    path: str | Path,
    frames: Sequence[np.ndarray],
    *,
    fps: Fraction | int = 25,
    pts_ms: Sequence[int] | None = None,
    display_rotation: tuple[int, bool, bool] | None = None,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    crf: int = 18,
) -> Path:
    """Encode RGB ``frames`` as they are (no pattern), optionally at irregular times or with a display matrix.

    ``pts_ms``: frame i is shown at ``pts_ms[i]`` ms (time base 1/1000; the last frame lasts
    as long as the step before it), else at ``i / fps``.  ``display_rotation`` is
    ``(degrees counter-clockwise, hflip, vflip)`` as PyAV's ``set_display_rotation`` takes
    it: a player shows the stored picture rotated by that angle, then mirrored.
    Odd sizes need a 4:4:4 ``pix_fmt`` (4:2:0 H.264 cannot code them).
    """
    path = Path(path)
    rate = Fraction(fps)
    tb = Fraction(1, 1000) if pts_ms is not None else Fraction(rate.denominator, rate.numerator)
    height, width = frames[0].shape[:2]
    options = {"crf": str(crf), "preset": "ultrafast"} if codec.startswith("libx264") else {}
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=30 if pts_ms is not None else rate, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if pts_ms is not None:
            stream.codec_context.time_base = tb
        if display_rotation is not None:
            degrees, hflip, vflip = display_rotation
            stream.set_display_rotation(degrees, hflip=hflip, vflip=vflip)
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts, frame.time_base = (int(pts_ms[i]) if pts_ms is not None else i), tb
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def stored_picture(upright: np.ndarray, degrees: int, hflip: bool = False, vflip: bool = False) -> np.ndarray:
    """The picture to store so that a player applying ``display_rotation=(degrees, hflip, vflip)``
    shows ``upright``: shown = mirror(rotate_ccw(stored, degrees)), so stored undoes both."""
    picture = upright
    if hflip:
        picture = picture[:, ::-1]
    if vflip:
        picture = picture[::-1]
    return np.ascontiguousarray(np.rot90(picture, k=-(degrees // 90)))


# ---------------------------------------------------------------------------- HDR inputs
HDR_REFERENCE_WHITE_NITS = 203.0    # ITU-R BT.2408: HDR reference (graphics) white


def sdr_to_hdr_signal(rgb: np.ndarray, transfer: str) -> np.ndarray:
    """BT.709 SDR RGB uint8 -> BT.2020 non-linear HDR signal float64 ``[..., 3]`` in [0, 1].

    The usual display-light mapping (BT.2408): SDR code -> light by the BT.1886 EOTF (gamma
    2.4), SDR white placed at HDR reference white (203 cd/m2), BT.709 -> BT.2020 primaries,
    then the PQ inverse EOTF, or for HLG the inverse OOTF (1000 cd/m2 display, gamma 1.2)
    and the OETF.  Only to make test media that look like a face clip filmed in HDR.
    """
    bt709_to_2020 = np.array([[0.627404, 0.329283, 0.043313],
                              [0.069097, 0.919540, 0.011362],
                              [0.016392, 0.088013, 0.895595]])
    light = (rgb.astype(np.float64) / 255.0) ** 2.4 @ bt709_to_2020.T * HDR_REFERENCE_WHITE_NITS
    if transfer == "pq":
        return pq_signal(light)
    display = np.clip(light / 1000.0, 0.0, 1.0)
    yd = display @ np.array([0.2627, 0.6780, 0.0593])
    scene = display * np.power(np.maximum(yd, 1e-12), (1 - 1.2) / 1.2)[..., None]
    return hlg_signal(scene)


def pq_signal(nits: np.ndarray | float) -> np.ndarray:
    """SMPTE ST 2084 inverse EOTF: cd/m2 -> PQ signal in [0, 1]."""
    m1, m2, c1, c2, c3 = 2610 / 16384, 2523 / 4096 * 128, 3424 / 4096, 2413 / 4096 * 32, 2392 / 4096 * 32
    y = np.power(np.clip(np.asarray(nits, np.float64) / 10000.0, 0.0, 1.0), m1)
    return np.power((c1 + c2 * y) / (1 + c3 * y), m2)


def hlg_signal(scene: np.ndarray | float) -> np.ndarray:
    """BT.2100 HLG OETF: scene light in [0, 1] -> signal in [0, 1]."""
    a = 0.17883277
    b, c = 1 - 4 * a, 0.5 - a * np.log(4 * a)
    e = np.clip(np.asarray(scene, np.float64), 0.0, 1.0)
    return np.where(e <= 1 / 12, np.sqrt(3 * e), a * np.log(np.maximum(12 * e - b, 1e-12)) + c)


def hdr_yuv420p10(signal: np.ndarray) -> np.ndarray:
    """BT.2020 non-constant-luminance limited-range 10-bit Y'CbCr 4:2:0 of an R'G'B' signal
    ``[H, W, 3]`` (even H, W), packed as PyAV's ``yuv420p10le`` ndarray ``[H * 3 // 2, W]``."""
    kr, kb = 0.2627, 0.0593
    r, g, b = signal[..., 0], signal[..., 1], signal[..., 2]
    y = kr * r + (1 - kr - kb) * g + kb * b
    cb, cr = (b - y) / (2 * (1 - kb)), (r - y) / (2 * (1 - kr))
    h, w = y.shape

    def sub(c):  # 2x2 mean: the chroma sample of each 2x2 luma block
        return c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    luma = np.rint(64 + 876 * y)
    chroma = [np.rint(512 + 896 * sub(c)).reshape(h // 4, w) for c in (cb, cr)]
    return np.clip(np.concatenate([luma] + chroma), 0, 1023).astype(np.uint16)


def hdr_encoder() -> str:
    """libx265 (HEVC Main10, as phones record HDR) when this PyAV has it, else libx264 (High 10)."""
    try:
        av.codec.Codec("libx265", "w")
        return "libx265"
    except Exception:  # noqa: BLE001
        return "libx264"


def make_hdr_video(path: str | Path, signals: Sequence[np.ndarray], transfer: str, fps: Fraction | int = 25) -> Path:
    """Lossless 10-bit video of BT.2020 R'G'B' ``signals`` (float ``[H, W, 3]`` in [0, 1], even
    H and W), tagged BT.2020 primaries and matrix, limited range, and the PQ or HLG transfer."""
    path = Path(path)
    rate = Fraction(fps)
    codec = hdr_encoder()
    # one encoder thread: the mux of the flushed packets failed once in a full CI run ("Not yet
    # implemented in FFmpeg"; not reproduced in 120 tries alone); without x265's thread pool the
    # packets no longer depend on thread timing
    options = ({"x265-params": "lossless=1:log-level=error:pools=none:frame-threads=1", "preset": "ultrafast"}
               if codec == "libx265" else {"qp": "0", "preset": "ultrafast", "threads": "1"})
    height, width = signals[0].shape[:2]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p10le"
        cc = stream.codec_context
        cc.color_trc = {"pq": 16, "hlg": 18}[transfer]
        cc.color_primaries, cc.colorspace, cc.color_range = 9, 9, 1      # BT.2020, BT.2020 NCL, limited
        for i, signal in enumerate(signals):
            frame = av.VideoFrame.from_ndarray(hdr_yuv420p10(signal), format="yuv420p10le")
            frame.pts, frame.time_base = i, Fraction(rate.denominator, rate.numerator)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path
