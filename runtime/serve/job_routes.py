"""HTTP routes of the job service (docs/jobs.md): ``/v1/jobs`` and ``/v1/batches``.

Errors are ``{"error": {"code", "message"}}`` (:class:`~talkrt.serve.job_inputs.ApiError`).
A request body over the limit is refused with 413 from its ``Content-Length`` before any of it
is read, or, without one, as soon as the bytes read pass the limit. Job events are Server-Sent
Events written with Starlette's ``StreamingResponse`` (no extra dependency): one ``job`` event
with the whole job object on every change, the last one when the job has ended.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message, Receive

from talkrt.serve.job_inputs import MAX_OPTIONS_CHARS, ApiError
from talkrt.serve.job_store import FINAL
from talkrt.serve.jobs import MAX_BATCH_JOBS, JobService, Media

EVENT_POLL_S = 0.1          # how often an event stream looks for a change
API_PATHS = "/v1/"             # every route here answers errors as {"error": {"code", "message"}}
KEEPALIVE_S = 15.0          # a comment line this often keeps idle proxies from closing the stream


class BodyTooLarge(Exception):
    """The request body passed the upload limit while it was read."""


def _limited(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def counted() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge()
        return message

    return counted


async def _text_part(value, key: str) -> str:
    """A form field's text, whether sent as a field or as a (UTF-8, bounded) file part.

    Raises:
        ApiError: 422 ``bad_part`` when the file is too long or not UTF-8.
    """
    if not isinstance(value, UploadFile):
        return str(value)
    data = await value.read(MAX_OPTIONS_CHARS * 4 + 1)
    if len(data) > MAX_OPTIONS_CHARS * 4:
        raise ApiError(422, "bad_part", f"'{key}' is over {MAX_OPTIONS_CHARS} characters")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(422, "bad_part", f"'{key}' is not UTF-8 text") from None


def install_job_routes(app: FastAPI, service: Callable[[], JobService]) -> None:
    """Add the job routes and the API's error handlers to ``app`` (every ``/v1`` error as
    ``{"error": {"code", "message"}}``); ``service()`` returns the job service or raises
    ``ApiError(503)`` while the models load."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        """FastAPI's checks of a route's declared fields (the avatar upload's ``video``)."""
        if not request.url.path.startswith(API_PATHS):
            return await request_validation_exception_handler(request, exc)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            error = ApiError(400, "bad_form", "the body must be multipart/form-data (curl -F video=@avatar.mp4)")
        else:
            fields = sorted({str(e.get("loc", ("", "?"))[-1]) for e in exc.errors()})
            error = ApiError(422, "missing_part", f"missing or invalid form field(s): {', '.join(fields)}")
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        """Starlette's own errors (no such route, wrong method) in the API's format on its paths."""
        if not request.url.path.startswith(API_PATHS):
            return await http_exception_handler(request, exc)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, f"http_{exc.status_code}")
        return JSONResponse({"error": {"code": code, "message": str(exc.detail)}}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    router = APIRouter()

    async def submit(request: Request, batch: bool) -> JSONResponse:
        jobs = service()
        limit = jobs.settings.max_upload_bytes
        length = request.headers.get("content-length")
        too_large = ApiError(413, "too_large", f"the request body is over this server's limit of {limit} bytes")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise too_large
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            raise ApiError(400, "bad_form", "the body is not multipart/form-data; send the files as form fields "
                                            "(curl -F video=@talk.mp4 -F audio=@dub.wav)")
        limited = Request(request.scope, _limited(request.receive, limit))
        try:
            form = await limited.form(max_files=MAX_BATCH_JOBS + 1, max_fields=MAX_BATCH_JOBS + 8)
        except BodyTooLarge:
            raise too_large from None
        except StarletteHTTPException as exc:
            raise ApiError(400, "bad_form", f"the body is not valid multipart/form-data ({exc.detail})") from None
        try:
            videos, audios, options = [], [], None
            for key, value in form.multi_items():
                if key in ("video", "audio"):
                    if not isinstance(value, UploadFile):
                        raise ApiError(422, "bad_part", f"'{key}' must be a file")
                    (videos if key == "video" else audios).append(Media(source=value.file, filename=value.filename))
                elif key == "avatar":
                    videos.append(Media(avatar=str(value)))
                elif key == "options":        # a text field, or a file holding the JSON (-F options=@opts.json)
                    options = await _text_part(value, key)
                else:
                    raise ApiError(422, "bad_part", f"unknown form field '{key}' (video, avatar, audio, options)")
            result = await asyncio.to_thread(jobs.submit, videos, audios, options, batch)
        finally:
            await form.close()
        return JSONResponse(result, status_code=202)

    @router.post("/v1/jobs")
    async def submit_job(request: Request) -> JSONResponse:
        return await submit(request, batch=False)

    @router.post("/v1/batches")
    async def submit_batch(request: Request) -> JSONResponse:
        return await submit(request, batch=True)

    @router.get("/v1/jobs")
    def list_jobs(status: str | None = None) -> dict:
        return {"jobs": service().list(status)}

    def found(job_id: str) -> dict:
        job = service().get(job_id)
        if job is None:
            raise ApiError(404, "not_found", f"no job with id {job_id!r}")
        return job

    @router.get("/v1/jobs/{job_id}")
    def get_job(job_id: str) -> dict:
        return found(job_id)

    @router.delete("/v1/jobs/{job_id}")
    def cancel_job(job_id: str) -> dict:
        return service().cancel(job_id)

    @router.get("/v1/jobs/{job_id}/result")
    def job_result(job_id: str) -> FileResponse:
        return FileResponse(service().result(job_id), media_type="video/mp4", filename=f"{job_id}.mp4")

    @router.get("/v1/jobs/{job_id}/events")
    def job_events(job_id: str) -> StreamingResponse:
        found(job_id)
        return StreamingResponse(_events(service(), job_id), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.get("/v1/batches/{batch_id}")
    def get_batch(batch_id: str) -> dict:
        batch = service().batch(batch_id)
        if batch is None:
            raise ApiError(404, "not_found", f"no batch with id {batch_id!r}")
        return batch

    app.include_router(router)


async def _events(jobs: JobService, job_id: str) -> AsyncIterator[str]:
    """``event: job`` with the job object whenever it changes; ends after a final status (or,
    with ``event: deleted``, when the job is deleted)."""
    seen, last_sent = -1, time.monotonic()
    while True:
        version = jobs.store.version(job_id)
        if version != seen:
            seen = version
            job = await asyncio.to_thread(jobs.get, job_id)
            if job is None:
                yield f"event: deleted\ndata: {json.dumps({'id': job_id})}\n\n"
                return
            yield f"event: job\ndata: {json.dumps(job)}\n\n"
            last_sent = time.monotonic()
            if job["status"] in FINAL:
                return
        elif time.monotonic() - last_sent > KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        await asyncio.sleep(EVENT_POLL_S)
