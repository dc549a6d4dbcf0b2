"""The durable job queue: jobs, batches, their state and progress in one SQLite file (WAL).

One server process owns the file. Every state change is one committed transaction
(``synchronous=FULL``), so after a crash the file holds every job that was accepted, each in
the last state it reached: :meth:`JobStore.recover` puts the jobs that were running back in the
queue (or ends them ``cancelled`` when a cancel had been asked for). A job becomes ``done`` in
one transaction, after its MP4 is in place, so a job is never done twice.

Every job records the model identity of the server that accepted it (:class:`ModelIdentity`:
the config it was given and the config's model hash); a job is only ever run by a server whose
model hash is the same (:meth:`JobStore.fail_other_models`, :class:`~talkrt.serve.job_runner.JobRunner`).
Jobs of a schema-1 database (before the identity was recorded) have none and run on any model,
as they did.

Progress is kept in memory for every running job (what ``GET /v1/jobs/{id}`` and the event
stream show) and written to the file at phase changes and at most every
:data:`PROGRESS_WRITE_S` seconds.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATUSES = ("queued", "running", "done", "failed", "cancelled")
FINAL = frozenset({"done", "failed", "cancelled"})
SCHEMA_VERSION = 2           # 2: jobs.config and jobs.model_hash (added to a schema-1 file on open)
PROGRESS_WRITE_S = 0.5

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    batch TEXT,
    status TEXT NOT NULL,
    video TEXT,                 -- media file name under media/ (NULL for an avatar job)
    avatar TEXT,                -- avatar id (NULL for an uploaded video)
    audio TEXT NOT NULL,        -- media file name under media/
    video_name TEXT NOT NULL,   -- the client's names, for messages only
    audio_name TEXT NOT NULL,
    options TEXT NOT NULL,      -- JSON list of [key, value] config values
    fps TEXT,                   -- output frame rate asked for ("25", "30000/1001"), NULL: the video's
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    frames_total INTEGER NOT NULL,
    frames_done INTEGER NOT NULL DEFAULT 0,
    phase TEXT, phase_done INTEGER, phase_total INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error TEXT,                 -- JSON {"code", "message"}
    summary TEXT,               -- JSON run report
    result_bytes INTEGER,
    expired INTEGER NOT NULL DEFAULT 0,
    config TEXT,                -- the accepting server's --config (NULL: accepted before schema 2)
    model_hash TEXT             -- its config's model_hash(): the job runs only on a server with the same
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_by_batch ON jobs (batch, seq);
CREATE TABLE IF NOT EXISTS batches (id TEXT PRIMARY KEY, created REAL NOT NULL);
"""


# columns added since schema 1, with their declarations (ALTER TABLE on an older file)
_ADDED_COLUMNS = (("config", "TEXT"), ("model_hash", "TEXT"))


