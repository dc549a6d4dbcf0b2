"""``run_pipeline`` command line: avatar video + speech -> lip-synced MP4.

Exit codes: 0 success, 2 bad input / config / engine (the message names the file and the
problem), 1 unexpected failure, 130 interrupted. A failed run leaves no output file.

The inputs and the output are checked before torch is imported or any model is built, so a
refusal takes about a second.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from talkrt import __version__
from talkrt.config import BACKENDS, COMPOSE_MODES, TalkrtConfig, load_config
from talkrt.errors import InputError, TalkrtError

log = logging.getLogger("talkrt")

#: third-party loggers that speak at INFO about things a user of talkrt need not see
QUIET_LOGGERS = ("PIL", "matplotlib", "httpx", "urllib3", "diffusers", "transformers", "torch._inductor")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="run_pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"talkrt {__version__}")
    p.add_argument("--video", required=True, help="avatar video or still image (any format FFmpeg reads)")
    p.add_argument("--audio", required=True, help="speech track (any audio or video file with audio)")
    p.add_argument("--out", required=True, help="output .mp4 path")
    p.add_argument("--config", help="musetalk (full size), tiny (a toy of the same structure, for tests) or a "
                                    ".yaml path; default: musetalk on a GPU, tiny on a CPU")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--batch-size", type=positive_int, help="frames per batch (overrides pipeline.batch_size)")
    p.add_argument("--weights", help="folder with the official MuseTalk v1.5 checkpoints (else synthetic weights)")
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
        if self.bar is not None:
            self.bar.close()


def choose_config(args: argparse.Namespace, overrides: list[str], on_gpu: bool) -> tuple[str, TalkrtConfig]:
    """(name as ``--config`` takes it, config): the one ``--config`` names; without one,
    ``musetalk`` on a GPU and ``tiny`` on a CPU, saying which runs and why."""
    if args.config:
        return args.config, load_config(args.config, overrides)
    if on_gpu:
        log.info("config: musetalk (full-size MuseTalk v1.5; no --config given)")
        return "musetalk", load_config("musetalk", overrides)
    log.warning("config: tiny, because no --config was given and this runs on the CPU: a toy model of "
                "MuseTalk's structure with small widths (right shapes and timing, not a real lip-sync "
                "model). Pass --config musetalk for the full-size model (minutes per second of video on a CPU).")
    return "tiny", load_config("tiny", overrides)


def check_inputs(args: argparse.Namespace, overrides: list[str]):
    """Everything that can be refused without torch: config overrides, inputs, output, report path.

    Returns (video, audio, out, VideoInfo, AudioClip, output frame count).
    Raises:
        TalkrtError: naming the file or setting and the problem.
    """
    from talkrt.media.audio import load_audio, num_video_frames
    from talkrt.media.output import check_not_an_input, preflight_output
    from talkrt.media.probe import probe_video

    load_config(args.config or "musetalk", overrides)      # bad --set / --config fail here, fast
    video, audio, out = Path(args.video), Path(args.audio), Path(args.out)
    inputs = {"--video": video, "--audio": audio}
    info = probe_video(video)
    clip = load_audio(audio)
    total = num_video_frames(len(clip.samples), info.fps, clip.sample_rate)
    if total == 0:
        raise InputError(audio, f"audio ({clip.duration_s:.3f} s) is shorter than one video frame "
                                f"({1 / float(info.fps):.3f} s at {float(info.fps):g} fps)")
    # a generous bound on the MP4's size: 0.5 byte per pixel per frame
    preflight_output(out, inputs, estimated_bytes=int(total * info.width * info.height * 0.5))
    if args.json:
        report = Path(args.json)
        if report.suffix.lower() != ".json" or not report.parent.is_dir():
            raise InputError(report, "--json needs a .json file in an existing folder")
        check_not_an_input(report, {**inputs, "--out": out})
    return video, audio, out, info, clip, total


def run(args: argparse.Namespace, progress: ProgressBar, started: float) -> int:
    """Check, build, run, report (see :func:`main`)."""
    overrides = list(args.set) + ([f"pipeline.batch_size={args.batch_size}"] if args.batch_size is not None else [])
    video, audio, out, info, clip, _ = check_inputs(args, overrides)

    from talkrt.pipeline import run_pipeline
    from talkrt.report import format_ranges, no_face_ranges, report_document, summary_line, write_json
    from talkrt.session import build_session, resolve_device

    device = resolve_device(args.device)
    config_name, cfg = choose_config(args, overrides, on_gpu=device.type == "cuda")
    parts = build_session(cfg, device=str(device), weights_dir=args.weights, backend=args.backend,
                          compose=args.compose, cache_dir=args.cache_dir, engines_dir=args.engines_dir)
    startup = time.perf_counter() - started
    report = run_pipeline(parts, video, info, audio, clip, out, progress=progress)
    progress.close()
    missing = no_face_ranges(report)
    if missing:
        log.warning("no face in %d of %d output frames (passed through unchanged): frames %s",
                    report.frames - report.faces_found, report.frames, format_ranges(missing))
    for stage, ms, share in report.stage_table:
        log.info("stage %-15s %8.2f ms/frame  %5.1f%%", stage, ms, 100 * share)
    if args.json:
        write_json(Path(args.json), report_document(report, startup_seconds=startup, config=config_name,
                                                    device=str(device), video=video, audio=audio))
    print(summary_line(report, startup))
    return 0


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    progress = ProgressBar(not args.no_progress and sys.stderr.isatty())
    from tqdm.contrib.logging import logging_redirect_tqdm
    try:
        with logging_redirect_tqdm():          # log lines go above the bar, never through it
            return run(args, progress, started)
    except TalkrtError as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:                 # a filesystem failure mid-run (disk full, folder removed, ...)
        where = f"{exc.filename}: " if exc.filename else ""
        log.error("%s%s; no output was written", where, exc.strerror or exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; no output was written")
        return 130
    except Exception:  # noqa: BLE001 - the CLI reports anything unexpected and exits non-zero
        log.exception("run_pipeline failed unexpectedly; no output was written")
        return 1
    finally:
        progress.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
