"""Simulated live clients for :mod:`benchmarks.live`, run in worker processes apart from the
server, and the analysis of what they saw.

Each client opens one ``WS /v1/live`` session (protocol v1, ``docs/protocol.md``), idles for a
short lead-in, streams its speech in 20 ms packets at the pace it is spoken (packet ``i`` leaves
``(i + 1) * 20 ms`` after the speech starts, the moment its last sample has been spoken), sends
``end``, and reads frames until every speech frame has arrived or the drain time is over. It
records when each packet left and when each frame arrived (``time.monotonic()``, one clock for
all processes of the host), and checks that the speech frames carry back the PCM it sent.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from benchmarks.common import percentiles

PACKET_MS = 20
SAMPLE_RATE = 16000
PACKET = SAMPLE_RATE * PACKET_MS // 1000        # samples per packet at 16 kHz


@dataclass(frozen=True)
class ClientPlan:
    """One simulated client: ``pcm`` is s16le mono at ``rate`` Hz; ``start_at`` a ``time.monotonic()``."""

    url: str
    avatar: str
    pcm: bytes
    rate: int
    start_at: float
    lead_in_s: float            # idle time between ready and the first packet
    drain_s: float              # how long to wait for missing speech frames after ``end``


@dataclass
class ClientRecord:
    """What one client saw. ``frames``: (slot index, speaking, arrival) per frame, in arrival order."""

    ready_at: float = float("nan")
    sends: list[float] = field(default_factory=list)       # when each packet was sent
    end_at: float = float("nan")
    closed_at: float = float("nan")
    frames: list[tuple[int, bool, float]] = field(default_factory=list)
    pcm_mismatches: int = 0     # speech frames whose PCM is not the next slice of what was sent
    events: list[dict] = field(default_factory=list)
    error: str | None = None


async def _client(plan: ClientPlan) -> ClientRecord:
    import websockets

    from talkrt.serve.protocol import unpack_frame

    rec = ClientRecord()
    packet = plan.rate * PACKET_MS // 1000 * 2
    await asyncio.sleep(max(0.0, plan.start_at - time.monotonic()))
    try:
        async with websockets.connect(plan.url, max_size=1 << 24) as ws:
            await ws.send(json.dumps({"type": "start", "avatar": plan.avatar, "sample_rate": plan.rate}))
            ready = json.loads(await ws.recv())
            rec.ready_at = time.monotonic()
            if ready.get("type") != "ready":
                rec.error = f"refused: {ready}"
                return rec
            spoken = asyncio.Event()
            offset = 0

            async def receive() -> None:
                nonlocal offset
                async for msg in ws:
                    now = time.monotonic()
                    if isinstance(msg, str):
                        rec.events.append(json.loads(msg))
                        continue
                    header, _, pcm = unpack_frame(msg)
                    rec.frames.append((header["index"], header["speaking"], now))
                    if header["speaking"]:
                        n = min(len(pcm), len(plan.pcm) - offset)     # the last frame is padded with silence
                        rec.pcm_mismatches += n <= 0 or pcm[:n] != plan.pcm[offset:offset + n] or any(pcm[n:])
                        offset += len(pcm)
                        if offset >= len(plan.pcm):
                            spoken.set()

            reader = asyncio.create_task(receive())
            t0 = rec.ready_at + plan.lead_in_s
            for i in range(0, len(plan.pcm), packet):
                await asyncio.sleep(max(0.0, t0 + (i // packet + 1) * PACKET_MS / 1000 - time.monotonic()))
                await ws.send(plan.pcm[i:i + packet])
                rec.sends.append(time.monotonic())
            await ws.send(json.dumps({"type": "end"}))
            rec.end_at = time.monotonic()
            try:
                await asyncio.wait_for(spoken.wait(), plan.drain_s)
            except asyncio.TimeoutError:
                pass
            reader.cancel()
        rec.closed_at = time.monotonic()
    except (OSError, websockets.WebSocketException) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    return rec


def need_packets(samples: int, fps: Fraction, window_steps: int, pad_left_steps: int) -> np.ndarray:
    """[frames] the packet whose arrival completes each utterance frame's audio (-1: ``end``).

    Frame ``k`` reads client samples up to ``floor((k+1) r / fps)`` and Whisper steps up to
    ``floor(50 k / fps) + window_steps - pad_left_steps - 1`` (:mod:`talkrt.serve.audio`)."""
    frames = -(-samples * fps.numerator // (SAMPLE_RATE * fps.denominator))
    k = np.arange(frames)
    pcm_end = (k + 1) * SAMPLE_RATE * fps.denominator // fps.numerator
    speech_end = ((50 * k * fps.denominator) // fps.numerator + window_steps - pad_left_steps) * PACKET
    need = np.maximum(pcm_end, speech_end)
    return np.where(need <= samples, -(-need // PACKET) - 1, -1)


def analyse(records: list[ClientRecord], needs: list[np.ndarray], fps: Fraction) -> dict:
    """On-time share, latencies and counts over the speech frames of every client."""
    interval = 1 / float(fps)
    latencies, vs_due = [], []
    expected = on_time = received = mismatches = 0
    errors = [r.error for r in records if r.error]
    for rec, need in zip(records, needs):
        expected += len(need)
        mismatches += rec.pcm_mismatches
        speech = [(index, t) for index, speaking, t in rec.frames if speaking][:len(need)]
        received += len(speech)
        for k, (index, t) in enumerate(speech):
            due = rec.ready_at + index * interval
            on_time += t <= due + interval
            vs_due.append(1000 * (t - due))
            sent = rec.sends[need[k]] if 0 <= need[k] < len(rec.sends) else rec.end_at
            latencies.append(1000 * (t - sent))
    lat = percentiles(latencies)
    return {"speech_frames": expected, "received": received, "on_time_pct": 100 * on_time / max(1, expected),
            "p50_ms": lat["p50"], "p95_ms": lat["p95"], "p99_ms": lat["p99"],
            "vs_due_p95_ms": percentiles(vs_due)["p95"], "pcm_mismatches": mismatches, "errors": errors,
            "events": [e for r in records for e in r.events]}


def run_clients(plans: list[ClientPlan]) -> list[ClientRecord]:
    """Run ``plans`` concurrently on one event loop (the body of one worker process)."""
    async def main() -> list[ClientRecord]:
        return list(await asyncio.gather(*(_client(p) for p in plans)))
    return asyncio.run(main())


def warm_worker(_: object = None) -> float:
    """Import what a client needs (so that the first measured run does not pay for it)."""
    import websockets  # noqa: F401

    from talkrt.serve import protocol  # noqa: F401
    return time.monotonic()
