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


def test_encoder_loop_splits_the_wall_of_an_encoder_bound_run():
    """The run's wall = the encoder thread's loop + a fixed part outside it; the loop's writing
    time against the encoder alone says whether libx264 is slowed inside the run."""
    from benchmarks.pipeline import encoder_loop, overlap_table
    row = {"seconds": 3.0, "fps": 250 / 3.0, "encoder_thread_seconds": {
        "encode": 2.5, "encoder_idle": 0.1, "download_wait": 0.1, "producer_wait": 2.0}}
    loop = encoder_loop(row, alone_seconds=2.25)
    assert loop["encoder_loop_share"] == pytest.approx(0.9)
    assert loop["outside_encoder_loop_s"] == pytest.approx(0.3)
    assert encoder_loop({"seconds": 1.0, "encoder_thread_seconds": {}}, 1.0) == {}
    row.update(loop, resolution="720p", path="talkrt", encoder_alone_fps=250 / 2.25, engines_alone_fps=500.0,
               share_of_bound=0.75, host_cores=4.0, encoder_alone_cores=4.5)
    table = overlap_table({"rows": [row]})
    assert "| 90% | 0.30 |" in table and "| 75% |" in table
