"""``WS /v1/live``: one live session per connection (protocol v1, :mod:`talkrt.serve.protocol`).

The event loop only moves bytes: PCM and control messages into the :class:`LiveSession`, and
finished frames from its :class:`BufferSink` onto the socket. Frames are made by the scheduler
thread; a client that reads too slowly loses the oldest waiting frames (counted).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING

from starlette.websockets import WebSocket, WebSocketDisconnect

from talkrt.errors import TalkrtError
from talkrt.serve.audio import lookahead_ms
from talkrt.serve.protocol import (CLOSE_TRY_AGAIN, ProtocolError, check_audio, error_message, pack_frame,
                                   parse_control, parse_start, ready_message)
from talkrt.serve.session import LiveSession
from talkrt.serve.sinks import BufferSink

if TYPE_CHECKING:
    from talkrt.serve.app import ServerState

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0
SINK_SECONDS = 5.0          # how long a frame may wait for a slow client before it is dropped
SINK_MAX_SECONDS = 20.0     # frames (in seconds of video) a session may hold at most, whatever their wait


async def _refuse(ws: WebSocket, exc: ProtocolError) -> None:
    try:
        await ws.send_text(error_message(exc.code, exc.message))
        await ws.close(exc.close_code, exc.message[:120])
    except (WebSocketDisconnect, RuntimeError):
        pass                # the client is already gone


async def live_session(ws: WebSocket, server: ServerState) -> None:
    """Serve one connection until the client stops or disconnects, or sends a bad message.

    Refused at once (an ``error`` message, then a close): ``loading`` (1013) while the models
    load, ``live_unavailable`` (1008) on a server whose model family has no live sessions
    (``ServerState.live`` false, e.g. LatentSync), ``server_full`` (1013) at ``max_sessions``.
    """
    await ws.accept()
    if not server.ready:
        await _refuse(ws, ProtocolError("loading", "the server is still loading its models", CLOSE_TRY_AGAIN))
        return
    if not server.live:
        family = server.info.get("family", "its model family")
        await _refuse(ws, ProtocolError("live_unavailable", f"this server runs {family} ({server.info.get('config')}), "
                                        "which makes offline jobs only (POST /v1/jobs, docs/jobs.md), not live "
                                        "sessions; live sessions need a server of a live model family (MuseTalk)"))
        return
    if server.open_sessions >= server.settings.max_sessions:
        server.metrics.sessions_refused.inc()
        await _refuse(ws, ProtocolError("server_full", f"the server is full ({server.settings.max_sessions} "
                                                       f"sessions); try again later", CLOSE_TRY_AGAIN))
        return
    server.open_sessions += 1                 # reserved before the first await below
    server.metrics.sessions.inc()
    session: LiveSession | None = None
    sender: asyncio.Task | None = None
    try:
        try:
            first = await asyncio.wait_for(ws.receive(), START_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ProtocolError("expected_start", f"no start message within {START_TIMEOUT_S:g} s") from None
        if first["type"] == "websocket.disconnect":
            return
        start = parse_start(first.get("text"))
        status = server.avatars.get(start.avatar)
        if status is None:
            raise ProtocolError("unknown_avatar", f"no avatar with id {start.avatar!r}")
        if status["status"] != "ready":
            detail = f" ({status['error']})" if status.get("error") else ""
            raise ProtocolError("avatar_not_ready", f"avatar {start.avatar} is {status['status']}{detail}")
        try:
            avatar = await asyncio.to_thread(server.avatars.live, start.avatar)
        except (KeyError, TalkrtError) as exc:
            raise ProtocolError("avatar_not_ready", f"avatar {start.avatar}: {exc}") from exc
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        sink = BufferSink(max(1, round(SINK_MAX_SECONDS * float(avatar.fps))), max_wait_s=SINK_SECONDS,
                          wake=lambda: loop.call_soon_threadsafe(wake.set))
        session = LiveSession(uuid.uuid4().hex[:16], avatar, start.sample_rate, server.audio_config, sink)
        p = avatar.prepared
        await ws.send_text(ready_message(session.sid, float(avatar.fps), p.width, p.height,
                                         round(lookahead_ms(avatar.fps, server.audio_config), 3)))
        sender = asyncio.create_task(_send_frames(ws, sink, wake, server))
        session.start = time.monotonic()       # slot 0 is due now
        server.scheduler.add(session)
        log.info("session %s: avatar %s at %d Hz", session.sid, start.avatar, start.sample_rate)
        await _receive(ws, session, server)
    except ProtocolError as exc:
        await _refuse(ws, exc)
    except WebSocketDisconnect:
        pass
    finally:
        if session is not None:
            server.scheduler.remove(session)
            log.info("session %s closed: %d speech, %d idle frames, %d dropped", session.sid,
                     session.speech_frames, session.idle_frames, session.sink.dropped)
        if sender is not None:
            sender.cancel()
        server.open_sessions -= 1
        server.metrics.sessions.dec()


async def _receive(ws: WebSocket, session: LiveSession, server: ServerState) -> None:
    while True:
        msg = await ws.receive()
        if msg["type"] == "websocket.disconnect":
            return
        if msg.get("bytes") is not None:
            check_audio(msg["bytes"])
            session.feed(msg["bytes"])
        else:
            kind = parse_control(msg.get("text") or "")
            if kind == "interrupt":
                await asyncio.to_thread(session.interrupt)      # may JPEG-encode idle frames: off the loop
            elif kind == "end":
                session.end()
            else:
                await ws.close(1000, "stop")
                return
        server.scheduler.wake()


async def _send_frames(ws: WebSocket, sink: BufferSink, wake: asyncio.Event, server: ServerState) -> None:
    dropped = 0
    try:
        while True:
            await wake.wait()
            wake.clear()
            for event in sink.take_events():
                await ws.send_text(json.dumps(event))
            for frame in sink.take():
                await ws.send_bytes(pack_frame(frame.index, frame.pts, frame.speaking, frame.jpeg, frame.pcm))
                server.metrics.frames_sent.labels("speech" if frame.speaking else "idle").inc()
            if sink.dropped > dropped:
                server.metrics.frames_dropped.inc(sink.dropped - dropped)
                dropped = sink.dropped
    except (WebSocketDisconnect, RuntimeError, OSError):
        return              # the connection is closing; the receiver cleans up
