"""Helpers of the end-to-end benchmark (CPU): tiled speech, --extra parsing, peak RSS sampling."""
import argparse
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.pipeline import PeakRss, parse_extra, tiled_speech
from talkrt.media.audio import load_audio

SPEECH = Path(__file__).parent / "data" / "sample_speech.wav"


def test_tiled_speech_repeats_the_track_to_the_asked_length(tmp_path):
    source = load_audio(SPEECH)
    seconds = 2.5 * source.duration_s
    tiled = load_audio(tiled_speech(SPEECH, seconds, tmp_path))
    assert tiled.sample_rate == source.sample_rate
    assert len(tiled.samples) == round(seconds * source.sample_rate)
    n = len(source.samples)
    # the second copy starts where the first ends. int16 storage: written as round(x * 32767),
    # read back as k / 32768, so the error is at most 0.5 / 32767 + |x| / 32768 < 2 / 32767
    assert np.max(np.abs(tiled.samples[n:2 * n] - source.samples)) < 2.0 / 32767
    assert np.max(np.abs(tiled.samples[:n] - tiled.samples[n:2 * n])) <= 1e-6


def test_parse_extra_names_the_row_and_splits_overrides():
    assert parse_extra("uf=pipeline.encoder.preset=ultrafast,pipeline.batch_size=32") == (
        "talkrt-uf", ["pipeline.encoder.preset=ultrafast", "pipeline.batch_size=32"])
    for bad in ("uf", "=a=b", "uf=nokey"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_extra(bad)


def test_peak_rss_sees_a_transient_allocation():
    with PeakRss(interval_s=0.005) as rss:
        before = PeakRss.current_mb()
        block = np.ones(64 * 2**20, dtype=np.uint8)     # 64 MB, touched
        deadline = time.monotonic() + 5.0               # a loaded machine may delay the sampler thread
        while rss.peak_mb < before + 48 and time.monotonic() < deadline:
            time.sleep(0.01)
        del block
    assert rss.peak_mb >= before + 48
