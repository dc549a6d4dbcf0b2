"""Segment-parallel libx264: frames in order, exact count, audio muxed, nothing left on failure."""
from fractions import Fraction

import numpy as np
import pytest
from media_factory import make_audio, pattern_frame

from talkrt.media.frames import iter_video_frames
from talkrt.media.probe import probe_output
from talkrt.media.segments import SegmentedMp4Writer


def _frames(n, w=96, h=64):
    return [pattern_frame(i, w, h, "gradient") for i in range(n)]


@pytest.mark.parametrize("workers, segment_frames, n", [(3, 5, 23), (2, 50, 12), (4, 1, 6)])
def test_segments_join_in_order(tmp_path, workers, segment_frames, n):
    audio = tmp_path / "a.wav"
    make_audio(audio, n / 25 + 0.5, sample_rate=16000)
    out = tmp_path / "out.mp4"
    source = _frames(n)
    with SegmentedMp4Writer(out, 96, 64, Fraction(25), audio_path=audio, metadata={"k": "v"},
                            workers=workers, segment_frames=segment_frames, crf=12) as w:
        for f in source:
            w.write_rgb(f)
    info = probe_output(out)
    assert info.num_frames == n and info.fps == 25 and info.has_audio
    assert abs(info.audio_duration_s - n / 25) < 1 / 25          # cut to the video, as Mp4Writer does
    assert info.metadata["k"] == "v"
    decoded = list(iter_video_frames(out))
    for i, frame in enumerate(decoded):   # each frame is nearest to its own source frame: order is kept
        errors = [np.abs(frame.astype(int) - s).mean() for s in source]
        assert int(np.argmin(errors)) == i, (i, errors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "out.mp4"]   # segments cleaned up


def test_failure_leaves_nothing(tmp_path):
    out = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError):
        with SegmentedMp4Writer(out, 96, 64, Fraction(25), workers=2, segment_frames=3) as w:
            for f in _frames(7):
                w.write_rgb(f)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_bad_frame_and_dead_worker_are_reported(tmp_path):
    from talkrt.errors import TalkrtError
    out = tmp_path / "out.mp4"
    w = SegmentedMp4Writer(out, 96, 64, Fraction(25), workers=1, segment_frames=4)
    with pytest.raises(ValueError, match="expects uint8"):
        w.write_rgb(np.zeros((10, 10, 3), np.uint8))
    w.workers[0].process.kill()                         # an encoder process dies mid-run
    w.workers[0].process.wait()
    with pytest.raises(TalkrtError, match="segment encoder failed"):
        for f in _frames(40):
            w.write_rgb(f)
        w.close()
    w.abort()
    assert list(tmp_path.iterdir()) == []
