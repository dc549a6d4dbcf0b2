"""Live serving benchmark: N simulated clients stream speech in real time to one ``talkrt serve``.

    python -m benchmarks.live [--sessions 1,2,4,8,16,24,32] [--seconds 20] [--config musetalk|tiny]
        [--device auto|cpu|cuda] [--backend B] [--avatars 2] [--client-procs P] [--json PATH]

The server runs in its own process (``python -m talkrt.serve.cli serve`` on a free loopback
port); the clients run in ``--client-procs`` worker processes (:mod:`benchmarks.live_clients`),
so neither waits for the other's Python. For each N, N clients on ``--avatars`` different
avatars (parts of ``--video``) each stream ``--seconds`` of ``--audio`` (tiled, each client from
another offset) in 20 ms packets at the pace it is spoken, starting within one second of each
other. Per N:

* **on time**: the share of the speech frames that arrived no later than one frame interval
  after their due time (slot ``index / fps`` after the client got ``ready``: the server's own
  ``talkrt_frames_late`` rule); speech frames that never arrived count as late;
* **latency p50/p95/p99**: from the moment the audio a speech frame needs had been sent (its
  PCM and its Whisper look-ahead: the packet holding the last sample it reads, or ``end`` for
  the last frames) to the frame's arrival. It includes the wait for the frame's slot (frames
  leave in slot order at the avatar's fps; an utterance starts once two frames are ready);
* **mean batch** and sessions per batch, from the server's ``/metrics`` over the run;
* **busy**: the server's summed batch wall time (Whisper to JPEG, stream synchronised) over the
  run's wall time; with ``pynvml``, also the mean NVML GPU utilisation sampled every 100 ms;
* **served** speech frames/s, and **render** speech frames per second of batch time.

After the sweep the server stops and the same process measures the **engines alone** (UNet +
VAE decoder, same config, backend and device) at each N's mean batch, and the share of it that
the sessions received (served / engines) and that the server's batches reach (render / engines).
Then idle sessions for ``--idle-seconds`` show that an idle session costs no model batch.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import httpx
import numpy as np

from benchmarks.live_clients import SAMPLE_RATE, ClientPlan, analyse, need_packets, run_clients, warm_worker

log = logging.getLogger("benchmarks.live")

ON_TIME_TARGET = 99.0


@contextmanager
def server_process(args, work: Path, max_sessions: int, extra: Sequence[str] = ()):
    """Start ``talkrt serve`` in a child process (``extra``: more of its options); yield its
    base URL once ``/healthz`` is 200."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "talkrt.serve.cli", "serve", "--config", args.config, "--device", args.device,
           "--port", str(port), "--max-sessions", str(max_sessions), "--data-dir", str(work / "data"),
           "--log-level", "warning"] + (["--backend", args.backend] if args.backend else []) + \
        (["--overlap-steps"] if getattr(args, "overlap_steps", False) else []) + list(extra)
    log_path = work / "server.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + args.start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}); its log:\n{log_path.read_text()[-4000:]}")
            try:
                r = httpx.get(base + "/healthz")
                if r.status_code == 200:
                    break
                if r.status_code == 500:
                    raise RuntimeError(f"the server failed to load: {r.json().get('error')}")
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server was not healthy after {args.start_timeout} s (log: {log_path})")
            time.sleep(0.5)
        log.info("server up: %s", r.json())
        yield base, r.json()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def scrape(base: str) -> dict[str, float]:
    """Every sample of ``/metrics``, summed over labels: ``{sample name: value}``; the step phases
    also one by one, as ``talkrt_step_phase_seconds_total:PHASE``."""
    from prometheus_client.parser import text_string_to_metric_families
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(base + "/metrics").text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
            if "phase" in sample.labels:
                out[f"{sample.name}:{sample.labels['phase']}"] = sample.value
    return out


def avatar_clips(video: Path, count: int, work: Path) -> list[Path]:
    """``count`` consecutive parts of ``video`` as MP4 files (different content: different avatars)."""
    from talkrt.media.frames import read_video_frames
    from talkrt.media.probe import probe_video
    from talkrt.media.writer import Mp4Writer
    info = probe_video(video)
    frames = read_video_frames(video, 2 << 30, fps=info.fps)
    clips = []
    for i, part in enumerate(np.array_split(np.arange(len(frames)), count)):
        clips.append(work / f"avatar{i}.mp4")
        with Mp4Writer(clips[-1], info.width, info.height, info.fps, crf=18) as writer:
            for j in part:
                writer.write_rgb(frames[j])
    return clips


