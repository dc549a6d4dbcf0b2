"""``talkrt serve`` over its lifetime: memory over 200 connect/disconnect cycles, and avatars that
survive a restart. Real uvicorn on loopback (tiny config, CPU), real WebSocket clients."""

from __future__ import annotations

import asyncio
import gc
import logging
import json
import time
import tracemalloc

import httpx
import pytest
import websockets

from serve_server import (frames_until, metric, pcm, running_server, sample_clip, start_session, upload,
                          wait_prepared)
from talkrt.serve.audio import Utterance
from talkrt.serve.session import LiveSession
from talkrt.serve.sinks import BufferSink

CYCLES, WARM_UP = 200, 20
# Stated bound: Python-heap growth (tracemalloc, server and client share this process) over
# 200 cycles after 20 warm-up cycles. A leaked session holds its utterance buffers (~100 KB)
# or at least its sink and a JPEG (~10 KB), so one leak per cycle would exceed it 2-20 times.
MAX_GROWTH_BYTES = 1 << 20


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(data dir, avatar status): one avatar uploaded and prepared by a server that has since stopped."""
    data_dir = tmp_path_factory.mktemp("serve-data")
    with running_server(data_dir) as (base, _):
        r = upload(base, sample_clip(tmp_path_factory.mktemp("clip"), 0, 8))
        assert r.status_code == 202, r.text
        status = wait_prepared(base, r.json()["id"])
    assert status["status"] == "ready", status
    return data_dir, status


@pytest.fixture(scope="module")
def restarted(prepared):
    """A new server on the same data dir: (base URL, its ServerState, the avatar's status before)."""
    data_dir, status = prepared
    with running_server(data_dir) as (base, app):
        yield base, app.state.server, status


def test_avatars_survive_a_restart(restarted):
    base, _, status = restarted
    assert httpx.get(base + "/v1/avatars").json()["avatars"] == [status]
    assert httpx.get(f"{base}/v1/avatars/{status['id']}").json() == status
    assert metric(base, "talkrt_avatar_preparations_total") == 0       # re-listed, not prepared again

    async def session() -> list:
        ws, ready = await start_session(base, status["id"])
        assert (ready["type"], ready["width"], ready["height"]) == ("ready", 320, 320)
        frames = await frames_until(ws, lambda f: len(f) >= 5)
        await ws.close()
        return frames

    assert [h["index"] for h, _, _ in asyncio.run(session())] == list(range(5))


async def _cycle(base: str, avatar: str, i: int, audio: bytes) -> None:
    """One session: start, a frame, 100 ms of speech (an utterance left open), then one of three
    endings: a close handshake, a ``stop`` message, or the TCP connection dropped."""
    ws, ready = await start_session(base, avatar)
    assert ready["type"] == "ready"
    await frames_until(ws, lambda f: len(f) >= 1)
    await ws.send(audio)
    if i % 3 == 0:
        await ws.close()
    elif i % 3 == 1:
        await ws.send(json.dumps({"type": "stop"}))
        with pytest.raises(websockets.ConnectionClosedOK):
            while True:
                await ws.recv()
    else:
        ws.transport.abort()
        await ws.wait_closed()


def _settle(state) -> None:
    """Wait until the server holds no session, then collect garbage."""
    deadline = time.monotonic() + 10
    while (state.open_sessions or state.scheduler.sessions) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert state.open_sessions == 0 and not state.scheduler.sessions
    gc.collect()


def _alive(kind: type) -> int:
    return sum(type(o) is kind for o in gc.get_objects())


def test_memory_does_not_grow_over_200_connect_disconnect_cycles(restarted):
    base, state, avatar = restarted
    audio = pcm(0.1, 7)

    async def cycles(first: int, count: int) -> None:
        for i in range(first, first + count):
            await _cycle(base, avatar["id"], i, audio)

    tracemalloc.start()
    try:
        asyncio.run(cycles(0, WARM_UP))
        _settle(state)
        before = tracemalloc.get_traced_memory()[0]
        # objects of servers that other test modules ran in this process are not this server's
        alive = [_alive(kind) for kind in (LiveSession, BufferSink, Utterance)]
        asyncio.run(cycles(WARM_UP, CYCLES))
        _settle(state)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    # a leak keeps one of each per cycle; a reference the scheduler thread holds until its next
    # step (at most IDLE_WAIT_S later) is not one, so wait for those to go
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        gc.collect()
        now = [_alive(kind) for kind in (LiveSession, BufferSink, Utterance)]
        if all(n <= a for n, a in zip(now, alive)):
            break
        time.sleep(0.05)
    assert all(n <= a for n, a in zip(now, alive)), (now, alive)
    assert not state.scheduler.pending
    assert after - before < MAX_GROWTH_BYTES, f"heap grew {(after - before) / 1024:.0f} KiB over {CYCLES} cycles"
    assert httpx.get(base + "/healthz").json()["sessions"] == 0


def test_the_loaded_server_freezes_its_start_up_objects_out_of_gc_passes(tmp_path):
    """Once the models are loaded the server calls ``gc.freeze()``: a full collection then walks
    only objects made since (it walked ~470,000 objects, ~400 ms on a 2-core CPU, before)."""
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    with running_server(tmp_path):
        frozen = gc.get_freeze_count()
    assert frozen > 10_000, frozen


@pytest.mark.parametrize("config", ["tiny", "latentsync16-tiny"])
def test_weights_that_cannot_load_are_one_error_line_without_traceback(tmp_path, caplog, config):
    """A refused input (here a --weights folder that does not exist) keeps the server up with
    /healthz 500 and the message, and logs one ERROR line, no traceback: it is not a bug."""
    bad = tmp_path / "no-weights"
    with caplog.at_level(logging.INFO), pytest.raises(RuntimeError, match="server failed to load") as err:
        with running_server(tmp_path / "data", config=config, weights_dir=str(bad)):
            pass
    assert f"InputError: {bad}: missing weights folder" in str(err.value)
    failed = [r for r in caplog.records if "loading failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].levelname == "ERROR" and failed[0].exc_info is None
    assert str(bad) in failed[0].getMessage() and "Traceback" not in caplog.text


def test_an_unexpected_loading_failure_keeps_its_traceback(tmp_path, caplog, monkeypatch):
    import talkrt.session
    from talkrt.families import load_family_config
    from talkrt.serve.app import ServerState, ServeSettings

    def broken(*args, **kwargs):
        raise ValueError("a bug")
    monkeypatch.setattr(talkrt.session, "build_session", broken)
    state = ServerState(ServeSettings(cfg=load_family_config("tiny"), device="cpu", data_dir=tmp_path))
    state.load()
    assert state.error == "ValueError: a bug"
    failed = [r for r in caplog.records if "loading failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info is not None
