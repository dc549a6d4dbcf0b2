"""Test-only slowdown of named pipeline stages, to prove the latency regression test catches one.

:func:`slow_stages` wraps ``StageClock.stage`` (a ``pytest.MonkeyPatch``) so that every
clock sleeps ``ms`` milliseconds per frame of the batch (once for stages that report no frames)
inside each named stage, before the stage's time is taken.  A name matches a stage exactly
(``3.unet``) or without its ``N.`` prefix (``unet``).  ``pytest -m latency -o addopts="" --slowdown
3.unet=5 tests/test_latency.py`` (the ``--slowdown`` option is in conftest.py) must fail.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pytest

from talkrt.profiling import StageClock


def parse_slowdown(text: str | None) -> dict[str, float]:
    """``"3.unet=5, compose=2.5"`` -> ``{"3.unet": 5.0, "compose": 2.5}`` (ms per frame).

    Raises ``ValueError`` for an item that is not ``stage=milliseconds`` with milliseconds >= 0.
    """
    result: dict[str, float] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if not sep or not name.strip() or ms < 0:
            raise ValueError(f"slowdown '{item}' must look like stage=milliseconds (>= 0)")
        result[name.strip()] = ms
    return result


def slowdown_for(slowdown: dict[str, float], name: str) -> float:
    """Injected ms per frame for stage ``name`` (exact name first, then without its ``N.`` prefix)."""
    if name in slowdown:
        return slowdown[name]
    head, dot, tail = name.partition(".")
    return slowdown.get(tail, 0.0) if dot and head.isdigit() else 0.0


@contextlib.contextmanager
def slow_stages(slowdown: dict[str, float]) -> Iterator[set[str]]:
    """Inside the block every ``StageClock`` sleeps in the stages ``slowdown`` names.

    Yields the set of stage names seen so far, so a caller can check that every name matched
    (:func:`unmatched`).  The patch is undone when the block ends.
    """
    seen: set[str] = set()
    timed = StageClock.stage

    @contextlib.contextmanager
    def stage(clock: StageClock, name: str, batch_index: int = -1, frames: int = 0) -> Iterator[None]:
        seen.add(name)
        with timed(clock, name, batch_index, frames):
            yield
            delay_ms = slowdown_for(slowdown, name)
            if delay_ms > 0:
                time.sleep(delay_ms * max(frames, 1) / 1000.0)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StageClock, "stage", stage)
        yield seen


def unmatched(slowdown: dict[str, float], stage_names: set[str]) -> list[str]:
    """Names in ``slowdown`` that match none of ``stage_names`` (a typo would slow nothing)."""
    return [key for key in slowdown if not any(slowdown_for({key: 1.0}, n) for n in stage_names)]
