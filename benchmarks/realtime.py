"""Real-time first-frame latency: speech arrives in 20 ms packets, frames leave as soon as they can.

    python -m benchmarks.realtime [--batch-sizes 1,4,8] [--json PATH] [--pace realtime|asap]
                                    [--config musetalk|tiny] [--device auto|cpu|cuda] [--seconds S]

Audio arrival (``--pace realtime``, the default): packet ``k = 1, 2, ...`` holds samples
``[(k-1)*320, k*320)`` (20 ms at 16 kHz) and arrives ``k * 20 ms`` after the stream starts, i.e.
the moment its last sample has been spoken; the final, partial packet arrives at the end of
the clip.  When the pipeline is slower than real time nothing waits and a backlog builds up,
so the latency grows, as it would live.  ``--pace asap`` delivers audio the moment a batch
asks for it; latency is then the compute time alone.

What a frame needs (:mod:`talkrt.models.audio`): frame ``i`` takes the padded Whisper steps
``floor(50 i / fps) .. +window_steps-1``; the left padding is ``pad_left_steps`` zeros, so the
last real step is ``s_i = floor(50 i / fps) + 10 - 4 - 1`` and the frame needs the audio up to
that step's end, ``(s_i + 1) / 50`` s (all of the clip when ``s_i`` falls in the right padding).
At 25 fps that is 120 ms after the frame's own time: the model's audio look-ahead.  (Whisper's
convolutions also see ~12.5 ms beyond a step's end; we count the step boundary, as the offline
pipeline does when it slices the encoder output.)

A batch of ``B`` frames starts once its last frame's audio has arrived.  Whisper then runs on
the most recent audio (the last 30 s at most, step aligned, zero-padded to its 30 s input)
and the pipeline's own stage objects do the rest: frames, UNet, VAE decode, compose, and
stage 6 converts to NV12 and hands the frames to the encoder.  A frame's latency runs from
the arrival of the audio it needs to the end of its batch's stage 6; ``compute`` runs from the
start of its batch.  Target: p95 latency under 40 ms on one H200, on top of the look-ahead.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import percentiles
from talkrt.serve.audio import gather_windows
from talkrt.media.audio import num_video_frames
from talkrt.streams import on_stream
from talkrt.models.audio import (SAMPLE_RATE, SEGMENT_SECONDS, STEPS_PER_SECOND, AudioFeatures,
                                 window_start)

log = logging.getLogger(__name__)

PACKET_MS = 20
TARGET_P95_MS = 40.0
SAMPLES_PER_STEP = SAMPLE_RATE // STEPS_PER_SECOND


@dataclass(frozen=True)
class AudioTiming:
    """When the audio each output frame needs has arrived, for a clip of ``num_samples``."""

    num_samples: int
    fps: Fraction
    pad_left_steps: int
    window_steps: int
    packet_ms: int = PACKET_MS
    sample_rate: int = SAMPLE_RATE

    @property
    def packet_samples(self) -> int:
        return self.sample_rate * self.packet_ms // 1000

    @property
    def total_steps(self) -> int:
        return self.num_samples * STEPS_PER_SECOND // self.sample_rate

    @property
    def num_frames(self) -> int:
        return num_video_frames(self.num_samples, self.fps, self.sample_rate)

    def last_step(self, frame: int) -> int:
        """Last unpadded Whisper step frame ``frame`` reads: ``floor(50 i / fps) + window - pad_left - 1``."""
        return int(window_start(frame, self.fps)) + self.window_steps - self.pad_left_steps - 1

    def samples_needed(self, frame: int) -> int:
        step = self.last_step(frame)
        if step >= self.total_steps:          # in the right padding: needs the end of the stream
            return self.num_samples
        return min((step + 1) * SAMPLES_PER_STEP, self.num_samples)

    def arrival_s(self, samples: int) -> float:
        """Seconds after the start at which the first ``samples`` samples have all arrived."""
        if samples >= self.num_samples:
            return self.num_samples / self.sample_rate
        return math.ceil(samples / self.packet_samples) * self.packet_ms / 1000.0

    def arrived_samples(self, elapsed_s: float) -> int:
        if elapsed_s >= self.num_samples / self.sample_rate:
            return self.num_samples
        packets = int(elapsed_s * 1000.0 // self.packet_ms)
        return min(packets * self.packet_samples, self.num_samples)

    def lookahead_ms(self, frame: int) -> float:
        return 1000.0 * (self.arrival_s(self.samples_needed(frame)) - frame / float(self.fps))


class StreamingAudio:
    """Stage 2 for a live source: Whisper over the most recent audio, re-run on every update."""

    def __init__(self, features: AudioFeatures, samples: np.ndarray, fps: Fraction):
        self.features, self.samples, self.fps = features, samples, fps
        self.total_steps = len(samples) * STEPS_PER_SECOND // SAMPLE_RATE
        self.states: torch.Tensor | None = None
        self.first_step = 0

    def update(self, arrived: int) -> None:
        """Encode the last <= 30 s of the first ``arrived`` samples (window start step aligned)."""
        start = max(0, arrived - SEGMENT_SECONDS * SAMPLE_RATE)
        start = -(-start // SAMPLES_PER_STEP) * SAMPLES_PER_STEP
        self.states = self.features.encode(self.samples[start:arrived])
        self.first_step = start // SAMPLES_PER_STEP

    def windows(self, frames: np.ndarray) -> torch.Tensor:
        if self.states is None:
            raise RuntimeError("StreamingAudio.windows before update")
        return gather_windows(self.states, self.first_step, self.total_steps, frames, self.fps,
                              self.features.cfg)


@dataclass(frozen=True)
class FrameLatency:
    frame: int
    batch: int
    latency_ms: float       # audio needed has arrived -> frame handed to the encoder
    compute_ms: float       # batch start -> frame handed to the encoder


@dataclass(frozen=True)
class BatchSizeResult:
    batch: int
    frames: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    compute_p50_ms: float
    compute_p95_ms: float
    max_ms: float
    wall_s: float
    stages_ms: dict[str, float]

    @classmethod
    def from_frames(cls, batch: int, rows: list[FrameLatency], wall_s: float,
                    stages_ms: dict[str, float]) -> BatchSizeResult:
        lat = percentiles([r.latency_ms for r in rows])
        comp = percentiles([r.compute_ms for r in rows], (50, 95))
        return cls(batch, len(rows), lat["p50"], lat["p95"], lat["p99"], comp["p50"], comp["p95"],
                   max((r.latency_ms for r in rows), default=float("nan")), wall_s, stages_ms)

    def row(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("batch", "frames", "p50_ms", "p95_ms", "p99_ms", "compute_p50_ms",
                                              "compute_p95_ms", "max_ms", "wall_s", "stages_ms")}


@dataclass(frozen=True)
class StreamContext:
    parts: Any                  # talkrt.pipeline.PipelineParts
    avatar: Any                 # talkrt.avatar.PreparedAvatar
    video: Path
    info: Any                   # talkrt.media.probe.VideoInfo
    samples: np.ndarray
    work_dir: Path


def stream_pass(ctx: StreamContext, batch_size: int, pace: str, max_batches: int | None = None,
                tag: str = "run") -> tuple[list[FrameLatency], dict[str, float], float]:
    """Feed the clip as a live stream; returns per-frame latencies, stage ms/frame and wall seconds."""
    from talkrt.media.writer import Mp4Writer
    from talkrt.pipeline import BatchRunner, build_stages, ping_pong_index
    from talkrt.profiling import StageClock
    from talkrt.stages import FrameBatch

    parts, info = ctx.parts, ctx.info
    a = parts.cfg.model.audio
    timing = AudioTiming(len(ctx.samples), info.fps, a.pad_left_steps, a.window_steps)
    num_out = timing.num_frames
    audio = StreamingAudio(parts.audio_features, ctx.samples, info.fps)
    clock = StageClock(parts.stream)
    arrived_now = {"samples": 0}

    def streaming_audio_stage(batch) -> None:
        with on_stream(parts.stream):
            audio.update(arrived_now["samples"])
            batch.audio = audio.windows(batch.out_index[batch.found])
    enc = parts.cfg.pipeline.encoder
    rows: list[FrameLatency] = []
    out_path = ctx.work_dir / f"realtime_{tag}_b{batch_size}.mp4"
    with Mp4Writer(out_path, info.width, info.height, info.fps, video_codec=enc.codec, preset=enc.preset,
                   crf=enc.crf) as writer:
        stages = build_stages(parts, ctx.video, info, num_out, writer, streaming_audio_stage)
        runner = BatchRunner(stages, clock, parts.stream)
        t0 = time.perf_counter()
        for b, first in enumerate(range(0, num_out, batch_size)):
            if max_batches is not None and b >= max_batches:
                break
            idx = np.arange(first, min(first + batch_size, num_out))
            need = timing.samples_needed(int(idx[-1]))
            if pace == "realtime":
                wait = t0 + timing.arrival_s(need) - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                start = time.perf_counter()
                arrived = max(need, timing.arrived_samples(start - t0))
                need_at = [t0 + timing.arrival_s(timing.samples_needed(int(i))) for i in idx]
            else:
                start = time.perf_counter()
                arrived, need_at = need, [start] * len(idx)
            batch = FrameBatch.of_avatar(b, idx, ping_pong_index(idx, ctx.avatar.num_frames), ctx.avatar)
            arrived_now["samples"] = arrived
            runner(batch)
            done = time.perf_counter()
            rows += [FrameLatency(int(i), b, 1000.0 * (done - t), 1000.0 * (done - start)) for i, t in zip(idx, need_at)]
        wall = time.perf_counter() - t0
        stages.finish()
    out_path.unlink(missing_ok=True)
    return rows, clock.ms_per_frame(len(rows)), wall


def run_realtime(ctx: StreamContext, batch_sizes: list[int], pace: str, warmup_batches: int) -> list[BatchSizeResult]:
    results = []
    for bs in batch_sizes:
        if warmup_batches > 0:
            stream_pass(ctx, bs, "asap", max_batches=warmup_batches, tag="warmup")
        rows, stages, wall = stream_pass(ctx, bs, pace)
        results.append(BatchSizeResult.from_frames(bs, rows, wall, stages))
        log.info("batch %d: p95 %.1f ms over %d frames", bs, results[-1].p95_ms, len(rows))
    return results


def format_results(results: list[BatchSizeResult], header: str, target_ms: float) -> str:
    lines = [header, f"{'batch':>5}{'frames':>8}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}"
                     f"{'compute p95':>13}{'frames/s':>10}  target p95 < {target_ms:g} ms"]
    for r in results:
        fps = r.frames / r.wall_s if r.wall_s > 0 else 0.0
        lines.append(f"{r.batch:>5}{r.frames:>8}{r.p50_ms:>10.1f}{r.p95_ms:>10.1f}{r.p99_ms:>10.1f}"
                     f"{r.compute_p95_ms:>13.1f}{fps:>10.1f}  {'meets' if r.p95_ms < target_ms else 'misses'}")
    return "\n".join(lines)


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--batch-sizes: '{text}' is not a comma-separated list of ints") from exc
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("--batch-sizes needs positive integers")
    return sizes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.realtime", description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", type=parse_batch_sizes, default=[1, 4, 8])
    p.add_argument("--json", help="write the results (a 'realtime' report section) here")
    p.add_argument("--pace", choices=("realtime", "asap"), default="realtime")
    p.add_argument("--config", help="musetalk (default on CUDA) or tiny (default on CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--video")
    p.add_argument("--audio")
    p.add_argument("--seconds", type=float, help="first S seconds of the speech (default: all on CUDA, 2 on CPU)")
    p.add_argument("--backend")
    p.add_argument("--cache-dir")
    p.add_argument("--warmup-batches", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from benchmarks.common import default_config_and_device, gpu_name, machine_info, sample_inputs, trim_clip
    from benchmarks.report import save_benchmark
    from talkrt.config import load_config
    from talkrt.media.audio import load_audio
    from talkrt.media.probe import probe_video
    from talkrt.session import build_session

    config, device = default_config_and_device(args.config, args.device)
    seconds = args.seconds if args.seconds is not None else (None if device.startswith("cuda") else 2.0)
    inputs = sample_inputs(args.video, args.audio)
    info = probe_video(inputs.video)
    clip = trim_clip(load_audio(inputs.audio), seconds)
    cfg = load_config(config)
    if max(args.batch_sizes) > cfg.pipeline.batch_size:
        cfg = load_config(config, [f"pipeline.batch_size={max(args.batch_sizes)}"])
    parts = build_session(cfg, device=device, backend=args.backend, cache_dir=args.cache_dir, warmup="all")
    avatar = parts.preparer(inputs.video, info)
    a = cfg.model.audio
    timing = AudioTiming(clip.num_samples, info.fps, a.pad_left_steps, a.window_steps)
    lookahead = max(timing.lookahead_ms(i) for i in range(timing.num_frames))
    with tempfile.TemporaryDirectory(prefix="talkrt-realtime-") as tmp:
        ctx = StreamContext(parts, avatar, inputs.video, info, clip.samples, Path(tmp))
        results = run_realtime(ctx, args.batch_sizes, args.pace, args.warmup_batches)
    machine = machine_info()
    header = (f"talkrt realtime: config={cfg.name} device={device} ({gpu_name(machine)}) backend={parts.backend} "
              f"compose={parts.compose} pace={args.pace} packets={PACKET_MS} ms clip={clip.duration_s:.2f} s "
              f"look-ahead={lookahead:.0f} ms (latency is on top of it)")
    print(format_results(results, header, TARGET_P95_MS))
    if args.json:
        section = {"config": cfg.name, "device": device, "backend": parts.backend, "compose": parts.compose,
                   "pace": args.pace, "packet_ms": PACKET_MS, "clip_seconds": clip.duration_s,
                   "lookahead_ms": round(lookahead, 3), "target_p95_ms": TARGET_P95_MS, "rows": [r.row() for r in results]}
        print(f"wrote {save_benchmark(args.json, 'realtime', section)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