def prepare_avatars(base: str, clips: list[Path], timeout: float) -> list[dict]:
    ids = []
    for clip in clips:
        r = httpx.post(base + "/v1/avatars", files={"video": (clip.name, clip.read_bytes(), "video/mp4")}, timeout=120)
        r.raise_for_status()
        ids.append(r.json()["id"])
    deadline, statuses = time.monotonic() + timeout, []
    for avatar_id in ids:
        while (status := httpx.get(f"{base}/v1/avatars/{avatar_id}").json())["status"] == "preparing":
            if time.monotonic() > deadline:
                raise TimeoutError(f"avatar {avatar_id} still preparing after {timeout} s")
            time.sleep(0.5)
        if status["status"] != "ready":
            raise RuntimeError(f"avatar {avatar_id}: {status}")
        statuses.append(status)
    return statuses


class GpuSampler:
    """Mean NVML utilisation of GPU 0 over a run (None without pynvml or a GPU)."""

    def __init__(self):
        try:
            import pynvml
            pynvml.nvmlInit()
            self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # noqa: BLE001 - pynvml missing or no driver
            self.nvml = None
        self.samples: list[float] = []
        self._stop = threading.Event()

    def __enter__(self) -> GpuSampler:
        if self.nvml is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)

    def __exit__(self, *exc) -> None:
        self._stop.set()

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def run_sessions(pool, procs: int, base: str, avatars: list[dict], pcms: list[bytes], rng, lead_in: float,
                 drain: float) -> tuple:
    """Run len(pcms) clients at once; returns (records, server metric deltas, wall seconds, GPU utilisation)."""
    url = base.replace("http://", "ws://", 1) + "/v1/live"
    start = time.monotonic() + 1.0
    plans = [ClientPlan(url, avatars[i % len(avatars)]["id"], pcm, SAMPLE_RATE, start + float(rng.uniform(0, 1.0)),
                        lead_in, drain) for i, pcm in enumerate(pcms)]
    chunks = [plans[i::procs] for i in range(min(procs, len(plans)))]
    before = scrape(base)
    with GpuSampler() as gpu:
        records = [r for part in pool.map(run_clients, chunks, chunksize=1) for r in part]
    after = scrape(base)
    deltas = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    ok = [r for r in records if r.error is None]
    wall = max(r.closed_at for r in ok) - min(r.ready_at for r in ok) if ok else float("nan")
    wait_idle(base)
    return records, deltas, wall, gpu.mean


