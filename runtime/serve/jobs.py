"""The offline job service of ``talkrt serve``: submissions checked and stored, the durable queue
(:mod:`~talkrt.serve.job_store`), the workers (:mod:`~talkrt.serve.job_runner`), retention and
the storage quota. The HTTP layer is :mod:`~talkrt.serve.job_routes`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from prometheus_client import CollectorRegistry, Counter, Gauge

from talkrt.avatar import avatar_key
from talkrt.hashing import sha256_files
from talkrt.serve.avatars import ID_PATTERN
from talkrt.serve.job_files import JOB_ID, JobFiles, Upload
from talkrt.serve.job_inputs import ApiError, check_job, job_config, parse_options
from talkrt.serve.job_runner import JobRunner, RunnerContext
from talkrt.serve.job_store import FINAL, STATUSES, JobSpec, JobStore, new_id

log = logging.getLogger(__name__)

MAX_BATCH_JOBS = 256


class SerialPreparer:
    """The server's one avatar preparer (its family's: MuseTalk's
    :class:`~talkrt.avatar.AvatarPreparer`, LatentSync's aligned crops and conditions), shared by
    the avatar store and the job workers: preparations run one at a time (the face tracker's
    TFLite interpreter and the VAE encoder each take one call at a time), loading a prepared
    avatar from the cache never waits for one. Other attributes are the preparer's."""

    def __init__(self, preparer):
        self.preparer = preparer
        self._lock = threading.Lock()

    def __getattr__(self, name: str):
        return getattr(self.preparer, name)

    def __call__(self, video_path, info, progress=None):
        if self.cached(video_path, info):
            return self.preparer(video_path, info, progress)
        with self._lock:                # the preparer looks at its cache again: another may have filled it
            return self.preparer(video_path, info, progress)

    def cached(self, video_path, info) -> bool:
        """The avatar of ``video_path`` is in the preparer's cache (its own key rule: any family's
        preparer has ``cfg``, ``weights_identity``, ``tracker_name``, ``prep_version`` and ``cache_dir``)."""
        p = self.preparer
        key = avatar_key(sha256_files([video_path]), p.cfg, p.weights_identity, p.tracker_name, info,
                         prep_version=p.prep_version)
        return (p.cache_dir / key / "meta.json").is_file()


@dataclass(frozen=True)
class JobSettings:
    """Limits and storage of the job service (``talkrt serve`` options)."""

    db_path: Path | None = None             # default: <data dir>/jobs.db
    workers: int = 2                        # jobs running at once
    max_upload_bytes: int = 2 << 30         # one request's body
    max_duration_s: float = 3600.0          # each input video and audio
    quota_bytes: int = 100 << 30            # inputs + results on disk
    retention_s: float = 7 * 24 * 3600.0    # results of finished jobs are removed this long after they finish
    janitor_s: float = 60.0                 # how often retention runs


@dataclass(frozen=True)
class Media:
    """One media part of a submission: a file (``source``, the client's ``filename``) or an avatar id."""

    source: BinaryIO | None = None
    filename: str | None = None
    avatar: str | None = None


