"""The scheduler: one per process (one per GPU), in its own thread.

Every step it asks each session for the slots due within ``lead`` seconds. Idle slots are
answered at once from the avatar's cached JPEGs (no model time). Speech slots join a queue;
the earliest-due ``max_batch`` of them, from any sessions and avatars, become ONE batch through
the renderer (one Whisper call, UNet, VAE decode, compose, JPEG), and each frame goes back to
its session, which hands it to its sink in slot order. Sinks never block, so a slow client
costs only its own frames.

Items of an interrupted or closed session that are still queued or in flight are answered as
idle frames (closed: dropped), so an interrupt shows within one step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from talkrt.serve.metrics import ServeMetrics
from talkrt.serve.session import LiveSession, WorkItem

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05      # longest sleep between steps when nothing is due


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


class Scheduler:
    """Cross-session batching of live frames.

    Args:
        render: ``items -> [jpeg bytes]`` for up to ``max_batch`` speech items (a
            :class:`~talkrt.serve.renderer.FrameRenderer`).
        max_batch: speech frames per batch (the engines' bucket).
        metrics: where frame and batch counts go.
        lead: seconds ahead of its due time at which a slot is handed out; frames of
            different sessions due within ``lead`` of each other can share a batch.
    """

    def __init__(self, render: Callable[[Sequence[WorkItem]], list[bytes]], max_batch: int, metrics: ServeMetrics,
                 lead: float = 0.08):
        self.render, self.max_batch, self.metrics, self.lead = render, max_batch, metrics, lead
        self.stats = SchedulerStats()
        self.sessions: dict[str, LiveSession] = {}
        self.pending: list[WorkItem] = []
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

    # ------------------------------------------------------------------ scheduler thread

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.step(time.monotonic()):
                continue
            with self._lock:
                sessions = list(self.sessions.values())
            next_time = min((s.next_assign_time(self.lead) for s in sessions), default=float("inf"))
            self._wake.wait(max(0.0, min(IDLE_WAIT_S, next_time - time.monotonic())))
            self._wake.clear()

    def step(self, now: float) -> bool:
        """One scheduling step at ``now`` (``time.monotonic()``); True if it made any frame."""
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
        if batch:
            self._run_batch(batch)
        return bool(idle or batch)

    def _send_idle(self, item: WorkItem) -> None:
        session = item.session
        if session.closed:
            return
        if item.speaking:                  # interrupted: the slot becomes an idle frame with silence
            item = WorkItem(session, item.slot, -1, None, session.epoch, session.silence(item.slot), item.due)
        jpeg = session.avatar.idle_jpeg(session.avatar.source_index(item.slot))
        self._deliver(item, jpeg)

    def _run_batch(self, batch: list[WorkItem]) -> None:
        try:
            jpegs = self.render(batch)
        except Exception as exc:  # noqa: BLE001 - a failed step fails its frames, never the scheduler
            log.exception("batch of %d frames failed; its sessions' speech is dropped", len(batch))
            self.stats.failures += 1
            self.metrics.batches_failed.inc()
            for session in {id(it.session): it.session for it in batch}.values():
                session.fail_speech(getattr(exc, "code", "render_failed"), str(exc))
            return
        seconds = getattr(self.render, "last_seconds", 0.0)
        owners = {id(it.session) for it in batch}
        st = self.stats
        st.batches += 1
        st.batch_sizes[len(batch)] += 1
        st.mixed_batches += len(owners) > 1
        st.max_sessions_in_batch = max(st.max_sessions_in_batch, len(owners))
        st.step_seconds = st.step_seconds[-999:] + [seconds]
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_sessions.observe(len(owners))
        self.metrics.step_seconds.observe(seconds)
        for item, jpeg in zip(batch, jpegs):
            if item.stale:
                self._send_idle(item)
            else:
                self._deliver(item, jpeg)

    def _deliver(self, item: WorkItem, jpeg: bytes) -> None:
        made = time.monotonic()
        if item.speaking:
            self.stats.speech_frames += 1
        else:
            self.stats.idle_frames += 1
        if made > item.due + float(1 / item.session.fps):
            self.metrics.frames_late.inc()
        item.session.deliver(item, jpeg, made)
