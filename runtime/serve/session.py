"""One live session's state, shared by the event loop (audio in, control) and the scheduler
thread (frames due, frames done) under one lock.

Session frame ``n`` (its "slot") is due at ``start + n / fps``; the scheduler asks for slots
``lead`` seconds ahead. A slot becomes a speech frame when the current utterance has its next
frame ready (PCM and Whisper look-ahead arrived), else an idle frame: the avatar's own frame
(ping-pong) with silence. Frames reach the sink in slot order whatever order they finish in.

An interrupt answers every slot handed out but not yet sent with an idle frame at once, on the
caller's thread, so the return to idle never waits for a batch in flight; that batch's frames,
when they come, find their slots answered and are dropped.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from fractions import Fraction

from talkrt.config import AudioConfig
from talkrt.serve.audio import Utterance
from talkrt.serve.avatars import LiveAvatar
from talkrt.serve.protocol import ProtocolError, speech_dropped_event
from talkrt.serve.sinks import FrameSink, LiveFrame

SILENCE_TIMEOUT_S = 0.5     # an utterance with no new audio for this long and no frame ready is ended
MAX_QUEUED_AUDIO_S = 60.0   # audio a session may have queued ahead of its frames


@dataclass(frozen=True, eq=False)
class WorkItem:
    """One frame to make: session slot ``slot``; ``frame`` is the utterance frame (-1: idle).

    ``pcm``: the frame's s16le audio at the client's rate; ``due``: ``time.monotonic()`` seconds.
    """

    session: LiveSession
    slot: int
    frame: int
    utterance: Utterance | None
    epoch: int
    pcm: bytes
    due: float

    @property
    def speaking(self) -> bool:
        return self.frame >= 0

    @property
    def stale(self) -> bool:
        """The session was interrupted or closed since this item was handed out."""
        return self.session.closed or self.epoch != self.session.epoch


class LiveSession:
    """State of one ``WS /v1/live`` connection (thread-safe).

    Args:
        sid: session id.
        avatar: the ready avatar it shows.
        rate: the client's PCM sample rate, Hz.
        audio: the model's audio config (window and padding steps).
        sink: where finished frames go, in slot order.
        start: ``time.monotonic()`` of slot 0.
    """

    def __init__(self, sid: str, avatar: LiveAvatar, rate: int, audio: AudioConfig, sink: FrameSink,
                 start: float | None = None):
        self.sid, self.avatar, self.rate, self.audio_cfg, self.sink = sid, avatar, rate, audio, sink
        self.fps = Fraction(avatar.fps)
        self.start = time.monotonic() if start is None else start
        self.lock = threading.Lock()
        self.utterances: deque[Utterance] = deque()
        self.epoch = 0
        self.next_slot = 0
        self.next_send = 0
        self._done: dict[int, LiveFrame] = {}
        self._odd = b""                 # a byte left over from an odd-length PCM message
        self.closed = False
        self.speech_frames = 0          # speech items handed out
        self.idle_frames = 0

    def due(self, slot: int) -> float:
        """``time.monotonic()`` at which slot ``slot`` is due."""
        return self.start + float(slot / self.fps)

    def silence(self, slot: int) -> bytes:
        """Zero PCM for slot ``slot`` at the client's rate."""
        def bound(n: int) -> int:
            return (n * self.rate * self.fps.denominator) // self.fps.numerator
        return bytes(2 * (bound(slot + 1) - bound(slot)))

    # ------------------------------------------------------------------ event loop side

    def feed(self, data: bytes) -> None:
        """Queue client PCM (s16le mono, any length); starts an utterance when none is open.

        Raises:
            ProtocolError: ``too_much_audio`` once more than :data:`MAX_QUEUED_AUDIO_S` seconds
                of audio wait for their frames (a client sending far faster than real time).
        """
        data = self._odd + data
        cut = len(data) - len(data) % 2
        self._odd = data[cut:]
        if not cut:
            return
        with self.lock:
            if not self.utterances or self.utterances[-1].ended:
                self.utterances.append(Utterance(self.rate, self.fps, self.audio_cfg))
            self.utterances[-1].feed(data[:cut])
            queued = sum(u.queued_samples for u in self.utterances) / self.rate
        if queued > MAX_QUEUED_AUDIO_S:
            raise ProtocolError("too_much_audio", f"{queued:.0f} s of audio queued ahead of the frames (at most "
                                                  f"{MAX_QUEUED_AUDIO_S:g} s): send audio at about the pace it is "
                                                  f"spoken")

    def end(self) -> None:
        """End of utterance: its remaining frames no longer wait for look-ahead audio."""
        with self.lock:
            self._odd = b""
            if self.utterances:
                self.utterances[-1].finish()

    def interrupt(self) -> int | None:
        """Drop every queued utterance and every speech frame not yet sent: the slots handed out
        but not sent become idle frames now (those already made wait in order with them).

        Returns:
            The first slot answered with an idle frame here (None: nothing was outstanding).
        """
        with self.lock:
            self._odd = b""
            self.utterances.clear()
            self.epoch += 1
            if self.closed or self.next_send >= self.next_slot:
                return None
            first, made = self.next_send, time.monotonic()
            for slot in range(self.next_send, self.next_slot):
                done = self._done.get(slot)
                if done is None or done.speaking:
                    self._done[slot] = self._idle_frame(slot, made)
            self._flush()
            return first

    def fail_speech(self, code: str, message: str) -> None:
        """A batch holding this session's frames failed: drop its speech as :meth:`interrupt`
        does and tell the client (a ``speech_dropped`` event, protocol v1)."""
        first = self.interrupt()
        if first is not None:
            self.sink.notify(speech_dropped_event(code, message, first))

    def close(self) -> None:
        """Stop making frames for this session and release its sink (idempotent)."""
        with self.lock:
            self.closed = True
            self.utterances.clear()
            self._done.clear()
        self.sink.close()

    # ------------------------------------------------------------------ scheduler side

    def next_assign_time(self, lead: float) -> float:
        """When the next slot may be handed out."""
        return self.due(self.next_slot) - lead

    def _current(self, now: float) -> Utterance | None:
        while self.utterances and self.utterances[0].done:
            self.utterances.popleft()
        if not self.utterances:
            return None
        utt = self.utterances[0]
        if not utt.ended and now - utt.last_audio > SILENCE_TIMEOUT_S and not utt.ready(utt.next_frame):
            utt.finish()           # the client stopped sending without "end"
        return None if utt.done else utt

    def take_due(self, now: float, lead: float) -> list[WorkItem]:
        """Hand out every slot due by ``now + lead``, in order, as speech or idle work items."""
        items: list[WorkItem] = []
        with self.lock:
            while not self.closed and self.next_assign_time(lead) <= now:
                slot = self.next_slot
                self.next_slot += 1
                utt = self._current(now)
                # an utterance starts once two frames are ready: one frame of jitter margin
                if utt is not None and utt.ready(utt.next_frame) and (utt.next_frame > 0 or utt.ready(1)
                                                                       or utt.ended):
                    k, pcm = utt.take_frame()
                    items.append(WorkItem(self, slot, k, utt, self.epoch, pcm, self.due(slot)))
                    self.speech_frames += 1
                else:
                    items.append(WorkItem(self, slot, -1, None, self.epoch, self.silence(slot), self.due(slot)))
                    self.idle_frames += 1
        return items

    def deliver(self, item: WorkItem, jpeg: bytes, made: float) -> None:
        """A finished frame; the sink gets frames in slot order. A slot an interrupt already
        answered keeps that answer."""
        frame = LiveFrame(index=item.slot, pts=float(item.slot / self.fps), speaking=item.speaking, jpeg=jpeg,
                          pcm=item.pcm, due=item.due, made=made)
        with self.lock:
            if self.closed or item.slot < self.next_send or item.slot in self._done:
                return
            self._done[item.slot] = frame
            self._flush()

    def _idle_frame(self, slot: int, made: float) -> LiveFrame:
        jpeg = self.avatar.idle_jpeg(self.avatar.source_index(slot))
        return LiveFrame(index=slot, pts=float(slot / self.fps), speaking=False, jpeg=jpeg, pcm=self.silence(slot),
                         due=self.due(slot), made=made)

    def _flush(self) -> None:
        """Hand the sink every finished frame that is next in slot order (the lock is held)."""
        while self.next_send in self._done:
            self.sink.put(self._done.pop(self.next_send))
            self.next_send += 1
