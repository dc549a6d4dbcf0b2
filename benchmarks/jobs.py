"""Offline jobs through ``talkrt serve`` against sequential ``run_pipeline`` runs, same inputs.

    python -m benchmarks.jobs [--jobs 20] [--seconds 10] [--resolution 1080p] [--config musetalk|tiny]
        [--device auto] [--backend B] [--job-workers 2] [--set KEY=VALUE ...] [--live-seconds 20]
        [--cli-runs K] [--work DIR] [--json PATH]

Inputs: one avatar video of ``--seconds`` at ``--resolution`` (the moving-face clip of
:mod:`benchmarks.pipeline`) and ``--jobs`` speech tracks of ``--seconds`` (the sample speech,
each from another offset). Measured:

1. **server**: ``talkrt serve`` in a child process running ``--job-workers`` jobs at once. After
   one warm-up job (avatar prepared, engines warm) every job is submitted at once, as one batch
   (one video, many audios): wall time from the submission to the last job done.
2. **live**: one live session (the small sample avatar) streams ``--live-seconds`` of speech in
   real time, first alone, then while the jobs of (1) run; its speech frames on time (no later
   than one frame interval after due, the server's ``talkrt_frames_late`` rule) and latency,
   computed as :mod:`benchmarks.live` does.
3. **sequential**: the same jobs one after another through ``run_pipeline`` in this process
   (models built once, one warm-up run): the work without start-up.
4. **CLI** (``--cli-runs K`` > 0): K real ``run_pipeline`` command runs, each loading its models
   (the start-up a service removes); their mean times the job count is an extrapolation, marked so.

A CPU smoke run: ``--jobs 2 --seconds 1 --resolution 360p --config tiny --live-seconds 3``.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import subprocess
import sys
import tempfile
import time
import wave
from fractions import Fraction
from pathlib import Path

import httpx
import numpy as np

from benchmarks.live import SAMPLE_RATE, analyse, need_packets, prepare_avatars, server_process, speech
from benchmarks.live_clients import ClientPlan, run_clients, warm_worker

log = logging.getLogger("benchmarks.jobs")


def serve(args, work: Path):
    """``talkrt serve`` with the job options in a child process (:func:`benchmarks.live.server_process`)."""
    return server_process(args, work, 2, ["--job-workers", str(args.job_workers), "--max-duration-s", "86400",
                                          "--max-upload-mb", "65536", *[x for kv in args.set for x in ("--set", kv)]])


def speech_tracks(source: Path, seconds: float, count: int, folder: Path) -> list[Path]:
    """``count`` WAVs of ``seconds`` of ``source`` (16 kHz), each starting 1.7 s later than the last."""
    samples = speech(source, max(seconds, 1.0) + 1.7 * count)
    tracks = []
    for i in range(count):
        path = folder / f"speech{i:02d}.wav"
        start = int(1.7 * i * SAMPLE_RATE)
        with wave.open(str(path), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(SAMPLE_RATE)
            out.writeframes(samples[start:start + int(seconds * SAMPLE_RATE)].tobytes())
        tracks.append(path)
    return tracks


def post_batch(base: str, video: Path, audios: list[Path]) -> dict:
    parts = [("video", (video.name, video.read_bytes(), "video/mp4"))]
    parts += [("audio", (a.name, a.read_bytes(), "audio/wav")) for a in audios]
    r = httpx.post(base + ("/v1/batches" if len(audios) > 1 else "/v1/jobs"), files=parts, timeout=600)
    r.raise_for_status()
    return r.json()


def wait_done(base: str, ids: list[str], timeout: float) -> list[dict]:
    """The jobs once all have ended; RuntimeError if one did not end ``done``."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = [httpx.get(f"{base}/v1/jobs/{i}").json() for i in ids]
        if all(j["status"] in ("done", "failed", "cancelled") for j in jobs):
            bad = [j for j in jobs if j["status"] != "done"]
            if bad:
                raise RuntimeError(f"job {bad[0]['id']} {bad[0]['status']}: {bad[0].get('error')}")
            return jobs
        if time.monotonic() > deadline:
            raise TimeoutError(f"jobs not done after {timeout} s")
        time.sleep(0.2)


