"""talkrt.serve pieces without a server: protocol messages, the frame sink, one utterance's
frames and PCM, and the live Whisper windows against whole-clip features."""

from __future__ import annotations

import json
import time
from fractions import Fraction

import numpy as np
import pytest
import torch

from talkrt.config import load_config
from talkrt.serve.audio import Utterance, WindowEncoder, lookahead_ms
from talkrt.serve.protocol import (MAX_AUDIO_BYTES, ProtocolError, check_audio, pack_frame, parse_control, parse_start,
                                   unpack_frame)
from talkrt.serve.sinks import MAX_EVENTS, BufferSink, LiveFrame

AUDIO = load_config("tiny").model.audio


def test_frame_message_round_trip():
    jpeg, pcm = b"\xff\xd8jpeg\xff\xd9", bytes(range(200)) * 2
    header, j, p = unpack_frame(pack_frame(7, 0.28, True, jpeg, pcm))
    assert header == {"index": 7, "pts": 0.28, "speaking": True, "jpeg_bytes": len(jpeg), "pcm_bytes": len(pcm)}
    assert (j, p) == (jpeg, pcm)
    with pytest.raises(ValueError):
        unpack_frame(pack_frame(0, 0.0, False, jpeg, pcm)[:-1])


@pytest.mark.parametrize("text, code", [
    (None, "expected_start"), ("hello", "bad_json"), ("[1]", "bad_message"), ('{"type":"end"}', "expected_start"),
    ('{"type":"start","sample_rate":16000}', "bad_start"),
    ('{"type":"start","avatar":"a","sample_rate":7999}', "bad_sample_rate"),
    ('{"type":"start","avatar":"a","sample_rate":48001}', "bad_sample_rate"),
    ('{"type":"start","avatar":"a","sample_rate":true}', "bad_sample_rate"),
    ('{"type":"start","avatar":"a","sample_rate":"16000"}', "bad_sample_rate"),
    (json.dumps({"type": "start", "avatar": "a" * 5000, "sample_rate": 16000}), "too_large"),
])
def test_bad_start_messages(text, code):
    with pytest.raises(ProtocolError) as err:
        parse_start(text)
    assert err.value.code == code and err.value.close_code == 1008


def test_start_and_control_messages():
    assert parse_start('{"type":"start","avatar":"abc","sample_rate":44100}').sample_rate == 44100
    assert [parse_control(json.dumps({"type": t})) for t in ("interrupt", "end", "stop")] == ["interrupt", "end", "stop"]
    with pytest.raises(ProtocolError, match="unknown message type"):
        parse_control('{"type":"start"}')
    check_audio(bytes(MAX_AUDIO_BYTES))
    with pytest.raises(ProtocolError):
        check_audio(bytes(MAX_AUDIO_BYTES + 1))


def test_buffer_sink_drops_oldest_and_counts():
    woken = []
    sink = BufferSink(3, wake=lambda: woken.append(1))
    for i in range(5):
        sink.put(LiveFrame(i, i / 25, False, b"j", b"p", 0.0, 0.0))
    assert [f.index for f in sink.take()] == [2, 3, 4]
    assert (sink.dropped, sink.put_count, len(woken)) == (2, 5, 5)
    sink.close()
    sink.put(LiveFrame(9, 0.0, False, b"", b"", 0.0, 0.0))
    assert sink.take() == []


def test_buffer_sink_drops_frames_that_waited_too_long_not_bursts():
    sink = BufferSink(1000, max_wait_s=0.05)
    for i in range(300):                                  # a burst from a late step: nothing has waited
        sink.put(LiveFrame(i, i / 25, False, b"j", b"p", 0.0, 0.0))
    assert sink.dropped == 0 and [f.index for f in sink.take()] == list(range(300))
    sink.put(LiveFrame(300, 12.0, False, b"j", b"p", 0.0, 0.0))
    time.sleep(0.1)                                       # the reader stalls
    sink.put(LiveFrame(301, 12.04, False, b"j", b"p", 0.0, 0.0))
    assert sink.dropped == 1 and [f.index for f in sink.take()] == [301]


def test_buffer_sink_events_wait_apart_from_frames():
    woken = []
    sink = BufferSink(2, wake=lambda: woken.append(1))
    for i in range(MAX_EVENTS + 3):
        sink.notify({"type": "speech_dropped", "index": i})
    sink.put(LiveFrame(0, 0.0, False, b"j", b"p", 0.0, 0.0))
    assert [e["index"] for e in sink.take_events()] == list(range(3, MAX_EVENTS + 3))   # the oldest dropped
    assert sink.take_events() == [] and [f.index for f in sink.take()] == [0] and len(woken) == MAX_EVENTS + 4
    sink.notify({"type": "speech_dropped", "index": 99})
    sink.close()
    sink.notify({"type": "speech_dropped", "index": 100})
    assert sink.take_events() == []


