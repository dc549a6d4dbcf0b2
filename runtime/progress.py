"""How long work reports its progress: phases of counted steps (a run's one progress display)."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Receives a run's phases ("tracking", "encoding", "lip-sync") and their advance."""

    def phase(self, name: str, total: int) -> None:
        """A new phase of ``total`` steps (frames) begins."""

    def advance(self, steps: int = 1) -> None:
        """``steps`` more steps of the current phase are done."""


class NoProgress:
    """A :class:`Progress` that shows nothing."""

    def phase(self, name: str, total: int) -> None:
        """Ignore the phase."""

    def advance(self, steps: int = 1) -> None:
        """Ignore the advance."""
