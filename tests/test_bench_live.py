"""benchmarks.live: when a speech frame's audio has arrived, checked against the server's own rule
(:class:`talkrt.serve.audio.Utterance`) packet by packet."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from benchmarks.live_clients import PACKET, need_packets
from talkrt.config import load_config
from talkrt.serve.audio import Utterance

AUDIO = load_config("tiny").model.audio


@pytest.mark.parametrize("fps, seconds", [(Fraction(25), 1.3), (Fraction(30000, 1001), 0.97)])
def test_need_packets_match_the_servers_readiness(fps, seconds):
    samples = int(16000 * seconds)
    need = need_packets(samples, fps, AUDIO.window_steps, AUDIO.pad_left_steps)
    utt = Utterance(16000, fps, AUDIO)
    pcm = np.zeros(samples, "<i2").tobytes()
    first_ready = np.full(len(need), -2)
    for i in range(0, samples, PACKET):
        utt.feed(pcm[2 * i:2 * (i + PACKET)])
        for k in range(len(need)):
            if first_ready[k] == -2 and utt.ready(k):
                first_ready[k] = i // PACKET
    utt.finish()
    assert utt.num_frames == len(need)
    first_ready[first_ready == -2] = -1          # ready only once the utterance ended
    assert np.array_equal(first_ready, need)
    assert need[0] == 5 and (need >= 0).sum() < len(need)   # 120 ms look-ahead; the last frames wait for end
