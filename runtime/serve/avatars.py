"""Avatars of the live server: uploads kept under one data root, prepared once in the background
by the pipeline's :class:`~talkrt.avatar.AvatarPreparer`, re-listed from disk at start-up.

Layout under ``root``::

    avatars/<id>/source<.ext>    the upload as received
    avatars/<id>/status.json     {"status", "frames", "width", "height", "fps", "faces_found", "error"?, "key"}
    prepared/<key>/...           the preparer's cache (see talkrt.avatar)

``<id>`` is the first 24 hex digits of the upload's SHA-256, so the same upload is one avatar.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from talkrt.avatar import AvatarPreparer, PreparedAvatar
from talkrt.errors import InputError, TalkrtError
from talkrt.media.frames import read_video_frames
from talkrt.media.probe import probe_video
from talkrt.pipeline import ping_pong_index
from talkrt.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)

ID_PATTERN = re.compile(r"^[0-9a-f]{24}$")
MAX_UPLOAD_BYTES = 512 << 20
MAX_FRAME_CACHE_BYTES = 2 << 30     # decoded RGB frames of one live avatar
JPEG_QUALITY = 85


class UploadTooLarge(TalkrtError):
    """The upload exceeds the store's byte limit."""


@dataclass
class LiveAvatar:
    """A ready avatar in memory: prepared data, its decoded RGB frames and, lazily, the JPEG of
    each source frame (what idle frames send, so idle sessions cost no encoding either)."""

    id: str
    prepared: PreparedAvatar
    frames: list[np.ndarray]             # [H, W, 3] uint8 RGB per source frame
    _idle_jpeg: dict[int, bytes] = field(default_factory=dict)

    @property
    def fps(self) -> Fraction:
        return self.prepared.fps

    def source_index(self, slot: int) -> int:
        """The source frame of session frame ``slot`` (MuseTalk's ping-pong cycle)."""
        return int(ping_pong_index(np.array([slot]), self.prepared.num_frames)[0])

    def idle_jpeg(self, src: int) -> bytes:
        """JPEG of source frame ``src``, encoded once (the scheduler thread and, on an interrupt,
        the event loop call it; a race at worst encodes a frame twice)."""
        if src not in self._idle_jpeg:
            self._idle_jpeg[src] = encode_jpeg_cpu(self.frames[src])
        return self._idle_jpeg[src]


def encode_jpeg_cpu(rgb: np.ndarray) -> bytes:
    """[H, W, 3] uint8 RGB -> baseline JPEG bytes (PIL, quality :data:`JPEG_QUALITY`)."""
    import io
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


