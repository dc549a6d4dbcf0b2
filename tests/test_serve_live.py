"""``talkrt serve`` on loopback: a real uvicorn server in a thread (tiny config, CPU), real HTTP
and WebSocket clients. The tiny model on a CPU makes a few speech frames per second, so speech
tests check content and order, not real-time pace; the pace check runs on idle frames."""

from __future__ import annotations

import asyncio
import io
import json
import re
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import websockets
from PIL import Image

from serve_server import running_server
from media_factory import make_not_media, write_frames
from talkrt.media.frames import read_video_frames
from talkrt.serve.protocol import unpack_frame

SAMPLE = Path(__file__).parent / "data" / "sample_avatar.mp4"
FRAME_PCM = 2 * 16000 // 25          # bytes of one 16 kHz frame


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("serve-data")
    with running_server(data) as (base, app):
        port = base.rsplit(":", 1)[1]
        yield {"base": base, "ws": f"ws://127.0.0.1:{port}/v1/live", "state": app.state.server, "data": data}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    frames = read_video_frames(SAMPLE, 1 << 30)
    return [write_frames(folder / "a.mp4", frames[:8]), write_frames(folder / "b.mp4", frames[40:48])]


def _upload(server, path: Path) -> httpx.Response:
    return httpx.post(server["base"] + "/v1/avatars", files={"video": (path.name, path.read_bytes(), "video/mp4")},
                      timeout=60)


def _metric(server, name: str) -> float:
    text = httpx.get(server["base"] + "/metrics").text
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


@pytest.fixture(scope="module")
def avatars(server, clips):
    ids = []
    for clip in clips:
        r = _upload(server, clip)
        assert r.status_code == 202 and r.json()["status"] == "preparing"
        ids.append(r.json()["id"])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        states = [httpx.get(f"{server['base']}/v1/avatars/{i}").json() for i in ids]
        if all(s["status"] != "preparing" for s in states):
            break
        time.sleep(0.3)
    assert [s["status"] for s in states] == ["ready", "ready"], states
    return ids


def test_healthz_and_metrics(server):
    health = httpx.get(server["base"] + "/healthz").json()
    assert health["status"] == "ok" and health["config"] == "tiny" and health["device"] == "cpu"
    text = httpx.get(server["base"] + "/metrics").text
    for name in ("talkrt_sessions", "talkrt_frames_sent_total", "talkrt_frames_dropped_total",
                 "talkrt_frames_late_total", "talkrt_batch_size_bucket", "talkrt_step_seconds_bucket"):
        assert name in text


def test_avatar_ready_listed_and_not_prepared_twice(server, clips, avatars):
    status = httpx.get(f"{server['base']}/v1/avatars/{avatars[0]}").json()
    assert status == {"id": avatars[0], "status": "ready", "frames": 8, "width": 320, "height": 320, "fps": 25.0,
                      "faces_found": 8}
    listed = {a["id"] for a in httpx.get(server["base"] + "/v1/avatars").json()["avatars"]}
    assert set(avatars) <= listed
    prepared = _metric(server, "talkrt_avatar_preparations_total")
    again = _upload(server, clips[0])
    assert again.status_code == 200 and again.json()["id"] == avatars[0] and again.json()["status"] == "ready"
    assert _metric(server, "talkrt_avatar_preparations_total") == prepared
    assert httpx.get(f"{server['base']}/v1/avatars/{'0' * 24}").status_code == 404


def test_bad_upload_is_refused_and_nothing_stored(server, tmp_path, avatars):
    before = sorted(p.name for p in (server["data"] / "avatars").iterdir())
    r = _upload(server, make_not_media(tmp_path / "notes.mp4"))
    assert r.status_code == 422
    assert r.json()["detail"].startswith("notes.mp4: not a readable media file")
    assert sorted(p.name for p in (server["data"] / "avatars").iterdir()) == before
    assert list((server["data"] / "tmp").iterdir()) == []


async def _start(server, avatar: str, rate: int = 16000):
    ws = await websockets.connect(server["ws"], max_size=1 << 24)
    await ws.send(json.dumps({"type": "start", "avatar": avatar, "sample_rate": rate}))
    ready = json.loads(await ws.recv())
    return ws, ready


async def _frames_until(ws, done, timeout: float = 60.0) -> list[tuple[dict, bytes, bytes]]:
    """Frames until ``done(frames)`` is true."""
    frames = []
    deadline = time.monotonic() + timeout
    while not done(frames):
        assert time.monotonic() < deadline, f"timed out after {len(frames)} frames"
        frames.append(unpack_frame(await asyncio.wait_for(ws.recv(), timeout)))
    return frames


def _speech_then_idle(frames) -> bool:
    spoke = [i for i, (h, _, _) in enumerate(frames) if h["speaking"]]
    return bool(spoke) and len(frames) > spoke[-1] + 3