def live_run(pool, base: str, avatar: dict, pcm: np.ndarray, need: np.ndarray, fps: Fraction, start_at: float):
    """Start one real-time live client in ``pool``; returns a callable giving its analysis."""
    url = base.replace("http://", "ws://", 1) + "/v1/live"
    pending = pool.apply_async(run_clients, ([ClientPlan(url, avatar["id"], pcm.tobytes(), SAMPLE_RATE, start_at,
                                                         0.3, 3.0)],))
    return lambda: analyse(pending.get(), [need], fps)


def server_path(args, work: Path, video: Path, tracks: list[Path], live_video: Path, pool) -> dict:
    from talkrt.config import load_config
    out: dict = {}
    with serve(args, work) as (base, health):
        out["health"] = health
        warm = post_batch(base, video, tracks[:1])
        wait_done(base, [warm["id"]], args.start_timeout)
        live = None
        if args.live_seconds > 0:
            avatar = prepare_avatars(base, [live_video], args.start_timeout)[0]
            fps = Fraction(avatar["fps"]).limit_denominator(1001)
            audio = load_config(args.config, args.set).model.audio
            pcm = speech(args.audio, args.live_seconds)
            need = need_packets(len(pcm), fps, audio.window_steps, audio.pad_left_steps)
            out["live_alone"] = live_run(pool, base, avatar, pcm, need, fps, time.monotonic() + 1.0)()
            live = live_run(pool, base, avatar, pcm, need, fps, time.monotonic() + 1.0)
            time.sleep(1.5)                       # the session is open and speaking when the jobs arrive
        started = time.monotonic()
        answer = post_batch(base, video, tracks)
        ids = answer["jobs"] if "jobs" in answer else [answer["id"]]
        jobs = wait_done(base, ids, 24 * 3600)
        out["wall_s"] = time.monotonic() - started
        out["job_seconds"] = [j["finished"] - j["created"] for j in jobs]
        out["frames"] = sum(j["frames_total"] for j in jobs)
        if live is not None:
            out["live_with_jobs"] = live()
    return out


def sequential_path(args, work: Path, video: Path, tracks: list[Path]) -> dict:
    from talkrt.config import load_config
    from talkrt.media.audio import load_audio
    from talkrt.media.probe import probe_video
    from talkrt.pipeline import run_pipeline
    from talkrt.session import build_session
    parts = build_session(load_config(args.config, args.set), device=args.device, backend=args.backend,
                          cache_dir=work / "cache")
    info = probe_video(video)
    run_pipeline(parts, video, info, tracks[0], load_audio(tracks[0]), work / "warm.mp4")
    started, frames = time.monotonic(), 0
    for i, track in enumerate(tracks):
        frames += run_pipeline(parts, video, info, track, load_audio(track), work / f"seq{i:02d}.mp4").frames
    return {"wall_s": time.monotonic() - started, "frames": frames}


def cli_path(args, work: Path, video: Path, tracks: list[Path]) -> dict:
    seconds = []
    for i in range(args.cli_runs):
        cmd = [sys.executable, "-m", "talkrt.cli", "--config", args.config, "--device", args.device, "--no-progress",
               "--video", str(video), "--audio", str(tracks[i % len(tracks)]), "--out", str(work / f"cli{i}.mp4"),
               "--cache-dir", str(work / "cache"), *(["--backend", args.backend] if args.backend else []),
               *[x for kv in args.set for x in ("--set", kv)]]
        started = time.monotonic()
        subprocess.run(cmd, check=True, capture_output=True)
        seconds.append(time.monotonic() - started)
    return {"runs": len(seconds), "run_s": seconds, "mean_s": float(np.mean(seconds)),
            "extrapolated_wall_s": float(np.mean(seconds)) * args.jobs}


