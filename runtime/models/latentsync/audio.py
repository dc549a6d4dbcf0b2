"""LatentSync's Whisper-tiny audio features: stacked encoder states and per-frame windows.

Rules (LatentSync ``latentsync/whisper/audio2feature.py`` and its ``whisper/transcribe.py``):

* the log-mel spectrogram (Whisper's: 80 bins, 100 frames/s, dynamic range clamped to 8
  below the maximum) is computed over the whole clip, then cut into 30-s segments of 3000
  frames; a short segment is padded with zeros in the normalised log-mel domain;
* each segment goes through the Whisper encoder; the embedding output and every layer's
  output are stacked, all *before* the final layer norm (``include_embeddings`` in upstream's
  encoder), giving ``[steps, L+1, D]`` = ``[., 5, 384]`` at 50 steps/s; the clip has
  ``T = floor(mel frames / 2) = floor(50 * seconds)`` steps;
* video frame ``i`` at ``fps`` takes steps ``[c - 4, c + 6)``, ``c = floor(50 i / fps)``
  (upstream ``int(i * 50 / fps)``; talkrt uses the exact rational rate, as
  :func:`talkrt.models.audio.window_start`), each clamped to ``[0, T - 1]``, flattened to
  ``[10 * 5, 384]`` = 50 tokens (step-major).

The seam: upstream encodes back-to-back segments, so steps near each 30-s boundary see no
context on one side (and conv padding), and the features jump there (LatentSync issues #101,
#121). talkrt overlaps the segments by ``segment_overlap_steps`` (the last one ends at the
clip's end) and cross-fades them: each segment's weight ramps linearly from its edges over
half the overlap, and the weights are normalised per step. ``segment_overlap_steps: 0``
reproduces upstream's back-to-back segments.
"""

from __future__ import annotations

from collections import OrderedDict
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F
from talkrt.models.audio import SAMPLE_RATE, SEGMENT_STEPS, window_start
from talkrt.models.latentsync.config import LatentSyncAudioConfig
from torch import nn
from transformers import WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

MEL_PER_STEP = 2                        # Whisper's second conv has stride 2
SEGMENT_MEL = SEGMENT_STEPS * MEL_PER_STEP


