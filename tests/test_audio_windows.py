"""MuseTalk's audio window rule: frame i takes the 10 padded Whisper steps from floor(50 i / fps)."""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from talkrt.config import load_config
from talkrt.media.audio import num_video_frames
from talkrt.models.audio import SAMPLE_RATE, AudioFeatures, StreamingAudioStates, window_start
from talkrt.models.weights import build_synthetic


@pytest.mark.parametrize("fps", [Fraction(25), Fraction(30), Fraction(30000, 1001)])
def test_window_start_matches_float_rule(fps):
    i = np.arange(0, 5000)
    expected = np.array([math.floor(50 * k / float(fps) + 1e-9) for k in i])
    assert np.array_equal(window_start(i, fps), expected)


def test_window_start_known_values():
    assert list(window_start(np.arange(5), Fraction(25))) == [0, 2, 4, 6, 8]
    assert list(window_start(np.arange(4), Fraction(30))) == [0, 1, 3, 5]
    # 29.97 fps drifts from 30 fps: after 1001 frames exactly 1670 steps (not 1668)
    assert int(window_start(1001, Fraction(30000, 1001))) == 1670


def test_num_video_frames_is_floor_of_duration_times_fps():
    assert num_video_frames(16000 * 3, Fraction(25), 16000) == 75
    assert num_video_frames(16000 * 3 - 1, Fraction(25), 16000) == 74
    assert num_video_frames(16000 * 10, Fraction(30000, 1001), 16000) == 299


@pytest.fixture(scope="module")
def tiny_features():
    cfg = load_config("tiny")
    models = build_synthetic(cfg)
    return cfg, AudioFeatures(models.whisper.eval(), cfg.model.audio, torch.device("cpu"), torch.float32)


def test_encode_shapes_and_padding(tiny_features):
    cfg, feats = tiny_features
    a = cfg.model.audio
    rng = np.random.default_rng(1)
    samples = (rng.standard_normal(16000 * 2 + 123) * 0.1).astype(np.float32)
    states = feats.encode(samples)
    assert states.shape == (100, a.hidden_states, a.d_model)        # floor(50 * 2.0077 s)
    padded = feats.pad(states)
    assert padded.shape[0] == 100 + a.pad_left_steps + a.pad_right_steps
    assert torch.count_nonzero(padded[:a.pad_left_steps]) == 0
    assert torch.count_nonzero(padded[-a.pad_right_steps:]) == 0
    assert torch.equal(padded[a.pad_left_steps:a.pad_left_steps + 100], states)


def test_windows_pick_the_right_steps(tiny_features):
    cfg, feats = tiny_features
    a = cfg.model.audio
    steps = 80
    padded = torch.arange(steps * a.hidden_states * a.d_model, dtype=torch.float32).reshape(steps, a.hidden_states, a.d_model)
    frames = np.array([0, 7, 29])
    win = feats.windows(padded, frames, Fraction(30))
    assert win.shape == (3, a.tokens_per_frame, a.d_model)
    for row, i in enumerate(frames):
        start = (50 * i) // 30
        expected = padded[start:start + a.window_steps].reshape(-1, a.d_model)
        assert torch.equal(win[row], expected)
    with pytest.raises(IndexError):
        feats.windows(padded, np.array([60]), Fraction(25))   # needs step 120 of 80


def test_long_audio_spans_several_whisper_segments(tiny_features):
    _, feats = tiny_features
    samples = (np.random.default_rng(2).standard_normal(16000 * 31) * 0.05).astype(np.float32)
    states = feats.encode(samples)
    assert states.shape[0] == 31 * 50
    # the second segment (steps 1500..) is encoded from real audio, not padding
    assert not torch.allclose(states[1500:1550], states[1500:1550] * 0)


def test_streaming_states_equal_whole_clip_windows_and_stay_bounded(tiny_features):
    cfg, whole_features = tiny_features
    # one 30-s segment per group, so 95 s of speech spans 4 groups and the stream must drop some
    feats = AudioFeatures(whole_features.stack, cfg.model.audio, torch.device("cpu"), torch.float32,
                          segments_per_batch=1)
    samples = (np.random.default_rng(3).standard_normal(16000 * 95 + 7) * 0.05).astype(np.float32)
    fps = Fraction(30000, 1001)
    expected_padded = feats.pad(feats.encode(samples))
    stream = StreamingAudioStates(feats, samples)
    n = num_video_frames(len(samples), fps, SAMPLE_RATE)
    held_steps = []
    for first in range(0, n, 16):
        frames = np.arange(first, min(first + 16, n))
        got = stream.windows(frames, fps)
        assert torch.equal(got, feats.windows(expected_padded, frames, fps)), f"frames {frames[0]}..{frames[-1]}"
        held_steps.append(stream.table.shape[0])
    assert max(held_steps) <= 2 * feats.group_steps + 1          # never more than two groups (+ the zero row)
    assert stream.first_group == 3                               # the earlier groups were dropped
    with pytest.raises(ValueError, match="in order"):
        stream.windows(np.array([0]), fps)
    with pytest.raises(IndexError):
        stream.windows(np.array([n + 10]), fps)
