"""A job runs only on the model it was submitted to: every job records the accepting server's
:class:`~talkrt.serve.job_store.ModelIdentity` (its ``--config`` and the config's model hash); a
server started on the same data directory with another model ends the queued and interrupted
jobs of the other model ``failed`` (``config_mismatch``) instead of running them. The store on a
real SQLite file (a schema-1 file migrated), then ``talkrt serve`` as child processes (tiny and
the tiny LatentSync config, CPU) restarted on one data directory, in both directions. A job
resumed on the same config is covered by test_serve_jobs_restart.py."""

from __future__ import annotations

import signal
import sqlite3
import time

import httpx
import pytest

from job_steps import free_port, leftovers, server_process, submit, wait_for, write_speech
from serve_server import sample_clip
from talkrt.serve import job_store
from talkrt.serve.job_store import JobSpec, JobStore, ModelIdentity

LATENTSYNC = ("model.denoise.steps=1", "pipeline.encoder.workers=1")
TINY = ModelIdentity("tiny", "a" * 16)
OTHER = ModelIdentity("latentsync16-tiny", "b" * 16)


def _spec(model: ModelIdentity | None, audio: str = "a.wav") -> JobSpec:
    return JobSpec(video="v.mp4", avatar=None, audio=audio, video_name="talk.mp4", audio_name="dub.wav", options=(),
                   fps=None, frames_total=10, model=model)


def test_jobs_of_another_model_end_failed_after_a_restart(tmp_path):
    """A running job (interrupted) and a queued one of the tiny server end failed on a server of
    another model; a job of that model stays queued and is the one claimed."""
    store = JobStore(tmp_path / "jobs.db")
    running, queued = store.create([_spec(TINY), _spec(TINY)])
    mine = store.create([_spec(OTHER)])[0]
    assert store.claim().id == running
    store.close()                                   # a crash: the job stays 'running' in the file
    store = JobStore(tmp_path / "jobs.db")
    assert store.recover() == [running]
    assert store.fail_other_models(OTHER) == [running, queued]
    for job_id, attempts in ((running, 1), (queued, 0)):
        job = store.get(job_id)
        assert (job["status"], job["attempts"], job["error"]["code"]) == ("failed", attempts, "config_mismatch")
        assert job["finished"] is not None
        assert job["error"]["message"] == (
            f"submitted to a server running config 'tiny' (model hash {'a' * 16}); this server runs "
            f"'latentsync16-tiny' (model hash {'b' * 16}): resubmit it here or restart the server with --config tiny")
    record = store.claim()
    assert (record.id, record.spec.model) == (mine, OTHER)
    assert store.claim() is None and store.fail_other_models(OTHER) == []
    assert "other model settings" in ModelIdentity("tiny", "c" * 16).mismatch(TINY)
    assert TINY.mismatch(None) is None and TINY.mismatch(ModelIdentity("renamed.yaml", TINY.model_hash)) is None
    store.close()


def test_a_schema_1_database_gains_the_columns_and_its_jobs_run_on_any_model(tmp_path):
    """A file written before the identity was recorded: opened, it gains the two columns; its
    jobs have no identity and keep running, whatever the server's model (as before)."""
    path = tmp_path / "jobs.db"
    old_schema = "\n".join(line for line in job_store._SCHEMA.splitlines()
                           if not line.strip().startswith(("config TEXT", "model_hash TEXT")))
    old_schema = old_schema.replace("expired INTEGER NOT NULL DEFAULT 0,", "expired INTEGER NOT NULL DEFAULT 0")
    with sqlite3.connect(path) as db:
        db.executescript(old_schema)
        db.execute("INSERT INTO jobs (id, status, video, audio, video_name, audio_name, options, created, "
                   "frames_total) VALUES (?, 'queued', 'v.mp4', 'a.wav', 'talk.mp4', 'dub.wav', '[]', ?, 10)",
                   ("0" * 32, time.time()))
        db.execute("PRAGMA user_version=1")
    db.close()
    store = JobStore(path)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == job_store.SCHEMA_VERSION == 2
        assert {"config", "model_hash"} <= {r[1] for r in db.execute("PRAGMA table_info(jobs)")}
    db.close()
    assert store.fail_other_models(OTHER) == []
    record = store.claim()
    assert (record.id, record.spec.model) == ("0" * 32, None)
    new = store.create([_spec(OTHER)])[0]
    assert store.claim().spec.model == OTHER and new
    store.close()
    JobStore(path).close()                          # opened again: nothing to add


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("identity-media")
    return {"a": sample_clip(folder, 0, 6, "a.mp4"), "long": write_speech(folder / "long.wav", 60, seed=7),
            "short": write_speech(folder / "short.wav", 6, seed=8)}


def _job(base: str, job_id: str) -> dict:
    return httpx.get(f"{base}/v1/jobs/{job_id}", timeout=30).json()


@pytest.mark.slow
def test_a_restart_on_another_config_fails_the_other_models_jobs(tmp_path, media):
    """latentsync16-tiny -> tiny: the job that was running at SIGTERM (queued again; preparing its
    avatar or in lip-sync, a stop takes either back) and a queued one end failed with
    config_mismatch at start-up, before any worker takes them, leaving no result and no input;
    tiny -> latentsync16-tiny: the same for a MuseTalk job (one with sharpening, which the
    LatentSync server would refuse: it fails as a mismatch, not as bad options). The LatentSync
    server first: it starts faster than a MuseTalk one (no live warm-up)."""
    data, port = tmp_path / "data", free_port()
    base = f"http://127.0.0.1:{port}"
    with server_process(data, port, "--job-workers", "1", config="latentsync16-tiny", overrides=LATENTSYNC) as proc:
        running = submit(base, media["a"], media["long"]).json()["id"]
        queued = submit(base, media["a"], media["short"]).json()["id"]
        wait_for(lambda: _job(base, running)["status"] == "running", 120, "the first job running")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) in (0, -signal.SIGTERM)
    with server_process(data, port, "--job-workers", "1") as proc:
        jobs = [_job(base, running), _job(base, queued)]
        assert [(j["status"], j["attempts"], j["error"]["code"]) for j in jobs] == [
            ("failed", 1, "config_mismatch"), ("failed", 0, "config_mismatch")]
        message = jobs[0]["error"]["message"]
        assert message.startswith("submitted to a server running config 'latentsync16-tiny' (model hash ")
        assert "this server runs 'tiny'" in message and message.endswith("--config latentsync16-tiny")
        assert httpx.get(f"{base}/v1/jobs/{running}/result").json()["error"]["code"] == "not_done"
        assert httpx.get(base + "/healthz").json()["jobs"]["failed"] == 2
        sharpened = submit(base, media["a"], media["short"], options='{"pipeline.sharpen.enabled": true}')
        assert sharpened.status_code == 202, sharpened.text
        proc.send_signal(signal.SIGKILL)           # queued or running: either way it comes back as queued
        proc.wait(30)
    with server_process(data, port, "--job-workers", "1", config="latentsync16-tiny", overrides=LATENTSYNC):
        job = _job(base, sharpened.json()["id"])
        assert (job["status"], job["error"]["code"]) == ("failed", "config_mismatch")
        assert job["error"]["message"].startswith("submitted to a server running config 'tiny' (model hash ")
        assert "this server runs 'latentsync16-tiny'" in job["error"]["message"]
        assert [_job(base, i)["status"] for i in (running, queued)] == ["failed", "failed"]   # never run
    assert list((data / "jobs" / "results").iterdir()) == [] and list((data / "jobs" / "media").iterdir()) == []
    assert leftovers(data / "jobs") == []
