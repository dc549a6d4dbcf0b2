"""A real ``talkrt serve`` app on loopback for the server tests (uvicorn in a thread; tiny config on
the CPU unless asked otherwise), and the HTTP/WebSocket client steps they share."""
from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
import numpy as np
import uvicorn
import websockets

from media_factory import write_frames
from talkrt.families import load_family_config
from talkrt.media.frames import read_video_frames
from talkrt.serve.app import ServeSettings, create_app
from talkrt.serve.protocol import unpack_frame

SAMPLE = Path(__file__).parent / "data" / "sample_avatar.mp4"


@contextlib.contextmanager
def running_server(data_dir: Path, max_sessions: int = 2, config: str = "tiny", device: str = "cpu",
                   overrides: Sequence[str] = (), timeout: float = 120.0, **settings) -> Iterator[tuple[str, object]]:
    """Yield (base URL, the app) once ``/healthz`` answers 200; stop the server on exit.
    ``settings``: more :class:`ServeSettings` fields (``api_key``, ``jobs``, ...).

    Raises:
        TimeoutError: the models did not load within ``timeout`` seconds.
        RuntimeError: loading failed (``/healthz`` answered 500; its error in the message).
    """
    app = create_app(ServeSettings(cfg=load_family_config(config, list(overrides)), device=device, data_dir=data_dir,
                                   max_sessions=max_sessions, **settings))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                r = httpx.get(base + "/healthz")
                if r.status_code == 200:
                    break
                if r.status_code == 500:
                    raise RuntimeError(f"server failed to load: {r.json().get('error')}")
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server did not become healthy in {timeout:g} s")
            time.sleep(0.2)
        yield base, app
    finally:
        srv.should_exit = True
        thread.join(30)


def ws_url(base: str) -> str:
    return base.replace("http://", "ws://", 1) + "/v1/live"


def sample_clip(folder: Path, first: int, count: int, name: str = "clip.mp4", size: int | None = None) -> Path:
    """``count`` frames of the sample avatar (320x320) from frame ``first``, as an MP4 in
    ``folder``; ``size``: resized to ``size`` x ``size`` first (OpenCV INTER_AREA)."""
    frames = read_video_frames(SAMPLE, 1 << 30)[first:first + count]
    if size is not None:
        import cv2
        frames = [cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in frames]
    return write_frames(Path(folder) / name, frames)


def upload(base: str, path: Path) -> httpx.Response:
    return httpx.post(base + "/v1/avatars", files={"video": (path.name, path.read_bytes(), "video/mp4")}, timeout=60)


def wait_prepared(base: str, avatar_id: str, timeout: float = 120.0) -> dict:
    """The avatar's status once it is no longer ``preparing`` (AssertionError on timeout)."""
    deadline = time.monotonic() + timeout
    while (status := httpx.get(f"{base}/v1/avatars/{avatar_id}").json())["status"] == "preparing":
        assert time.monotonic() < deadline, f"avatar {avatar_id} still preparing after {timeout:g} s"
        time.sleep(0.3)
    return status


def metric(base: str, name: str) -> float:
    """Sum of the samples of Prometheus metric ``name`` (all labels) from ``/metrics``."""
    text = httpx.get(base + "/metrics").text
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def pcm(seconds: float, seed: int, rate: int = 16000) -> bytes:
    """Random s16le mono PCM (loud enough to differ from silence everywhere)."""
    rng = np.random.default_rng(seed)
    return rng.integers(-20000, 20000, int(rate * seconds), dtype=np.int16).astype("<i2").tobytes()


async def start_session(base: str, avatar: str, rate: int = 16000):
    """(open connection, the ``ready`` message) of a new live session."""
    ws = await websockets.connect(ws_url(base), max_size=1 << 24)
    await ws.send(json.dumps({"type": "start", "avatar": avatar, "sample_rate": rate}))
    return ws, json.loads(await ws.recv())


async def speak(ws, data: bytes, packet: int = 640) -> None:
    """Send ``data`` in ``packet``-byte messages at once, then ``end``."""
    for i in range(0, len(data), packet):
        await ws.send(data[i:i + packet])
    await ws.send(json.dumps({"type": "end"}))


async def frames_until(ws, done: Callable[[list], bool], timeout: float = 60.0, events: list | None = None) -> list:
    """Frames ``(header, jpeg, pcm)`` until ``done(frames)`` holds; text events go to ``events``
    (AssertionError when none is expected or on timeout)."""
    frames: list = []
    deadline = time.monotonic() + timeout
    while not done(frames):
        assert time.monotonic() < deadline, f"timed out after {len(frames)} frames"
        msg = await asyncio.wait_for(ws.recv(), timeout)
        if isinstance(msg, str):
            assert events is not None, f"unexpected text message {msg}"
            events.append(json.loads(msg))
            continue
        frames.append(unpack_frame(msg))
    return frames


def speech_then_idle(frames) -> bool:
    """Some speech frames, then at least three idle ones."""
    spoke = [i for i, (h, _, _) in enumerate(frames) if h["speaking"]]
    return bool(spoke) and len(frames) > spoke[-1] + 3
