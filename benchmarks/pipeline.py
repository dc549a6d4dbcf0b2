"""End-to-end benchmark: MuseTalk-style baseline vs talkrt, same process, same inputs.

    python -m benchmarks.pipeline [--resolutions 720p,1080p,4k] [--speech-seconds 20]
        [--extra NAME=KEY=VALUE[,KEY=VALUE...]] [--long-minutes 10] [--switch-interval-ms MS] [--json PATH]

For each resolution a real-face clip (the bundled astronaut photo with head motion, 4 s at
25 fps) is driven by the bundled speech tiled to ``--speech-seconds``, so the avatar cycles
(ping-pong) as in MuseTalk. Every path runs the same synthetic full-size model after a warm-up
run (avatar cache filled, engines loaded), and reports end-to-end frames/s, per-stage ms/frame,
peak GPU memory (torch allocator) and peak host RSS sampled during the run:

* ``baseline``: MuseTalk's way: eager model (no CUDA graphs), frames decoded on the CPU, cv2
  resize + PIL paste per frame (``compose=reference``), RGB frames encoded by one libx264.
* ``talkrt``: NVDEC (or upload) to NV12, the fused CuPy compose kernel into NV12, the best engine
  backend, stages overlapping (``stage_sync=false``: its per-stage figures are GPU times from CUDA
  events, not wall times), NVENC where the GPU has one, else only NV12 to the host for libx264.
* ``--extra NAME=overrides``: talkrt again with config overrides (e.g.
  ``ultrafast=pipeline.encoder.preset=ultrafast``), one more row each.

Every talkrt row also gets its two bounds measured alone right after it (``benchmarks.bounds``):
the encoder alone on the same frames and the engines alone at the same batch, and the share of
the slower one that the end-to-end run reaches (the overlap table).

``--long-minutes M`` then runs talkrt alone at ``--long-resolution`` on 10 s and on M minutes of
speech and reports both peaks, to show that memory does not grow with the video's length.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
import wave
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from talkrt.config import load_config
from talkrt.media.audio import load_audio
from talkrt.media.probe import probe_video
from talkrt.media.writer import Mp4Writer
from talkrt.pipeline import run_pipeline
from benchmarks.bounds import encoder_alone, engines_alone
from benchmarks.common import HostCores
from benchmarks.sample import moving_face_frames
from talkrt.session import build_session

log = logging.getLogger(__name__)

RESOLUTIONS = {"360p": (640, 360), "720p": (1280, 720), "1080p": (1920, 1080), "4k": (3840, 2160)}


def make_clip(folder: Path, name: str, seconds: float) -> Path:
    width, height = RESOLUTIONS[name]
    path = folder / f"avatar_{name}.mp4"
    if not path.exists():
        with Mp4Writer(path, width, height, Fraction(25), crf=18, preset="veryfast") as writer:
            for frame in moving_face_frames(seconds=seconds, width=width, height=height):
                writer.write_rgb(frame)
    return path


def tiled_speech(source: Path, seconds: float, folder: Path) -> Path:
    """``source`` repeated to ``seconds`` of 16 kHz mono PCM (a long speech track from the bundled one)."""
    path = folder / f"speech_{seconds:g}s.wav"
    if not path.exists():
        clip = load_audio(source)
        n = int(round(seconds * clip.sample_rate))
        tiled = np.resize(clip.samples, n)
        with wave.open(str(path), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(clip.sample_rate)
            out.writeframes((np.clip(tiled, -1.0, 1.0) * 32767).astype("<i2").tobytes())
    return path


class PeakRss:
    """Peak resident set size of this process while the block runs (sampled every 20 ms)."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s, self.peak_mb = interval_s, 0.0
        self._stop = threading.Event()

    @staticmethod
    def current_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") / 2**20)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, self.current_mb())

    def __enter__(self) -> PeakRss:
        self.peak_mb = self.current_mb()
        self._thread = threading.Thread(target=self._sample, name="talkrt-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self.current_mb())


def run_once(parts, video: Path, audio: Path, out: Path) -> dict:
    info, clip = probe_video(video), load_audio(audio)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with PeakRss() as rss, HostCores() as cpu:
        report = run_pipeline(parts, video, info, audio, clip, out)
    return {
        "frames": report.frames, "seconds": report.seconds, "fps": report.fps,
        "stages_ms_per_frame": {name: ms for name, ms, _ in report.stage_table},
        # with stage_sync off the wall times above are launch times; CUDA events give the GPU time per stage
        "gpu_stages_ms_per_frame": {k: 1000 * v / report.frames for k, v in (report.gpu_stage_seconds or {}).items()},
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0,
        "peak_host_rss_mb": rss.peak_mb, "host_cores": cpu.cores, "cores_available": cpu.available,
        "encoder_thread_seconds": report.encode_waits,
        "width": info.width, "height": info.height, "encode_path": report.encode_path,
    }


def parse_extra(text: str) -> tuple[str, list[str]]:
    """``NAME=KEY=VALUE[,KEY=VALUE...]`` -> (``talkrt-NAME``, overrides)."""
    name, _, overrides = text.partition("=")
    if not name or "=" not in overrides:
        raise argparse.ArgumentTypeError(f"--extra wants NAME=KEY=VALUE[,KEY=VALUE...], got {text!r}")
    return f"talkrt-{name}", overrides.split(",")


def bench(resolutions: list[str], config: str, device: str, seconds: float, work: Path, talkrt_backend: str,
          speech: Path, extras: list[tuple[str, list[str]]] = ()) -> dict:
    cache = work / "cache"
    talkrt = ["pipeline.stage_sync=false"]
    paths = {
        "baseline": build_session(load_config(config, ["pipeline.encoder.workers=1"]), device=device,
                                  backend="eager", compose="reference", cache_dir=cache, cuda_graphs=False),
        "talkrt": build_session(load_config(config, talkrt), device=device, backend=talkrt_backend,
                                compose="auto", cache_dir=cache),
    }
    for label, overrides in extras:
        paths[label] = build_session(load_config(config, [*talkrt, *overrides]), device=device,
                                     backend=talkrt_backend, compose="auto", cache_dir=cache)
    results: dict = {"config": paths["talkrt"].cfg.name, "device": str(paths["talkrt"].device),
                     "speech": str(speech), "extras": {k: v for k, v in extras}, "rows": []}
    engines_fps: dict[str, float] = {}
    for name in resolutions:
        video = make_clip(work, name, seconds)
        for label, parts in paths.items():
            run_once(parts, video, speech, work / f"warm_{label}_{name}.mp4")        # warm-up
            row = run_once(parts, video, speech, work / f"{label}_{name}.mp4")
            row.update(resolution=name, path=label, backend=parts.backend, compose=parts.compose)
            if label != "baseline":          # the bounds of this run, measured alone right after it
                if label not in engines_fps:
                    engines_fps[label] = engines_alone(parts, row["frames"])["fps"]
                encoder = encoder_alone(parts, video, speech, row["frames"], work / f"encoder_{label}_{name}.mp4")
                bound = min(encoder["fps"], engines_fps[label])
                row.update(encoder_alone_fps=encoder["fps"], engines_alone_fps=engines_fps[label],
                           share_of_bound=row["fps"] / bound, encoder_alone_cores=encoder["host_cores"],
                           **encoder_loop(row, encoder["seconds"]))
            results["rows"].append(row)
            log.info("%s %s: %.1f frames/s", name, label, row["fps"])
    for name in resolutions:
        rows = {r["path"]: r for r in results["rows"] if r["resolution"] == name}
        for label, row in rows.items():
            row["speedup_vs_baseline"] = row["fps"] / rows["baseline"]["fps"]
    return results


def bench_length(config: str, device: str, backend: str, resolution: str, minutes: float, work: Path,
                 speech: Path) -> list[dict]:
    """talkrt on 10 s and on ``minutes`` of speech: peaks must not grow with the length."""
    parts = build_session(load_config(config, ["pipeline.stage_sync=false"]), device=device, backend=backend,
                          compose="auto", cache_dir=work / "cache")
    video = make_clip(work, resolution, 4.0)
    rows = []
    for seconds in (10.0, 60.0 * minutes):
        track = tiled_speech(speech, seconds, work)
        row = run_once(parts, video, track, work / f"length_{seconds:g}s.mp4")
        row.update(resolution=resolution, speech_s=seconds)
        rows.append(row)
        log.info("%s, %g s of speech: %.1f frames/s, peak GPU %.0f MB, peak RSS %.0f MB", resolution, seconds,
                 row["fps"], row["peak_gpu_mb"], row["peak_host_rss_mb"])
    return rows


def markdown_table(results: dict) -> str:
    stages = sorted({s for r in results["rows"] for s in r["stages_ms_per_frame"]})
    head = ["resolution", "path", "backend", "compose", "frames/s", "speedup", "peak GPU MB", "peak RSS MB"] + \
        [f"{s} ms/f" for s in stages]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["rows"]:
        cells = [r["resolution"], r["path"], r["backend"], r["compose"], f"{r['fps']:.1f}",
                 f"{r.get('speedup_vs_baseline', 1.0):.2f}x", f"{r['peak_gpu_mb']:.0f}", f"{r['peak_host_rss_mb']:.0f}"]
        per_stage = r["gpu_stages_ms_per_frame"] or r["stages_ms_per_frame"]
        cells += [f"{per_stage.get(s, 0.0):.2f}" for s in stages]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def encoder_loop(row: dict, alone_seconds: float) -> dict:
    """Where an encoder-bound run's wall goes (GPU path; {} elsewhere): ``encoder_loop_share``,
    the encoder alone's time over the time the run's encoder thread spent in its writer (1.0:
    inside the run libx264 encodes as fast as alone), and ``outside_encoder_loop_s``, the run's
    wall outside the encoder thread's loop (set-up before its first batch is queued, the writer's
    close: libx264's flush and the audio mux), a fixed cost per run."""
    waits = row.get("encoder_thread_seconds") or {}
    if not waits.get("encode"):
        return {}
    loop = waits["encode"] + waits["encoder_idle"] + waits["download_wait"]
    return {"encoder_loop_share": alone_seconds / waits["encode"], "outside_encoder_loop_s": row["seconds"] - loop}


def overlap_table(results: dict) -> str:
    """End to end against the slower of (encoder alone, engines alone), per talkrt row."""
    head = ("| resolution | path | end to end f/s | encoder alone f/s | engines alone f/s | share of the slower "
            "| host cores end to end | host cores encoder alone | encoder thread: encode / idle / download wait "
            "| pipeline thread waits for a buffer | encoder loop vs alone | outside the loop s |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in results["rows"]:
        if "share_of_bound" in r:
            waits = {k: 100 * v / r["seconds"] for k, v in r.get("encoder_thread_seconds", {}).items()}
            thread = "-" if not waits else \
                f"{waits['encode']:.0f}% / {waits['encoder_idle']:.0f}% / {waits['download_wait']:.0f}%"
            producer = f"{waits['producer_wait']:.0f}%" if waits else "-"
            lines.append(f"| {r['resolution']} | {r['path']} | {r['fps']:.1f} | {r['encoder_alone_fps']:.1f} "
                         f"| {r['engines_alone_fps']:.1f} | {100 * r['share_of_bound']:.0f}% "
                         f"| {r.get('host_cores', float('nan')):.1f} | {r.get('encoder_alone_cores', float('nan')):.1f} "
                         f"| {thread} | {producer} | {_pct(r.get('encoder_loop_share'))} "
                         f"| {_num(r.get('outside_encoder_loop_s'))} |")
    cores = next((r["cores_available"] for r in results["rows"] if "cores_available" in r), None)
    lines.append("\nencoder loop vs alone: the encoder alone's seconds over the seconds the run's encoder thread "
                 "spent writing frames; outside the loop: the run's wall before its encoder thread got work and "
                 "after it finished (set-up, libx264's flush and the audio mux at close), a fixed cost per run")
    lines.append(f"\nhost cores: CPU seconds of the process over wall seconds (of {cores} available); "
                 "libx264 runs in-process. Encoder thread and pipeline thread waits: shares of the run's wall "
                 "time (GPU path only)")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def length_table(rows: list[dict]) -> str:
    lines = ["| resolution | speech | frames | frames/s | peak GPU MB | peak RSS MB |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['resolution']} | {r['speech_s']:g} s | {r['frames']} | {r['fps']:.1f} "
                     f"| {r['peak_gpu_mb']:.0f} | {r['peak_host_rss_mb']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolutions", default="720p,1080p,4k", help="comma list; empty: skip the comparison")
    p.add_argument("--config", default=None, help="default: musetalk on CUDA, tiny on CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="auto", help="talkrt path's engine backend")
    p.add_argument("--seconds", type=float, default=4.0, help="avatar clip length")
    p.add_argument("--speech-seconds", type=float, default=20.0,
                   help="speech length: the --audio track tiled (steady state, not start-up)")
    p.add_argument("--work", type=Path, default=None, help="folder for clips and outputs (default: temp)")
    p.add_argument("--audio", type=Path, default=Path("tests/data/sample_speech.wav"), help="speech track")
    p.add_argument("--extra", type=parse_extra, action="append", default=[], metavar="NAME=OVERRIDES",
                   help="one more talkrt row with config overrides, e.g. ultrafast=pipeline.encoder.preset=ultrafast")
    p.add_argument("--long-minutes", type=float, default=0.0, help="also run talkrt on 10 s and on this many minutes")
    p.add_argument("--long-resolution", default="720p")
    p.add_argument("--switch-interval-ms", type=float, default=None,
                   help="Python's GIL switch interval for the whole run (default: Python's, 5 ms): the encoder "
                        "thread waits up to this long for the GIL after each libx264 call while the thread "
                        "that drives the GPU runs Python")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1000.0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = args.config or ("musetalk" if torch.cuda.is_available() else "tiny")
    work = args.work or Path(tempfile.mkdtemp(prefix="talkrt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    speech = tiled_speech(args.audio, args.speech_seconds, work)
    resolutions = [r.strip() for r in args.resolutions.split(",") if r.strip()]
    results = bench(resolutions, config, args.device, args.seconds, work, args.backend, speech, args.extra) \
        if resolutions else {"rows": []}
    if args.long_minutes > 0:
        results["length_rows"] = bench_length(config, args.device, args.backend, args.long_resolution,
                                              args.long_minutes, work, args.audio)
    results["wall_s"] = time.time() - started
    results["switch_interval_ms"] = 1000.0 * sys.getswitchinterval()
    if torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name()
    if results["rows"]:
        print(markdown_table(results))
        print(overlap_table(results))
    if results.get("length_rows"):
        print(length_table(results["length_rows"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
