"""The scheduler: one per process (one per GPU), in its own thread.

Every step it asks each session for the slots due within ``lead`` seconds. Idle slots are
answered at once from the avatar's cached JPEGs (no model time). Speech slots join a queue;
the earliest-due ``max_batch`` of them, from any sessions and avatars, become ONE batch through
the renderer (one Whisper call, UNet, VAE decode, compose, JPEG), and each frame goes back to
its session, which hands it to its sink in slot order. Sinks never block, so a slow client
costs only its own frames. With ``overlap`` the thread keeps one batch in flight: it prepares
step k+1's batch (host work: the Whisper input and window rows) while the device runs step
k's, then finishes step k's (waits for it, JPEG with the device otherwise idle, delivery), then
launches step k+1's.

An interrupt answers the session's outstanding slots with idle frames at once
(:meth:`LiveSession.interrupt`); its items still queued or in flight here are stale and their
results are dropped (a closed session's too).

Jobs (:mod:`talkrt.serve.jobwork`) submit the face rows of their batches; a step takes its live
speech items first and fills the capacity they leave (at most ``job_rows_with_live`` rows while
live speech is in the step) with job rows in submission order, so one UNet + VAE call serves
both and a job never takes a place a due live frame needs. A failed mixed batch is retried as
its live part and each job's part alone, so a job's bad rows fail that job only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from talkrt.serve.jobwork import JobFrames, JobRows
from talkrt.serve.metrics import ServeMetrics
from talkrt.serve.session import LiveSession, WorkItem

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05      # longest sleep between steps when nothing is due
SLOW_BATCH_S = 0.1      # a batch whose host time (Whisper to JPEG) exceeds this is logged, by phase


@dataclass
class SchedulerStats:
    """What the scheduler has done (read them from any thread; they only grow)."""

    steps: int = 0
    batches: int = 0
    speech_frames: int = 0
    idle_frames: int = 0
    mixed_batches: int = 0              # batches holding frames of more than one session
    max_sessions_in_batch: int = 0
    batch_sizes: Counter = field(default_factory=Counter)
    step_seconds: list[float] = field(default_factory=list)   # model time of the last 1000 batches
    failures: int = 0
    job_frames: int = 0                 # job face rows made
    job_batches: int = 0                # batches holding job rows
    shared_batches: int = 0             # batches holding live speech and job rows
    job_failures: int = 0               # job parts that failed on their own


class Launched(Protocol):
    """A batch whose device work is queued; ``finish()`` waits for it and returns (one JPEG per
    live item, one face array per job part)."""

    def finish(self) -> tuple[list[bytes], list[Any]]: ...


class Renderer(Protocol):
    """Makes one step's frames (a :class:`~talkrt.serve.renderer.FrameRenderer`).

    ``prepare(items, jobs)`` does the host's part (no device work), with
    ``len(items) + sum(len(j) for j in jobs) <= max_batch``; ``launch(prepared)`` queues the
    device work and returns a :class:`Launched`; after its ``finish()``, ``last_seconds`` holds
    that batch's host time and ``last_phases`` the same by phase.
    """

    last_seconds: float
    last_phases: dict[str, float]

    def prepare(self, items: Sequence[WorkItem], jobs: Sequence[JobRows] = ()) -> Any: ...

    def launch(self, prepared: Any) -> Launched: ...


@dataclass
class _InFlight:
    batch: list[WorkItem]
    jobs: list[JobRows]
    launched: Launched


class SchedulerStopped(RuntimeError):
    """The scheduler stopped before it made these job rows."""


class Scheduler:
    """Cross-session batching of live frames, with job rows in the capacity they leave.

    Args:
        render: the step's frames (:class:`Renderer`).
        max_batch: frames per batch (the engines' bucket).
        metrics: where frame and batch counts go.
        lead: seconds ahead of its due time at which a slot is handed out; frames of
            different sessions due within ``lead`` of each other can share a batch.
        job_rows_with_live: most job rows in a step that holds live speech (None: all the
            capacity left), a knob to keep shared steps short.
        overlap: the thread's steps keep one batch in flight (see :meth:`step`). Off by default:
            a first version (2026-12-01 on an H200, BENCHMARKS.md), which launched batch k+1
            before finishing batch k, raised the frames served at 20 sessions from 202 to 293
            per second but delivered each batch later (nvJPEG's encode of batch k waited for
            batch k+1's model work), so fewer frames were on time at 4 and 8 sessions. This
            version (JPEG before the next launch) has not been measured on a GPU.
    """

    def __init__(self, render: Renderer, max_batch: int, metrics: ServeMetrics, lead: float = 0.08,
                 job_rows_with_live: int | None = None, overlap: bool = False):
        self.render, self.max_batch, self.metrics, self.lead = render, max_batch, metrics, lead
        self.overlap = overlap
        self.job_rows_with_live = max_batch if job_rows_with_live is None else job_rows_with_live
        self.stats = SchedulerStats()
        self._phases: dict[str, float] = {}     # the renderer's phases of the batches finished in this step
        self._in_render = 0.0                   # host seconds inside the renderer in this step
        self._in_flight: _InFlight | None = None  # launched by the last step, finished by the next
        self.sessions: dict[str, LiveSession] = {}
        self.pending: list[WorkItem] = []
        self.jobs: deque[JobFrames] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ any thread

    def add(self, session: LiveSession) -> None:
        with self._lock:
            self.sessions[session.sid] = session
        self._wake.set()

    def remove(self, session: LiveSession) -> None:
        """Close the session and forget it; its queued items are dropped at the next step."""
        session.close()
        with self._lock:
            self.sessions.pop(session.sid, None)
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def submit(self, work: JobFrames) -> None:
        """Queue a job's face rows behind those already queued (fails them if stopped)."""
        with self._lock:
            if not self._stop.is_set():
                self.jobs.append(work)
                work = None
        if work is not None:
            work.fail(SchedulerStopped("the server is stopping"))
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="talkrt-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread after its current step (idempotent)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            waiting, self.jobs = list(self.jobs), deque()
        for work in waiting:
            work.fail(SchedulerStopped("the server is stopping"))

    # ------------------------------------------------------------------ scheduler thread

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.step(time.monotonic(), overlap=self.overlap):
                continue
            with self._lock:
                sessions = list(self.sessions.values())
            next_time = min((s.next_assign_time(self.lead) for s in sessions), default=float("inf"))
            self._wake.wait(max(0.0, min(IDLE_WAIT_S, next_time - time.monotonic())))
            self._wake.clear()
        self._finish_in_flight()

    def step(self, now: float, overlap: bool = False) -> bool:
        """One scheduling step at ``now`` (``time.monotonic()``); True if it made or launched any
        frame. With ``overlap`` the step prepares its batch (host work), finishes the batch the
        previous step launched (waits for it, JPEG, delivery), then launches its own and leaves
        it in flight: the host prepares batch k+1 while the device runs batch k, and nvJPEG
        encodes batch k with no model work beside it. Without, the step finishes its own."""
        start = time.perf_counter()
        made = self._step(now, overlap)
        render, self._in_render = self._in_render, 0.0
        if made:
            for phase, seconds in self._phases.items():
                self.metrics.step_phase_seconds.labels(phase).inc(seconds)
            self.metrics.step_phase_seconds.labels("schedule").inc(max(0.0, time.perf_counter() - start - render))
        self._phases = {}
        return made

    def _step(self, now: float, overlap: bool) -> bool:
        self.stats.steps += 1
        with self._lock:
            sessions = list(self.sessions.values())
        idle: list[WorkItem] = []
        for session in sessions:
            for item in session.take_due(now, self.lead):
                (self.pending if item.speaking else idle).append(item)
        live = []
        for item in self.pending:
            if item.stale:
                idle.append(item)
            else:
                live.append(item)
        live.sort(key=lambda it: it.due)
        batch, self.pending = live[:self.max_batch], live[self.max_batch:]
        for item in idle:
            self._send_idle(item)
        room = self.max_batch - len(batch)
        jobs = self._take_job_rows(min(room, self.job_rows_with_live) if batch else room)
        prepared = self._prepare(batch, jobs) if batch or jobs else None
        finished = self._finish_in_flight()
        launched = self._launch(batch, jobs, prepared) if prepared is not None else None
        self._in_flight = launched
        self.metrics.batch_in_flight.set(int(launched is not None))
        if not overlap:
            self._finish_in_flight()
        return bool(idle or launched or finished)

    def _take_job_rows(self, capacity: int) -> list[JobRows]:
        """Up to ``capacity`` rows of the queued job work, oldest first."""
        taken: list[JobRows] = []
        with self._lock:
            while capacity > 0 and self.jobs:
                work = self.jobs[0]
                if work.abandoned:
                    self.jobs.popleft()
                    continue
                rows = work.take(capacity)
                taken.append(rows)
                capacity -= len(rows)
                if work.remaining == 0:
                    self.jobs.popleft()
        return taken

    def _send_idle(self, item: WorkItem) -> None:
        session = item.session
        if session.closed:
            return
        if item.speaking:                  # interrupted: the slot becomes an idle frame with silence
            item = WorkItem(session, item.slot, -1, None, session.epoch, session.silence(item.slot), item.due)
        jpeg = session.avatar.idle_jpeg(session.avatar.source_index(item.slot))
        self._deliver(item, jpeg)

    def _rendering(self, call, *args):
        """``call(*args)``, its host time counted as the renderer's (not the ``schedule`` phase)."""
        start = time.perf_counter()
        try:
            return call(*args)
        finally:
            self._in_render += time.perf_counter() - start

    def _prepare(self, batch: list[WorkItem], jobs: list[JobRows]) -> Any:
        """The batch's host work (None: it failed, and its frames with it)."""
        try:
            return self._rendering(self.render.prepare, batch, jobs)
        except Exception as exc:  # noqa: BLE001 - a failed step fails its frames, never the scheduler
            self._failed(batch, jobs, exc)
            return None

    def _launch(self, batch: list[WorkItem], jobs: list[JobRows], prepared: Any) -> _InFlight | None:
        """The batch's work queued on the device (None: it failed, and its frames with it)."""
        try:
            return _InFlight(batch, jobs, self._rendering(self.render.launch, prepared))
        except Exception as exc:  # noqa: BLE001 - a failed step fails its frames, never the scheduler
            self._failed(batch, jobs, exc)
            return None

    def _finish_in_flight(self) -> bool:
        """Finish the batch in flight, if any: count it and hand its frames out."""
        flight, self._in_flight = self._in_flight, None
        if flight is None:
            return False
        try:
            jpegs, faces = self._rendering(flight.launched.finish)
        except Exception as exc:  # noqa: BLE001 - a failed step fails its frames, never the scheduler
            self._failed(flight.batch, flight.jobs, exc)
            return True
        finally:
            self.metrics.batch_in_flight.set(0)
        self._done(flight.batch, flight.jobs, jpegs, faces)
        return True

    def _done(self, batch: list[WorkItem], jobs: list[JobRows], jpegs: list[bytes], faces: list) -> None:
        self._count(batch, jobs)
        for rows, part in zip(jobs, faces):
            rows.put(part)
        for item, jpeg in zip(batch, jpegs):
            if item.stale:
                self._send_idle(item)
            else:
                self._deliver(item, jpeg)

    def _failed(self, batch: list[WorkItem], jobs: list[JobRows], exc: Exception) -> None:
        if jobs:
            log.warning("batch of %d live and %d job frames failed (%s); retrying each part alone", len(batch),
                        sum(map(len, jobs)), exc)
            self._run_parts_alone(batch, jobs)
        else:
            self._fail_live(batch, exc)

    def _run_parts_alone(self, batch: list[WorkItem], jobs: list[JobRows]) -> None:
        """After a failed mixed batch: the live part, then each job part, as batches of their own."""
        if batch:
            try:
                jpegs, _ = self._rendering(lambda: self.render.launch(self.render.prepare(batch, [])).finish())
            except Exception as exc:  # noqa: BLE001 - the live part fails on its own
                self._fail_live(batch, exc)
            else:
                self._done(batch, [], jpegs, [])
        for rows in jobs:
            try:
                _, faces = self._rendering(lambda part=rows: self.render.launch(self.render.prepare([], [part])).finish())
            except Exception as exc:  # noqa: BLE001 - this job's rows fail, nothing else
                log.warning("job %s: %d frames failed: %s", rows.work.owner, len(rows), exc)
                self.stats.job_failures += 1
                rows.work.fail(exc)
                continue
            self._done([], [rows], [], faces)

    def _fail_live(self, batch: list[WorkItem], exc: Exception) -> None:
        log.exception("batch of %d frames failed; its sessions' speech is dropped", len(batch), exc_info=exc)
        self.stats.failures += 1
        self.metrics.batches_failed.inc()
        for session in {id(it.session): it.session for it in batch}.values():
            session.fail_speech(getattr(exc, "code", "render_failed"), str(exc))

    def _count(self, batch: list[WorkItem], jobs: list[JobRows]) -> None:
        seconds = getattr(self.render, "last_seconds", 0.0)
        for phase, t in getattr(self.render, "last_phases", {}).items():
            self._phases[phase] = self._phases.get(phase, 0.0) + t
        job_frames = sum(map(len, jobs))
        st = self.stats
        st.batches += 1
        st.batch_sizes[len(batch) + job_frames] += 1
        st.step_seconds = st.step_seconds[-999:] + [seconds]
        self.metrics.step_seconds.observe(seconds)
        if seconds > SLOW_BATCH_S:
            phases = getattr(self.render, "last_phases", {})
            log.warning("slow batch %d: %d live + %d job frames took %.0f ms (%s)", st.batches, len(batch), job_frames,
                        1e3 * seconds, ", ".join(f"{k} {1e3 * v:.0f}" for k, v in phases.items()))
        if jobs:
            st.job_batches += 1
            st.job_frames += job_frames
            st.shared_batches += bool(batch)
        if batch:
            owners = {id(it.session) for it in batch}
            st.mixed_batches += len(owners) > 1
            st.max_sessions_in_batch = max(st.max_sessions_in_batch, len(owners))
            self.metrics.batch_size.observe(len(batch))
            self.metrics.batch_sessions.observe(len(owners))

    def _deliver(self, item: WorkItem, jpeg: bytes) -> None:
        made = time.monotonic()
        if item.speaking:
            self.stats.speech_frames += 1
        else:
            self.stats.idle_frames += 1
        if made > item.due + float(1 / item.session.fps):
            self.metrics.frames_late.inc()
        item.session.deliver(item, jpeg, made)
