"""The job service of ``talkrt serve`` on loopback: a real uvicorn server in a thread (tiny config,
CPU, an API key set), real HTTP and WebSocket clients, real media and SQLite. Restarts and the
``talkrt submit`` client are in test_serve_jobs_restart.py, the scheduler's sharing in
test_serve_jobs_scheduler.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from concurrent.futures import ThreadPoolExecutor
import httpx
import pytest
import websockets

from job_steps import (JOB_OVERRIDES, check_result, events, files, leftovers, submit, wait_for, wait_jobs,
                       write_speech)
from media_factory import make_not_media, make_video
from serve_server import running_server, sample_clip, ws_url
from talkrt.serve.jobs import JobSettings

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMIT = 3 << 20                 # request body limit of the test server
SIZE = (320, 320)               # the sample avatar's frames


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("jobs-data")
    settings = JobSettings(workers=2, max_upload_bytes=LIMIT, max_duration_s=30.0, janitor_s=3600.0)
    with running_server(data, overrides=JOB_OVERRIDES, api_key=KEY, jobs=settings) as (base, app):
        yield {"base": base, "data": data, "state": app.state.server}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("job-media")
    return {
        "a": sample_clip(folder, 0, 6, "a.mp4"), "b": sample_clip(folder, 12, 4, "b.mp4"),
        "c": sample_clip(folder, 24, 4, "c.mp4"), "d": sample_clip(folder, 36, 4, "d.mp4"),
        "speech": write_speech(folder / "speech.wav", 10, seed=0),
        "long": write_speech(folder / "long.wav", 500, seed=1),
        "folder": folder,
    }


def _state(server) -> dict[str, list[str]]:
    """What the job service holds on disk, and its jobs."""
    root = server["data"] / "jobs"
    disk = {d: sorted(p.name for p in (root / d).iterdir()) for d in ("tmp", "media", "results")}
    return {**disk, "jobs": [j["id"] for j in httpx.get(server["base"] + "/v1/jobs", headers=AUTH).json()["jobs"]]}


def _error(r: httpx.Response) -> tuple[int, str, str]:
    body = r.json()["error"]
    return r.status_code, body["code"], body["message"]


def test_job_events_to_done_and_the_result(server, media, tmp_path):
    base = server["base"]
    r = submit(base, media["a"], media["speech"], AUTH, options=json.dumps({"pipeline.encoder.crf": 30}))
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert r.json() == {"id": job_id, "status": "queued"}
    seen = events(base, job_id, AUTH)
    assert seen[0]["status"] in ("queued", "running") and seen[-1]["status"] == "done"
    assert [e["progress"] for e in seen] == sorted(e["progress"] for e in seen)
    assert "lip-sync" in {e["phase"]["name"] for e in seen if e["phase"]}
    last = seen[-1]
    assert (last["progress"], last["frames_done"], last["frames_total"], last["attempts"]) == (1.0, 10, 10, 1)
    assert last["created"] <= last["started"] <= last["finished"]
    fields = dict(item.split("=", 1) for item in last["summary"]["line"].split(" "))
    assert (fields["frames"], fields["faces"], fields["weights"]) == ("10", "10/10", "synthetic")
    assert last["summary"]["inputs"] == {"video": "a.mp4", "audio": "speech.wav"}
    assert last["summary"]["output"] == f"/v1/jobs/{job_id}/result"
    result = httpx.get(f"{base}/v1/jobs/{job_id}/result", headers=AUTH)
    assert result.status_code == 200 and result.headers["content-type"] == "video/mp4"
    out = tmp_path / "out.mp4"
    out.write_bytes(result.content)
    check_result(out, 10, SIZE)
    assert httpx.get(f"{base}/v1/jobs/{job_id}", headers=AUTH).json() == last


def test_batch_of_three_videos_over_one_audio(server, media, tmp_path):
    base = server["base"]
    parts = files(None, media["speech"]) + [("video", (media[k].name, media[k].read_bytes(), "video/mp4"))
                                            for k in ("b", "c", "d")]
    r = httpx.post(base + "/v1/batches", files=parts, headers=AUTH, timeout=60)
    assert r.status_code == 202, r.text
    batch, ids = r.json()["batch"], r.json()["jobs"]
    assert len(ids) == 3 and len(set(ids)) == 3
    jobs = wait_jobs(base, ids, AUTH)
    assert [j["status"] for j in jobs] == ["done"] * 3
    assert [j["summary"]["inputs"]["video"] for j in jobs] == ["b.mp4", "c.mp4", "d.mp4"]
    agg = httpx.get(f"{base}/v1/batches/{batch}", headers=AUTH).json()
    assert (agg["status"], agg["progress"], agg["frames_done"], agg["frames_total"]) == ("done", 1.0, 30, 30)
    assert agg["counts"]["done"] == 3 and [j["id"] for j in agg["jobs"]] == ids
    for job_id in ids:
        out = tmp_path / f"{job_id}.mp4"
        out.write_bytes(httpx.get(f"{base}/v1/jobs/{job_id}/result", headers=AUTH).content)
        check_result(out, 10, SIZE)


def test_one_failing_job_fails_alone(server, media, tmp_path):
    base = server["base"]
    blank = make_video(tmp_path / "blank.mp4", 96, 96, num_frames=4)          # decodes fine, has no face
    parts = files(None, media["speech"])
    parts += [("video", (p.name, p.read_bytes(), "video/mp4")) for p in (blank, media["b"])]
    answer = httpx.post(base + "/v1/batches", files=parts, headers=AUTH, timeout=60).json()
    jobs = wait_jobs(base, answer["jobs"], AUTH)
    assert [j["status"] for j in jobs] == ["failed", "done"]
    assert jobs[0]["error"] == {"code": "bad_media", "message": "blank.mp4: no face found in any frame"}
    assert httpx.get(f"{base}/v1/batches/{answer['batch']}", headers=AUTH).json()["status"] == "failed"
    assert _error(httpx.get(f"{base}/v1/jobs/{jobs[0]['id']}/result", headers=AUTH))[:2] == (409, "not_done")
    assert not (server["data"] / "jobs" / "results" / f"{jobs[0]['id']}.mp4").exists()
    health = httpx.get(base + "/healthz").json()
    assert health["jobs"]["failed"] >= 1 and health["jobs"]["done"] >= 1
    assert (health["family"], health["live"]) == ("musetalk", True)       # a MuseTalk server serves live too


def test_cancel_a_running_job_leaves_no_file(server, media):
    base = server["base"]
    job_id = submit(base, media["a"], media["long"], AUTH).json()["id"]
    wait_for(lambda: httpx.get(f"{base}/v1/jobs/{job_id}", headers=AUTH).json()["frames_done"] > 0, 120,
             "lip-sync frames")
    early = httpx.get(f"{base}/v1/jobs/{job_id}/result", headers=AUTH)
    assert _error(early)[:2] == (409, "not_done")
    answer = httpx.delete(f"{base}/v1/jobs/{job_id}", headers=AUTH).json()
    assert answer["status"] in ("running", "cancelled")
    job = wait_jobs(base, [job_id], AUTH)[0]
    assert job["status"] == "cancelled" and 0 < job["frames_done"] < 500
    assert _error(httpx.get(f"{base}/v1/jobs/{job_id}/result", headers=AUTH))[:2] == (409, "not_done")
    assert not (server["data"] / "jobs" / "results" / f"{job_id}.mp4").exists()
    assert leftovers(server["data"]) == []


def test_corrupt_or_short_media_is_refused_with_the_probe_message(server, media, tmp_path):
    base = server["base"]
    before = _state(server)
    r = submit(base, make_not_media(tmp_path / "notes.mp4"), media["speech"], AUTH)
    status, code, message = _error(r)
    assert (status, code) == (422, "bad_media") and message.startswith("notes.mp4: not a readable media file")
    r = submit(base, media["a"], make_not_media(tmp_path / "voice.wav"), AUTH)
    assert _error(r)[:2] == (422, "bad_media") and _error(r)[2].startswith("voice.wav: ")
    r = submit(base, media["a"], write_speech(tmp_path / "blip.wav", 0, seed=2), AUTH)
    assert _error(r)[0] == 422 and "blip.wav" in _error(r)[2]
    short = tmp_path / "short.wav"
    write_speech(short, 1, seed=3)
    short.write_bytes(short.read_bytes()[:-400])                # 15 ms: shorter than one frame
    r = submit(base, media["a"], short, AUTH)
    assert _error(r)[0] == 422 and "shorter than one video frame" in _error(r)[2]
    assert _state(server) == before


def test_bad_requests_get_json_errors(server, media, tmp_path):
    base = server["base"]
    before = _state(server)
    r = submit(base, media["a"], write_speech(tmp_path / "lecture.wav", 31 * 25, seed=4), AUTH)
    assert _error(r) == (422, "too_long", "lecture.wav: 31.0 s is longer than this server takes (30 s)")
    cases = [
        (dict(options=json.dumps({"model.crop_size": 64})), 422, "bad_options"),
        (dict(options=json.dumps({"pipeline.encoder.crf": 99})), 422, "bad_options"),
        (dict(options="{not json"), 422, "bad_options"),
        (dict(options="[" * 5000 + "]" * 5000), 422, "bad_options"),          # nested too deeply
        (dict(options=json.dumps({"pipeline.encoder.workers": 100000})), 422, "bad_options"),   # one job, all cores
        (dict(avatar="f" * 24), 422, "bad_job"),                 # a video and an avatar
    ]
    for data, status, code in cases:
        r = submit(base, media["a"], media["speech"], AUTH, **data)
        assert _error(r)[:2] == (status, code), (data, r.text)
    r = httpx.post(base + "/v1/jobs", files=files(None, media["speech"]), data={"avatar": "f" * 24}, headers=AUTH)
    assert _error(r)[:2] == (422, "unknown_avatar")
    r = submit(base, media["a"], media["speech"], AUTH, options=json.dumps({"fps": "1000"}))
    assert _error(r) == (422, "bad_options", "options.fps: frame rate 1000 is out of range (0 < fps <= 240)")
    r = submit(base, media["a"], media["speech"], AUTH, options=json.dumps({"model.crop_size": 64}))
    assert _error(r)[2].startswith("options.model.crop_size: not settable per job; allowed: fps, ")
    assert "pipeline.sharpen.amount" in _error(r)[2]                    # MuseTalk sharpens
    # options sent as a file part (curl -F options=@opts.json) are read as the JSON they hold
    as_file = ("options", ("opts.json", json.dumps({"pipeline.encoder.crf": 99}).encode(), "application/json"))
    r = httpx.post(base + "/v1/jobs", files=files(media["a"], media["speech"]) + [as_file], headers=AUTH)
    assert _error(r)[:2] == (422, "bad_options") and "crf" in _error(r)[2]
    r = httpx.post(base + "/v1/jobs", files=files(None, media["speech"]), headers=AUTH)
    assert _error(r)[:2] == (422, "missing_part")
    assert _error(httpx.post(base + "/v1/jobs", json={"video": "x"}, headers=AUTH))[:2] == (400, "bad_form")
    assert _error(httpx.post(base + "/v1/jobs", headers=AUTH))[:2] == (400, "bad_form")
    assert _error(httpx.get(f"{base}/v1/jobs/{'0' * 32}", headers=AUTH))[:2] == (404, "not_found")
    assert _error(httpx.get(f"{base}/v1/jobs/..%2F..%2Fjobs.db/result", headers=AUTH))[:2] == (404, "not_found")
    assert _error(httpx.get(f"{base}/v1/jobs?status=sleeping", headers=AUTH))[:2] == (422, "bad_status")
    assert _error(httpx.get(f"{base}/v1/batches/{'0' * 32}", headers=AUTH))[:2] == (404, "not_found")
    assert _state(server) == before


def test_upload_over_the_limit_is_413_before_it_is_stored(server, media):
    base = server["base"]
    before = _state(server)
    big = bytes(LIMIT + 1)
    r = httpx.post(base + "/v1/jobs", files=[("video", ("big.mp4", big, "video/mp4"))] + files(None, media["speech"]),
                   headers=AUTH)
    assert _error(r)[:2] == (413, "too_large")

    def chunked():                      # no Content-Length: refused once the bytes read pass the limit
        yield b"--x\r\nContent-Disposition: form-data; name=\"video\"; filename=\"big.mp4\"\r\n\r\n"
        for _ in range(LIMIT // (1 << 16) + 2):
            yield bytes(1 << 16)
    r = httpx.post(base + "/v1/jobs", content=chunked(),
                   headers={**AUTH, "content-type": "multipart/form-data; boundary=x"})
    assert _error(r)[:2] == (413, "too_large")
    avatars = sorted((server["data"] / "avatars").rglob("*"))
    r = httpx.post(base + "/v1/avatars", files={"video": ("big.mp4", big, "video/mp4")}, headers=AUTH)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"   # the same --max-upload-mb limit as jobs
    assert sorted((server["data"] / "avatars").rglob("*")) == avatars
    assert _state(server) == before


def test_api_key_on_every_v1_route(server, media):
    base = server["base"]
    assert httpx.get(base + "/healthz").status_code == 200
    for method, path in [("GET", "/v1/jobs"), ("GET", "/v1/avatars"), ("POST", "/v1/jobs"), ("POST", "/v1/batches"),
                         ("GET", f"/v1/jobs/{'0' * 32}/events")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
            r = httpx.request(method, base + path, headers=headers)
            assert _error(r)[:2] == (401, "unauthorized"), (method, path, headers)
            assert r.headers["www-authenticate"].startswith("Bearer")
    assert httpx.get(base + "/v1/jobs", params={"token": KEY}).status_code == 200

    async def live(url: str):
        try:
            async with websockets.connect(url) as ws:
                await ws.send(json.dumps({"type": "start", "avatar": "f" * 24, "sample_rate": 16000}))
                return json.loads(await ws.recv())["code"]
        except websockets.InvalidStatus as exc:
            return exc.response.status_code

    assert asyncio.run(live(ws_url(base))) == 401
    assert asyncio.run(live(ws_url(base) + "?token=wrong")) == 401
    assert asyncio.run(live(ws_url(base) + f"?token={KEY}")) == "unknown_avatar"     # past the key check


def test_job_on_a_stored_avatar_reuses_its_preparation(server, media):
    base = server["base"]
    r = httpx.post(base + "/v1/avatars", files={"video": ("a.mp4", media["a"].read_bytes(), "video/mp4")},
                   headers=AUTH, timeout=60)
    assert r.status_code in (200, 202), r.text
    avatar = r.json()["id"]

    def prepared():
        s = httpx.get(f"{base}/v1/avatars/{avatar}", headers=AUTH).json()
        return s if s["status"] != "preparing" else None

    status = wait_for(prepared, 120, "avatar preparation")
    assert status["status"] == "ready"
    prepared = sorted(p.name for p in (server["data"] / "prepared").iterdir())
    r = httpx.post(base + "/v1/jobs", files=files(None, media["speech"]), data={"avatar": avatar}, headers=AUTH)
    assert r.status_code == 202, r.text
    job = wait_jobs(base, [r.json()["id"]], AUTH)[0]
    assert job["status"] == "done" and job["avatar"] == avatar
    assert job["summary"]["inputs"] == {"video": f"avatar {avatar}", "audio": "speech.wav", "avatar": avatar}
    assert sorted(p.name for p in (server["data"] / "prepared").iterdir()) == prepared      # a cache hit


def test_storage_quota_refuses_new_jobs(server, media):
    service = server["state"].jobs
    before = _state(server)
    settings = service.settings
    service.settings = dataclasses.replace(settings, quota_bytes=service.files.usage() + 1000)
    try:
        assert _error(submit(server["base"], media["a"], media["speech"], AUTH))[:2] == (507, "quota")
    finally:
        service.settings = settings
    assert _state(server) == before


def test_fifty_queued_jobs_none_lost_or_duplicated(server, media, tmp_path):
    base = server["base"]
    done_before = _done_count(httpx.get(base + "/metrics").text)
    frames = [2 + i % 3 for i in range(50)]
    audios = [write_speech(tmp_path / f"s{i:02d}.wav", n, seed=100 + i) for i, n in enumerate(frames)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda a: submit(base, media["a"], a, AUTH), audios))
    assert [r.status_code for r in answers] == [202] * 50
    ids = [r.json()["id"] for r in answers]
    assert len(set(ids)) == 50
    jobs = wait_jobs(base, ids, AUTH, timeout=240)
    assert [j["status"] for j in jobs] == ["done"] * 50
    assert [j["attempts"] for j in jobs] == [1] * 50
    assert [j["frames_total"] for j in jobs] == frames
    assert [j["summary"]["inputs"]["audio"] for j in jobs] == [a.name for a in audios]
    for job, n in zip(jobs, frames):
        out = tmp_path / f"{job['id']}.mp4"
        out.write_bytes(httpx.get(f"{base}/v1/jobs/{job['id']}/result", headers=AUTH).content)
        check_result(out, n, SIZE)
    assert _done_count(httpx.get(base + "/metrics").text) - done_before == 50
    listed = [j["id"] for j in httpx.get(base + "/v1/jobs", params={"status": "done"}, headers=AUTH).json()["jobs"]]
    assert set(ids) <= set(listed) and len(listed) == len(set(listed))
    assert _state(server)["media"] == []                 # inputs removed once no job needs them
    assert leftovers(server["data"]) == []


def test_retention_removes_old_results(server):
    base = server["base"]
    service = server["state"].jobs
    done = [j["id"] for j in httpx.get(base + "/v1/jobs", params={"status": "done"}, headers=AUTH).json()["jobs"]]
    assert done and service.expire(time.time() - 3600) == []           # nothing that old yet
    expired = service.expire(time.time() + service.settings.retention_s + 1)
    assert set(done) <= set(expired)
    job_id = done[0]
    assert _error(httpx.get(f"{base}/v1/jobs/{job_id}/result", headers=AUTH))[:2] == (410, "expired")
    assert httpx.get(f"{base}/v1/jobs/{job_id}", headers=AUTH).json()["expired"] is True
    assert _state(server)["results"] == []
    r = httpx.delete(f"{base}/v1/jobs/{job_id}", headers=AUTH)
    assert r.json() == {"id": job_id, "status": "done", "deleted": True}
    assert _error(httpx.get(f"{base}/v1/jobs/{job_id}", headers=AUTH))[:2] == (404, "not_found")


def _done_count(metrics_text: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith('talkrt_jobs_finished_total{status="done"}'):
            return float(line.split()[-1])
    return 0.0