def _pcm(seconds: float, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return rng.integers(-20000, 20000, int(16000 * seconds), dtype=np.int16).astype("<i2").tobytes()


async def _speak(ws, pcm: bytes) -> None:
    for i in range(0, len(pcm), 640):           # 20 ms packets, sent at once
        await ws.send(pcm[i:i + 640])
    await ws.send(json.dumps({"type": "end"}))


def _check_stream(frames, pcm: bytes) -> None:
    """Consecutive indices from 0, speech PCM == ``pcm``, idle frames silent, JPEGs 320x320."""
    assert [h["index"] for h, _, _ in frames] == list(range(len(frames)))
    assert all(h["pts"] == pytest.approx(h["index"] / 25) for h, _, _ in frames)
    speech = [p for h, _, p in frames if h["speaking"]]
    assert b"".join(speech) == pcm
    assert all(len(p) == FRAME_PCM and not any(p) for h, _, p in frames if not h["speaking"])
    for h, jpeg, _ in frames[:: max(1, len(frames) // 5)] + [f for f in frames if f[0]["speaking"]][:2]:
        assert Image.open(io.BytesIO(jpeg)).size == (320, 320)


def test_live_session_speech_and_idle(server, avatars):
    pcm = _pcm(0.2, 1)                                   # 5 frames at 25 fps

    async def run():
        ws, ready = await _start(server, avatars[0])
        assert ready["type"] == "ready" and isinstance(ready["session"], str)
        assert (ready["fps"], ready["width"], ready["height"], ready["lookahead_ms"]) == (25.0, 320, 320, 120.0)
        frames = await _frames_until(ws, lambda f: len(f) >= 3)
        await _speak(ws, pcm)
        frames += await _frames_until(ws, lambda f: _speech_then_idle(frames + f))
        await ws.close()
        return frames

    frames = asyncio.run(run())
    assert sum(h["speaking"] for h, _, _ in frames) == 5
    _check_stream(frames, pcm)


def test_interrupt_returns_to_idle(server, avatars):
    async def run():
        ws, _ = await _start(server, avatars[0])
        await ws.send(_pcm(3.0, 2))
        frames = await _frames_until(ws, lambda f: any(h["speaking"] for h, _, _ in f))
        await ws.send(json.dumps({"type": "interrupt"}))
        sent = time.monotonic()
        after = await _frames_until(ws, lambda f: bool(f) and not f[-1][0]["speaking"])
        idle_after = time.monotonic() - sent
        later = await _frames_until(ws, lambda f: len(f) >= 25)
        await ws.close()
        return frames + after + later, idle_after

    frames, idle_after = asyncio.run(run())
    spoken = sum(h["speaking"] for h, _, _ in frames)
    assert spoken < 75                                     # far fewer than the 3 s sent
    assert not any(h["speaking"] for h, _, _ in frames[-25:])
    assert idle_after < 10.0                               # one CPU batch at most (GPU target: 100 ms)


def test_two_sessions_on_two_avatars_share_batches(server, avatars):
    scheduler = server["state"].scheduler
    mixed = scheduler.stats.mixed_batches
    pcms = [_pcm(0.2, 3), _pcm(0.2, 4)]

    async def one(avatar, pcm):
        ws, _ = await _start(server, avatar)
        await _speak(ws, pcm)
        frames = await _frames_until(ws, _speech_then_idle)
        await ws.close()
        return frames

    async def both():
        return await asyncio.gather(one(avatars[0], pcms[0]), one(avatars[1], pcms[1]))

    for frames, pcm in zip(asyncio.run(both()), pcms):
        _check_stream(frames, pcm)
    assert scheduler.stats.mixed_batches > mixed
    assert scheduler.stats.max_sessions_in_batch == 2


def test_malformed_first_message_closes_1008(server, avatars):
    async def run(first):
        async with websockets.connect(server["ws"]) as ws:
            await ws.send(first)
            error = json.loads(await ws.recv())
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            return error, closed.value.rcvd.code

    error, code = asyncio.run(run("hello"))
    assert (error["type"], error["code"], code) == ("error", "bad_json", 1008)
    error, code = asyncio.run(run(json.dumps({"type": "start", "avatar": "f" * 24, "sample_rate": 16000})))
    assert (error["code"], code) == ("unknown_avatar", 1008)
    error, code = asyncio.run(run(b"\x00\x01"))
    assert (error["code"], code) == ("expected_start", 1008)


def test_over_max_sessions_closes_1013(server, avatars):
    async def run():
        first, _ = await _start(server, avatars[0])
        second, _ = await _start(server, avatars[1])
        async with websockets.connect(server["ws"]) as third:
            error = json.loads(await third.recv())
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await third.recv()
        await first.close()
        await second.close()
        return error, closed.value.rcvd.code

    error, code = asyncio.run(run())
    assert (error["code"], code) == ("server_full", 1013)
    assert "full" in error["message"]


def test_disconnect_mid_utterance_frees_the_session(server, avatars):
    state = server["state"]

    async def run():
        ws, _ = await _start(server, avatars[1])
        await ws.send(_pcm(2.0, 5))
        await _frames_until(ws, lambda f: len(f) >= 1)
        await ws.close()

    asyncio.run(run())
    deadline = time.monotonic() + 10
    while (state.open_sessions or state.scheduler.sessions) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state.open_sessions == 0 and not state.scheduler.sessions
    assert httpx.get(server["base"] + "/healthz").json()["sessions"] == 0
    # queued speech of the closed session is dropped, never rendered for it (a batch in flight
    # may take a CPU step or two to finish first)
    deadline = time.monotonic() + 10
    while any(it.session.closed for it in state.scheduler.pending) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(it.session.closed for it in state.scheduler.pending)


def test_idle_frames_arrive_at_the_avatar_fps(server, avatars):
    async def run():
        ws, _ = await _start(server, avatars[0])
        await _frames_until(ws, lambda f: len(f) >= 5)       # settled
        start = time.monotonic()
        frames = await _frames_until(ws, lambda f: time.monotonic() - start >= 3.0)
        elapsed = time.monotonic() - start
        await ws.close()
        return len(frames), elapsed

    count, elapsed = asyncio.run(run())
    assert count / elapsed == pytest.approx(25.0, rel=0.10)
