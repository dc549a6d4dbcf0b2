"""``talkrt serve`` on CUDA: the musetalk config (synthetic weights) on a real server on loopback,
frames composed into device NV12 by the CuPy kernel and JPEG-encoded by nvJPEG (torchvision).
GPU only; needs CuPy, torchvision (CUDA build) and the server packages."""

from __future__ import annotations

import asyncio
import io
import json
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
for _name in ("cupy", "torchvision", "fastapi", "uvicorn", "websockets", "httpx", "multipart", "prometheus_client"):
    pytest.importorskip(_name)

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

from serve_server import (frames_until, metric, pcm, running_server, sample_clip, speak,  # noqa: E402
                          speech_then_idle, start_session, upload, wait_prepared)
from talkrt.serve.protocol import unpack_frame  # noqa: E402
from talkrt.stages import CpuComposeStage, FrameBatch  # noqa: E402
from talkrt.streams import on_stream  # noqa: E402

FRAME_PCM = 2 * 16000 // 25
SMALL = 256                       # the second avatar's frame size (the first: 320x320)
SIZES = (320, SMALL)
# Stated tolerances, in 8-bit levels. Outside the face box a speech frame is the avatar frame
# through BT.709 NV12 and back (4:2:0 chroma) and a quality-85 JPEG: small mean error, no bias
# (a wrong matrix, range or channel order shows as a bias of several levels).
MAX_MEAN_OUTSIDE_BOX = 4.0
MAX_BIAS_OUTSIDE_BOX = 1.5
# GPU compose (NV12, kernel) against the CPU compose (RGB, reference) on the same smooth faces:
# the whole-frame mean may exceed that of the NV12 round trip alone (8-bit rounding, 4:2:0
# chroma: ~1-2 levels) by 1 level, and at most 1% of the values may be off by more than 16
# (chroma of 2x2 blocks across the feathered mask edge).
COMPOSE_OVER_ROUND_TRIP = 1.0
MAX_SHARE_OVER_16 = 0.01


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("serve-data")
    with running_server(data, max_sessions=4, config="musetalk", device="cuda", timeout=900) as (base, app):
        yield {"base": base, "state": app.state.server}