class AvatarStore:
    """Uploads, their background preparation, status and deletion; thread-safe."""

    def __init__(self, root: Path, preparer: AvatarPreparer, metrics: ServeMetrics,
                 max_upload_bytes: int = MAX_UPLOAD_BYTES):
        self.root = Path(root)
        self.avatars_dir = self.root / "avatars"
        self.avatars_dir.mkdir(parents=True, exist_ok=True)
        self.preparer = preparer
        self.max_upload_bytes = max_upload_bytes
        self.metrics = metrics
        self._status: dict[str, dict] = {}
        self._live: dict[str, LiveAvatar] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="talkrt-prepare")
        self._rescan()

    # ------------------------------------------------------------------ start-up

    def _rescan(self) -> None:
        """Re-list avatars from disk; uploads whose preparation was cut short are prepared again."""
        for folder in sorted(self.avatars_dir.iterdir()):
            status_file = folder / "status.json"
            if not ID_PATTERN.match(folder.name) or not status_file.is_file() or self._source(folder.name) is None:
                continue
            status = json.loads(status_file.read_text())
            self._status[folder.name] = status
            if status["status"] == "preparing":
                self._submit(folder.name)
        log.info("avatar store %s: %d avatars", self.avatars_dir, len(self._status))

    # ------------------------------------------------------------------ queries

    def get(self, avatar_id: str) -> dict | None:
        """The public status of one avatar (None if unknown)."""
        with self._lock:
            status = self._status.get(avatar_id)
            return None if status is None else self._public(avatar_id, status)

    def list(self) -> list[dict]:
        with self._lock:
            return [self._public(i, s) for i, s in sorted(self._status.items())]

    @staticmethod
    def _public(avatar_id: str, status: dict) -> dict:
        return {"id": avatar_id, **{k: v for k, v in status.items() if k != "key"}}

    def source(self, avatar_id: str) -> Path | None:
        """The stored upload of avatar ``avatar_id`` (None if unknown); what jobs on it read."""
        return self._source(avatar_id) if ID_PATTERN.match(avatar_id) else None

    def _source(self, avatar_id: str) -> Path | None:
        folder = self.avatars_dir / avatar_id
        found = sorted(folder.glob("source*")) if folder.is_dir() else []
        return found[0] if found else None

    # ------------------------------------------------------------------ upload, delete

    def add(self, upload: BinaryIO, filename: str) -> tuple[dict, bool]:
        """Store an upload and start preparing it; returns (public status, newly added).

        Raises:
            UploadTooLarge: over ``max_upload_bytes``.
            InputError: the probe refuses the media (nothing is kept).
        """
        tmp_dir = self.root / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        suffix = Path(filename or "").suffix.lower()[:8]
        fd, tmp_name = tempfile.mkstemp(prefix=".upload-", suffix=suffix if re.match(r"^\.[a-z0-9]+$", suffix) else "",
                                        dir=tmp_dir)
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as out:
                while chunk := upload.read(1 << 20):
                    size += len(chunk)
                    if size > self.max_upload_bytes:
                        raise UploadTooLarge(f"upload over the limit of {self.max_upload_bytes} bytes")
                    digest.update(chunk)
                    out.write(chunk)
            avatar_id = digest.hexdigest()[:24]
            with self._lock:
                if avatar_id in self._status:
                    return self._public(avatar_id, self._status[avatar_id]), False
            info = probe_video(tmp)                   # InputError for media the pipeline cannot read
            folder = self.avatars_dir / avatar_id
            folder.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, folder / f"source{tmp.suffix}")
            status = {"status": "preparing", "frames": info.num_frames, "width": info.width,
                      "height": info.height, "fps": float(info.fps), "faces_found": None}
            with self._lock:
                self._status[avatar_id] = status
                self._write(avatar_id, status)
            self._submit(avatar_id)
            return self._public(avatar_id, status), True
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, avatar_id: str) -> bool:
        """Forget an avatar and remove its files (False if unknown). Sessions using it keep their copy."""
        with self._lock:
            status = self._status.pop(avatar_id, None)
            self._live.pop(avatar_id, None)
        if status is None:
            return False
        shutil.rmtree(self.avatars_dir / avatar_id, ignore_errors=True)
        if status.get("key"):
            shutil.rmtree(self.preparer.cache_dir / status["key"], ignore_errors=True)
        return True

    def _write(self, avatar_id: str, status: dict) -> None:
        folder = self.avatars_dir / avatar_id
        if folder.is_dir():
            tmp = folder / ".status.json.tmp"
            tmp.write_text(json.dumps(status))
            os.replace(tmp, folder / "status.json")

    # ------------------------------------------------------------------ preparation

    def _submit(self, avatar_id: str) -> None:
        self._pool.submit(self._prepare, avatar_id)

    def _prepare(self, avatar_id: str) -> None:
        source = self._source(avatar_id)
        if source is None:                            # deleted while queued
            return
        self.metrics.preparations.inc()
        try:
            prepared = self.preparer(source, probe_video(source))
            update = {"status": "ready", "frames": prepared.num_frames, "width": prepared.width,
                      "height": prepared.height, "fps": float(prepared.fps), "faces_found": prepared.faces_found,
                      "key": prepared.key}
        except TalkrtError as exc:
            log.warning("avatar %s failed: %s", avatar_id, exc)
            update = {"status": "failed", "error": exc.problem if isinstance(exc, InputError) else str(exc)}
        except Exception as exc:  # noqa: BLE001 - a failed preparation must not kill the worker
            log.exception("avatar %s failed", avatar_id)
            update = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        with self._lock:
            if avatar_id in self._status:
                self._status[avatar_id] = {**self._status[avatar_id], **update}
                self._write(avatar_id, self._status[avatar_id])

    def live(self, avatar_id: str) -> LiveAvatar:
        """The ready avatar with its frames in memory (loaded once; blocking: call off the event loop).

        Raises:
            KeyError: unknown avatar.
            TalkrtError: the avatar is not ready (its status in the message).
        """
        with self._lock:
            status = self._status[avatar_id]
            cached = self._live.get(avatar_id)
        if cached is not None:
            return cached
        if status["status"] != "ready":
            detail = f": {status['error']}" if status.get("error") else ""
            raise TalkrtError(f"avatar {avatar_id} is {status['status']}{detail}")
        source = self._source(avatar_id)
        info = probe_video(source)
        prepared = self.preparer(source, info)        # a cache hit: loads from disk
        avatar = LiveAvatar(avatar_id, prepared, read_video_frames(source, MAX_FRAME_CACHE_BYTES))
        if len(avatar.frames) != prepared.num_frames:
            raise TalkrtError(f"avatar {avatar_id}: decoded {len(avatar.frames)} frames, prepared {prepared.num_frames}")
        with self._lock:
            return self._live.setdefault(avatar_id, avatar)

    def close(self) -> None:
        """Stop the preparation worker (a running preparation finishes first)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
