"""Whisper-tiny audio features and MuseTalk's per-frame audio windows.

Rule (MuseTalk v1.5, ``get_whisper_chunk``):
  * the Whisper encoder turns 16 kHz audio into 50 steps per second; talkrt stacks the
    embedding output and every encoder layer's output, giving ``[T, L+1, D]``
    (``[T, 5, 384]`` for Whisper-tiny), with ``T = floor(50 * seconds)``;
  * the sequence is zero-padded by 4 steps on the left and 12 on the right;
  * video frame ``i`` (time ``i / fps``) takes the 10 padded steps starting at
    ``floor(50 * i / fps)`` (``2 i`` at 25 fps), reshaped to ``[10 * (L+1), D]`` = ``[50, 384]``;
  * the video has ``floor(seconds * fps)`` frames.
MuseTalk truncates fps to an integer first; talkrt uses the exact rational rate, so
29.97 fps (30000/1001) stays in sync over long clips.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import torch
from torch import nn
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from talkrt.config import AudioConfig
from talkrt.streams import to_device

SAMPLE_RATE = 16_000
STEPS_PER_SECOND = 50
SEGMENT_SECONDS = 30
SEGMENT_STEPS = SEGMENT_SECONDS * STEPS_PER_SECOND
SEGMENT_SAMPLES = SEGMENT_SECONDS * SAMPLE_RATE


def window_start(frame_index: int | np.ndarray, fps: Fraction) -> int | np.ndarray:
    """First padded Whisper step of video frame ``i``: ``floor(50 * i / fps)``, exactly."""
    fps = Fraction(fps)
    return (np.asarray(frame_index) * STEPS_PER_SECOND * fps.denominator) // fps.numerator


def whisper_config(audio: AudioConfig) -> WhisperConfig:
    return WhisperConfig(
        d_model=audio.d_model,
        encoder_layers=audio.encoder_layers,
        encoder_attention_heads=audio.encoder_attention_heads,
        encoder_ffn_dim=audio.encoder_ffn_dim,
        decoder_layers=audio.encoder_layers,
        decoder_attention_heads=audio.encoder_attention_heads,
        decoder_ffn_dim=audio.encoder_ffn_dim,
        num_mel_bins=audio.num_mel_bins,
        max_source_positions=SEGMENT_STEPS,
    )


class LogMel:
    """Whisper's log-mel spectrogram of a batch of <= 30-s clips, computed on ``device``:
    ``[B, num_mel_bins, 3000]`` float32, staying there.

    The rule of transformers' ``WhisperFeatureExtractor`` (its torch path, ``dither=0``; itself
    OpenAI Whisper's ``log_mel_spectrogram``): each clip truncated or zero-padded to 30 s,
    ``torch.stft`` (n_fft 400, hop 160, Hann window, centred, reflect padding), the last frame
    dropped, power spectrum, the extractor's Slaney mel filters, ``log10`` clamped at 1e-10,
    floored at the clip's maximum minus 8, then ``(x + 4) / 4``. Unlike the extractor, the
    result is not copied back to the host and only the clips' real samples cross to the
    device (without blocking the host: :func:`talkrt.streams.to_device`).
    """

    def __init__(self, extractor: WhisperFeatureExtractor, device: torch.device):
        if getattr(extractor, "dither", 0.0):
            raise ValueError("LogMel follows the extractor without dither")
        self.device, self.n_fft, self.hop = device, extractor.n_fft, extractor.hop_length
        self.filters = torch.from_numpy(np.ascontiguousarray(extractor.mel_filters.T)).to(device, torch.float32)
        self.window = torch.hann_window(self.n_fft, device=device)

    def __call__(self, clips: list[np.ndarray]) -> torch.Tensor:
        """``clips``: 1-D float arrays of 16 kHz samples in [-1, 1) (any length; past 30 s ignored)."""
        clips = [np.asarray(c, np.float32)[:SEGMENT_SAMPLES] for c in clips]
        flat = to_device(np.concatenate(clips) if clips else np.zeros(0, np.float32), self.device)
        return self.from_flat(flat, [len(c) for c in clips])

    def from_flat(self, flat: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """The clips laid end to end in ``flat`` (1-D float32 on ``device``), ``lengths[i]``
        samples each (each at most 30 s)."""
        wave = torch.zeros(len(lengths), SEGMENT_SAMPLES, device=self.device)
        first = 0
        for row, n in zip(wave, lengths):
            if n:
                row[:n] = flat[first:first + n]
            first += n
        stft = torch.stft(wave, self.n_fft, self.hop, window=self.window, return_complex=True)
        power = stft[..., :-1].abs() ** 2                                   # [B, 201, 3000]
        log = torch.clamp(self.filters @ power, min=1e-10).log10()         # [B, mels, 3000]
        log = torch.maximum(log, log.amax(dim=(1, 2), keepdim=True) - 8.0)
        return (log + 4.0) / 4.0


class WhisperStack(nn.Module):
    """``mel [B, 80, 3000] -> stacked hidden states [B, 1500, L+1, D]`` (exportable)."""

    def __init__(self, encoder: WhisperEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        states = self.encoder(mel, output_hidden_states=True, return_dict=True).hidden_states
        return torch.stack(states, dim=2)


class AudioFeatures:
    """Stage object: 16 kHz mono samples -> Whisper states ``[T, L+1, D]`` -> per-frame windows."""

    def __init__(self, stack: WhisperStack, audio: AudioConfig, device: torch.device, dtype: torch.dtype,
                 segments_per_batch: int = 8):
        self.stack = stack
        self.cfg = audio
        self.device = device
        self.dtype = dtype
        self.segments_per_batch = segments_per_batch
        self.extractor = WhisperFeatureExtractor(feature_size=audio.num_mel_bins, sampling_rate=SAMPLE_RATE)
        self.log_mel = LogMel(self.extractor, device)

    @property
    def group_steps(self) -> int:
        """Whisper steps encoded per call: ``segments_per_batch`` 30-s segments."""
        return self.segments_per_batch * SEGMENT_STEPS

    @torch.inference_mode()
    def encode_group(self, samples: np.ndarray, group: int) -> torch.Tensor:
        """States ``[group_steps or fewer, L+1, D]`` of the ``group``-th run of ``segments_per_batch``
        30-s segments (the last group is shorter; nothing is trimmed here)."""
        seg = SEGMENT_SECONDS * SAMPLE_RATE
        first = group * self.segments_per_batch * seg
        chunks = [samples[i:i + seg] for i in range(first, min(len(samples), first + self.segments_per_batch * seg),
                                                      seg)] or [samples[:0]]
        out = self.stack(self.log_mel(chunks).to(self.dtype))
        return out.reshape(-1, *out.shape[2:])

    def encode(self, samples: np.ndarray) -> torch.Tensor:
        """Whisper states for the whole clip, trimmed to ``floor(50 * seconds)`` steps."""
        seg = SEGMENT_SECONDS * SAMPLE_RATE
        groups = max(1, -(-len(samples) // (seg * self.segments_per_batch)))
        steps = (len(samples) * STEPS_PER_SECOND) // SAMPLE_RATE
        return torch.cat([self.encode_group(samples, g) for g in range(groups)])[:steps]

    def pad(self, states: torch.Tensor) -> torch.Tensor:
        """Zero-pad ``pad_left_steps`` before and ``pad_right_steps`` after the states."""
        left = states.new_zeros(self.cfg.pad_left_steps, *states.shape[1:])
        right = states.new_zeros(self.cfg.pad_right_steps, *states.shape[1:])
        return torch.cat([left, states, right])

    def windows(self, padded: torch.Tensor, frame_indices: np.ndarray, fps: Fraction) -> torch.Tensor:
        """Audio prompts ``[B, window_steps * (L+1), D]`` for the given output frame indices."""
        starts = torch.as_tensor(window_start(frame_indices, fps), device=padded.device)
        steps = starts[:, None] + torch.arange(self.cfg.window_steps, device=padded.device)[None]
        if int(steps.max()) >= padded.shape[0]:
            raise IndexError(f"frame {int(frame_indices.max())} needs audio step {int(steps.max())}, "
                             f"only {padded.shape[0]} padded steps exist")
        window = padded[steps]  # [B, 10, L+1, D]
        return window.reshape(window.shape[0], -1, window.shape[-1])


class StreamingAudioStates:
    """Per-frame windows of a long clip with GPU memory independent of its length.

    Equal to ``features.windows(features.pad(features.encode(samples)), frames, fps)`` (the
    same Whisper calls on the same segment groups), but a group of ``segments_per_batch``
    30-s segments is encoded only when a frame first needs it, and groups before the earliest
    step a call asks for are dropped, so frames must come in non-decreasing order (the
    pipeline's order). At most two groups are held: ~92 MB for Whisper-tiny in fp16 with the
    default 8 segments per group, instead of 0.19 MB per second of speech.
    """

    def __init__(self, features: AudioFeatures, samples: np.ndarray):
        self.features, self.samples = features, samples
        self.total_steps = (len(samples) * STEPS_PER_SECOND) // SAMPLE_RATE
        cfg = features.cfg
        self.padded_steps = cfg.pad_left_steps + self.total_steps + cfg.pad_right_steps
        self.first_group, self.last_group = 0, -1      # groups held in self.table (none yet)
        self.table: torch.Tensor | None = None   # [1 zero row + held groups' steps, L+1, D]
        self.low_water = 0                  # smallest padded step asked for so far

    def _hold(self, lo: int, hi: int) -> None:
        """Make ``self.table`` hold exactly groups ``lo..hi``: groups it already holds are sliced
        out of it, the others encoded."""
        if self.table is not None and (self.first_group, self.last_group) == (lo, hi):
            return
        gs = self.features.group_steps
        parts = [self.table[1 + (g - self.first_group) * gs:1 + (g - self.first_group + 1) * gs]
                 if self.first_group <= g <= self.last_group else self.features.encode_group(self.samples, g)
                 for g in range(lo, hi + 1)]
        self.table = torch.cat([parts[0].new_zeros(1, *parts[0].shape[1:]), *parts])
        self.first_group, self.last_group = lo, hi

    def windows(self, frame_indices: np.ndarray, fps: Fraction) -> torch.Tensor:
        cfg = self.features.cfg
        starts = np.asarray(window_start(frame_indices, fps), dtype=np.int64)
        steps = starts[:, None] + np.arange(cfg.window_steps)[None]
        if steps.size == 0:
            raise ValueError("no frames asked for")
        if int(steps.max()) >= self.padded_steps:
            raise IndexError(f"frame {int(np.max(frame_indices))} needs audio step {int(steps.max())}, "
                             f"only {self.padded_steps} padded steps exist")
        if int(steps.min()) < self.low_water:
            raise ValueError(f"frames must come in order: step {int(steps.min())} was already dropped")
        self.low_water = int(steps.min())
        raw = steps - cfg.pad_left_steps                      # step in the unpadded states
        valid = (raw >= 0) & (raw < self.total_steps)
        group_steps = self.features.group_steps
        groups = raw[valid] // group_steps
        if groups.size:
            self._hold(int(groups.min()), int(groups.max()))
        elif self.table is None:
            self._hold(0, 0)
        rows = np.where(valid, raw - self.first_group * group_steps + 1, 0)
        window = self.table[to_device(rows, self.table.device)]              # [B, 10, L+1, D]
        return window.reshape(window.shape[0], -1, window.shape[-1])