@pytest.mark.parametrize("rate", [16000, 44100, 8000])
def test_utterance_frames_carry_the_pcm_sent(rate):
    fps = Fraction(25)
    rng = np.random.default_rng(rate)
    pcm = rng.integers(-20000, 20000, int(rate * 0.37), dtype=np.int16)   # not a whole number of frames
    utt = Utterance(rate, fps, AUDIO)
    cuts = np.cumsum(rng.integers(1, rate // 40, 200))
    pieces = np.split(pcm, cuts[cuts < len(pcm)])
    fed = 0
    for piece in pieces:
        utt.feed(piece.astype("<i2").tobytes())
        fed += len(piece)
        # frame k needs its own PCM and the look-ahead: (floor(50 k / 25) + 6) steps of 20 ms
        k = utt.next_frame
        needs_s = (2 * k + 6) / 50
        if rate == 16000:
            assert utt.ready(k) == (fed >= needs_s * rate)
        while utt.ready(utt.next_frame):
            utt.take_frame()
    taken = utt.next_frame
    assert taken >= int((0.37 - 0.12) * 25) - 1
    utt.finish()
    assert utt.num_frames == -(-len(pcm) * 25 // rate)
    out = []
    utt_frames = []
    while not utt.done:
        utt_frames.append(utt.take_frame())
    # re-run on a fresh utterance to read every frame's PCM from the start
    utt2 = Utterance(rate, fps, AUDIO)
    utt2.feed(pcm.astype("<i2").tobytes())
    utt2.finish()
    while not utt2.done:
        out.append(utt2.take_frame()[1])
    joined = b"".join(out)
    assert joined[:2 * len(pcm)] == pcm.astype("<i2").tobytes()
    assert set(joined[2 * len(pcm):]) <= {0}
    assert len(joined) == 2 * (utt2.num_frames * rate // 25)
    assert abs(utt2.speech.end - len(pcm) * 16000 / rate) <= 2 + 16000 * 0.01


def test_lookahead_ms():
    assert lookahead_ms(Fraction(25), AUDIO) == pytest.approx(120.0)
    assert 100 <= lookahead_ms(Fraction(30000, 1001), AUDIO) <= 140


@pytest.fixture(scope="module")
def features():
    from talkrt.models.audio import AudioFeatures
    from talkrt.models.weights import load_models
    cfg = load_config("tiny")
    models = load_models(cfg, None, torch.device("cpu"), torch.float32)
    return AudioFeatures(models.whisper, cfg.model.audio, torch.device("cpu"), torch.float32)


def _speechlike(seconds: float) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    return (0.3 * env * np.sin(2 * np.pi * 220 * t * (1 + 0.1 * np.sin(2 * np.pi * t)))).astype(np.float32)


def test_live_windows_match_whole_clip_features(features):
    """Whole utterance arrived: the windows equal the offline pipeline's. Streaming (each frame
    encoded the moment its look-ahead arrives): within the stated tolerance of them."""
    fps = Fraction(25)
    clip = _speechlike(2.0)
    pcm = np.round(clip * 32768).clip(-32768, 32767).astype("<i2")
    samples = pcm.astype(np.float32) / 32768.0
    frames = np.arange(50)
    whole = features.windows(features.pad(features.encode(samples)), frames, fps)
    encoder = WindowEncoder(features)

    utt = Utterance(16000, fps, AUDIO)
    utt.feed(pcm.tobytes())
    utt.finish()
    both = encoder([(utt, frames[:25]), (utt, frames[25:])])        # one Whisper call, batch 2
    assert encoder.calls == 1
    assert torch.allclose(torch.cat(both), whole, atol=1e-4)

    live = Utterance(16000, fps, AUDIO)
    streamed = []
    for k in range(48):                        # frames whose look-ahead lies inside the clip
        need = (2 * k + 6) * 320
        live.feed(pcm[live.pcm.end:need].tobytes())
        assert live.ready(k)
        streamed.append(encoder([(live, np.array([k]))])[0])
    diff = (torch.cat(streamed) - whole[:48]).abs()
    scale = whole[:48].abs().mean()
    # stated tolerance: mean error under 1% of the mean feature magnitude (measured 0.1% with the
    # tiny synthetic Whisper; the newest steps see zeros where the whole clip has future audio)
    assert float(diff.mean()) < 0.01 * float(scale), (float(diff.mean()), float(scale))


def test_window_encoder_warm_up_runs_every_batch_size_and_leaves_results_unchanged(features):
    """The warm-up sweeps Whisper batch sizes 1..n (one encoder call each) and does not change
    what a later call returns (no state carried over)."""
    pcm = np.round(_speechlike(1.0) * 32768).clip(-32768, 32767).astype("<i2")
    fps = Fraction(25)
    utt = Utterance(16000, fps, AUDIO)
    utt.feed(pcm.tobytes())
    utt.finish()
    cold = WindowEncoder(features)([(utt, np.arange(10))])[0]
    encoder = WindowEncoder(features)
    calls = []
    original = encoder.encode
    encoder.encode = lambda staged: calls.append(len(staged.lengths)) or original(staged)
    encoder.warm_up(3)
    assert calls == [1, 2, 3] and encoder.calls == 0
    utt2 = Utterance(16000, fps, AUDIO)
    utt2.feed(pcm.tobytes())
    utt2.finish()
    assert torch.equal(encoder([(utt2, np.arange(10))])[0], cold)
