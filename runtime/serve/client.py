"""A client of the job service (httpx): submit, follow a job's events with the CLI's progress
display, download the result atomically. ``talkrt submit`` (:mod:`talkrt.serve.cli`) drives it.

Following survives a restart of the server: a dropped event stream is reopened (the job is
queued again there and runs from the start), until ``timeout`` seconds have passed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from talkrt.media.output import create_temp_file

log = logging.getLogger(__name__)

FINAL = ("done", "failed", "cancelled")
RETRY_S = 1.0               # wait before reopening a dropped event stream
POLL_S = 0.5                # batch progress is polled this often


class ClientError(Exception):
    """The server refused a request or could not be reached; ``status`` is the HTTP status
    (0: no answer) and ``code`` the error code of its ``{"error": ...}`` body."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class JobClient:
    """Requests to one server (``base`` URL); ``api_key`` is sent as a bearer token."""

    def __init__(self, base: str, api_key: str | None = None, timeout: float = 3600.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base, self.timeout = base.rstrip("/"), timeout
        self.http = httpx.Client(base_url=self.base, headers=headers, timeout=httpx.Timeout(60.0, read=None))

    def close(self) -> None:
        self.http.close()

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ClientError(0, "unreachable", f"{self.base}: {exc}") from exc
        if response.status_code >= 400:
            error = error_of(response)
            if response.status_code == 401:
                error.message += " (talkrt submit: --api-key KEY or $TALKRT_API_KEY)"
            elif response.status_code in (404, 405) and error.code == "error":    # not a talkrt route
                error.message = (f"{method} {self.base}{path}: {response.status_code} {response.reason_phrase}; "
                                 f"is --server the base URL of a talkrt server (e.g. http://127.0.0.1:8000)?")
            raise error
        return response

    def submit(self, videos: list[Path], avatars: list[str], audios: list[Path], options: dict[str, Any],
               batch: bool) -> dict[str, Any]:
        """POST the files (and avatar ids); returns ``{"id", ...}`` or ``{"batch", "jobs"}``."""
        with ExitStack() as stack:
            files = [(field, (p.name, stack.enter_context(open(p, "rb")), "application/octet-stream"))
                     for field, paths in (("video", videos), ("audio", audios)) for p in paths]
            data = {"avatar": avatars} if avatars else {}
            if options:
                data["options"] = json.dumps(options)
            return self._request("POST", "/v1/batches" if batch else "/v1/jobs", files=files, data=data).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def batch(self, batch_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/batches/{batch_id}").json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("DELETE", f"/v1/jobs/{job_id}").json()

    def events(self, job_id: str) -> Iterator[dict[str, Any]]:
        """The job object at every change until it ends; a dropped stream is reopened."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                with self.http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
                    if response.status_code >= 400:
                        response.read()
                        raise error_of(response)
                    for job in _sse_data(response.iter_lines()):
                        yield job
                        if job["status"] in FINAL:
                            return
            except (httpx.TransportError, ClientError) as exc:
                if isinstance(exc, ClientError) and exc.status not in (502, 503, 504):
                    raise
                if time.monotonic() > deadline:
                    raise ClientError(0, "timeout", f"job {job_id}: no end within {self.timeout:g} s ({exc})") from exc
                log.info("event stream of job %s dropped (%s); reconnecting", job_id, exc)
            time.sleep(RETRY_S)

    def wait_batch(self, batch_id: str, on_update: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Poll a batch until every job has ended; ``on_update`` gets each batch object."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                batch = self.batch(batch_id)
            except ClientError as exc:
                if exc.status not in (0, 502, 503, 504) or time.monotonic() > deadline:
                    raise
                time.sleep(RETRY_S)
                continue
            on_update(batch)
            if all(j["status"] in FINAL for j in batch["jobs"]):
                return batch
            if time.monotonic() > deadline:
                raise ClientError(0, "timeout", f"batch {batch_id}: not finished within {self.timeout:g} s")
            time.sleep(POLL_S)

    def download(self, job_id: str, out: Path) -> int:
        """Write the job's MP4 to ``out`` (a temporary file renamed into place); returns its bytes."""
        temp = create_temp_file(out.parent, "download", ".mp4")
        try:
            with self.http.stream("GET", f"/v1/jobs/{job_id}/result") as response:
                if response.status_code >= 400:
                    response.read()
                    raise error_of(response)
                with open(temp, "wb") as f:
                    for chunk in response.iter_bytes(1 << 20):
                        f.write(chunk)
            size = temp.stat().st_size
            os.replace(temp, out)
            return size
        except BaseException:
            temp.unlink(missing_ok=True)
            raise


def error_of(response: httpx.Response) -> ClientError:
    """The :class:`ClientError` of an error answer (``{"error": {...}}``, FastAPI's
    ``{"detail": ...}``, or plain text)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return ClientError(response.status_code, str(body["error"].get("code")), str(body["error"].get("message")))
    if isinstance(body, dict) and "detail" in body:
        return ClientError(response.status_code, "error", str(body["detail"]))
    return ClientError(response.status_code, "error", response.text[:300] or response.reason_phrase)


def _sse_data(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """The JSON ``data`` of each ``job`` event of a Server-Sent Events stream."""
    event, data = "message", []
    for line in lines:
        if not line:
            if data and event == "job":
                yield json.loads("\n".join(data))
            elif event == "deleted":
                raise ClientError(404, "not_found", "the job was deleted")
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