class JobService:
    """Jobs of one server: owns the store, the files and the workers.

    Args:
        data_dir: the server's data root (jobs live in ``<data_dir>/jobs``).
        settings: limits and storage.
        ctx: what job runs share (engines, scheduler, config).
        avatar_status: avatar id -> its public status (None if unknown).
        registry: where the job metrics go.
    """

    def __init__(self, data_dir: Path, settings: JobSettings, ctx: RunnerContext,
                 avatar_status: Callable[[str], dict | None], registry: CollectorRegistry):
        self.settings, self.ctx, self.avatar_status = settings, ctx, avatar_status
        self.store = JobStore(settings.db_path or Path(data_dir) / "jobs.db")
        self.files = JobFiles(Path(data_dir) / "jobs")
        requeued = self.store.recover()
        self.files.clean_start(requeued)
        if requeued:
            log.info("jobs: %d interrupted job(s) queued again from the start", len(requeued))
        self.finished = Counter("talkrt_jobs_finished", "jobs that ended", ["status"], registry=registry)
        mismatched = self.store.fail_other_models(ctx.model)
        if mismatched:
            log.warning("jobs: %d queued job(s) were accepted by a server of another model and end failed "
                        "(config_mismatch; this server: %s): %s", len(mismatched), self._config_name,
                        ", ".join(mismatched))
            self.finished.labels("failed").inc(len(mismatched))
            with self.files.lock:
                self.files.drop_media(self.store.referenced_media())
        self.submitted = Counter("talkrt_jobs_submitted", "jobs accepted", registry=registry)
        queued = Gauge("talkrt_jobs", "jobs by status", ["status"], registry=registry)
        for status in STATUSES:
            queued.labels(status).set_function(lambda s=status: self.store.counts()[s])
        self.runner = JobRunner(self.store, self.files, ctx, settings.workers, on_finish=self._finished)
        self._stop = threading.Event()
        self._janitor = threading.Thread(target=self._janitor_loop, name="talkrt-jobs-janitor", daemon=True)

    def start(self) -> None:
        self.runner.start()
        self._janitor.start()

    def close(self) -> None:
        """Stop the workers (running jobs go back to the queue) and close the database."""
        self._stop.set()
        self.runner.stop()
        self._janitor.join(5)
        self.store.close()

    # ------------------------------------------------------------------ submissions

    def submit(self, videos: list[Media], audios: list[Media], options: str | None, batch: bool) -> dict[str, Any]:
        """Check and queue one job (``batch=False``: one video or avatar, one audio) or a batch
        (one audio and many videos/avatars, or one video/avatar and many audios). Blocking.

        Returns ``{"id", "status": "queued"}`` or ``{"batch", "jobs": [ids]}``.
        Raises:
            ApiError: 422 for missing or bad parts or media (nothing is stored), 507 over the quota.
        """
        opts = parse_options(options)
        job_config(self.ctx.cfg, opts.values)
        pairs = _pairs(videos, audios, batch)
        uploads: dict[int, Upload] = {}
        try:
            for media in {id(m): m for pair in pairs for m in pair if m.source is not None}.values():
                uploads[id(media)] = self.files.receive(media.source, media.filename, "upload")
            checked = [self._check(v, a, uploads, opts) for v, a in pairs]
            used = self.files.usage()           # this request's uploads included: they are in tmp/
            if used > self.settings.quota_bytes:
                raise ApiError(507, "quota", f"the server's job storage is full ({used / 1e6:.0f} MB used of "
                                             f"{self.settings.quota_bytes / 1e6:.0f} MB); try again later")
            with self.files.lock:
                kept = {key: self.files.keep(u) for key, u in uploads.items()}
                specs = [JobSpec(video=kept.get(id(v)), avatar=v.avatar, audio=kept[id(a)],
                                 video_name=_name(v, uploads), audio_name=uploads[id(a)].name,
                                 options=opts.values, fps=opts.fps, frames_total=frames, model=self.ctx.model)
                         for (v, a), frames in zip(pairs, checked)]
                batch_id = new_id() if batch else None
                ids = self.store.create(specs, batch_id)
        finally:
            self.files.discard(list(uploads.values()))
        self.submitted.inc(len(ids))
        self.runner.notify()
        log.info("jobs queued: %s", ", ".join(ids))
        return {"batch": batch_id, "jobs": ids} if batch else {"id": ids[0], "status": "queued"}

    @property
    def _config_name(self) -> str:
        return self.ctx.cfg.source or self.ctx.cfg.name

    def _check(self, video: Media, audio: Media, uploads: dict[int, Upload], opts) -> int:
        """Output frames of one (video, audio) pair, after the CLI's checks."""
        if video.avatar is not None:
            status = self.avatar_status(video.avatar) if ID_PATTERN.match(video.avatar) else None
            if status is None:
                raise ApiError(422, "unknown_avatar", f"no avatar with id {video.avatar!r}")
            if status["status"] == "failed":
                raise ApiError(422, "avatar_failed", f"avatar {video.avatar} failed: {status.get('error')}")
            path = self.ctx.avatar_source(video.avatar)
            if path is None:
                raise ApiError(422, "unknown_avatar", f"no avatar with id {video.avatar!r}")
        else:
            path = uploads[id(video)].path
        inputs = check_job(path, _name(video, uploads), uploads[id(audio)].path, uploads[id(audio)].name,
                           self.files.results / "submission.mp4", config=self._config_name,
                           overrides=opts.overrides, fps=opts.fps, device=self.ctx.device,
                           cache_dir=self.ctx.cache_dir, max_duration_s=self.settings.max_duration_s)
        return inputs.frames

    # ------------------------------------------------------------------ queries and control

    def get(self, job_id: str) -> dict[str, Any] | None:
        return self.store.get(job_id) if JOB_ID.match(job_id) else None

    def list(self, status: str | None) -> list[dict[str, Any]]:
        if status is not None and status not in STATUSES:
            raise ApiError(422, "bad_status", f"status must be one of {', '.join(STATUSES)}")
        return self.store.list(status)

    def batch(self, batch_id: str) -> dict[str, Any] | None:
        """``{"batch", "status", "progress", "frames_done", "frames_total", "counts", "jobs"}``."""
        jobs = self.store.batch(batch_id) if JOB_ID.match(batch_id) else None
        if jobs is None:
            return None
        counts = {s: sum(j["status"] == s for j in jobs) for s in STATUSES}
        total = sum(j["frames_total"] for j in jobs)
        done = sum(j["frames_done"] for j in jobs)
        if counts["queued"] == len(jobs):
            status = "queued"
        elif all(j["status"] in FINAL for j in jobs):
            status = "done" if counts["done"] == len(jobs) else "failed" if counts["failed"] else "cancelled"
        else:
            status = "running"
        return {"batch": batch_id, "status": status, "progress": round(done / total, 4) if total else 0.0,
                "frames_done": done, "frames_total": total, "counts": counts, "jobs": jobs}

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued or running job; delete a finished one and its result.

        Raises:
            ApiError: 404 unknown job.
        """
        job = self.get(job_id)
        if job is None:
            raise ApiError(404, "not_found", f"no job with id {job_id!r}")
        if job["status"] in FINAL:
            self.files.result(job_id).unlink(missing_ok=True)
            self.store.delete(job_id)
            return {"id": job_id, "status": job["status"], "deleted": True}
        before = self.runner.cancel(job_id)
        if before == "queued":
            self._finished(job_id, "cancelled")
        return self.store.get(job_id) or {"id": job_id, "status": "cancelled"}

    def result(self, job_id: str) -> Path:
        """The MP4 of a done job.

        Raises:
            ApiError: 404 unknown, 409 not done, 410 removed by retention.
        """
        job = self.get(job_id)
        if job is None:
            raise ApiError(404, "not_found", f"no job with id {job_id!r}")
        if job["status"] != "done":
            later = ("; its result exists once it is done" if job["status"] in ("queued", "running")
                     else "; it has no result and never will")
            raise ApiError(409, "not_done", f"job {job_id} is {job['status']}{later}")
        path = self.files.result(job_id)
        if job.get("expired") or not path.is_file():
            raise ApiError(410, "expired", f"the result of job {job_id} was removed after the retention period")
        return path

    # ------------------------------------------------------------------ housekeeping

    def _finished(self, job_id: str, status: str) -> None:
        self.finished.labels(status).inc()
        with self.files.lock:
            self.files.drop_media(self.store.referenced_media())

    def expire(self, now: float | None = None) -> list[str]:
        """Remove the results of jobs finished more than ``retention_s`` ago; returns their ids."""
        ids = self.store.expire((time.time() if now is None else now) - self.settings.retention_s)
        for job_id in ids:
            self.files.result(job_id).unlink(missing_ok=True)
        if ids:
            log.info("jobs: %d result(s) past retention removed", len(ids))
        return ids

    def _janitor_loop(self) -> None:
        while not self._stop.wait(self.settings.janitor_s):
            try:
                self.expire()
            except Exception:  # noqa: BLE001 - housekeeping must not die
                log.exception("jobs: retention failed")


def _name(media: Media, uploads: dict[int, Upload]) -> str:
    return f"avatar {media.avatar}" if media.avatar is not None else uploads[id(media)].name


def _pairs(videos: list[Media], audios: list[Media], batch: bool) -> list[tuple[Media, Media]]:
    """(video or avatar, audio) per job.

    Raises:
        ApiError: 422 ``missing_part``/``bad_batch`` for a combination that is not one job or one batch.
    """
    if not audios:
        raise ApiError(422, "missing_part", "an 'audio' file is required")
    if not videos:
        raise ApiError(422, "missing_part", "a 'video' file or an 'avatar' id is required")
    if not batch:
        if len(videos) != 1 or len(audios) != 1:
            raise ApiError(422, "bad_job", "a job takes one 'video' or 'avatar' and one 'audio' (use /v1/batches)")
        return [(videos[0], audios[0])]
    if len(audios) == 1:
        pairs = [(v, audios[0]) for v in videos]
    elif len(videos) == 1:
        pairs = [(videos[0], a) for a in audios]
    else:
        raise ApiError(422, "bad_batch", "a batch takes one 'audio' and many 'video'/'avatar', "
                                         "or one 'video'/'avatar' and many 'audio'")
    if len(pairs) > MAX_BATCH_JOBS:
        raise ApiError(422, "bad_batch", f"a batch holds at most {MAX_BATCH_JOBS} jobs")
    return pairs
