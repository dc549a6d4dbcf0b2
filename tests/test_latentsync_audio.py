"""LatentSync audio features: upstream's window rule at 25 and 29.97 fps, and no jump at the 30-s seams."""
import dataclasses
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from talkrt.models.latentsync.audio import ClipStates, LatentSyncAudio, segment_starts
from talkrt.models.latentsync.config import load_latentsync_config
from talkrt.models.latentsync.weights import build_synthetic

SR = 16000


@pytest.fixture(scope="module")
def setup():
    cfg = load_latentsync_config("latentsync16-tiny")
    whisper = build_synthetic(cfg).whisper.eval()

    def features(overlap=None):
        audio = cfg.model.audio if overlap is None else dataclasses.replace(cfg.model.audio,
                                                                            segment_overlap_steps=overlap)
        return LatentSyncAudio(whisper, audio, torch.device("cpu"), torch.float32)
    return cfg, features


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """Gliding tone under a 4 Hz syllable envelope, plus a little noise."""
    t = np.arange(int(seconds * SR)) / SR
    f0 = 150 + 80 * np.sin(2 * np.pi * 0.3 * t)
    tone = np.sin(2 * np.pi * np.cumsum(f0) / SR) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)) ** 2
    return (0.3 * tone + 0.01 * np.random.default_rng(seed).standard_normal(t.size)).astype(np.float32)


def upstream_window(states: torch.Tensor, i: int, fps: Fraction) -> torch.Tensor:
    """audio2feature.get_sliced_feature: steps [c-4, c+6), c = int(i * 50 / fps), each clamped."""
    c = int(i * 50 / float(fps))
    idx = [min(max(k, 0), len(states) - 1) for k in range(c - 4, c + 6)]
    return torch.cat([states[k] for k in idx]).reshape(-1, states.shape[-1])


@pytest.mark.parametrize("fps", [Fraction(25), Fraction(30000, 1001)])
def test_windows_follow_upstream_rule(setup, fps):
    cfg, features = setup
    feats = features()
    samples = speech_like(3.0)
    states = feats.encode(samples)
    a = cfg.model.audio
    assert states.shape == (150, a.hidden_states, a.d_model)
    frames = np.arange(0, int(3 * fps) + 3)            # past the end too: clamped to the last step
    win = feats.clip(samples).windows(frames, fps)
    assert win.shape == (len(frames), a.tokens_per_frame, a.d_model) == (len(frames), 30, 64)
    for i in frames:
        assert torch.equal(win[i], upstream_window(states, int(i), fps)), i
    assert torch.equal(win[0, :a.hidden_states * 4], states[0].repeat(4, 1))   # steps -4..-1 clamp to 0


def test_log_mel_is_whisper_length_with_one_clamp_for_the_clip(setup):
    _, features = setup
    feats = features()
    loud_then_quiet = np.concatenate([speech_like(2.0), 0.001 * speech_like(2.0, seed=1)])
    mel = feats.log_mel(loud_then_quiet)
    assert mel.shape == (80, loud_then_quiet.size // 160)
    # one dynamic-range clamp (8 decades below the clip's maximum) for the whole clip, as upstream
    assert float(mel.max() - mel.min()) == pytest.approx(2.0, abs=1e-5)
    assert float(mel[:, 205:].max()) < float(mel[:, :195].max()) - 1.0      # 60 dB quieter: 1.5 lower
    with pytest.raises(ValueError, match="at least 20 ms"):
        feats.log_mel(np.zeros(100, np.float32))


def test_segments_overlap_and_end_at_the_clip_end():
    assert segment_starts(1000, 250) == [0]
    assert segment_starts(2250, 250) == [0, 750]
    assert segment_starts(4000, 250) == [0, 1250, 2500]
    assert segment_starts(4000, 0) == [0, 1500, 3000]        # upstream: back to back, the last one short


def test_zero_overlap_reproduces_upstream_back_to_back_segments(setup):
    _, features = setup
    feats = features(overlap=0)
    samples = speech_like(35.0)
    states = feats.encode(samples)
    mel = feats.log_mel(samples)
    with torch.no_grad():
        first = feats.model(mel[None, :, :3000])[0]
        tail = mel[:, 3000:]
        second = feats.model(F.pad(tail, (0, 3000 - tail.shape[1]))[None])[0]      # zero-padded log-mel
    assert states.shape[0] == 35 * 50
    assert torch.equal(states[:1500], first)
    assert torch.allclose(states[1500:], second[:250])


def step_jumps(states: torch.Tensor) -> torch.Tensor:
    """Relative change from each step to the next."""
    flat = states.flatten(1)
    return (flat[1:] - flat[:-1]).norm(dim=1) / flat[:-1].norm(dim=1)


def test_no_jump_at_the_30_s_seam(setup):
    """45 s of audio: upstream's back-to-back segments jump at step 1500 (the 30-s boundary), far more
    than a segment that holds the boundary in its middle (the seam-free reference) changes between
    neighbouring steps there; talkrt's overlapped, cross-faded segments change no more than that
    reference anywhere around the seam or across their cross-fade."""
    _, features = setup
    samples = speech_like(45.0)
    ours, naive = features().encode(samples), features(overlap=0).encode(samples)
    feats = features()
    reference = feats.encode_segments(feats.log_mel(samples), [750])[0]           # steps 750..2249
    ref_jump = float(step_jumps(reference[1400 - 750:1600 - 750]).max())
    assert float(step_jumps(naive[1400:1600]).max()) > 2 * ref_jump              # the upstream glitch
    assert float(step_jumps(ours[1400:1600]).max()) <= 1.25 * ref_jump
    assert float(step_jumps(ours[740:1510]).max()) <= 1.25 * float(step_jumps(reference[:1510 - 750]).max())
    # away from the cross-fade, the first segment is used as it is
    assert torch.equal(ours[:740], feats.encode_segments(feats.log_mel(samples), [0])[0][:740])


@pytest.mark.parametrize("fps", [Fraction(25), Fraction(30000, 1001)])
def test_windows_across_the_seam_stream_in_order(setup, fps):
    """Frames asked for chunk by chunk (16 at a time) across the seams of a 65-s clip (three segments)
    get the windows of the whole-clip states, while at most two segments are held."""
    _, features = setup
    feats = features()
    samples = speech_like(65.0)
    states = feats.encode(samples)
    clip = ClipStates(feats, feats.log_mel(samples), keep=2)
    total = int(65 * fps)
    held = 0
    for first in range(0, total, 16):
        frames = np.arange(first, min(first + 16, total))
        win = clip.windows(frames, fps)
        held = max(held, len(clip.cache))
        for row, i in enumerate(frames):
            assert torch.allclose(win[row], upstream_window(states, int(i), fps), atol=1e-6), i
    assert len(clip.starts) == 3 and held == 2