def tables(r: dict) -> str:
    s, q = r["server"], r["sequential"]
    lines = [f"talkrt jobs: {r['jobs']} jobs of {r['seconds']:g} s at {r['resolution']}, config={r['config']} "
             f"device={r['device']} ({r['gpu']}), {r['job_workers']} job workers", "",
             "| path | wall s | output frames/s | vs server |", "|---|---:|---:|---:|",
             f"| server (one batch, {r['job_workers']} at once) | {s['wall_s']:.1f} | {s['frames'] / s['wall_s']:.1f} "
             f"| 1.00x |",
             f"| sequential run_pipeline (one process) | {q['wall_s']:.1f} | {q['frames'] / q['wall_s']:.1f} "
             f"| {q['wall_s'] / s['wall_s']:.2f}x |"]
    if r.get("cli"):
        c = r["cli"]
        lines.append(f"| sequential CLI runs (mean of {c['runs']} x {r['jobs']}, extrapolated) "
                     f"| {c['extrapolated_wall_s']:.1f} | - | {c['extrapolated_wall_s'] / s['wall_s']:.2f}x |")
    lines.append(f"\njob latency (submitted to done): p50 {np.percentile(s['job_seconds'], 50):.1f} s, "
                 f"max {max(s['job_seconds']):.1f} s")
    if "live_alone" in s:
        lines += ["", "| live session | speech frames | on time | p50 ms | p95 ms | late p95 ms |",
                  "|---|---:|---:|---:|---:|---:|"]
        for label, key in (("alone", "live_alone"), ("while the jobs run", "live_with_jobs")):
            x = s[key]
            lines.append(f"| {label} | {x['received']}/{x['speech_frames']} | {x['on_time_pct']:.1f}% "
                         f"| {x['p50_ms']:.0f} | {x['p95_ms']:.0f} | {x['vs_due_p95_ms']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.jobs", description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=20)
    p.add_argument("--seconds", type=float, default=10.0, help="length of each job (avatar video and speech)")
    p.add_argument("--resolution", default="1080p", help="360p, 720p, 1080p or 4k")
    p.add_argument("--config", help="musetalk (default on CUDA) or tiny (default on CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", help="engine backend (default: the config's)")
    p.add_argument("--job-workers", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every path")
    p.add_argument("--live-seconds", type=float, default=20.0, help="speech of the live session (0: no live session)")
    p.add_argument("--cli-runs", type=int, default=0, help="real run_pipeline command runs to time (default 0)")
    p.add_argument("--audio", type=Path, help="speech WAV at 16 kHz (default: the sample)")
    p.add_argument("--start-timeout", type=float, default=1800.0)
    p.add_argument("--work", type=Path, help="folder for inputs, outputs and the server's data (default: temp)")
    p.add_argument("--json", help="write the results (a 'jobs' section) here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from benchmarks.common import default_config_and_device, gpu_name, machine_info, sample_inputs
    from benchmarks.pipeline import make_clip
    from benchmarks.report import save_benchmark

    args.config, args.device = default_config_and_device(args.config, args.device)
    inputs = sample_inputs(None, args.audio)
    args.audio = inputs.audio
    work = args.work or Path(tempfile.mkdtemp(prefix="talkrt-jobs-"))
    work.mkdir(parents=True, exist_ok=True)
    video = make_clip(work, args.resolution, args.seconds)
    tracks = speech_tracks(inputs.audio, args.seconds, args.jobs, work)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        pool.apply(warm_worker)
        server = server_path(args, work, video, tracks, inputs.video, pool)
    result = {"config": args.config, "device": args.device, "gpu": gpu_name(machine_info()), "jobs": args.jobs,
              "seconds": args.seconds, "resolution": args.resolution, "job_workers": args.job_workers,
              "overrides": args.set, "server": server, "sequential": sequential_path(args, work, video, tracks)}
    if args.cli_runs > 0:
        result["cli"] = cli_path(args, work, video, tracks)
    result["ratio_sequential_over_server"] = result["sequential"]["wall_s"] / server["wall_s"]
    print(tables(result))
    if args.json:
        print(f"wrote {save_benchmark(args.json, 'jobs', result)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
