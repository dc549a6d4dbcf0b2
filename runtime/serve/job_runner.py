"""Job workers: each takes the oldest queued job and runs ``run_pipeline`` on it with the model
stages the server chose (:mod:`talkrt.serve.jobwork`): on a live server they are handed to the
shared scheduler, so jobs and live sessions share one set of engines; on a server of a family
without live sessions (LatentSync) they are the family's own, one chunk on the device at a time.
Several workers let one job decode, compose and encode while another job's frames are in the model.

A job accepted by a server of another model (its :class:`~talkrt.serve.job_store.ModelIdentity`)
is never run: it ends ``failed`` with ``config_mismatch`` (the service fails those at start-up;
a worker checks again when it takes one).

A job's progress raises in ``advance`` when it was cancelled (it ends ``cancelled``) or when
the server stops (it goes back to the queue); ``run_pipeline`` then aborts and leaves no file.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from talkrt.config import TalkrtConfig
from talkrt.pipeline import PipelineParts, RunReport, run_pipeline
from talkrt.report import report_document, summary_line
from talkrt.serve.job_files import JobFiles
from talkrt.serve.job_inputs import ApiError, JobOptions, check_job, display_error, job_config
from talkrt.serve.job_store import JobRecord, JobStore, ModelIdentity
from talkrt.serve.jobwork import JobModelStages

log = logging.getLogger(__name__)


class JobCancelled(Exception):
    """The job was cancelled while it ran."""


class ServerStopping(Exception):
    """The server is stopping; the job goes back to the queue."""


class JobProgress:
    """A job's :class:`~talkrt.progress.Progress`: phases and frames into the store; raises at
    the next step after a cancel or a stop."""

    def __init__(self, store: JobStore, job_id: str, cancelled: threading.Event, stopping: threading.Event):
        self.store, self.job_id, self.cancelled, self.stopping = store, job_id, cancelled, stopping
        self.name, self.total, self.done = "", 0, 0

    def check(self) -> None:
        """Raise :class:`JobCancelled` or :class:`ServerStopping` when the job must stop."""
        if self.cancelled.is_set():
            raise JobCancelled(self.job_id)
        if self.stopping.is_set():
            raise ServerStopping(self.job_id)

    def phase(self, name: str, total: int) -> None:
        self.check()
        self.name, self.total, self.done = name, total, 0
        self.store.progress(self.job_id, name, 0, total, 0 if name == "lip-sync" else None, force=True)

    def advance(self, steps: int = 1) -> None:
        self.check()
        self.done += steps
        self.store.progress(self.job_id, self.name, self.done, self.total,
                            self.done if self.name == "lip-sync" else None)


@dataclasses.dataclass(frozen=True)
class RunnerContext:
    """What every job run shares: the server's config (of any model family), device, built parts,
    the model stages a job runs (:class:`~talkrt.serve.jobwork.ScheduledModelStages` or
    :class:`~talkrt.serve.jobwork.ExclusiveModelStages`), where the avatar cache lives, and a
    lookup of avatar sources by id."""

    cfg: TalkrtConfig
    device: str
    parts: PipelineParts
    model_stages: JobModelStages
    cache_dir: Path
    avatar_source: Callable[[str], Path | None]

    @property
    def model(self) -> ModelIdentity:
        """What this server runs, as jobs record it."""
        return ModelIdentity.of(self.cfg)


class JobRunner:
    """``workers`` threads running queued jobs until :meth:`stop`."""

    def __init__(self, store: JobStore, files: JobFiles, ctx: RunnerContext, workers: int,
                 on_finish: Callable[[str, str], None] | None = None):
        self.store, self.files, self.ctx, self.workers = store, files, ctx, workers
        self.on_finish = on_finish
        self._cond = threading.Condition()
        self._cancel: dict[str, threading.Event] = {}
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(self.workers):
            t = threading.Thread(target=self._work, name=f"talkrt-job-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def notify(self) -> None:
        """New jobs were queued."""
        with self._cond:
            self._cond.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        """Running jobs go back to the queue at their next step; wait for the workers."""
        self._stopping.set()
        self.notify()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()

    def cancel(self, job_id: str) -> str | None:
        """Cancel a job (see :meth:`JobStore.cancel`); a running one stops at its next batch."""
        with self._cond:
            before = self.store.cancel(job_id)
            if before == "running" and job_id in self._cancel:
                self._cancel[job_id].set()
        return before

    # ------------------------------------------------------------------ worker threads

    def _work(self) -> None:
        while not self._stopping.is_set():
            with self._cond:
                record = self.store.claim()
                if record is None:
                    self._cond.wait(1.0)
                    continue
                cancelled = self._cancel[record.id] = threading.Event()
            try:
                self._run(record, cancelled)
            finally:
                with self._cond:
                    self._cancel.pop(record.id, None)

    def _run(self, record: JobRecord, cancelled: threading.Event) -> None:
        out = self.files.result(record.id)
        progress = JobProgress(self.store, record.id, cancelled, self._stopping)
        names: dict[str, str] = {}
        log.info("job %s: started (attempt %d)", record.id, record.attempts)
        try:
            status, extra = "done", self._pipeline(record, out, progress, names)
        except ServerStopping as exc:
            out.unlink(missing_ok=True)
            self.store.requeue(record.id)
            log.info("job %s: back in the queue (%s)", record.id, type(exc).__name__)
            return
        except JobCancelled:
            status, extra = "cancelled", {}
        except Exception as exc:  # noqa: BLE001 - one job's failure ends that job only
            if self._stopping.is_set():
                out.unlink(missing_ok=True)
                self.store.requeue(record.id)
                return
            status, extra = "failed", {"error": display_error(exc, names)}
            log.warning("job %s failed: %s", record.id, extra["error"]["message"],
                        exc_info=extra["error"]["code"] == "internal")
        if status != "done":
            out.unlink(missing_ok=True)
        self.store.finish(record.id, status, **extra)
        log.info("job %s: %s", record.id, status)
        if self.on_finish is not None:
            self.on_finish(record.id, status)

    def _pipeline(self, record: JobRecord, out: Path, progress: JobProgress, names: dict[str, str]) -> dict:
        ctx = self.ctx
        spec = record.spec
        mismatch = ctx.model.mismatch(spec.model)
        if mismatch is not None:
            raise ApiError(409, "config_mismatch", mismatch)
        cfg = job_config(ctx.cfg, spec.options)
        if spec.avatar is not None:
            video = ctx.avatar_source(spec.avatar)
            if video is None:
                raise ApiError(422, "unknown_avatar", f"avatar {spec.avatar} no longer exists")
        else:
            video = self.files.media(spec.video)
        audio = self.files.media(spec.audio)
        names.update({str(video): spec.video_name, str(audio): spec.audio_name})
        inputs = check_job(video, spec.video_name, audio, spec.audio_name, out, config=ctx.cfg.source or ctx.cfg.name,
                           overrides=JobOptions(spec.options).overrides, fps=spec.fps, device=ctx.device,
                           cache_dir=ctx.cache_dir)
        stream = torch.cuda.Stream(ctx.parts.device) if ctx.parts.stream is not None else None
        parts = dataclasses.replace(ctx.parts, cfg=cfg, stream=stream)
        stages = ctx.model_stages(parts, record.id, stream, progress.check)
        started = time.time()
        report = run_pipeline(parts, inputs.video, inputs.info, inputs.audio, inputs.clip, out, progress=progress,
                              overrides=stages)
        progress.check()            # a cancel that came during the last batch still wins
        return {"summary": job_summary(report, record, cfg, ctx.device, queued_s=started - record.created),
                "result_bytes": out.stat().st_size}


def job_summary(report: RunReport, record: JobRecord, cfg: TalkrtConfig, device: str, queued_s: float) -> dict:
    """The CLI's JSON run report for a job, with ids in place of server paths, and its
    ``key=value`` summary line as ``line`` (``startup_s`` there: seconds the job waited in the queue)."""
    spec = record.spec
    doc = report_document(report, startup_seconds=queued_s, config=cfg.source or cfg.name,
                          config_hash=cfg.model_hash(), device=device, video=Path(spec.video_name),
                          audio=Path(spec.audio_name))
    doc["inputs"] = {"video": spec.video_name, "audio": spec.audio_name,
                     **({"avatar": spec.avatar} if spec.avatar else {})}
    doc["output"] = f"/v1/jobs/{record.id}/result"
    doc["line"] = summary_line(report, queued_s)
    return doc