class WhisperStates(nn.Module):
    """``mel [B, n_mels, 3000] -> states [B, 1500, L+1, D]``: embedding output and each layer's
    output, none through the encoder's final ``layer_norm`` (exportable)."""

    def __init__(self, encoder: WhisperEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        x = F.gelu(enc.conv2(F.gelu(enc.conv1(mel)))).permute(0, 2, 1)
        x = x + enc.embed_positions.weight[: x.shape[1]].to(x.dtype)
        states = [x]
        for layer in enc.layers:
            x = layer(x, None)
            states.append(x)
        return torch.stack(states, dim=2)


def segment_starts(total_steps: int, overlap: int) -> list[int]:
    """First step of each 1500-step Whisper segment of a ``total_steps`` clip.

    ``overlap == 0``: upstream's back-to-back segments (the last may be short, padded).
    ``overlap > 0``: a hop of ``1500 - overlap`` and a last segment that ends at the clip's end.
    """
    if overlap == 0 or total_steps <= SEGMENT_STEPS:
        return list(range(0, max(total_steps, 1), SEGMENT_STEPS))
    return list(range(0, total_steps - SEGMENT_STEPS, SEGMENT_STEPS - overlap)) + [total_steps - SEGMENT_STEPS]


def segment_weights(starts: list[int], total_steps: int, overlap: int) -> list[np.ndarray]:
    """Cross-fade weight of each segment over its valid steps (not yet normalised).

    A segment's weight is ``min(1, d_left / r, d_right / r)`` with ``r = overlap / 2`` and
    ``d`` the distance in steps to its edge, where an edge at the clip's start or end does not
    count; upstream's back-to-back segments get weight 1.
    """
    ramp = max(overlap / 2, 1.0)
    out = []
    for s in starts:
        t = np.arange(s, min(s + SEGMENT_STEPS, total_steps), dtype=np.float64)
        if overlap == 0:
            out.append(np.ones_like(t))
            continue
        left = np.full_like(t, np.inf) if s == 0 else (t - s + 1) / ramp
        right = np.full_like(t, np.inf) if s + SEGMENT_STEPS >= total_steps else (s + SEGMENT_STEPS - t) / ramp
        out.append(np.minimum(1.0, np.minimum(left, right)))
    return out


class LatentSyncAudio:
    """Stage object: Whisper states for a clip and the per-frame 50-token windows.

    ``states = feats.clip(samples)``; ``states.windows(frame_indices, fps) -> [B, 50, D]``.
    """

    def __init__(self, model: WhisperStates, cfg: LatentSyncAudioConfig, device: torch.device, dtype: torch.dtype,
                 segments_per_batch: int = 8):
        self.model, self.cfg = model, cfg
        self.device, self.dtype = device, dtype
        self.segments_per_batch = segments_per_batch
        self.extractor = WhisperFeatureExtractor(feature_size=cfg.num_mel_bins, sampling_rate=SAMPLE_RATE)

    def log_mel(self, samples: np.ndarray) -> torch.Tensor:
        """Whisper log-mel of the whole clip, ``[n_mels, floor(len / 160)]`` float32 (one max clamp)."""
        samples = np.asarray(samples, dtype=np.float32)
        if samples.ndim != 1 or samples.size < 2 * 160:
            raise ValueError(f"need mono 16 kHz samples of at least 20 ms (one Whisper step), got shape "
                             f"{samples.shape}")
        mel = self.extractor(samples, sampling_rate=SAMPLE_RATE, return_tensors="pt", padding="longest",
                             truncation=False).input_features[0]
        return mel[:, : samples.size // 160]

    @torch.inference_mode()
    def encode_segments(self, mel: torch.Tensor, starts: list[int]) -> torch.Tensor:
        """States ``[len(starts), 1500, L+1, D]`` of the segments starting at those steps."""
        chunks = []
        for s in starts:
            seg = mel[:, s * MEL_PER_STEP: s * MEL_PER_STEP + SEGMENT_MEL]
            chunks.append(F.pad(seg, (0, SEGMENT_MEL - seg.shape[1])))
        out = []
        for i in range(0, len(chunks), self.segments_per_batch):
            batch = torch.stack(chunks[i:i + self.segments_per_batch]).to(self.device, self.dtype)
            out.append(self.model(batch))
        return torch.cat(out)

    def clip(self, samples: np.ndarray) -> ClipStates:
        return ClipStates(self, self.log_mel(samples))

    def encode(self, samples: np.ndarray) -> torch.Tensor:
        """All states of a clip, ``[T, L+1, D]`` (memory grows with the clip; see :class:`ClipStates`)."""
        clip = self.clip(samples)
        return clip.states(0, clip.total_steps)


class ClipStates:
    """States of one clip, encoded segment by segment as windows need them.

    At most ``keep`` segment outputs are held (~5.8 MB each for Whisper-tiny in fp16), so memory
    does not grow with the clip when frames are asked for in order.
    """

    def __init__(self, audio: LatentSyncAudio, mel: torch.Tensor, keep: int = 4):
        self.audio, self.mel, self.keep = audio, mel, keep
        self.total_steps = mel.shape[1] // MEL_PER_STEP
        overlap = audio.cfg.segment_overlap_steps
        self.starts = segment_starts(self.total_steps, overlap)
        self.weights = segment_weights(self.starts, self.total_steps, overlap)
        self.cache: OrderedDict[int, torch.Tensor] = OrderedDict()

    def _segments(self, indices: list[int]) -> list[torch.Tensor]:
        missing = [j for j in indices if j not in self.cache]
        if missing:
            for j, states in zip(missing, self.audio.encode_segments(self.mel, [self.starts[j] for j in missing])):
                self.cache[j] = states
        for j in indices:
            self.cache.move_to_end(j)
        result = [self.cache[j] for j in indices]
        while len(self.cache) > max(self.keep, len(indices)):
            self.cache.popitem(last=False)
        return result

    def states(self, lo: int, hi: int) -> torch.Tensor:
        """Cross-faded states of steps ``lo..hi-1`` (``0 <= lo < hi <= T``): ``[hi - lo, L+1, D]``."""
        if not 0 <= lo < hi <= max(self.total_steps, 1):
            raise IndexError(f"steps {lo}..{hi - 1} asked for; the clip has {self.total_steps}")
        idx = [j for j, s in enumerate(self.starts) if s < hi and s + SEGMENT_STEPS > lo]
        acc = total = None
        for j, seg in zip(idx, self._segments(idx)):
            s = self.starts[j]
            a, b = max(lo, s), min(hi, s + len(self.weights[j]))
            if a >= b:
                continue
            w = torch.as_tensor(self.weights[j][a - s:b - s], dtype=torch.float32, device=seg.device)
            if acc is None:
                acc = seg.new_zeros((hi - lo, *seg.shape[1:]), dtype=torch.float32)
                total = acc.new_zeros(hi - lo)
            acc[a - lo:b - lo] += seg[a - s:b - s].float() * w[:, None, None]
            total[a - lo:b - lo] += w
        return (acc / total[:, None, None]).to(self.audio.dtype)

    def windows(self, frame_indices: np.ndarray, fps: Fraction) -> torch.Tensor:
        """Audio tokens ``[B, window_steps * (L+1), D]`` for output frames ``frame_indices``."""
        cfg = self.audio.cfg
        frame_indices = np.asarray(frame_indices, dtype=np.int64).reshape(-1)
        if frame_indices.size == 0:
            raise ValueError("no frames asked for")
        centre = np.asarray(window_start(frame_indices, Fraction(fps)), dtype=np.int64)
        steps = centre[:, None] - cfg.window_before_steps + np.arange(cfg.window_steps)[None]
        steps = np.clip(steps, 0, self.total_steps - 1)
        lo, hi = int(steps.min()), int(steps.max()) + 1
        table = self.states(lo, hi)
        window = table[torch.as_tensor(steps - lo, device=table.device)]     # [B, 10, L+1, D]
        return window.reshape(window.shape[0], -1, window.shape[-1])
