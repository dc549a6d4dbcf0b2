"""``run_pipeline`` command line: avatar video + speech -> lip-synced MP4.

Exit codes: 0 success, 2 bad input / config / engine (the message names the file and the
problem), 1 unexpected failure, 130 interrupted. A failed run leaves no output file.

The inputs and the output are checked before torch is imported or any model is built, so a
refusal takes about a second.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import re
import signal
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

from talkrt import __version__
from talkrt.config import BACKENDS, COMPOSE_MODES, TalkrtConfig
from talkrt.errors import InputError, TalkrtError
from talkrt.families import load_family_config

log = logging.getLogger("talkrt")

#: third-party loggers that speak at INFO about things a user of talkrt need not see
QUIET_LOGGERS = ("PIL", "matplotlib", "httpx", "urllib3", "diffusers", "transformers", "torch._inductor",
                 "PyNvVideoCodec")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def frame_rate(text: str) -> Fraction:
    """argparse type: a positive rate as an integer, a decimal or a fraction (``30000/1001``)."""
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a frame rate (e.g. 25, 29.97, 30000/1001)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="run_pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"talkrt {__version__}")
    p.add_argument("--video", required=True, help="avatar video or still image (any format FFmpeg reads)")
    p.add_argument("--audio", required=True, help="speech track (any audio or video file with audio)")
    p.add_argument("--out", required=True, help="output .mp4 path")
    p.add_argument("--config", help="musetalk (full size), tiny (a toy of the same structure, for tests), "
                                    "latentsync16, latentsync16-tiny, or a .yaml path (its 'family' picks the "
                                    "model); default: musetalk on a GPU, tiny on a CPU")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--fps", type=frame_rate, help="output frame rate, e.g. 25 or 30000/1001 (default: the video's "
                                                 "own; variable-rate videos: their nominal rate)")
    p.add_argument("--batch-size", type=positive_int, help="frames per batch (overrides pipeline.batch_size; "
                                                             "LatentSync batches model.frames_per_chunk)")
    p.add_argument("--weights", help="folder with the official checkpoints of the config's model "
                                     "(MuseTalk v1.5 or LatentSync 1.6; else synthetic weights)")
    p.add_argument("--backend", choices=BACKENDS, help="engine backend (default: from config, auto)")
    p.add_argument("--compose", choices=COMPOSE_MODES, help="compose path (default: from config, auto)")
    p.add_argument("--engines-dir", help="where `make engines` put the engines (default: ./engines)")
    p.add_argument("--cache-dir", help="avatar cache folder (default: ~/.cache/talkrt/avatars)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set pipeline.sharpen.enabled=true (repeatable)")
    p.add_argument("--json", metavar="PATH", help="also write the run report as JSON here")
    p.add_argument("--no-progress", action="store_true", help="do not draw the progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


class ProgressBar:
    """The run's one progress display (a tqdm bar on stderr): each phase relabels and resets it."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def phase(self, name: str, total: int) -> None:
        """Start phase ``name`` of ``total`` frames."""
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="frame", desc=name, dynamic_ncols=True)
        else:
            self.bar.reset(total=total)
            self.bar.set_description(name)

    def advance(self, steps: int = 1) -> None:
        """``steps`` more frames of the current phase are done."""
        if self.bar is not None:
            self.bar.update(steps)

    def close(self) -> None:
        """Remove the bar (idempotent)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def choose_config(args: argparse.Namespace, overrides: list[str], on_gpu: bool) -> tuple[str, TalkrtConfig]:
    """(name as ``--config`` takes it, config): the one ``--config`` names; without one,
    ``musetalk`` on a GPU and ``tiny`` on a CPU, saying which runs and why."""
    if args.config:
        return args.config, load_family_config(args.config, overrides)
    if on_gpu:
        log.info("config: musetalk (full-size MuseTalk v1.5; no --config given)")
        return "musetalk", load_family_config("musetalk", overrides)
    log.warning("config: tiny, because no --config was given and this runs on the CPU: a toy model of "
                "MuseTalk's structure with small widths (right shapes and timing, not a real lip-sync "
                "model). Pass --config musetalk for the full-size model (minutes per second of video on a CPU).")
    return "tiny", load_family_config("tiny", overrides)


def early_config(args: argparse.Namespace, overrides: list[str]) -> TalkrtConfig:
    """The config as far as it can be known without torch: ``--config``, else ``tiny`` for
    ``--device cpu`` and ``musetalk`` otherwise (``auto`` is settled once torch is loaded)."""
    return load_family_config(args.config or ("tiny" if args.device == "cpu" else "musetalk"), overrides)


def check_settings(args: argparse.Namespace, cfg: TalkrtConfig) -> None:
    """Refuse option combinations that cannot run, from their text alone.

    Raises:
        TalkrtError: naming the option and the problem.
    """
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        raise TalkrtError(f"--device {args.device!r}: use cpu, cuda, cuda:N or auto")
    compose = args.compose or cfg.pipeline.compose
    if compose == "gpu" and args.device == "cpu":
        raise TalkrtError("--compose gpu needs a CUDA device, not --device cpu")
    if compose == "reference" and cfg.pipeline.sharpen.enabled:
        raise TalkrtError("pipeline.sharpen.enabled=true needs compose 'numpy' or 'gpu': 'reference' "
                          "reproduces MuseTalk's post-processing, which does not sharpen")
    if (args.backend or cfg.pipeline.backend) == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        from talkrt.engines.select import check_family_backend    # imports torch: on this refusal only
        from talkrt.engines.specs import engine_backends
        check_family_backend(cfg, "tensorrt", engine_backends(cfg))   # a family without TensorRT says so first
        raise TalkrtError("--backend tensorrt: the tensorrt package is not installed here "
                          "(pip install 'tensorrt>=10' from NVIDIA's index, then make engines)")
    if args.weights and not Path(args.weights).is_dir():
        raise InputError(Path(args.weights), "--weights must be a folder with the official checkpoints")


def check_inputs(args: argparse.Namespace, overrides: list[str]):
    """Everything that can be refused without torch: settings, inputs, output, report and cache paths.

    Returns (video, audio, out, VideoInfo, AudioClip).
    Raises:
        TalkrtError: naming the file or setting and the problem.
    """
    from talkrt.media.audio import load_audio, num_video_frames
    from talkrt.media.output import (
        check_free_space,
        check_writable_folder,
        preflight_file,
    )
    from talkrt.media.probe import probe_video
    from talkrt.paths import default_cache_dir

    check_settings(args, early_config(args, overrides))
    video, audio, out = Path(args.video), Path(args.audio), Path(args.out)
    inputs = {"--video": video, "--audio": audio}
    info = probe_video(video, fps=args.fps)
    clip = load_audio(audio)
    total = num_video_frames(len(clip.samples), info.fps, clip.sample_rate)
    if total == 0:
        raise InputError(audio, f"audio ({clip.duration_s:.3f} s) is shorter than one video frame "
                                f"({1 / float(info.fps):.3f} s at {float(info.fps):g} fps)")
    preflight_file(out, ".mp4", inputs)
    # H.264 at CRF 20 stays well under 0.05 byte per pixel and frame for talking heads
    check_free_space(out.parent, int(total * info.width * info.height * 0.05))
    if args.json:
        preflight_file(Path(args.json), ".json", {**inputs, "--out": out})
    check_writable_folder(Path(args.cache_dir) if args.cache_dir else default_cache_dir())
    return video, audio, out, info, clip


def run(args: argparse.Namespace, progress: ProgressBar, started: float, before_main: float) -> int:
    """Check, build, run, report (see :func:`main`); ``before_main``: seconds from process start to ``started``."""
    overrides = list(args.set) + ([f"pipeline.batch_size={args.batch_size}"] if args.batch_size is not None else [])
    video, audio, out, info, clip = check_inputs(args, overrides)
    checked = time.perf_counter()
    log.info("loading the models")

    from talkrt.pipeline import run_pipeline
    from talkrt.report import (
        format_ranges,
        no_face_ranges,
        report_document,
        startup_breakdown,
        summary_line,
        write_json,
    )
    from talkrt.session import build_session, freeze_gc, resolve_device
    imported = time.perf_counter()

    device = resolve_device(args.device)
    config_name, cfg = choose_config(args, overrides, on_gpu=device.type == "cuda")
    parts = build_session(cfg, device=str(device), weights_dir=args.weights, backend=args.backend,
                          compose=args.compose, cache_dir=args.cache_dir, engines_dir=args.engines_dir)
    freeze_gc()
    startup = time.perf_counter() - started
    report = run_pipeline(parts, video, info, audio, clip, out, progress=progress)
    progress.close()
    missing = no_face_ranges(report)
    if missing:
        log.warning("no face in %d of %d output frames (passed through unchanged): frames %s",
                    report.frames - report.faces_found, report.frames, format_ranges(missing))
    for stage, ms, share in report.stage_table:
        log.info("stage %-15s %8.2f ms/frame  %5.1f%%", stage, ms, 100 * share)
    breakdown = startup_breakdown(report, parts.load_seconds, before_main=before_main, checks=checked - started,
                                  imports=imported - checked)
    log.info("start-up: %s", ", ".join(f"{k} {v:.2f} s" for k, v in breakdown.items()))
    if args.json:
        write_json(Path(args.json), report_document(report, startup_seconds=startup, config=config_name,
                                                    config_hash=cfg.model_hash(), device=str(device), video=video,
                                                    audio=audio, startup=breakdown))
    print(summary_line(report, startup, breakdown["to_first_frame"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    # a console-script run counts from process start; a call from Python counts from here
    before_main = (seconds_since_process_start() or 0.0) if argv is None else 0.0
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    progress = ProgressBar(not args.no_progress and sys.stderr.isatty())
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if on_main_thread else None
    from tqdm.contrib.logging import logging_redirect_tqdm
    try:
        with logging_redirect_tqdm():          # log lines go above the bar, never through it
            return run(args, progress, started, before_main)
    except TalkrtError as exc:
        progress.close()
        log.error("%s", exc)
        return 2
    except OSError as exc:                 # a filesystem failure mid-run (disk full, folder removed, ...)
        progress.close()
        where = f"{exc.filename}: " if exc.filename else ""
        log.error("%s%s; no output was written", where, exc.strerror or exc)
        return 2
    except (KeyboardInterrupt, Terminated) as exc:
        progress.close()
        log.error("%s; no output was written", "terminated" if isinstance(exc, Terminated) else "interrupted")
        return 143 if isinstance(exc, Terminated) else 130
    except Exception:  # noqa: BLE001 - the CLI reports anything unexpected and exits non-zero
        progress.close()
        log.exception("run_pipeline failed unexpectedly; no output was written")
        return 1
    finally:
        progress.close()
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


def seconds_since_process_start() -> float | None:
    """Seconds since this process started (Linux ``/proc``, 10 ms resolution); None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()       # after the command name, from field 3 on
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))   # field 22: starttime
    except (OSError, ValueError, IndexError):
        return None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is so that every writer discards its files on the way
    out. A KeyboardInterrupt, because logging handlers (tqdm's among them) swallow other exceptions
    raised while they write, and a signal may arrive then."""


def _terminated(signum, frame) -> None:
    raise Terminated()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
