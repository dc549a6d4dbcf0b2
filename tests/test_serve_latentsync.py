"""``talkrt serve`` with a LatentSync config: jobs run the family's own denoising stages, one chunk
on the device at a time; live sessions are refused. A real uvicorn server on loopback (the tiny
LatentSync config on the CPU, 2 denoising steps), real HTTP and WebSocket clients, real media
and SQLite. The MuseTalk server's behaviour is covered by the other test_serve_* modules."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import websockets

from job_steps import check_result, events, files, submit, wait_jobs, write_speech
from serve_server import running_server, sample_clip, upload, wait_prepared, ws_url
from talkrt.media.probe import probe_output, probe_video
from talkrt.serve.jobs import JobSettings

OVERRIDES = ("model.denoise.steps=2", "pipeline.encoder.workers=1")
SIZE = (320, 320)       # the sample avatar's frames
FPS = 25


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("ls-serve-data")
    settings = JobSettings(workers=2, max_duration_s=30.0, janitor_s=3600.0)
    with running_server(data, config="latentsync16-tiny", overrides=OVERRIDES, jobs=settings) as (base, app):
        yield {"base": base, "data": data, "state": app.state.server}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ls-media")
    return {"a": sample_clip(folder, 0, 6, "a.mp4"), "b": sample_clip(folder, 20, 5, "b.mp4"),
            "c": sample_clip(folder, 40, 6, "c.mp4"),
            "speech": write_speech(folder / "speech.wav", 20, seed=3),
            "short": write_speech(folder / "short.wav", 7, seed=4)}


def _fields(job: dict) -> dict[str, str]:
    return dict(item.split("=", 1) for item in job["summary"]["line"].split(" "))


def test_healthz_names_the_family_and_no_live(server):
    health = httpx.get(server["base"] + "/healthz").json()
    assert (health["status"], health["family"], health["live"]) == ("ok", "latentsync16", False)
    assert (health["config"], health["max_batch"], health["backend"]) == ("latentsync-1.6-tiny", 16, "eager")
    state = server["state"]
    assert state.scheduler is None and state.renderer is None     # no live machinery was built


def test_job_on_an_uploaded_video_runs_the_denoising_stages(server, media, tmp_path):
    """20 output frames = one 16-frame chunk and a short one of 4, over a 6-frame video (ping-pong)."""
    base, stages = server["base"], server["state"].model_stages
    chunks_before = stages.chunks
    r = submit(base, media["c"], media["speech"], options=json.dumps({"pipeline.encoder.crf": 28}))
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    seen = events(base, job_id)
    last = seen[-1]
    assert last["status"] == "done", last
    assert (last["frames_done"], last["frames_total"], last["progress"]) == (20, 20, 1.0)
    phases = {e["phase"]["name"] for e in seen if e["phase"]}
    assert "lip-sync" in phases and phases & {"tracking", "encoding"}, phases      # prepared, then made
    fields = _fields(last)
    assert (fields["frames"], fields["faces"], fields["weights"]) == ("20", "20/20", "synthetic")
    assert stages.chunks - chunks_before == 2
    out = tmp_path / "out.mp4"
    out.write_bytes(httpx.get(f"{base}/v1/jobs/{job_id}/result").content)
    check_result(out, 20, SIZE)
    info = probe_output(out)
    assert info.fps == FPS and info.duration_s == pytest.approx(20 / FPS, abs=1 / FPS)
    assert info.audio_duration_s == pytest.approx(20 / FPS, abs=0.03)
    assert info.metadata["talkrt_config"] == "latentsync-1.6-tiny"


def test_concurrent_jobs_never_overlap_their_chunks(server, media):
    """Two workers, two jobs: both workers run chunks, never two at once (the model lock)."""
    generator = server["state"].jobs.ctx.parts.models.generator
    intervals: list[tuple[float, float, str]] = []
    original = generator.denoise

    def timed(chunk):
        start = time.perf_counter()
        try:
            return original(chunk)
        finally:
            intervals.append((start, time.perf_counter(), threading.current_thread().name))

    generator.denoise = timed
    try:
        parts = files(None, media["speech"]) + [("video", (media[k].name, media[k].read_bytes(), "video/mp4"))
                                                for k in ("a", "b")]
        answer = httpx.post(server["base"] + "/v1/batches", files=parts, timeout=60).json()
        jobs = wait_jobs(server["base"], answer["jobs"], timeout=120)
    finally:
        del generator.denoise                   # the class's method again
    assert [j["status"] for j in jobs] == ["done", "done"], jobs
    assert len(intervals) == 4 and len({name for _, _, name in intervals}) == 2, intervals
    intervals.sort()
    assert all(a_end <= b_start for (_, a_end, _), (b_start, _, _) in itertools.pairwise(intervals)), intervals


def test_job_on_a_prepared_avatar_uses_its_cache(server, media, tmp_path):
    base, state = server["base"], server["state"]
    r = upload(base, media["b"])
    assert r.status_code in (200, 202), r.text
    status = wait_prepared(base, r.json()["id"])
    assert (status["status"], status["frames"], status["faces_found"], status["width"]) == ("ready", 5, 5, 320)
    source = state.avatars.source(status["id"])
    assert state.avatars.preparer.cached(source, probe_video(source))     # the family's own cache key rule
    r = submit(base, None, media["short"], avatar=status["id"])
    assert r.status_code == 202, r.text
    seen = events(base, r.json()["id"])
    assert seen[-1]["status"] == "done", seen[-1]
    assert {e["phase"]["name"] for e in seen if e["phase"]} == {"lip-sync"}      # nothing prepared again
    assert seen[-1]["summary"]["inputs"] == {"video": f"avatar {status['id']}", "audio": "short.wav",
                                             "avatar": status["id"]}
    out = tmp_path / "avatar.mp4"
    out.write_bytes(httpx.get(f"{base}/v1/jobs/{seen[-1]['id']}/result").content)
    check_result(out, 7, SIZE)


def test_options_the_family_cannot_run_are_refused(server, media):
    """Every pipeline.sharpen.* key is refused by name (even a value that would change nothing
    here), and the allowed list a refusal gives does not offer them."""
    before = httpx.get(server["base"] + "/v1/jobs").json()["jobs"]
    for key, value in (("pipeline.sharpen.enabled", True), ("pipeline.sharpen.amount", 2.0),
                       ("pipeline.sharpen.threshold", 5)):
        r = submit(server["base"], media["a"], media["short"], options=json.dumps({key: value}))
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "bad_options" and error["message"].startswith(f"options.{key}: "), error
        assert "does not sharpen" in error["message"]
    r = submit(server["base"], media["a"], media["short"], options=json.dumps({"model.crop_size": 64}))
    message = r.json()["error"]["message"]
    assert r.status_code == 422 and "allowed: fps, pipeline.encoder." in message and "sharpen" not in message
    assert httpx.get(server["base"] + "/v1/jobs").json()["jobs"] == before


def test_live_session_is_refused_with_a_protocol_error(server):
    async def run():
        async with websockets.connect(ws_url(server["base"])) as ws:
            error = json.loads(await ws.recv())         # refused as it opens, before any start message
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            return error, closed.value.rcvd.code

    error, code = asyncio.run(run())
    assert (error["type"], error["code"], code) == ("error", "live_unavailable", 1008)
    assert "latentsync16" in error["message"] and "/v1/jobs" in error["message"]
    assert server["state"].open_sessions == 0


def test_the_cli_serves_a_latentsync_config(monkeypatch, tmp_path):
    """``talkrt serve --config latentsync16-tiny`` builds the app (uvicorn itself is not started)."""
    import uvicorn

    from talkrt.serve import cli
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app, **kw))
    args = cli.parser().parse_args(["serve", "--config", "latentsync16-tiny", "--device", "cpu", "--data-dir",
                                    str(tmp_path), "--set", "model.denoise.steps=2", "--log-level", "warning"])
    assert isinstance(args, argparse.Namespace) and cli.serve(args) == 0
    cfg = started["app"].state.server.settings.cfg
    assert (cfg.family, cfg.model.denoise.steps) == ("latentsync16", 2)


def test_the_page_offers_no_live_session(server, tmp_path):
    """The browser page reads ``live: false`` from /healthz: the session buttons stay off."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip(f"{chromium} is missing (apt-get install chromium)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(server["base"] + "/")
            page.wait_for_function("window.talkrtStats.live === false", timeout=15_000)
            assert page.is_disabled("#mic") and page.is_disabled("#wav")
            assert page.is_visible("#live-off") and "jobs only" in page.inner_text("#live-off")
            assert errors == []
        finally:
            browser.close()
