"""Jobs and live sessions on one scheduler, without HTTP: the real renderer (tiny config, CPU), a
real live session and real job rows, scheduler steps driven by hand at chosen times. A wrapper
records what each batch held."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from job_steps import JOB_OVERRIDES
from serve_server import pcm, sample_clip
from talkrt.config import load_config
from talkrt.media.frames import read_video_frames
from talkrt.media.probe import probe_video
from talkrt.serve.avatars import LiveAvatar
from talkrt.serve.jobwork import JobFrames
from talkrt.serve.metrics import ServeMetrics
from talkrt.serve.renderer import FrameRenderer
from talkrt.serve.scheduler import Scheduler, SchedulerStopped
from talkrt.serve.session import LiveSession
from talkrt.serve.sinks import BufferSink
from talkrt.session import build_session

FPS = Fraction(25)
LEAD = 0.08


class Recorder:
    """The renderer, recording (live items, [job rows per part]) of every batch."""

    def __init__(self, render: FrameRenderer):
        self.render, self.batches = render, []

    @property
    def last_seconds(self) -> float:
        return self.render.last_seconds

    @property
    def last_phases(self) -> dict:
        return self.render.last_phases

    def prepare(self, items, jobs=()):
        self.batches.append((len(items), [len(j) for j in jobs]))
        return self.render.prepare(items, jobs)

    def launch(self, prepared):
        return self.render.launch(prepared)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return build_session(load_config("tiny", list(JOB_OVERRIDES)), device="cpu",
                         cache_dir=tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="module")
def avatar(parts, tmp_path_factory):
    clip = sample_clip(tmp_path_factory.mktemp("clip"), 0, 4)
    return LiveAvatar("a" * 24, parts.preparer(clip, probe_video(clip)), read_video_frames(clip, 1 << 30))


@pytest.fixture(scope="module")
def windows(parts):
    """[40, tokens, D] real Whisper windows of 40 frames of speech-like audio."""
    f = parts.audio_features
    t = np.arange(16000 * 2) / 16000
    samples = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    with torch.inference_mode():
        return f.windows(f.pad(f.encode(samples)), np.arange(40), FPS)


def _job(avatar, windows, rows: int, first: int = 0, owner: str = "job") -> JobFrames:
    src = np.arange(first, first + rows) % avatar.prepared.num_frames
    return JobFrames(owner, (avatar.prepared,), np.zeros(rows, np.int64), src.astype(np.int64),
                     windows[first:first + rows])


def _speaking(parts, avatar, t0: float, **kwargs) -> tuple[Recorder, Scheduler, BufferSink]:
    """A scheduler (not started: steps are driven by hand) with one session that has 2 s of
    speech queued from ``t0``."""
    recorder = Recorder(FrameRenderer(parts))
    scheduler = Scheduler(recorder, 8, ServeMetrics(), lead=LEAD, **kwargs)
    sink = BufferSink(1000)
    session = LiveSession("s1", avatar, 16000, parts.cfg.model.audio, sink, start=t0)
    session.feed(pcm(2.0, seed=1))
    session.end()
    scheduler.add(session)
    return recorder, scheduler, sink


def _no_wait():
    return None


def test_live_frames_first_job_rows_fill_the_rest(parts, avatar, windows):
    t0 = 1000.0
    recorder, scheduler, sink = _speaking(parts, avatar, t0)
    first, second = _job(avatar, windows, 20, 0, "first"), _job(avatar, windows, 6, 20, "second")
    scheduler.submit(first)
    scheduler.submit(second)
    # slots 0..7 due by t0 + 0.2 + LEAD: eight live speech frames fill the bucket, no job row
    assert scheduler.step(t0 + 0.2)
    assert recorder.batches[-1] == (8, [])
    # one more slot due: it goes first, seven job rows (oldest job first) fill the rest
    assert scheduler.step(t0 + 0.24)
    assert recorder.batches[-1] == (1, [7])
    # nothing live due: job rows only, the first job before the second
    while scheduler.step(t0 + 0.24):
        pass
    assert recorder.batches[2:] == [(0, [8]), (0, [5, 3]), (0, [3])]
    faces = first.wait(_no_wait)
    assert faces.shape == (20, 128, 128, 3) and faces.dtype == np.uint8
    assert second.wait(_no_wait).shape == (6, 128, 128, 3)
    # one UNet + VAE call made the same faces for rows that shared a batch and rows that did not
    alone = _job(avatar, windows, 20, 0, "again")
    scheduler.submit(alone)
    while scheduler.step(t0 + 0.24):
        pass
    assert np.array_equal(alone.wait(_no_wait), faces)
    frames = sink.take()
    assert [f.index for f in frames] == list(range(9)) and all(f.speaking for f in frames)
    assert scheduler.stats.job_frames == 46 and scheduler.stats.shared_batches == 1


def test_job_rows_in_a_step_with_live_speech_can_be_capped(parts, avatar, windows):
    t0 = 2000.0
    recorder, scheduler, _ = _speaking(parts, avatar, t0, job_rows_with_live=2)
    scheduler.submit(_job(avatar, windows, 10))
    scheduler.step(t0 + 0.2 - 7 / 25)                     # slot 0 only
    assert recorder.batches[-1] == (1, [2])
    scheduler.step(t0 + 0.2 - 7 / 25)                     # no live frame due: the whole bucket
    assert recorder.batches[-1] == (0, [8])


def test_a_jobs_bad_rows_fail_that_job_only(parts, avatar, windows):
    t0 = 3000.0
    recorder, scheduler, sink = _speaking(parts, avatar, t0)
    good = _job(avatar, windows, 3, 0, "good")
    bad = JobFrames("bad", (avatar.prepared,), np.zeros(2, np.int64), np.zeros(2, np.int64),
                    windows[:2, :, :-1])                   # a wrong feature width: the UNet refuses it
    scheduler.submit(bad)
    scheduler.submit(good)
    scheduler.step(t0)                                     # slots 0..2 and both jobs in one batch
    assert recorder.batches[0] == (3, [2, 3])
    with pytest.raises(RuntimeError):
        bad.wait(_no_wait)
    assert good.wait(_no_wait).shape == (3, 128, 128, 3)
    frames = sink.take()
    assert [f.index for f in frames] == [0, 1, 2] and all(f.speaking for f in frames)
    assert scheduler.stats.job_failures == 1 and scheduler.stats.failures == 0


def test_stopping_fails_the_rows_still_waiting(parts, avatar, windows):
    scheduler = Scheduler(Recorder(FrameRenderer(parts)), 8, ServeMetrics())
    work = _job(avatar, windows, 4)
    scheduler.submit(work)
    scheduler.stop()
    with pytest.raises(SchedulerStopped):
        work.wait(_no_wait)
    late = _job(avatar, windows, 4)
    scheduler.submit(late)
    with pytest.raises(SchedulerStopped):
        late.wait(_no_wait)


def test_overlapped_steps_deliver_a_batch_one_step_later_and_the_same_frames(parts, avatar, windows):
    t0 = 3000.0
    _, plain, plain_sink = _speaking(parts, avatar, t0)
    plain.step(t0 + 0.21)
    expected = plain_sink.take()
    assert [f.index for f in expected] == list(range(8))
    recorder, overlapped, sink = _speaking(parts, avatar, t0)
    assert overlapped.step(t0 + 0.21, overlap=True)       # slots 0..7 launched, none delivered yet
    assert sink.take() == [] and overlapped.stats.batches == 0
    assert overlapped.step(t0 + 0.25, overlap=True)      # slot 8 launched, slots 0..7 finished
    got = sink.take()
    assert [f.index for f in got] == list(range(8)) and overlapped.stats.batches == 1
    assert [f.jpeg for f in got] == [f.jpeg for f in expected]
    assert overlapped.step(t0 + 0.25, overlap=True)      # nothing new: slot 8 finished
    assert [f.index for f in sink.take()] == [8] and recorder.batches == [(8, []), (1, [])]
    assert not overlapped.step(t0 + 0.25, overlap=True)
    # the renderer's host time goes to its phases, not to "schedule", whichever step it fell in
    phase = {p: overlapped.metrics.registry.get_sample_value("talkrt_step_phase_seconds_total", {"phase": p})
             for p in ("schedule", "model", "audio")}
    assert phase["model"] > 0 and phase["audio"] > 0 and phase["schedule"] < 0.5 * phase["model"]
