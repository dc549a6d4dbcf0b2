"""The ASGI app of ``talkrt serve``: health and metrics, avatars, the live WebSocket and the
job service (:mod:`~talkrt.serve.job_routes`).

Models load once, in a background thread started by the lifespan, so ``/healthz`` can answer
503 while they load and 200 once they are ready; the scheduler thread and the job workers start
with them. With an API key every ``/v1`` route needs it (:mod:`~talkrt.serve.auth`).

The config may be of any model family (:mod:`talkrt.families`). The family's ``live`` attribute
is the one thing that decides what the server runs: a live family (MuseTalk) gets the renderer
and the scheduler, which serve the WebSocket sessions and share their batches with the jobs; a
family without live sessions (LatentSync: a denoising loop is not real time) runs jobs only,
each chunk on the device under one lock (:class:`~talkrt.serve.jobwork.ExclusiveModelStages`),
and its WebSocket sessions are refused (``live_unavailable``). ``/healthz`` says which
(``family``, ``live``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, File, UploadFile, WebSocket
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST

from talkrt.config import AudioConfig, TalkrtConfig
from talkrt.errors import InputError, TalkrtError
from talkrt.serve.auth import ApiKeyMiddleware
from talkrt.serve.avatars import ID_PATTERN, AvatarStore, UploadTooLarge
from talkrt.serve.job_inputs import ApiError
from talkrt.serve.job_routes import install_job_routes
from talkrt.serve.job_runner import RunnerContext
from talkrt.serve.jobs import JobService, JobSettings, SerialPreparer
from talkrt.serve.jobwork import ExclusiveModelStages, JobModelStages, ScheduledModelStages
from talkrt.serve.live import live_session
from talkrt.serve.metrics import ServeMetrics
from talkrt.serve.renderer import FrameRenderer
from talkrt.serve.scheduler import Scheduler

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"


@dataclass(frozen=True)
class ServeSettings:
    """What ``talkrt serve`` was asked for."""

    cfg: TalkrtConfig                    # a config of any model family (talkrt.families.load_family_config)
    device: str = "auto"                 # cpu, cuda, cuda:N or auto
    data_dir: Path = Path("talkrt-data")
    max_sessions: int = 16
    backend: str | None = None
    weights_dir: str | None = None
    api_key: str | None = None           # required on every /v1 route when set
    jobs: JobSettings = field(default_factory=JobSettings)
    job_rows_with_live: int | None = None   # job rows in a step with live speech (None: all the room left)
    overlap_steps: bool = False             # the scheduler keeps one batch in flight (Scheduler's overlap)


@dataclass
class ServerState:
    """Everything the routes share; ``ready`` once the models, the avatar store, the job service
    and (for a live family) the scheduler exist. ``live``: None while loading, then whether the
    loaded family serves WebSocket sessions."""

    settings: ServeSettings
    metrics: ServeMetrics = field(default_factory=ServeMetrics)
    avatars: AvatarStore | None = None
    scheduler: Scheduler | None = None          # live families only
    renderer: FrameRenderer | None = None       # live families only
    jobs: JobService | None = None
    model_stages: JobModelStages | None = None  # what a job's run_pipeline gets as stages 3-4
    audio_config: AudioConfig | None = None
    live: bool | None = None
    info: dict = field(default_factory=dict)
    error: str | None = None
    open_sessions: int = 0
    loaded: bool = False

    @property
    def ready(self) -> bool:
        return self.loaded

    def load(self) -> None:
        """Build the config family's parts, the avatar store, the job service and, when the family
        runs live (``parts.family.live``), the renderer and the scheduler (blocking; sets ``error``
        on failure)."""
        from talkrt.session import build_session, freeze_gc
        s = self.settings
        try:
            parts = build_session(s.cfg, device=s.device, weights_dir=s.weights_dir, backend=s.backend,
                                  cache_dir=Path(s.data_dir) / "prepared", warmup="all")   # live batches take any size
            parts = dataclasses.replace(parts, preparer=SerialPreparer(parts.preparer))   # avatars and jobs share it
            self.avatars = AvatarStore(Path(s.data_dir), parts.preparer, self.metrics,
                                       max_upload_bytes=s.jobs.max_upload_bytes)    # --max-upload-mb, as for jobs
            live = bool(parts.family.live)          # the one place the family's capability decides
            if live:
                self.renderer = FrameRenderer(parts)
                self.renderer.warm_up()
                self.audio_config = s.cfg.model.audio
                scheduler = Scheduler(self.renderer, self.renderer.max_batch, self.metrics,
                                      job_rows_with_live=s.job_rows_with_live, overlap=s.overlap_steps)
                scheduler.start()
                self.scheduler, model_stages = scheduler, ScheduledModelStages(scheduler)
                max_batch = self.renderer.max_batch
            else:
                model_stages, max_batch = ExclusiveModelStages(), parts.family.chunk_frames(s.cfg)
                log.info("talkrt serve: the %s family runs jobs only (no live sessions); one chunk of %d frames "
                         "on the device at a time", parts.family.name, max_batch)
            ctx = RunnerContext(cfg=s.cfg, device=s.device, parts=parts, model_stages=model_stages,
                                cache_dir=Path(s.data_dir) / "prepared", avatar_source=self.avatars.source)
            self.jobs = JobService(Path(s.data_dir), s.jobs, ctx, self.avatars.get, self.metrics.registry)
            self.jobs.start()
            self.model_stages, self.live = model_stages, live
            self.info = {"config": s.cfg.name, "family": parts.family.name, "live": live, "device": str(parts.device),
                         "backend": parts.backend, "weights": parts.weights, "compose": parts.compose,
                         "max_batch": max_batch}
            log.info("talkrt serve: %d objects loaded, frozen out of the garbage collector's passes", freeze_gc())
            self.loaded = True
            log.info("talkrt serve ready: %s", self.info)
        except TalkrtError as exc:      # a refused input (weights, engines, config): one line, no traceback
            log.error("talkrt serve: loading failed: %s", exc)
            self.error = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - reported by /healthz and the log
            log.exception("talkrt serve: loading failed")
            self.error = f"{type(exc).__name__}: {exc}"

    def close(self) -> None:
        if self.jobs is not None:
            self.jobs.close()
        if self.scheduler is not None:
            self.scheduler.stop()
        if self.avatars is not None:
            self.avatars.close()


def create_app(settings: ServeSettings) -> FastAPI:
    """The FastAPI app; ``app.state.server`` is its :class:`ServerState`."""
    server = ServerState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=server.load, name="talkrt-load", daemon=True).start()
        yield
        server.close()

    app = FastAPI(title="talkrt serve", lifespan=lifespan)
    app.state.server = server
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, key=settings.api_key)

    def store() -> AvatarStore:
        if not server.ready:
            raise ApiError(503, "loading", "models are loading" if server.error is None else server.error)
        return server.avatars

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        if server.error is not None:
            return JSONResponse({"status": "failed", "error": server.error}, status_code=500)
        if not server.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        jobs = {"jobs": server.jobs.store.counts()} if server.jobs is not None else {}
        return JSONResponse({"status": "ok", "sessions": server.open_sessions, **jobs, **server.info})

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/avatars")
    def add_avatar(video: UploadFile = File(...)) -> JSONResponse:
        name = video.filename or "upload"
        try:
            status, new = store().add(video.file, name)
        except InputError as exc:
            raise ApiError(422, "bad_media", f"{name}: {exc.problem}") from exc
        except UploadTooLarge as exc:
            raise ApiError(413, "too_large", str(exc)) from exc
        return JSONResponse(status, status_code=202 if new or status["status"] == "preparing" else 200)

    @app.get("/v1/avatars")
    def list_avatars() -> dict:
        return {"avatars": store().list()}

    @app.get("/v1/avatars/{avatar_id}")
    def get_avatar(avatar_id: str) -> dict:
        status = store().get(avatar_id) if ID_PATTERN.match(avatar_id) else None
        if status is None:
            raise ApiError(404, "not_found", f"no avatar with id {avatar_id!r}")
        return status

    @app.delete("/v1/avatars/{avatar_id}", status_code=204)
    def delete_avatar(avatar_id: str) -> Response:
        if not ID_PATTERN.match(avatar_id) or not store().delete(avatar_id):
            raise ApiError(404, "not_found", f"no avatar with id {avatar_id!r}")
        return Response(status_code=204)

    def job_service() -> JobService:
        if server.jobs is None:
            raise ApiError(503, "loading", "the server is still loading its models" if server.error is None
                           else f"the server failed to load: {server.error}")
        return server.jobs

    install_job_routes(app, job_service)

    @app.websocket("/v1/live")
    async def live(ws: WebSocket) -> None:
        await live_session(ws, server)

    return app
