"""The job service across a crash, and its command-line client: ``talkrt serve`` as a child process
(tiny config, CPU) killed with SIGKILL mid-job and started again on the same data directory, and
``talkrt submit`` run as a user runs it."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest

from job_steps import (REPO, check_result, free_port, leftovers, server_process, submit, wait_for, wait_jobs,
                       write_speech)
from media_factory import make_not_media
from serve_server import sample_clip

KEY = "restart-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SIZE = (320, 320)
LONG = 60                       # frames of the job that is running when the server is killed


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("restart-media")
    return {"a": sample_clip(folder, 0, 6, "a.mp4"), "b": sample_clip(folder, 20, 4, "b.mp4"),
            "long": write_speech(folder / "long.wav", LONG, seed=7),
            "short": [write_speech(folder / f"short{i}.wav", 6 + i, seed=8 + i) for i in range(2)],
            "speech": write_speech(folder / "speech.wav", 10, seed=9)}


def _submit_cli(base: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "talkrt.serve.cli", "submit", "--server", base, "--api-key", KEY,
                             "--no-progress", *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def restarted(tmp_path_factory, media):
    """A job running (followed by ``talkrt submit --wait``) and two queued when the server is
    killed with SIGKILL; then the server started again on the same data directory. Yields what
    the restart test checks; the client tests below use the restarted server."""
    root = tmp_path_factory.mktemp("restart")
    data, port = root / "data", free_port()
    base = f"http://127.0.0.1:{port}"
    out = root / "followed.mp4"
    with server_process(data, port, "--job-workers", "1", "--api-key", KEY) as proc:
        client = _submit_cli(base, "--video", media["a"], "--audio", media["long"], "--out", out, "--wait")
        first = wait_for(lambda: httpx.get(base + "/v1/jobs", headers=AUTH).json()["jobs"], 60, "the client's job")
        first_id = first[0]["id"]
        queued = [submit(base, media["a"], s, AUTH).json()["id"] for s in media["short"]]
        wait_for(lambda: httpx.get(f"{base}/v1/jobs/{first_id}", headers=AUTH).json()["frames_done"] > 0, 120,
                 "lip-sync frames of the first job")
        states = [httpx.get(f"{base}/v1/jobs/{i}", headers=AUTH).json()["status"] for i in queued]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    partial = (data / "jobs" / "results" / f"{first_id}.mp4").exists()
    with server_process(data, port, "--job-workers", "1", "--api-key", KEY) as proc:
        yield {"base": base, "data": data, "root": root, "ids": [first_id, *queued], "queued_states": states,
               "partial": partial, "client": client, "out": out, "proc": proc}


@pytest.mark.slow
def test_sigkill_mid_job_then_restart_runs_every_job_once(restarted):
    base, ids = restarted["base"], restarted["ids"]
    assert restarted["queued_states"] == ["queued"] * 2 and not restarted["partial"]
    again = httpx.get(f"{base}/v1/jobs/{ids[0]}/result", headers=AUTH)
    assert again.status_code in (409, 200)                      # never a partial file
    jobs = wait_jobs(base, ids, AUTH, timeout=180)
    assert [j["status"] for j in jobs] == ["done"] * 3
    assert [j["attempts"] for j in jobs] == [2, 1, 1]
    for job, frames in zip(jobs, (LONG, 6, 7)):
        path = restarted["root"] / f"{job['id']}.mp4"
        path.write_bytes(httpx.get(f"{base}/v1/jobs/{job['id']}/result", headers=AUTH).content)
        check_result(path, frames, SIZE)
    client = restarted["client"]
    _, err = client.communicate(timeout=120)
    assert client.returncode == 0, err                          # the client followed the job across the restart
    check_result(restarted["out"], LONG, SIZE)
    assert len(httpx.get(base + "/v1/jobs", headers=AUTH).json()["jobs"]) == 3
    assert leftovers(restarted["data"]) == [] and leftovers(restarted["root"]) == []


@pytest.fixture(scope="module")
def server(restarted):
    return restarted["base"]


def test_submit_wait_writes_the_mp4_and_prints_the_summary(server, media, tmp_path):
    out = tmp_path / "out.mp4"
    proc = _submit_cli(server, "--video", media["a"], "--audio", media["speech"], "--out", out, "--wait",
                       "--set", "pipeline.encoder.crf=30")
    stdout, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    fields = dict(item.split("=", 1) for item in stdout.strip().splitlines()[-1].split(" "))
    assert (fields["frames"], fields["faces"], fields["weights"], fields["encode"]) == ("10", "10/10", "synthetic",
                                                                                      "libx264-rgb")
    check_result(out, 10, SIZE)
    assert leftovers(tmp_path) == []


def test_submit_batch_writes_one_mp4_per_video(server, media, tmp_path):
    proc = _submit_cli(server, "--batch", "--audio", media["speech"], "--video", media["a"], "--video", media["b"],
                       "--out-dir", tmp_path / "outs", "--wait")
    stdout, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    lines = stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("job=") and " frames=10 " in line for line in lines)
    for name in ("a.mp4", "b.mp4"):
        check_result(tmp_path / "outs" / name, 10, SIZE)


def test_submit_without_wait_prints_the_job(server, media):
    proc = _submit_cli(server, "--video", media["b"], "--audio", media["speech"])
    stdout, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    answer = json.loads(stdout)
    assert answer["status"] == "queued"
    job = wait_jobs(server, [answer["id"]], AUTH)[0]
    assert job["status"] == "done"


def test_submit_refusals_exit_2_with_the_server_message(server, media, tmp_path):
    started = time.monotonic()
    proc = _submit_cli(server, "--video", make_not_media(tmp_path / "notes.mp4"), "--audio", media["speech"],
                       "--out", tmp_path / "o.mp4", "--wait")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "notes.mp4: not a readable media file" in err and "Traceback" not in err
    proc = _submit_cli(server, "--video", media["a"], "--audio", media["speech"], "--set", "model.crop_size=64")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "not settable per job" in err
    proc = subprocess.run([sys.executable, "-m", "talkrt.serve.cli", "submit", "--server", server, "--api-key", "bad",
                           "--video", str(media["a"]), "--audio", str(media["speech"])], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "401 unauthorized" in proc.stderr
    assert not (tmp_path / "o.mp4").exists() and leftovers(tmp_path) == []
    assert time.monotonic() - started < 60


def test_sigterm_puts_the_running_job_back_in_the_queue(restarted, media):
    """Last in this module: it stops the server. A graceful stop (SIGTERM) mid-job ends the
    process within its grace period, the job is queued again from the start, no file is left."""
    base, proc, data = restarted["base"], restarted["proc"], restarted["data"]
    job_id = submit(base, media["a"], media["long"], AUTH).json()["id"]
    wait_for(lambda: httpx.get(f"{base}/v1/jobs/{job_id}", headers=AUTH).json()["frames_done"] > 0, 120,
             "lip-sync frames")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) in (0, -signal.SIGTERM)          # uvicorn re-raises the signal after its shutdown
    with sqlite3.connect(data / "jobs.db") as db:
        row = db.execute("SELECT status, frames_done, attempts FROM jobs WHERE id=?", (job_id,)).fetchone()
    assert row == ("queued", 0, 1)
    assert not (data / "jobs" / "results" / f"{job_id}.mp4").exists() and leftovers(data) == []
