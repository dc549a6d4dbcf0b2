"""Exceptions raised by talkrt library code (never ``exit()``)."""

from __future__ import annotations

import os


class TalkrtError(Exception):
    """Base class of every error talkrt raises on purpose."""


class InputError(TalkrtError):
    """A user-supplied file is missing, unreadable or unsuitable.

    The message always names the file and the problem, e.g.
    ``clip.mp4: no audio stream``.
    """

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class ConfigError(TalkrtError):
    """A configuration file or override is invalid."""


class EngineError(TalkrtError):
    """An engine is missing, stale or does not match this machine or config."""