@pytest.fixture(scope="module")
def avatars(server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    ids = []
    for first, name, size in ((0, "a.mp4", None), (40, "b.mp4", SMALL)):     # two frame sizes in one batch
        r = upload(server["base"], sample_clip(folder, first, 8, name, size))
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    states = [wait_prepared(server["base"], i, timeout=300) for i in ids]
    assert [s["status"] for s in states] == ["ready", "ready"], states
    return ids


def _rgb(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def _outside_box_error(state, avatar_id: str, header: dict, jpeg: bytes) -> tuple[float, float]:
    """(mean |error|, largest per-channel mean error) of a decoded speech frame against the
    avatar's source frame, outside the frame's face box."""
    live = state.avatars.live(avatar_id)
    src = live.source_index(header["index"])
    x1, y1, x2, y2 = (int(v) for v in live.prepared.boxes[src])
    outside = np.ones(live.frames[src].shape[:2], bool)
    outside[y1:y2, x1:x2] = False
    diff = (_rgb(jpeg).astype(np.int16) - live.frames[src].astype(np.int16))[outside]
    return float(np.abs(diff).mean()), float(np.abs(diff.mean(axis=0)).max())


def test_gpu_path_is_in_use(server):
    health = httpx.get(server["base"] + "/healthz").json()
    assert health["device"].startswith("cuda") and (health["compose"], health["config"]) == ("gpu", "musetalk-v1.5")
    assert server["state"].renderer.on_gpu


def test_two_sessions_on_two_avatars_share_gpu_batches(server, avatars):
    state = server["state"]
    mixed = state.scheduler.stats.mixed_batches
    sent = [pcm(0.4, 11), pcm(0.4, 12)]

    async def one(avatar, data):
        ws, ready = await start_session(server["base"], avatar)
        size = SIZES[avatars.index(avatar)]
        assert (ready["width"], ready["height"]) == (size, size)
        await speak(ws, data)
        frames = await frames_until(ws, speech_then_idle)
        await ws.close()
        return frames

    async def both():
        return await asyncio.gather(*(one(a, d) for a, d in zip(avatars, sent)))

    for avatar, size, frames, data in zip(avatars, SIZES, asyncio.run(both()), sent):
        assert [h["index"] for h, _, _ in frames] == list(range(len(frames)))
        assert b"".join(p for h, _, p in frames if h["speaking"]) == data            # bit-exact, in order
        assert all(len(p) == FRAME_PCM and not any(p) for h, _, p in frames if not h["speaking"])
        speech = [(h, j) for h, j, _ in frames if h["speaking"]]
        assert len(speech) == 10
        for h, jpeg in speech:
            assert jpeg[:2] == b"\xff\xd8" and Image.open(io.BytesIO(jpeg)).size == (size, size)
            error, bias = _outside_box_error(state, avatar, h, jpeg)
            assert error < MAX_MEAN_OUTSIDE_BOX and bias < MAX_BIAS_OUTSIDE_BOX, \
                f"frame {h['index']} outside the face: mean error {error:.2f}, bias {bias:.2f}"
    assert state.scheduler.stats.mixed_batches > mixed
    assert state.scheduler.stats.max_sessions_in_batch == 2


def test_speech_in_real_time_is_on_time(server, avatars):
    """2 s of speech in 20 ms packets at the pace it is spoken: at least 95% of the speech frames
    arrive no later than one frame interval after their due time (slot index / fps after ready)."""
    data = pcm(2.0, 13)

    async def run():
        ws, _ = await start_session(server["base"], avatars[0])
        t0 = time.monotonic()
        arrivals: list[tuple[dict, float]] = []

        async def receive():
            while True:
                msg = await ws.recv()
                if isinstance(msg, bytes):
                    arrivals.append((unpack_frame(msg)[0], time.monotonic()))

        reader = asyncio.create_task(receive())
        start = time.monotonic()
        for i in range(0, len(data), 640):
            await asyncio.sleep(max(0.0, start + (i // 640 + 1) * 0.02 - time.monotonic()))
            await ws.send(data[i:i + 640])
        await ws.send(json.dumps({"type": "end"}))
        await asyncio.sleep(0.8)
        reader.cancel()
        await ws.close()
        return t0, arrivals

    t0, arrivals = asyncio.run(run())
    speech = [(h, t) for h, t in arrivals if h["speaking"]]
    assert len(speech) == 50
    on_time = sum(t <= t0 + h["pts"] + 0.04 for h, t in speech)
    assert on_time >= 0.95 * len(speech), f"{on_time} of {len(speech)} speech frames on time"


def _smooth_faces(n: int, size: int) -> np.ndarray:
    """[n, size, size, 3] uint8 low-frequency faces (4:2:0 chroma loses nothing visible on them)."""
    y, x = np.mgrid[0:size, 0:size] / size
    faces = [np.stack([90 + 60 * np.sin(2 * np.pi * (x + k / n)), 120 + 50 * np.cos(2 * np.pi * y),
                       100 + 40 * np.sin(2 * np.pi * (x + y))], -1) for k in range(n)]
    return np.round(np.stack(faces)).astype(np.uint8)


def test_gpu_compose_matches_cpu_compose(server, avatars):
    state = server["state"]
    renderer = state.renderer
    live = state.avatars.live(avatars[0])
    p = live.prepared
    src = np.flatnonzero(p.found)[:8]
    assert len(src) > 0
    size = state.settings.cfg.model.crop_size
    faces = _smooth_faces(len(src), size)

    def batch() -> FrameBatch:
        return FrameBatch(index=0, out_index=np.arange(len(src)), src_index=src, avatars=(p,),
                          avatar_index=np.zeros(len(src), np.int64), found=np.ones(len(src), bool))

    gpu = batch()
    with torch.inference_mode(), on_stream(renderer.parts.stream):
        gpu.nv12 = renderer.gpu.frames([live], gpu.avatar_index, src)
        untouched = [t.cpu().numpy() for t in renderer.gpu.rgb([f.clone() for f in gpu.nv12])]
        gpu.faces = torch.from_numpy(faces).cuda()
        renderer.gpu.compose(gpu)
        got = [t.cpu().numpy().transpose(1, 2, 0) for t in renderer.gpu.rgb(gpu.nv12)]
    cpu = batch()
    cpu.frames = [live.frames[s].copy() for s in src]
    cpu.faces = faces
    CpuComposeStage("numpy", state.settings.cfg.pipeline.sharpen)(cpu)

    floor = np.mean([np.abs(u.transpose(1, 2, 0).astype(int) - live.frames[s]).mean() for u, s in zip(untouched, src)])
    diff = np.abs(np.stack(got).astype(np.int16) - np.stack(cpu.frames).astype(np.int16))
    assert floor < 2.5, f"NV12 round trip alone: mean error {floor:.2f}"
    assert diff.mean() <= floor + COMPOSE_OVER_ROUND_TRIP, f"mean {diff.mean():.2f} (NV12 round trip alone: {floor:.2f})"
    assert (diff > 16).mean() <= MAX_SHARE_OVER_16, f"{100 * (diff > 16).mean():.2f}% of values off by > 16"
    changed = np.abs(np.stack(got).astype(np.int16) - np.stack([live.frames[s] for s in src])).mean()
    assert changed > 1.0                                    # the faces were composed at all


def test_out_of_memory_fails_the_step_and_the_server_keeps_serving(server, avatars):
    """A real CUDA out-of-memory error: the caching allocator is capped at what it holds now
    (``torch.cuda.set_per_process_memory_fraction``, this process is the server), so the next
    speech step cannot allocate. The speaking session gets ``speech_dropped`` and idle frames, an
    idle session on the other avatar is not disturbed, and once the cap is lifted the speaker
    speaks again."""
    failed_before = metric(server["base"], "talkrt_batches_failed_total")
    total = torch.cuda.get_device_properties(0).total_memory
    first, second = pcm(0.4, 21), pcm(0.2, 22)

    async def run():
        speaker, _ = await start_session(server["base"], avatars[0])
        watcher, _ = await start_session(server["base"], avatars[1])
        watched: list[tuple[dict, float]] = []

        async def watch():                  # the idle session, read all along
            while True:
                msg = await watcher.recv()
                watched.append((unpack_frame(msg)[0], time.monotonic()))

        reader = asyncio.create_task(watch())
        await speak(speaker, pcm(0.2, 20))                          # warm: a step that succeeds
        await frames_until(speaker, speech_then_idle)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(torch.cuda.memory_reserved() / total)
        try:
            events: list[dict] = []
            await speak(speaker, first)
            dropped = await frames_until(speaker, lambda f: bool(events) and len(f) >= 10, timeout=30,
                                         events=events)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
        await speak(speaker, second)
        again = await frames_until(speaker, speech_then_idle, timeout=30)
        reader.cancel()
        await speaker.close()
        await watcher.close()
        return events, dropped, again, watched

    events, dropped, again, watched = asyncio.run(run())
    assert [e["type"] for e in events] == ["speech_dropped"] and events[0]["code"] == "out_of_memory"
    after = [h for h, _, _ in dropped if h["index"] >= events[0]["index"]]
    assert after and not any(h["speaking"] for h in after)
    assert b"".join(p for h, _, p in again if h["speaking"]) == second
    indices = [h["index"] for h, _ in watched]
    assert indices == list(range(len(indices))) and len(indices) > 25
    assert not any(h["speaking"] for h, _ in watched)
    gaps = np.diff([t for _, t in watched])
    assert gaps.max() < 0.25, f"the idle session waited {1000 * gaps.max():.0f} ms for a frame"
    assert metric(server["base"], "talkrt_batches_failed_total") > failed_before
    assert httpx.get(server["base"] + "/healthz").json()["status"] == "ok"
