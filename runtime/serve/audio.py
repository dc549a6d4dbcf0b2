"""Live audio: one utterance's PCM as it arrives, which of its video frames can be made, and
their Whisper windows, batched over every utterance of a scheduler step.

Timeline: an utterance starts with the first PCM after idle (or after ``end``); utterance
frame ``k`` covers client samples ``[floor(k r / fps), floor((k+1) r / fps))`` (``r`` the
client's rate) and carries exactly those samples back. Its Whisper window is MuseTalk's rule
(:mod:`talkrt.models.audio`) applied to the utterance as a clip: padded steps
``floor(50 k / fps) ..+window_steps``, so frame ``k`` needs the 16 kHz audio up to the end of
step ``floor(50 k / fps) + window_steps - pad_left_steps - 1`` (120 ms past the frame's start
at 25 fps: the look-ahead). After ``end`` the last frame's PCM is padded with silence and
steps past the audio are the model's zero padding, as in the offline pipeline.

Bounded windows: each step, Whisper encodes the most recent <= 30 s of an utterance (its
input size), step aligned, so the left context is up to 30 s minus the look-ahead and the
features of the newest steps see zeros where the whole-clip encoder would see future audio.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
import torch

from talkrt.config import AudioConfig
from talkrt.models.audio import (SAMPLE_RATE, SEGMENT_SECONDS, SEGMENT_STEPS, STEPS_PER_SECOND, AudioFeatures,
                                 window_start)
from talkrt.streams import to_device

SAMPLES_PER_STEP = SAMPLE_RATE // STEPS_PER_SECOND
WINDOW_SAMPLES = SEGMENT_SECONDS * SAMPLE_RATE     # Whisper's input: 30 s at 16 kHz


def lookahead_ms(fps: Fraction, audio: AudioConfig) -> float:
    """How far past a frame's start its Whisper window reads, in ms (the largest over one
    cycle of frames; 120 ms at 25 fps)."""
    fps = Fraction(fps)
    frames = np.arange(fps.numerator)
    ends = (window_start(frames, fps) + audio.window_steps - audio.pad_left_steps) * (1000 / STEPS_PER_SECOND)
    return float(np.max(ends - frames * 1000 / float(fps)))


class _Samples:
    """An append-only 1-D sample buffer whose old samples can be released (amortised O(1))."""

    def __init__(self, dtype: type):
        self._buf = np.zeros(1 << 14, dtype)
        self.base = 0          # absolute index of _buf[0]
        self._len = 0          # samples held

    @property
    def end(self) -> int:
        """Absolute index one past the newest sample."""
        return self.base + self._len

    def append(self, x: np.ndarray) -> None:
        if self._len + len(x) > len(self._buf):
            grown = np.zeros(max(2 * len(self._buf), self._len + len(x)), self._buf.dtype)
            grown[:self._len] = self._buf[:self._len]
            self._buf = grown
        self._buf[self._len:self._len + len(x)] = x
        self._len += len(x)

    def view(self, start: int, stop: int) -> np.ndarray:
        """Samples ``[start, stop)`` (absolute; zeros past the end); ``start`` must not be released."""
        if start < self.base:
            raise IndexError(f"sample {start} was released (first held: {self.base})")
        out = self._buf[start - self.base:max(start, min(stop, self.end)) - self.base]
        return out if len(out) == stop - start else np.concatenate([out, np.zeros(stop - start - len(out), out.dtype)])

    def release(self, before: int) -> None:
        """Forget samples before absolute index ``before`` (compacting when over half is free)."""
        drop = min(max(0, before - self.base), self._len)
        if drop and drop >= self._len // 2:
            self._buf[:self._len - drop] = self._buf[drop:self._len].copy()
            self._len -= drop
            self.base += drop


class Utterance:
    """One utterance of a live session: client PCM in, frames out.

    ``feed`` takes s16le mono bytes at ``rate`` Hz (8-48 kHz; other rates are resampled to
    16 kHz for Whisper with FFmpeg's resampler, which delays its output by a few ms).
    The session's lock guards it, except the 16 kHz samples that the scheduler thread reads for
    Whisper (:meth:`recent_span`, :meth:`take_speech`) outside that lock: a lock of their own.
    """

    def __init__(self, rate: int, fps: Fraction, audio: AudioConfig):
        self.rate, self.fps, self.cfg = rate, Fraction(fps), audio
        self.pcm = _Samples(np.int16)              # client-rate samples
        self.speech = _Samples(np.float32)         # 16 kHz samples in [-1, 1)
        self._speech_lock = threading.Lock()       # feed (event loop) vs Whisper input (scheduler thread)
        self.resampler = None if rate == SAMPLE_RATE else av.AudioResampler(format="flt", layout="mono",
                                                                              rate=SAMPLE_RATE)
        self.ended = False
        self.next_frame = 0                # the next frame to hand out
        self.last_audio = time.monotonic()

    def feed(self, data: bytes) -> None:
        """Append PCM (an even number of bytes) to the utterance."""
        if self.ended:
            raise RuntimeError("feed after the utterance ended")
        pcm = np.frombuffer(data, "<i2")
        self.pcm.append(pcm)
        self.last_audio = time.monotonic()
        if self.resampler is None:
            with self._speech_lock:
                self.speech.append(pcm.astype(np.float32) / 32768.0)
            return
        frame = av.AudioFrame.from_ndarray(pcm[None, :].astype(np.int16), format="s16", layout="mono")
        frame.sample_rate = self.rate
        self._take(self.resampler.resample(frame))

    def _take(self, frames: list) -> None:
        for f in frames:
            samples = f.to_ndarray().reshape(-1).astype(np.float32)
            with self._speech_lock:
                self.speech.append(samples)

    def finish(self) -> None:
        """End of utterance: flush the resampler; the remaining frames no longer wait for audio."""
        if self.ended:
            return
        if self.resampler is not None:
            self._take(self.resampler.resample(None))
        self.ended = True

    # ------------------------------------------------------------------ frames

    def _pcm_bound(self, k: int) -> int:
        """First client sample of frame ``k``."""
        return (k * self.rate * self.fps.denominator) // self.fps.numerator

    def _speech_needed(self, k: int) -> int:
        """16 kHz samples frame ``k``'s Whisper window needs (up to its last real step's end)."""
        last = int(window_start(k, self.fps)) + self.cfg.window_steps - self.cfg.pad_left_steps - 1
        return (last + 1) * SAMPLES_PER_STEP

    @property
    def num_frames(self) -> int | None:
        """Frames of the ended utterance: ``ceil(samples * fps / rate)``; None while it runs."""
        if not self.ended:
            return None
        return -(-self.pcm.end * self.fps.numerator // (self.rate * self.fps.denominator))

    @property
    def total_steps(self) -> int | None:
        """Whisper steps of real audio once ended (``floor(50 s)``); None while it runs."""
        return self.speech.end * STEPS_PER_SECOND // SAMPLE_RATE if self.ended else None

    def ready(self, k: int) -> bool:
        """Whether frame ``k`` has its PCM and its Whisper look-ahead."""
        if self.ended:
            return k < self.num_frames
        return self.pcm.end >= self._pcm_bound(k + 1) and self.speech.end >= self._speech_needed(k)

    @property
    def queued_samples(self) -> int:
        """Client samples received and not yet handed out with a frame."""
        return max(0, self.pcm.end - self._pcm_bound(self.next_frame))

    @property
    def done(self) -> bool:
        """Ended and every frame handed out."""
        return self.ended and self.next_frame >= self.num_frames

    def take_frame(self) -> tuple[int, bytes]:
        """Hand out the next frame: (utterance frame number, its PCM as s16le bytes, silence-padded)."""
        k = self.next_frame
        pcm = self.pcm.view(self._pcm_bound(k), self._pcm_bound(k + 1)).astype("<i2").tobytes()
        self.next_frame += 1
        self.pcm.release(self._pcm_bound(self.next_frame))
        return k, pcm

    def recent_span(self, frames: np.ndarray) -> tuple[int, int]:
        """``[start, stop)``, absolute 16 kHz sample numbers, of one Whisper call covering
        ``frames``: the latest <= 30 s of audio, step aligned, starting no later than the first
        step the frames read. The call's first step is ``start // 320``."""
        first_needed = max(0, int(window_start(int(frames.min()), self.fps)) - self.cfg.pad_left_steps)
        with self._speech_lock:
            start = max(self.speech.base, self.speech.end - WINDOW_SAMPLES)
            start = min(-(-start // SAMPLES_PER_STEP) * SAMPLES_PER_STEP, first_needed * SAMPLES_PER_STEP)
            return start, min(self.speech.end, start + WINDOW_SAMPLES)

    def take_speech(self, start: int, stop: int, out: np.ndarray, frames: np.ndarray) -> None:
        """Copy samples ``[start, stop)`` (a :meth:`recent_span`) into ``out`` (float32), then
        release what no later call reads: before ``frames``' first window, or older than 30 s."""
        first_needed = max(0, int(window_start(int(frames.min()), self.fps)) - self.cfg.pad_left_steps)
        with self._speech_lock:
            out[:] = self.speech.view(start, stop)
            self.speech.release(min(first_needed * SAMPLES_PER_STEP, self.speech.end - WINDOW_SAMPLES))


def window_rows(first_step: int, held_steps: int, total_steps: int | None, frames: np.ndarray, fps: Fraction,
                audio: AudioConfig, base: int = 0, zero_row: int | None = None) -> np.ndarray:
    """``[B, window_steps]`` int64 rows of a state table for the frames' windows: step
    ``first_step + i`` is row ``base + i`` (``held_steps`` steps held); steps before 0 or from
    ``total_steps`` on (None: no end yet) are the zero padding, row ``zero_row`` (default
    ``base + held_steps``).

    Raises:
        RuntimeError: a frame reads a step the table does not hold.
    """
    starts = np.asarray(window_start(np.asarray(frames), fps), dtype=np.int64) - audio.pad_left_steps
    steps = starts[:, None] + np.arange(audio.window_steps)[None]
    real = (steps >= 0) & (steps < (total_steps if total_steps is not None else np.iinfo(np.int64).max))
    local = steps - first_step
    missing = real & ((local < 0) | (local >= held_steps))
    if missing.any():
        raise RuntimeError(f"a frame needs Whisper step {int(steps[missing][0])}, the window holds steps "
                           f"{first_step}..{first_step + held_steps - 1}")
    return np.where(real, base + local, base + held_steps if zero_row is None else zero_row)


def gather_windows(states: torch.Tensor, first_step: int, total_steps: int | None, frames: np.ndarray,
                   fps: Fraction, audio: AudioConfig) -> torch.Tensor:
    """Per-frame windows ``[B, window_steps * (L+1), D]`` from the states ``[T, L+1, D]`` of
    steps ``first_step..``; steps before 0 or from ``total_steps`` on (None: no end yet) are
    the zero padding.

    Raises:
        RuntimeError: a frame reads a step the states do not hold.
    """
    rows = window_rows(first_step, states.shape[0], total_steps, frames, fps, audio)
    # padding steps read an appended zero row: one gather, no data-dependent shape (no host sync)
    table = torch.cat([states, states.new_zeros(1, *states.shape[1:])])
    out = table[to_device(rows, states.device)]                      # [B, window_steps, L+1, D]
    return out.reshape(out.shape[0], -1, out.shape[-1])


@dataclass
class StagedWindows:
    """The host half of a :class:`WindowEncoder` call: every utterance's samples end to end in
    (pinned) host memory, ``lengths[b]`` each, and the ``[sum k, window_steps]`` table rows of
    the frames' windows; ``counts[b]``: request ``b``'s frames."""

    flat: torch.Tensor
    lengths: list[int]
    rows: np.ndarray
    counts: list[int]


class WindowEncoder:
    """Whisper windows for the frames of one scheduler step: ONE encoder call for all the
    utterances in it (batch = utterances), whatever their sessions, and one gather.
    :meth:`stage` does the host's part (no device work), :meth:`encode` the device's."""

    def __init__(self, features: AudioFeatures):
        self.features = features
        self.calls = 0

    def warm_up(self, max_requests: int) -> None:
        """One call per batch size ``1..max_requests`` of full 30-s windows, so that a step's
        first call at a new batch size does not pay for its lazy set-up (FFT plans, allocator
        growth and pinned staging blocks are made per size; one suspect, not shown, for the
        steps 90-120 ms longer in the audio phase on an H200, 2026-12-01, BENCHMARKS.md).
        Takes ``max_requests`` encoder calls; meant for CUDA (on the CPU it only costs time)."""
        f = self.features
        window_steps = f.cfg.window_steps
        for b in range(1, max_requests + 1):
            flat = torch.zeros(b * WINDOW_SAMPLES, dtype=torch.float32, pin_memory=f.device.type == "cuda")
            rows = np.zeros((b, window_steps), np.int64)
            self.encode(StagedWindows(flat, [WINDOW_SAMPLES] * b, rows, [1] * b))
        self.calls = 0

    def __call__(self, requests: list[tuple[Utterance, np.ndarray]]) -> list[torch.Tensor]:
        """``[(utterance, [k] frame numbers)]`` -> per request ``[k, window_steps*(L+1), D]``."""
        return self.encode(self.stage(requests)) if requests else []

    def stage(self, requests: list[tuple[Utterance, np.ndarray]]) -> StagedWindows:
        """Copy the requests' recent samples (the real ones only) once, into pinned staging
        memory on CUDA, release what later calls will not read, and compute the window rows.

        Raises:
            RuntimeError: a frame reads a step its utterance no longer holds.
        """
        f = self.features
        spans = [utt.recent_span(frames) for utt, frames in requests]
        lengths = [stop - start for start, stop in spans]
        flat = torch.empty(sum(lengths), dtype=torch.float32, pin_memory=f.device.type == "cuda")
        host, first = flat.numpy(), 0
        for (utt, frames), (start, stop), n in zip(requests, spans, lengths):
            utt.take_speech(start, stop, host[first:first + n], frames)
            first += n
        rows = np.concatenate([                                          # Whisper: 1500 steps per call
            window_rows(start // SAMPLES_PER_STEP, n * STEPS_PER_SECOND // SAMPLE_RATE, utt.total_steps, frames,
                        utt.fps, f.cfg, base=b * SEGMENT_STEPS, zero_row=len(requests) * SEGMENT_STEPS)
            for b, ((utt, frames), (start, _), n) in enumerate(zip(requests, spans, lengths))])
        return StagedWindows(flat, lengths, rows, [len(frames) for _, frames in requests])

    @torch.inference_mode()
    def encode(self, staged: StagedWindows) -> list[torch.Tensor]:
        """Log-mel and Whisper on the model's device (the extractor's padded 30-s windows and its
        copy of the log-mel back to the host cost the H200 host 35 ms per step of 15 frames),
        then one gather: per request ``[k, window_steps*(L+1), D]``."""
        f = self.features
        mel = f.log_mel.from_flat(staged.flat.to(f.device, non_blocking=True), staged.lengths)
        states = f.stack(mel.to(f.dtype))                              # [B, 1500, L+1, D]
        self.calls += 1
        table = torch.cat([states.reshape(-1, *states.shape[2:]), states.new_zeros(1, *states.shape[2:])])
        out = table[to_device(staged.rows, table.device)]              # [sum k, window_steps, L+1, D]
        out = out.reshape(out.shape[0], -1, out.shape[-1])
        return list(torch.split(out, staged.counts))
