"""Default folders, resolved without importing torch (the CLI checks them before loading models)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "TALKRT_CACHE_DIR"


def default_cache_dir() -> Path:
    """The avatar cache: ``$TALKRT_CACHE_DIR/avatars``, else ``~/.cache/talkrt/avatars``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "talkrt")
    return Path(root) / "avatars"
