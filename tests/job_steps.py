"""Client steps and media of the job-service tests: submit over HTTP, follow a job's Server-Sent
Events, wait, check results; ``talkrt serve`` as a child process for the restart tests.

The servers run the tiny config with ``model.crop_size=128`` (the same network, a quarter of the
pixels through UNet and VAE: about ten times faster on a CPU) and one libx264 per output.
"""
from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np

from talkrt.media.probe import probe_output

JOB_OVERRIDES = ("model.crop_size=128", "pipeline.encoder.workers=1")
FINAL = ("done", "failed", "cancelled")
REPO = Path(__file__).resolve().parents[1]


def write_speech(path: Path, frames: int, seed: int, fps: int = 25) -> Path:
    """Random-phase tones of exactly ``frames`` video frames at ``fps`` (16 kHz mono WAV)."""
    n = frames * 16000 // fps
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    signal = 0.3 * np.sin(2 * np.pi * (150 + 400 * rng.random()) * t + rng.random() * 6.28)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes((signal * 32767).astype("<i2").tobytes())
    return path


def files(video: Path | None, audio: Path) -> list:
    parts = [("audio", (audio.name, audio.read_bytes(), "audio/wav"))]
    if video is not None:
        parts.append(("video", (video.name, video.read_bytes(), "video/mp4")))
    return parts


def submit(base: str, video: Path | None, audio: Path, headers: dict | None = None, **data) -> httpx.Response:
    """POST /v1/jobs (``data``: more form fields, e.g. ``avatar=...``, ``options=...``)."""
    return httpx.post(base + "/v1/jobs", files=files(video, audio), data=data, headers=headers, timeout=60)


def events(base: str, job_id: str, headers: dict | None = None, timeout: float = 120.0) -> list[dict]:
    """Every ``job`` event of the job's stream until it ends."""
    seen = []
    with httpx.stream("GET", f"{base}/v1/jobs/{job_id}/events", headers=headers, timeout=timeout) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event == "job":
                seen.append(json.loads(line[5:]))
    return seen


def wait_jobs(base: str, ids: list[str], headers: dict | None = None, timeout: float = 120.0) -> list[dict]:
    """The jobs once every one has ended (AssertionError on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = [httpx.get(f"{base}/v1/jobs/{i}", headers=headers, timeout=30).json() for i in ids]
        if all(j["status"] in FINAL for j in jobs):
            return jobs
        assert time.monotonic() < deadline, [(j["id"], j["status"]) for j in jobs]
        time.sleep(0.25)


def wait_for(check, timeout: float = 60.0, what: str = "condition"):
    """``check()``'s first truthy value (AssertionError on timeout)."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"no {what} within {timeout:g} s"
        time.sleep(0.05)
    return value


def check_result(path: Path, frames: int, size: tuple[int, int], faces: int | None = None) -> None:
    """A finished MP4 as the CLI tests check it: H.264 of ``frames`` frames at ``size`` with AAC
    audio, ``faces`` of them (default: all) with a face."""
    info = probe_output(path)
    assert (info.video_codec, info.num_frames, (info.width, info.height)) == ("h264", frames, size)
    assert info.has_audio and info.audio_codec == "aac"
    assert info.metadata["talkrt_faces"] == f"{frames if faces is None else faces}/{frames}"


def leftovers(root: Path) -> list[str]:
    """Temporary files of writers or uploads anywhere under ``root``."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name.startswith((".talkrt-", ".upload-")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(data_dir: Path, port: int, *extra: str, config: str = "tiny",
                   overrides: tuple[str, ...] = JOB_OVERRIDES, timeout: float = 120.0) -> Iterator[subprocess.Popen]:
    """``talkrt serve`` (``config``, default tiny, on the CPU, with ``overrides``) as a child process
    on ``port``, once ``/healthz`` answers 200; killed (SIGKILL) on exit if it still runs. Its log
    goes to ``data_dir/../server-<port>.log``."""
    args = [sys.executable, "-m", "talkrt.serve.cli", "serve", "--config", config, "--device", "cpu",
            "--port", str(port), "--data-dir", str(data_dir), "--log-level", "warning", *extra]
    for override in overrides:
        args += ["--set", override]
    log = open(Path(data_dir).parent / f"server-{port}.log", "ab")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not become healthy"
            time.sleep(0.2)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        log.close()
