"""Files of the job service under one folder: uploads being received, inputs kept by content
hash, results, and the bytes they take (for the storage quota).

Layout under ``root``::

    tmp/.upload-*                 uploads being received and checked (removed at once if refused)
    media/<sha256[:32]><.ext>     inputs of queued and running jobs, one file per distinct upload
    results/<job id>.mp4          results of done jobs, until retention removes them

Only names made here (hex digests, job ids) ever become paths; a client's file name is kept
for messages and for its extension (letters and digits only), which helps FFmpeg guess raw formats.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from talkrt.media.output import TEMP_PREFIX

log = logging.getLogger(__name__)

MEDIA_NAME = re.compile(r"^[0-9a-f]{32}(\.[a-z0-9]{1,8})?$")
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
CHUNK = 1 << 20


def client_name(filename: str | None, fallback: str) -> str:
    """The last path component of a client's file name, for messages (at most 200 characters)."""
    name = re.split(r"[\\/]", filename or "")[-1].strip()
    return (name or fallback)[:200]


def _extension(name: str) -> str:
    suffix = Path(name).suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix) else ""


@dataclass
class Upload:
    """One received upload: the client's ``name``, its copy ``path`` under ``tmp/``, its
    SHA-256 ``digest`` (hex) and ``size`` in bytes."""

    name: str
    path: Path
    digest: str
    size: int

    @property
    def media_name(self) -> str:
        """Its file name under ``media/``."""
        return self.digest[:32] + _extension(self.name)


class JobFiles:
    """Uploads, inputs and results of the job service (thread-safe where it says so).

    ``lock`` serialises storing inputs and creating their jobs against removing inputs no job
    needs, so an input is never removed between the two.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp, self.media_dir, self.results = self.root / "tmp", self.root / "media", self.root / "results"
        for folder in (self.tmp, self.media_dir, self.results):
            folder.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()

    # ------------------------------------------------------------------ start-up

    def clean_start(self, requeued: list[str]) -> None:
        """Remove what a stopped server left half-done: uploads being received, temporary output
        files, and the results of jobs that are queued again (written, never committed)."""
        for path in self.tmp.iterdir():
            _remove(path)
        for path in self.results.iterdir():
            if path.name.startswith(TEMP_PREFIX):
                _remove(path)
        for job_id in requeued:
            self.result(job_id).unlink(missing_ok=True)

    # ------------------------------------------------------------------ uploads

    def receive(self, source: BinaryIO, filename: str | None, fallback: str) -> Upload:
        """Copy an upload into ``tmp/`` while hashing it."""
        name = client_name(filename, fallback)
        fd, tmp_name = tempfile.mkstemp(prefix=".upload-", suffix=_extension(name), dir=self.tmp)
        path = Path(tmp_name)
        digest, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := source.read(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return Upload(name, path, digest.hexdigest(), size)

    def keep(self, upload: Upload) -> str:
        """Move a checked upload to ``media/`` (the same bytes are stored once); returns its
        media name. Call with :attr:`lock` held."""
        target = self.media_dir / upload.media_name
        if target.exists():
            upload.path.unlink(missing_ok=True)
        else:
            os.replace(upload.path, target)
        return upload.media_name

    @staticmethod
    def discard(uploads: list[Upload]) -> None:
        """Remove received uploads that were refused or already stored."""
        for upload in uploads:
            upload.path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ paths and space

    def media(self, name: str) -> Path:
        """The stored input ``name`` (a name this class made).

        Raises:
            ValueError: not a media name.
        """
        if not MEDIA_NAME.match(name):
            raise ValueError(f"not a media name: {name!r}")
        return self.media_dir / name

    def result(self, job_id: str) -> Path:
        """Where job ``job_id``'s MP4 is written.

        Raises:
            ValueError: not a job id.
        """
        if not JOB_ID.match(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.results / f"{job_id}.mp4"

    def usage(self) -> int:
        """Bytes under ``root`` (inputs, results, uploads being received)."""
        total = 0
        for folder in (self.tmp, self.media_dir, self.results):
            for entry in os.scandir(folder):
                try:
                    total += entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue
        return total

    def drop_media(self, needed: set[str]) -> list[str]:
        """Remove the inputs no queued or running job needs; returns their names. Call with
        :attr:`lock` held."""
        dropped = []
        for path in self.media_dir.iterdir():
            if path.name not in needed:
                _remove(path)
                dropped.append(path.name)
        return dropped


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
