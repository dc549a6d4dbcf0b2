"""Where the scheduler hands finished frames: the :class:`FrameSink` interface and the bounded,
drop-when-slow buffer the WebSocket sender reads (a WebRTC track would be another sink)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

MAX_EVENTS = 16


@dataclass(frozen=True)
class LiveFrame:
    """One finished video frame of a session, with the audio that belongs to it.

    ``jpeg``: baseline JPEG of the whole [H, W] frame; ``pcm``: s16le mono at the client's
    sample rate (silence for idle frames); ``due``/``made``: ``time.monotonic()`` seconds.
    """

    index: int
    pts: float
    speaking: bool
    jpeg: bytes
    pcm: bytes
    due: float
    made: float


class FrameSink(Protocol):
    """Receives a session's frames in index order. ``put`` and ``notify`` must never block (they
    run on the scheduler thread); a sink that cannot keep up drops frames and counts them."""

    def put(self, frame: LiveFrame) -> None: ...

    def notify(self, event: dict) -> None:
        """A control event for the client (a JSON object, e.g. ``speech_dropped``)."""

    def close(self) -> None: ...


class BufferSink:
    """A bounded, thread-safe frame buffer: ``put`` from the scheduler, ``take`` from the reader.

    A frame that has waited longer than ``max_wait_s`` for the reader is dropped at the next
    ``put``, and so is the oldest when ``capacity`` frames are waiting (``dropped`` counts
    both), so a slow client sees the newest frames rather than a growing delay. Waiting time,
    not the count alone, marks a slow reader: a burst of frames from a late server step reaches
    a reader that keeps up whole. Events (``notify``) wait in their own queue of at most
    :data:`MAX_EVENTS` (beyond it the oldest are dropped). ``wake`` is called after every
    ``put`` and ``notify`` (e.g. ``loop.call_soon_threadsafe(event.set)``); it must not block.
    """

    def __init__(self, capacity: int, wake: Callable[[], None] | None = None, max_wait_s: float | None = None):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity, self.wake, self.max_wait_s = capacity, wake, max_wait_s
        self._frames: deque[LiveFrame] = deque()
        self._put_at: deque[float] = deque()            # time.monotonic() of each waiting frame's put
        self._events: deque[dict] = deque(maxlen=MAX_EVENTS)
        self._lock = threading.Lock()
        self.put_count = 0
        self.dropped = 0
        self.closed = False

    def put(self, frame: LiveFrame) -> None:
        with self._lock:
            if self.closed:
                return
            now = time.monotonic()
            while self._frames and (len(self._frames) >= self.capacity or
                                    (self.max_wait_s is not None and now - self._put_at[0] > self.max_wait_s)):
                self._frames.popleft()
                self._put_at.popleft()
                self.dropped += 1
            self._frames.append(frame)
            self._put_at.append(now)
            self.put_count += 1
        if self.wake is not None:
            self.wake()

    def notify(self, event: dict) -> None:
        with self._lock:
            if self.closed:
                return
            self._events.append(event)
        if self.wake is not None:
            self.wake()

    def take_events(self) -> list[dict]:
        """Every waiting event, oldest first (empty when none)."""
        with self._lock:
            events = list(self._events)
            self._events.clear()
        return events

    def take(self) -> list[LiveFrame]:
        """Every waiting frame, oldest first (empty when none)."""
        with self._lock:
            frames = list(self._frames)
            self._frames.clear()
            self._put_at.clear()
        return frames

    def close(self) -> None:
        """Refuse further frames and forget the waiting ones (idempotent)."""
        with self._lock:
            self.closed = True
            self._frames.clear()
            self._put_at.clear()
            self._events.clear()
