"""Prometheus metrics of one server process (a private registry, so several apps can live in
one process, e.g. in tests)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
STEP_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)


@dataclass
class ServeMetrics:
    """The server's counters, gauges and histograms."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.sessions = Gauge("talkrt_sessions", "open live sessions", registry=r)
        self.sessions_refused = Counter("talkrt_sessions_refused", "sessions refused (server full)", registry=r)
        self.frames_sent = Counter("talkrt_frames_sent", "frames sent to clients", ["kind"], registry=r)
        self.frames_dropped = Counter("talkrt_frames_dropped", "frames dropped because a client read too slowly",
                                      registry=r)
        self.frames_late = Counter("talkrt_frames_late", "frames made more than one frame interval after their "
                                                         "due time", registry=r)
        self.batch_size = Histogram("talkrt_batch_size", "speech frames per model batch", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.batch_sessions = Histogram("talkrt_batch_sessions", "sessions per model batch",
                                        buckets=BATCH_BUCKETS, registry=r)
        self.step_seconds = Histogram("talkrt_step_seconds", "wall time of one batch (Whisper to JPEG; on "
                                      "CUDA the stream synchronised)", buckets=STEP_BUCKETS, registry=r)
        self.step_phase_seconds = Counter("talkrt_step_phase_seconds", "scheduler thread time by phase of its "
                                          "steps: schedule (slots, idle frames, delivery), prepare, audio, model, "
                                          "compose (host time to launch on CUDA), sync (waiting for the GPU), jpeg",
                                          ["phase"], registry=r)
        self.batch_in_flight = Gauge("talkrt_batch_in_flight", "1 while a model batch is launched and not yet finished", registry=r)
        self.batches_failed = Counter("talkrt_batches_failed", "model batches that failed (e.g. GPU out of memory); "
                                      "their sessions' speech was dropped", registry=r)
        self.preparations = Counter("talkrt_avatar_preparations", "avatar preparations started", registry=r)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