def wait_idle(base: str, timeout: float = 120.0) -> None:
    """Wait until the server holds no session and runs no batch (``talkrt_batch_in_flight``), so
    that one run's backlog does not spill into the next."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not httpx.get(base + "/healthz").json().get("sessions") and not scrape(base).get("talkrt_batch_in_flight"):
            return
        time.sleep(0.2)
    log.warning("the server was still busy %g s after the clients left", timeout)


def row_of(n: int, records, deltas: dict, wall: float, gpu_util, needs, fps: Fraction) -> dict:
    row = {"sessions": n, **analyse(records, needs, fps)}
    batches = deltas.get("talkrt_batch_size_count", 0.0)
    step_s = deltas.get("talkrt_step_seconds_sum", 0.0)
    speech = deltas.get("talkrt_batch_size_sum", 0.0)
    row.update(batches=int(batches), mean_batch=speech / batches if batches else float("nan"),
               sessions_per_batch=deltas.get("talkrt_batch_sessions_sum", 0.0) / batches if batches else float("nan"),
               busy_pct=100 * step_s / wall if wall > 0 else float("nan"), gpu_util_pct=gpu_util,
               served_fps=row["received"] / wall if wall > 0 else float("nan"),
               render_fps=speech / step_s if step_s > 0 else float("nan"), wall_s=wall,
               server_late=int(deltas.get("talkrt_frames_late_total", 0)),
               dropped=int(deltas.get("talkrt_frames_dropped_total", 0)),
               failed_batches=int(deltas.get("talkrt_batches_failed_total", 0)),
               phase_ms={k.split(":", 1)[1]: 1000 * v / batches for k, v in deltas.items()
                         if k.startswith("talkrt_step_phase_seconds_total:") and batches})
    return row


def engines_alone(args, batches: list[int]) -> dict[int, dict]:
    """UNet + VAE decoder ms per call and frames/s at each batch (same config, device, backend)."""
    import torch

    from benchmarks.engines import time_ms
    from talkrt.config import load_config
    from talkrt.session import build_session
    parts = build_session(load_config(args.config), device=args.device, backend=args.backend,
                          cache_dir=tempfile.mkdtemp(prefix="talkrt-live-engines-"), warmup="all")
    m, dev = parts.cfg.model, parts.device
    out = {}
    for b in sorted(set(batches)):
        gen = torch.Generator(device="cpu").manual_seed(b)
        feeds = {"latent_input": torch.randn(b, m.unet.in_channels, m.latent_size, m.latent_size, generator=gen),
                 "audio_features": torch.randn(b, m.audio.tokens_per_frame, m.audio.d_model, generator=gen)}
        feeds = {k: v.to(dev, parts.dtype) for k, v in feeds.items()}
        # on the current stream: time_ms's CUDA events are recorded there
        latents = parts.unet.run(feeds, None)["pred_latents"]
        warm = 3 if dev.type == "cuda" else 1
        unet_ms = time_ms(lambda: parts.unet.run(feeds, None), dev, args.engine_iters, warm)
        vae_ms = time_ms(lambda: parts.vae_decoder.run({"latents": latents}, None), dev, args.engine_iters, warm)
        out[b] = {"unet_ms": unet_ms, "vae_ms": vae_ms, "fps": 1000 * b / (unet_ms + vae_ms)}
        log.info("engines alone, batch %d: %.1f frames/s", b, out[b]["fps"])
    return out


def tables(result: dict) -> str:
    head = (f"talkrt live: config={result['config']} device={result['device']} ({result['gpu']}) "
            f"backend={result['backend']} compose={result['compose']} "
            f"overlap_steps={'on' if result.get('overlap_steps') else 'off'} speech={result['seconds']:g} s per client, "
            f"{result['avatars']} avatars, {result['client_procs']} client processes, "
            f"look-ahead {result['lookahead_ms']:g} ms")
    lines = [head, "", "| N | on time | p50 ms | p95 ms | p99 ms | late p95 ms | mean batch | sess/batch | busy | GPU util "
                       "| served f/s | render f/s | engines f/s | served/engines | render/engines |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        util = "-" if r["gpu_util_pct"] is None else f"{r['gpu_util_pct']:.0f}%"
        eng = r.get("engines_fps")
        shares = ["-", "-", "-"] if eng is None else \
            [f"{eng:.0f}", f"{100 * r['served_fps'] / eng:.0f}%", f"{100 * r['render_fps'] / eng:.0f}%"]
        lines.append(f"| {r['sessions']} | {r['on_time_pct']:.1f}% | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} "
                     f"| {r['p99_ms']:.0f} | {r['vs_due_p95_ms']:.0f} | {r['mean_batch']:.1f} "
                     f"| {r['sessions_per_batch']:.1f} | {r['busy_pct']:.0f}% | {util} | {r['served_fps']:.0f} "
                     f"| {r['render_fps']:.0f} | " + " | ".join(shares) + " |")
    phases = ("schedule", "prepare", "audio", "model", "compose", "sync", "jpeg")
    lines += ["", "scheduler thread, ms per batch by phase (on CUDA the GPU's time shows in sync):", "",
              "| N | " + " | ".join(phases) + " |", "|---:|" + "---:|" * len(phases)]
    lines += [f"| {r['sessions']} | " + " | ".join(f"{r.get('phase_ms', {}).get(p, float('nan')):.2f}" for p in phases)
              + " |" for r in result["rows"]]
    best = result["largest_on_time"]
    lines += ["", f"largest N with >= {ON_TIME_TARGET:g}% of speech frames on time: {best if best else 'none'}",
              f"idle sessions: {result['idle']['sessions']} for {result['idle']['seconds']:g} s, "
              f"{result['idle']['model_batches']} model batches, {result['idle']['frames_per_s']:.1f} frames/s each"]
    problems = [f"N={r['sessions']}: {k}={r[k]}" for r in result["rows"] for k in ("pcm_mismatches", "failed_batches")
                if r[k]] + [f"N={r['sessions']}: {e}" for r in result["rows"] for e in r["errors"][:3]]
    return "\n".join(lines + [f"PROBLEM {p}" for p in problems])


def speech(audio: Path, seconds: float) -> np.ndarray:
    """``seconds`` of ``audio`` at 16 kHz as int16 (tiled when shorter)."""
    from talkrt.media.audio import load_audio
    clip = load_audio(audio)
    if clip.sample_rate != SAMPLE_RATE:
        raise ValueError(f"{audio}: {clip.sample_rate} Hz, the benchmark streams {SAMPLE_RATE} Hz")
    return np.resize(np.round(clip.samples * 32767).clip(-32768, 32767).astype("<i2"), int(seconds * SAMPLE_RATE))


def idle_check(pool, procs: int, base: str, avatars: list[dict], n: int, seconds: float) -> dict:
    """``n`` sessions that never speak for ``seconds``: model batches run meanwhile (should be 0)."""
    records, deltas, wall, _ = run_sessions(pool, procs, base, avatars, [b""] * n, np.random.default_rng(1), 0.0,
                                            seconds)
    frames = [len(r.frames) / (r.closed_at - r.ready_at) for r in records if r.error is None]
    return {"sessions": n, "seconds": seconds, "model_batches": int(deltas.get("talkrt_batch_size_count", 0)),
            "frames_per_s": float(np.mean(frames)) if frames else float("nan"),
            "errors": [r.error for r in records if r.error]}


def sessions_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("session counts must be positive")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.live", description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=sessions_list, default=[1, 2, 4, 8, 16, 24, 32], help="N values, e.g. 1,2,4")
    p.add_argument("--seconds", type=float, default=20.0, help="speech per client (default 20)")
    p.add_argument("--config", help="musetalk (default on CUDA) or tiny (default on CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", help="engine backend (default: the config's)")
    p.add_argument("--avatars", type=int, default=2, help="different avatars, clients spread over them")
    p.add_argument("--video", help="avatar video (default: the sample), split into --avatars parts")
    p.add_argument("--audio", help="speech WAV at 16 kHz (default: the sample)")
    p.add_argument("--client-procs", type=int, help="client worker processes (default: min(8, CPUs/2, max N))")
    p.add_argument("--drain-seconds", type=float, default=3.0, help="wait after 'end' for missing speech frames")
    p.add_argument("--idle-seconds", type=float, default=3.0)
    p.add_argument("--engine-iters", type=int, help="timed calls per engine and batch (default 20 on CUDA, 3 on CPU)")
    p.add_argument("--start-timeout", type=float, default=1800.0, help="seconds for the server to load")
    p.add_argument("--work", type=Path, help="folder for the server's data and log (default: temp)")
    p.add_argument("--overlap-steps", action="store_true", help="serve with --overlap-steps (one batch in flight)")
    p.add_argument("--json", help="write the results (a 'live' section) here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from benchmarks.common import default_config_and_device, gpu_name, machine_info, sample_inputs
    from benchmarks.report import save_benchmark
    from talkrt.config import load_config
    from talkrt.serve.audio import lookahead_ms

    args.config, args.device = default_config_and_device(args.config, args.device)
    args.engine_iters = args.engine_iters or (20 if args.device.startswith("cuda") else 3)
    inputs = sample_inputs(args.video, args.audio)
    audio_cfg = load_config(args.config).model.audio
    procs = args.client_procs or max(1, min(8, (os.cpu_count() or 2) // 2, max(args.sessions)))
    work = args.work or Path(tempfile.mkdtemp(prefix="talkrt-live-"))
    work.mkdir(parents=True, exist_ok=True)
    samples = speech(inputs.audio, args.seconds)
    rng = np.random.default_rng(0)
    rows: list[dict] = []
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        pool.map(warm_worker, range(procs), chunksize=1)
        with server_process(args, work, max(args.sessions)) as (base, health):
            avatars = prepare_avatars(base, avatar_clips(inputs.video, args.avatars, work), args.start_timeout)
            fps = Fraction(avatars[0]["fps"]).limit_denominator(1001)
            need = need_packets(len(samples), fps, audio_cfg.window_steps, audio_cfg.pad_left_steps)
            for n in args.sessions:
                pcms = [np.roll(samples, -int(0.37 * SAMPLE_RATE * i)).tobytes() for i in range(n)]
                records, deltas, wall, util = run_sessions(pool, procs, base, avatars, pcms, rng, 0.3,
                                                           args.drain_seconds)
                rows.append(row_of(n, records, deltas, wall, util, [need] * n, fps))
                log.info("N=%d: %.1f%% on time, p95 %.0f ms, mean batch %.1f", n, rows[-1]["on_time_pct"],
                         rows[-1]["p95_ms"], rows[-1]["mean_batch"])
            idle = idle_check(pool, procs, base, avatars, max(args.sessions), args.idle_seconds)
    batch_of = {r["sessions"]: max(1, round(r["mean_batch"])) for r in rows if r["batches"]}
    engines = engines_alone(args, list(batch_of.values())) if batch_of else {}
    for r in rows:
        if r["sessions"] in batch_of:
            r["engines_batch"] = batch_of[r["sessions"]]
            r["engines_fps"] = engines[r["engines_batch"]]["fps"]
    on_time = [r["sessions"] for r in rows if r["on_time_pct"] >= ON_TIME_TARGET and not r["errors"]]
    result = {"config": args.config, "device": args.device, "backend": health.get("backend"),
              "compose": health.get("compose"), "gpu": gpu_name(machine_info()), "seconds": args.seconds,
              "avatars": args.avatars, "client_procs": procs, "lookahead_ms": lookahead_ms(fps, audio_cfg),
              "rows": rows, "engines": {str(b): v for b, v in engines.items()}, "idle": idle,
              "largest_on_time": max(on_time) if on_time else None, "on_time_target_pct": ON_TIME_TARGET,
              "overlap_steps": bool(args.overlap_steps)}
    print(tables(result))
    if args.json:
        print(f"wrote {save_benchmark(args.json, 'live', result)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
