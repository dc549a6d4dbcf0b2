"""Jobs and a live session on one GPU: the musetalk config (synthetic weights) on a real server on
loopback; while a batch of offline jobs runs, a live client streams speech in real time and its
frames must keep the avatar's rate and arrive on time. GPU only; needs CuPy, torchvision (CUDA
build) and the server packages."""

from __future__ import annotations

import asyncio
import json
import time
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
for _name in ("cupy", "torchvision", "fastapi", "uvicorn", "websockets", "httpx", "multipart", "prometheus_client"):
    pytest.importorskip(_name)

import httpx  # noqa: E402
import websockets  # noqa: E402

from job_steps import check_result, wait_jobs, write_speech  # noqa: E402
from serve_server import pcm, running_server, sample_clip, upload, wait_prepared, ws_url  # noqa: E402
from talkrt.serve.jobs import JobSettings  # noqa: E402
from talkrt.serve.protocol import unpack_frame  # noqa: E402

JOBS = 6
SPEECH_S = 8.0
# Stated bounds for the live session while jobs run: frames at the avatar's 25 fps within 5%,
# and at least 95% of its speech frames no later than one frame interval after their slot's due
# time (the server's talkrt_frames_late rule, seen from the client).
RATE_TOLERANCE = 0.05
MIN_ON_TIME = 0.95


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("serve-data")
    with running_server(data, config="musetalk", device="cuda", timeout=900,
                        jobs=JobSettings(workers=2)) as (base, app):
        yield {"base": base, "state": app.state.server}


async def _live(base: str, avatar: str, speech: bytes) -> tuple[list, float]:
    """Stream ``speech`` in 20 ms packets at its own pace; (frames as (header, arrival), ready time)."""
    async with websockets.connect(ws_url(base), max_size=1 << 24) as ws:
        await ws.send(json.dumps({"type": "start", "avatar": avatar, "sample_rate": 16000}))
        assert json.loads(await ws.recv())["type"] == "ready"
        ready = time.monotonic()
        frames: list = []

        async def receive():
            async for msg in ws:
                if isinstance(msg, bytes):
                    frames.append((unpack_frame(msg)[0], time.monotonic()))

        reader = asyncio.create_task(receive())
        for i in range(0, len(speech), 640):
            await asyncio.sleep(max(0.0, ready + 0.3 + (i // 640 + 1) * 0.02 - time.monotonic()))
            await ws.send(speech[i:i + 640])
        await ws.send(json.dumps({"type": "end"}))
        await asyncio.sleep(1.0)
        reader.cancel()
    return frames, ready


def test_live_session_keeps_its_frame_rate_while_jobs_run(server, tmp_path):
    base = server["base"]
    r = upload(base, sample_clip(tmp_path, 0, 8, "live.mp4"))
    assert r.status_code == 202, r.text
    avatar = wait_prepared(base, r.json()["id"], timeout=300)
    assert avatar["status"] == "ready"
    audios = [write_speech(tmp_path / f"job{i}.wav", 250, seed=i) for i in range(JOBS)]       # 10 s each
    video = sample_clip(tmp_path, 40, 8, "job.mp4")
    parts = [("video", (video.name, video.read_bytes(), "video/mp4"))]
    parts += [("audio", (a.name, a.read_bytes(), "audio/wav")) for a in audios]
    batch = httpx.post(base + "/v1/batches", files=parts, timeout=120).json()
    ids = batch["jobs"]
    deadline = time.monotonic() + 300
    while httpx.get(f"{base}/v1/batches/{batch['batch']}").json()["frames_done"] == 0:
        assert time.monotonic() < deadline, "the jobs did not start"
        time.sleep(0.2)
    before = server["state"].scheduler.stats.job_frames
    frames, ready = asyncio.run(_live(base, avatar["id"], pcm(SPEECH_S, seed=3)))
    during = server["state"].scheduler.stats.job_frames - before
    shared = server["state"].scheduler.stats.shared_batches
    assert during > 0 and shared > 0, "no job frames were made while the live session spoke"

    headers = [h for h, _ in frames]
    assert [h["index"] for h in headers] == list(range(len(headers)))
    elapsed = frames[-1][1] - frames[0][1]
    assert (len(frames) - 1) / elapsed == pytest.approx(25.0, rel=RATE_TOLERANCE)
    speech = [(h, t) for h, t in frames if h["speaking"]]
    assert len(speech) >= SPEECH_S * 25 - 2
    on_time = sum(t <= ready + (h["index"] + 1) / 25 for h, t in speech) / len(speech)
    assert on_time >= MIN_ON_TIME, f"{100 * on_time:.1f}% of speech frames on time while jobs ran"

    jobs = wait_jobs(base, ids, timeout=900)
    assert [j["status"] for j in jobs] == ["done"] * JOBS
    out = tmp_path / "job0.mp4"
    out.write_bytes(httpx.get(f"{base}/v1/jobs/{ids[0]}/result").content)
    check_result(out, 250, (320, 320))
