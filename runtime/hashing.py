"""Content digests of files (engine artifacts, manifests, avatar videos)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

_CHUNK = 1 << 22   # 4 MiB reads: multi-GB plans and videos hash without loading them whole


def sha256_files(paths: Iterable[str | os.PathLike]) -> str:
    """Hex SHA-256 over the contents of ``paths`` concatenated in order.

    Raises ``OSError`` (e.g. ``FileNotFoundError``) when a file cannot be read.
    """
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()