def new_id() -> str:
    """A job or batch id: 32 lowercase hex digits (random)."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class ModelIdentity:
    """What a server runs, as far as a job's result depends on it: ``config`` (what ``--config``
    was given, for messages and the hint) and ``model_hash`` (the config's ``model_hash()``: its
    model section, the family's included; what decides whether two servers run the same model)."""

    config: str
    model_hash: str

    @classmethod
    def of(cls, cfg: Any) -> ModelIdentity:
        """The identity of a loaded config of any family."""
        return cls(cfg.source or cfg.name, cfg.model_hash())

    def mismatch(self, job: ModelIdentity | None) -> str | None:
        """Why a job accepted under ``job`` must not run here (None: it may; a job without an
        identity, from a schema-1 database, may)."""
        if job is None or job.model_hash == self.model_hash:
            return None
        if job.config == self.config:           # the same config, other model values (--set model.*)
            return (f"submitted to a server running config '{job.config}' with other model settings (model hash "
                    f"{job.model_hash}; this server's: {self.model_hash}): resubmit it here or restart the server "
                    f"with the model settings it had")
        return (f"submitted to a server running config '{job.config}' (model hash {job.model_hash}); this server "
                f"runs '{self.config}' (model hash {self.model_hash}): resubmit it here or restart the server "
                f"with --config {job.config}")


@dataclass(frozen=True)
class JobSpec:
    """One job as submitted (media already stored, names already checked)."""

    video: str | None
    avatar: str | None
    audio: str
    video_name: str
    audio_name: str
    options: tuple[tuple[str, Any], ...]
    fps: str | None
    frames_total: int
    model: ModelIdentity | None = None      # the accepting server's (None: a job of a schema-1 database)


@dataclass(frozen=True)
class JobRecord:
    """A job the runner has claimed: its id, what was submitted, and how often it was started."""

    id: str
    spec: JobSpec
    created: float
    attempts: int


class JobStore:
    """Thread-safe access to the jobs database at ``path`` (created with its folder if needed)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._live: dict[str, dict[str, Any]] = {}        # running job id -> in-memory progress
        self._versions: dict[str, int] = {}
        self._written: dict[str, float] = {}
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, 1, SCHEMA_VERSION):        # 1: migrated below
                raise RuntimeError(f"{self.path}: jobs database schema {version}, this talkrt reads 1 to "
                                   f"{SCHEMA_VERSION}")
            self._db.executescript(_SCHEMA)
            have = {r["name"] for r in self._db.execute("PRAGMA table_info(jobs)")}
            for name, decl in _ADDED_COLUMNS:           # a schema-1 file: its jobs keep NULL (no identity)
                if name not in have:
                    self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ writes

    def recover(self) -> list[str]:
        """After a start: jobs left ``running`` go back to the queue from the start (those with a
        cancel asked for end ``cancelled``). Returns the ids of the jobs re-queued."""
        with self._lock:
            rows = self._db.execute("SELECT id, cancel_requested FROM jobs WHERE status='running'").fetchall()
            self._db.execute("BEGIN IMMEDIATE")
            for row in rows:
                if row["cancel_requested"]:
                    self._db.execute("UPDATE jobs SET status='cancelled', finished=? WHERE id=?",
                                     (time.time(), row["id"]))
                else:
                    self._db.execute("UPDATE jobs SET status='queued', started=NULL, frames_done=0, phase=NULL, "
                                     "phase_done=NULL, phase_total=NULL WHERE id=?", (row["id"],))
            self._db.execute("COMMIT")
        return [r["id"] for r in rows if not r["cancel_requested"]]

    def fail_other_models(self, server: ModelIdentity) -> list[str]:
        """End ``failed`` (code ``config_mismatch``) every queued job accepted by a server of
        another model hash (call after :meth:`recover`); returns their ids."""
        with self._lock:
            rows = self._db.execute("SELECT id, config, model_hash FROM jobs WHERE status='queued' AND model_hash "
                                    "IS NOT NULL AND model_hash != ? ORDER BY seq", (server.model_hash,)).fetchall()
            self._db.execute("BEGIN IMMEDIATE")
            now = time.time()
            for row in rows:
                message = server.mismatch(ModelIdentity(row["config"], row["model_hash"]))
                self._db.execute("UPDATE jobs SET status='failed', finished=?, error=? WHERE id=? AND status='queued'",
                                 (now, json.dumps({"code": "config_mismatch", "message": message}), row["id"]))
            self._db.execute("COMMIT")
            for row in rows:
                self._bump(row["id"])
        return [r["id"] for r in rows]

    def create(self, specs: list[JobSpec], batch: str | None = None) -> list[str]:
        """Queue ``specs`` (one transaction); returns their ids in order."""
        now = time.time()
        ids = [new_id() for _ in specs]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if batch is not None:
                    self._db.execute("INSERT INTO batches (id, created) VALUES (?, ?)", (batch, now))
                for job_id, s in zip(ids, specs):
                    self._db.execute(
                        "INSERT INTO jobs (id, batch, status, video, avatar, audio, video_name, audio_name, options, "
                        "fps, created, frames_total, config, model_hash) "
                        "VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (job_id, batch, s.video, s.avatar, s.audio, s.video_name, s.audio_name,
                         json.dumps(list(s.options)), s.fps, now, s.frames_total,
                         s.model.config if s.model else None, s.model.model_hash if s.model else None))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return ids

    def claim(self) -> JobRecord | None:
        """The oldest queued job, now ``running`` (None when the queue is empty)."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE status='queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            self._db.execute("UPDATE jobs SET status='running', started=?, attempts=attempts+1 WHERE id=?",
                             (time.time(), row["id"]))
            self._live[row["id"]] = {"phase": None, "phase_done": 0, "phase_total": 0, "frames_done": 0}
            self._bump(row["id"])
        spec = JobSpec(video=row["video"], avatar=row["avatar"], audio=row["audio"], video_name=row["video_name"],
                       audio_name=row["audio_name"], options=tuple((k, v) for k, v in json.loads(row["options"])),
                       fps=row["fps"], frames_total=row["frames_total"],
                       model=None if row["model_hash"] is None else ModelIdentity(row["config"], row["model_hash"]))
        return JobRecord(id=row["id"], spec=spec, created=row["created"], attempts=row["attempts"] + 1)

    def progress(self, job_id: str, phase: str, done: int, total: int, frames_done: int | None = None,
                 force: bool = False) -> None:
        """A running job's progress (in memory; written when ``force`` or every PROGRESS_WRITE_S)."""
        with self._lock:
            live = self._live.get(job_id)
            if live is None:
                return
            live.update(phase=phase, phase_done=done, phase_total=total)
            if frames_done is not None:
                live["frames_done"] = frames_done
            self._bump(job_id)
            now = time.monotonic()
            if force or now - self._written.get(job_id, 0.0) >= PROGRESS_WRITE_S:
                self._written[job_id] = now
                self._db.execute("UPDATE jobs SET phase=?, phase_done=?, phase_total=?, frames_done=? WHERE id=?",
                                 (phase, done, total, live["frames_done"], job_id))

    def finish(self, job_id: str, status: str, *, error: dict | None = None, summary: dict | None = None,
               result_bytes: int | None = None) -> None:
        """End a running job as ``done``, ``failed`` or ``cancelled`` (one transaction)."""
        if status not in FINAL:
            raise ValueError(f"not a final status: {status}")
        with self._lock:
            live = self._live.pop(job_id, {})
            self._written.pop(job_id, None)
            self._db.execute(
                "UPDATE jobs SET status=?, finished=?, error=?, summary=?, result_bytes=?, "
                "frames_done=CASE WHEN ?='done' THEN frames_total ELSE ? END, phase=?, phase_done=?, phase_total=? "
                "WHERE id=? AND status='running'",
                (status, time.time(), json.dumps(error) if error else None, json.dumps(summary) if summary else None,
                 result_bytes, status, live.get("frames_done", 0), live.get("phase"), live.get("phase_done"),
                 live.get("phase_total"), job_id))
            self._bump(job_id)

    def requeue(self, job_id: str) -> None:
        """Put a running job back in the queue (the server is stopping; it re-runs from the start)."""
        with self._lock:
            self._live.pop(job_id, None)
            self._db.execute("UPDATE jobs SET status='queued', started=NULL, frames_done=0, phase=NULL, "
                             "phase_done=NULL, phase_total=NULL WHERE id=? AND status='running'", (job_id,))
            self._bump(job_id)

    def cancel(self, job_id: str) -> str | None:
        """Cancel: a queued job ends ``cancelled`` now; a running one is marked (the runner stops
        it). Returns the status the job had (None if unknown)."""
        with self._lock:
            row = self._db.execute("SELECT status FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                return None
            if row["status"] == "queued":
                self._db.execute("UPDATE jobs SET status='cancelled', finished=? WHERE id=?", (time.time(), job_id))
            elif row["status"] == "running":
                self._db.execute("UPDATE jobs SET cancel_requested=1 WHERE id=?", (job_id,))
            self._bump(job_id)
            return row["status"]

    def delete(self, job_id: str) -> bool:
        """Forget a finished job (False if unknown or not finished)."""
        with self._lock:
            done = self._db.execute("DELETE FROM jobs WHERE id=? AND status IN ('done', 'failed', 'cancelled')",
                                    (job_id,)).rowcount
            self._bump(job_id)
            return bool(done)

    def expire(self, before: float) -> list[str]:
        """Mark the results of jobs finished before ``before`` (epoch seconds) expired; returns
        the ids of the done jobs whose result files may now be removed."""
        with self._lock:
            rows = self._db.execute("SELECT id FROM jobs WHERE status IN ('done', 'failed', 'cancelled') AND expired=0 "
                                    "AND finished < ?", (before,)).fetchall()
            self._db.executemany("UPDATE jobs SET expired=1 WHERE id=?", [(r["id"],) for r in rows])
            for r in rows:
                self._bump(r["id"])
        return [r["id"] for r in rows]

    def _bump(self, job_id: str) -> None:
        self._versions[job_id] = self._versions.get(job_id, 0) + 1

    # ------------------------------------------------------------------ reads

    def version(self, job_id: str) -> int:
        """A number that changes whenever the job does (for event streams)."""
        return self._versions.get(job_id, 0)

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The public job object (None if unknown)."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            return None if row is None else self._public(row)

    def list(self, status: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Jobs in submission order, optionally of one status."""
        with self._lock:
            if status is None:
                rows = self._db.execute("SELECT * FROM jobs ORDER BY seq LIMIT ?", (limit,)).fetchall()
            else:
                rows = self._db.execute("SELECT * FROM jobs WHERE status=? ORDER BY seq LIMIT ?",
                                        (status, limit)).fetchall()
            return [self._public(r) for r in rows]

    def batch(self, batch_id: str) -> list[dict[str, Any]] | None:
        """The jobs of a batch in order (None if there is no such batch)."""
        with self._lock:
            if self._db.execute("SELECT 1 FROM batches WHERE id=?", (batch_id,)).fetchone() is None:
                return None
            rows = self._db.execute("SELECT * FROM jobs WHERE batch=? ORDER BY seq", (batch_id,)).fetchall()
            return [self._public(r) for r in rows]

    def referenced_media(self) -> set[str]:
        """Media file names that a queued or running job still needs."""
        with self._lock:
            rows = self._db.execute("SELECT video, audio FROM jobs WHERE status IN ('queued', 'running')").fetchall()
        return {name for r in rows for name in (r["video"], r["audio"]) if name}

    def counts(self) -> dict[str, int]:
        """Jobs per status."""
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").fetchall()
        return {s: 0 for s in STATUSES} | {r["status"]: r["n"] for r in rows}

    def _public(self, row: sqlite3.Row) -> dict[str, Any]:
        live = self._live.get(row["id"]) if row["status"] == "running" else None
        state = live or {"phase": row["phase"], "phase_done": row["phase_done"], "phase_total": row["phase_total"],
                         "frames_done": row["frames_done"]}
        total = row["frames_total"]
        out: dict[str, Any] = {
            "id": row["id"], "status": row["status"],
            "progress": 1.0 if row["status"] == "done" else round(state["frames_done"] / total, 4) if total else 0.0,
            "frames_done": state["frames_done"], "frames_total": total,
            "created": row["created"], "started": row["started"], "finished": row["finished"],
            "phase": None if not state["phase"] else {"name": state["phase"], "done": state["phase_done"],
                                                      "total": state["phase_total"]},
            "attempts": row["attempts"],
        }
        if row["batch"]:
            out["batch"] = row["batch"]
        if row["avatar"]:
            out["avatar"] = row["avatar"]
        if row["error"]:
            out["error"] = json.loads(row["error"])
        if row["summary"]:
            out["summary"] = json.loads(row["summary"])
        if row["cancel_requested"] and row["status"] == "running":
            out["cancel_requested"] = True
        if row["expired"]:
            out["expired"] = True
        return out
