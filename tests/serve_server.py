"""A real ``talkrt serve`` app on loopback for the server tests: uvicorn in a thread, tiny config, CPU."""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import uvicorn

from talkrt.config import load_config
from talkrt.serve.app import ServeSettings, create_app


@contextlib.contextmanager
def running_server(data_dir: Path, max_sessions: int = 2) -> Iterator[tuple[str, object]]:
    """Yield (base URL, the app) once ``/healthz`` answers 200; stop the server on exit.

    Raises:
        TimeoutError: the models did not load within 120 s.
    """
    app = create_app(ServeSettings(cfg=load_config("tiny"), device="cpu", data_dir=data_dir,
                                   max_sessions=max_sessions))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(base + "/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server did not become healthy in 120 s")
            time.sleep(0.2)
        yield base, app
    finally:
        srv.should_exit = True
        thread.join(30)
