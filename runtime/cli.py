"""``run_pipeline`` command line: avatar video + speech -> lip-synced MP4.

Exit codes: 0 success, 2 bad input / config / engine (the message names the file and the
problem), 1 unexpected failure. A failed run leaves no output file.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from talkrt.config import BACKENDS, COMPOSE_MODES, load_config
from talkrt.errors import TalkrtError

log = logging.getLogger("talkrt")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="run_pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--video", required=True, help="avatar video (any container/codec FFmpeg reads)")
    p.add_argument("--audio", required=True, help="speech track (any audio or video file with audio)")
    p.add_argument("--out", required=True, help="output .mp4 path")
    p.add_argument("--config", default="musetalk", help="shipped config name (musetalk, tiny) or a .yaml path")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--batch-size", type=int, help="frames per batch (overrides pipeline.batch_size)")
    p.add_argument("--weights", help="folder with the official MuseTalk v1.5 checkpoints (else synthetic weights)")
    p.add_argument("--backend", choices=BACKENDS, help="engine backend (default: from config, auto)")
    p.add_argument("--compose", choices=COMPOSE_MODES, help="compose path (default: from config, auto)")
    p.add_argument("--engines-dir", help="where `make engines` put the engines (default: ./engines)")
    p.add_argument("--cache-dir", help="avatar cache folder (default: ~/.cache/talkrt/avatars)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set pipeline.sharpen.enabled=true (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="do not draw the progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None, None
    from tqdm import tqdm
    bar = tqdm(total=total, unit="frame", desc="lip-sync", dynamic_ncols=True)
    return bar, bar.update


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bar = None
    try:
        from talkrt.media.audio import load_audio
        from talkrt.media.probe import probe_video
        from talkrt.media.writer import check_output_path
        from talkrt.models.audio import num_video_frames
        from talkrt.pipeline import run_pipeline
        from talkrt.session import build_session

        overrides = list(args.set) + ([f"pipeline.batch_size={args.batch_size}"] if args.batch_size else [])
        cfg = load_config(args.config, overrides)
        video, audio, out = Path(args.video), Path(args.audio), Path(args.out)
        check_output_path(out)
        info = probe_video(video)          # fail fast on bad inputs, before loading any model
        clip = load_audio(audio)
        parts = build_session(cfg, device=args.device, weights_dir=args.weights, backend=args.backend,
                              compose=args.compose, cache_dir=args.cache_dir, engines_dir=args.engines_dir)
        total = num_video_frames(len(clip.samples), info.fps, clip.sample_rate)
        bar, update = _progress_bar(total, not args.no_progress and sys.stderr.isatty())
        report = run_pipeline(parts, video, info, audio, clip, out, progress=update)
    except TalkrtError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; no output was written")
        return 130
    except Exception:  # noqa: BLE001 - the CLI reports anything unexpected and exits non-zero
        log.exception("run_pipeline failed unexpectedly; no output was written")
        return 1
    finally:
        if bar is not None:
            bar.close()
    print(report.summary())
    for stage, ms, share in report.stage_table:
        log.info("stage %-15s %8.2f ms/frame  %5.1f%%", stage, ms, 100 * share)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
