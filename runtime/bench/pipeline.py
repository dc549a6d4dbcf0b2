"""End-to-end benchmark: MuseTalk-style baseline vs talkrt, same process, same inputs.

    python -m talkrt.bench.pipeline [--resolutions 720p,1080p,4k] [--config musetalk] [--json PATH]

For each resolution a real-face clip (the bundled astronaut photo with head motion, 4 s at
25 fps) and the bundled 6 s speech are used, so the avatar cycles (ping-pong) as in MuseTalk.
Both paths run the same synthetic full-size model after a warm-up run (avatar cache filled,
engines loaded), and report end-to-end frames/s, per-stage ms/frame and peak memory:

* ``baseline``: MuseTalk's way: eager model (no CUDA graphs), frames decoded on the CPU, cv2 resize + PIL paste per
  frame (``compose=reference``), RGB frames encoded by one libx264.
* ``talkrt``: NVDEC (or upload) to NV12, the fused CuPy compose kernel into NV12, only NV12 to the
  host for libx264 segment encoders (no NVENC on H100/H200), best available engine backend, stages overlapping
  (``stage_sync=false``: its per-stage figures are GPU times from CUDA events, not wall times).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import torch

from talkrt.config import load_config
from talkrt.media.audio import load_audio
from talkrt.media.probe import probe_video
from talkrt.media.writer import Mp4Writer
from talkrt.pipeline import run_pipeline
from talkrt.sample import moving_face_frames
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


def run_once(parts, video: Path, audio: Path, out: Path) -> dict:
    info, clip = probe_video(video), load_audio(audio)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    report = run_pipeline(parts, video, info, audio, clip, out)
    return {
        "frames": report.frames, "seconds": report.seconds, "fps": report.fps,
        "stages_ms_per_frame": {name: ms for name, ms, _ in report.stage_table},
        # with stage_sync off the wall times above are launch times; CUDA events give the GPU time per stage
        "gpu_stages_ms_per_frame": {k: 1000 * v / report.frames for k, v in (report.gpu_stage_seconds or {}).items()},
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0,
        "peak_host_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "width": info.width, "height": info.height,
    }


def bench(resolutions: list[str], config: str, device: str, seconds: float, work: Path, talkrt_backend: str,
          speech: Path, compare_single_encoder: bool = False) -> dict:
    single = ["pipeline.encoder.workers=1"]
    cache = work / "cache"
    paths = {
        "baseline": build_session(load_config(config, single), device=device, backend="eager", compose="reference",
                                  cache_dir=cache, cuda_graphs=False),
        "talkrt": build_session(load_config(config, ["pipeline.stage_sync=false"]), device=device,
                                backend=talkrt_backend, compose="auto", cache_dir=cache),
    }
    if compare_single_encoder:
        paths["talkrt-1enc"] = build_session(load_config(config, ["pipeline.stage_sync=false", *single]),
                                             device=device, backend=talkrt_backend, compose="auto", cache_dir=cache)
    results: dict = {"config": paths["talkrt"].cfg.name, "device": str(paths["talkrt"].device), "rows": []}
    for name in resolutions:
        video = make_clip(work, name, seconds)
        for label, parts in paths.items():
            run_pipeline_args = (parts, video, speech)
            run_once(*run_pipeline_args, work / f"warm_{label}_{name}.mp4")        # warm-up
            row = run_once(*run_pipeline_args, work / f"{label}_{name}.mp4")
            row.update(resolution=name, path=label, backend=parts.backend, compose=parts.compose)
            results["rows"].append(row)
            log.info("%s %s: %.1f frames/s", name, label, row["fps"])
    for name in resolutions:
        rows = {r["path"]: r for r in results["rows"] if r["resolution"] == name}
        for label, row in rows.items():
            row["speedup_vs_baseline"] = row["fps"] / rows["baseline"]["fps"]
    return results


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolutions", default="720p,1080p,4k")
    p.add_argument("--config", default=None, help="default: musetalk on CUDA, tiny on CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="auto", help="talkrt path's engine backend")
    p.add_argument("--seconds", type=float, default=4.0, help="avatar clip length")
    p.add_argument("--work", type=Path, default=None, help="folder for clips and outputs (default: temp)")
    p.add_argument("--audio", type=Path, default=Path("tests/data/sample_speech.wav"), help="speech track")
    p.add_argument("--compare-single-encoder", action="store_true",
                   help="also run talkrt with one libx264 instead of the segment encoders")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = args.config or ("musetalk" if torch.cuda.is_available() else "tiny")
    work = args.work or Path(tempfile.mkdtemp(prefix="talkrt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results = bench([r.strip() for r in args.resolutions.split(",")], config, args.device, args.seconds, work,
                    args.backend, args.audio, args.compare_single_encoder)
    results["wall_s"] = time.time() - started
    if torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name()
    table = markdown_table(results)
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
