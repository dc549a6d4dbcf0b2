"""Frame timing: the frame rate of a stream and the constant-rate frame sequence made from it.

Constant frame rate (CFR) is what talkrt works in: output frame ``i`` lasts ``1/fps`` and
the audio windows are cut at ``i/fps``.  A variable-frame-rate (VFR) source is resampled by
:func:`fps_filter_plan`, which picks, for every output frame, the source frame that FFmpeg's
``fps`` filter with its defaults (``round=near``, ``eof_action=round``) would pick.
"""

from __future__ import annotations

import math
from fractions import Fraction
from statistics import median_low
from typing import Sequence

# A frame-to-frame pts step may differ from the typical step by this fraction of it
# (or by 1.5 time-base ticks, whichever is larger: containers with a 1/1000 time base
# store 29.97 fps as 33/34/33 ms) before the stream is called variable frame rate.
VFR_RELATIVE_TOLERANCE = 0.10
_VFR_TICK_TOLERANCE = Fraction(3, 2)
# A measured rate this close (relative) to an integer or NTSC (N*1000/1001) rate is taken as that rate.
_SNAP_TOLERANCE = Fraction(1, 100)
_TIMESTAMP_RESOLUTION = Fraction(1, 1000)   # seconds: what a frame time is assumed exact to, at best


def pts_deltas(pts: Sequence[int]) -> list[int]:
    """Steps between consecutive presentation times, in time-base ticks (``pts`` sorted first)."""
    known = sorted(pts)
    return [b - a for a, b in zip(known, known[1:])]


def _tolerance(typical: int) -> Fraction:
    return max(_VFR_TICK_TOLERANCE, Fraction(typical) * Fraction(VFR_RELATIVE_TOLERANCE))


def looks_vfr(deltas: Sequence[int]) -> bool:
    """True when some frame interval differs from the typical (median) one by more than the tolerance."""
    if len(deltas) < 2:
        return False
    typical = median_low(deltas)
    if typical <= 0:
        return True  # duplicate timestamps: not a usable constant-rate stream
    return any(abs(d - typical) > _tolerance(typical) for d in deltas)


def cfr_rate(avg_rate: Fraction | None, guessed_rate: Fraction | None, deltas: Sequence[int],
             time_base: Fraction | None) -> Fraction | None:
    """The exact rate of a constant-frame-rate stream.

    The container's average rate is preferred when it is a clean rate (integer or
    N*1000/1001).  Otherwise, if the typical pts step gives a clean rate within 1 %
    of it (MP4 edit lists can make the average slightly off, e.g. 12500/501), that one
    is used; else the average (or guessed) rate as stored.
    """
    rate = avg_rate or guessed_rate
    step_rate: Fraction | None = None
    if deltas and time_base:
        typical = median_low(deltas)
        if typical > 0:
            step_rate = 1 / (Fraction(typical) * time_base)
    if rate is not None and is_clean_rate(rate):
        return rate
    if step_rate is not None:
        snapped = step_rate.limit_denominator(1001)
        if (
            is_clean_rate(snapped)
            and abs(snapped - step_rate) <= step_rate / 1000
            and (rate is None or abs(snapped - rate) <= rate / 100)
        ):
            return snapped
    return rate or step_rate


def nominal_rate(deltas: Sequence[int], time_base: Fraction) -> Fraction | None:
    """The nominal rate of a variable-frame-rate stream: the rate of its regular frame interval.

    The regular intervals are those within the VFR tolerance of the median interval (a
    phone's 33.3 ms, leaving out its dropped-frame gaps and bursts); their mean is the
    nominal interval, known to within ``max(time_base, 1 ms) / count`` (timestamps are whole
    ticks and often were milliseconds before a muxer rescaled them: 30 fps stored as 33/34 ms
    steps; MKV and WebM keep milliseconds).  The result is the integer rate whose
    interval lies within that precision, else such an NTSC rate (N*1000/1001), else the
    nearest integer or NTSC rate within 1 %, else the measured rate itself (limited to a
    denominator of 1001).  None without intervals.
    """
    positive = [d for d in deltas if d > 0]
    if not positive or not time_base:
        return None
    typical = median_low(positive)
    regular = [d for d in positive if abs(d - typical) <= _tolerance(typical)]
    interval = Fraction(sum(regular), len(regular)) * time_base
    precision = max(Fraction(time_base), _TIMESTAMP_RESOLUTION) / len(regular)
    rate = 1 / interval
    ntsc = {Fraction(n * 1000, 1001) for n in (math.floor(rate * 1001 / 1000), math.ceil(rate * 1001 / 1000))}
    candidates = [c for c in [Fraction(round(rate))] + sorted(ntsc, key=lambda c: abs(c - rate)) if c > 0]
    for candidate in candidates:                 # the integer rate first: it is the likelier nominal rate
        if abs(1 / candidate - interval) <= precision:
            return candidate
    best = min(candidates, key=lambda c: abs(c - rate), default=None)
    if best is not None and abs(best - rate) <= rate * _SNAP_TOLERANCE:
        return best
    return rate.limit_denominator(1001)


def is_clean_rate(rate: Fraction) -> bool:
    """True for integer and NTSC (N*1000/1001) rates."""
    return rate > 0 and rate.denominator in (1, 1001)


def fps_text(fps: Fraction) -> str:
    """``25`` or ``30000/1001``: the form ``ffmpeg -r`` and ``--fps`` take."""
    return str(fps.numerator) if fps.denominator == 1 else f"{fps.numerator}/{fps.denominator}"


def round_near(x: Fraction) -> int:
    """Round half away from zero (FFmpeg's ``AV_ROUND_NEAR_INF``)."""
    n = math.floor(abs(x) + Fraction(1, 2))
    return n if x >= 0 else -n


def fps_filter_plan(pts: Sequence[int], end_pts: int, time_base: Fraction, fps: Fraction) -> list[int]:
    """Which source frame each constant-rate output frame shows, as FFmpeg's ``fps`` filter picks.

    ``pts`` are the source frames' presentation times in ``time_base`` ticks (display order
    after sorting); ``end_pts`` is where the last frame ends (its pts + duration).  Each
    timestamp is rounded to the output grid, ``tick(t) = round_near(t * time_base * fps)``
    (half away from zero, the filter's ``round=near``).  Output frame ``n`` (time
    ``tick(pts[0]) + n`` ticks) shows the *last* source frame whose tick is <= that time:
    a frame that another one replaces within the same tick is dropped, and a frame is
    repeated until the next one's tick.  Output stops at ``tick(end_pts)``
    (``eof_action=round``), so there are ``tick(end_pts) - tick(pts[0])`` frames.
    Returns the source index (into sorted ``pts``) of each output frame; empty for no frames.
    """
    if not pts:
        return []
    scale = Fraction(time_base) * Fraction(fps)
    ticks = [round_near(p * scale) for p in sorted(pts)]
    end = round_near(end_pts * scale)
    plan: list[int] = []
    k = 0
    for n in range(ticks[0], end):
        while k + 1 < len(ticks) and ticks[k + 1] <= n:
            k += 1
        plan.append(k)
    return plan
