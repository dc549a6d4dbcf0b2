"""``talkrt serve``: the live avatar and job server (FastAPI on uvicorn, one process per GPU), and
``talkrt submit``, its job client.

    talkrt serve --config tiny|musetalk|latentsync16|latentsync16-tiny --device cpu|cuda --host 127.0.0.1 --port 8000
                 [--max-sessions N] [--data-dir DIR] [--api-key KEY] [--set KEY=VALUE ...]
    talkrt submit --server URL --video X --audio Y --out Z [--wait]
    talkrt submit --server URL --batch --audio Y --video A --video B --out-dir D [--wait]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from talkrt import __version__
from talkrt.cli import positive_int
from talkrt.config import BACKENDS
from talkrt.serve.auth import ENV_VAR

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5


def default_data_dir() -> Path:
    """``$TALKRT_DATA_DIR``, else ``~/.cache/talkrt/serve``."""
    root = os.environ.get("TALKRT_DATA_DIR")
    return Path(root) if root else Path.home() / ".cache" / "talkrt" / "serve"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="talkrt", description="talkrt: MuseTalk-class lip-sync engine")
    p.add_argument("--version", action="version", version=f"talkrt {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve live avatars (docs/protocol.md) and offline jobs (docs/jobs.md)")
    s.add_argument("--config", help="musetalk, tiny, latentsync16, latentsync16-tiny or a YAML path (default: musetalk "
                                    "on CUDA, tiny on the CPU); a LatentSync config runs jobs only, no live sessions")
    s.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: every "
                                                          "interface, then set --api-key)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    s.add_argument("--max-sessions", type=positive_int, default=16, help="live sessions at once (default 16)")
    s.add_argument("--data-dir", type=Path, default=None,
                   help="avatars and their prepared data (default: $TALKRT_DATA_DIR or ~/.cache/talkrt/serve)")
    s.add_argument("--backend", choices=BACKENDS,
                   help="engine backend (default: the config's; tensorrt and compiled need `make engines`)")
    s.add_argument("--weights", help="folder with the config family's official checkpoints (default: synthetic "
                                     "weights)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    s.add_argument("--overlap-steps", action="store_true",
                   help="prepare the next batch on the host while the GPU runs the current one (an earlier "
                        "form served more frames/s at many sessions and fewer on time at few; this one is "
                        "not yet measured: BENCHMARKS.md)")
    s.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    s.add_argument("--api-key", default=os.environ.get(ENV_VAR),
                   help=f"bearer token every /v1 route then requires (default: ${ENV_VAR}, preferred: a key on "
                        f"the command line shows in ps; unset: none)")
    j = s.add_argument_group("jobs")
    j.add_argument("--jobs-db", type=Path, help="the job queue's SQLite file (default: DATA_DIR/jobs.db)")
    j.add_argument("--job-workers", type=positive_int, default=2, help="jobs running at once (default 2)")
    j.add_argument("--max-upload-mb", type=positive_int, default=2048, help="largest request body, jobs and avatars (default 2048)")
    j.add_argument("--max-duration-s", type=positive_int, default=3600,
                   help="longest input video or audio of a job (default 3600)")
    j.add_argument("--storage-quota-gb", type=float, default=100.0,
                   help="job inputs and results on disk at most (default 100)")
    j.add_argument("--retention-hours", type=float, default=168.0,
                   help="results are removed this long after their job ended (default 168)")
    j.add_argument("--job-rows-with-live", type=int, default=None,
                   help="most job frames in a batch that holds live speech (default: all the room left)")
    from talkrt.serve.submit import add_arguments
    add_arguments(sub.add_parser("submit", help="send a job (or a batch) to a talkrt server; --wait downloads it"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "submit":
        from talkrt.serve.submit import submit
        return submit(args)
    return serve(args)


def serve(args: argparse.Namespace) -> int:
    """``talkrt serve``: load the config, build the app, run uvicorn until stopped."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch
    import uvicorn

    from talkrt.errors import TalkrtError
    from talkrt.families import load_family_config
    from talkrt.serve.app import ServeSettings, create_app
    from talkrt.serve.jobs import JobSettings

    on_gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    config = args.config or ("musetalk" if on_gpu else "tiny")
    try:
        cfg = load_family_config(config, args.set)       # any model family (its own loader and checks)
    except TalkrtError as exc:
        log.error("%s", exc)
        return 2
    jobs = JobSettings(db_path=args.jobs_db, workers=args.job_workers, max_upload_bytes=args.max_upload_mb << 20,
                       max_duration_s=float(args.max_duration_s), quota_bytes=int(args.storage_quota_gb * 2**30),
                       retention_s=args.retention_hours * 3600.0)
    settings = ServeSettings(cfg=cfg, device=args.device, data_dir=args.data_dir or default_data_dir(),
                             max_sessions=args.max_sessions, backend=args.backend, weights_dir=args.weights,
                             api_key=args.api_key or None, jobs=jobs, job_rows_with_live=args.job_rows_with_live,
                             overlap_steps=args.overlap_steps)
    log.info("talkrt serve: config=%s device=%s data=%s on http://%s:%d", cfg.name, args.device,
             settings.data_dir, args.host, args.port)
    # open event streams and live sessions get this long to end on SIGINT/SIGTERM; then running
    # jobs go back to the queue and the models are released
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level,
                ws_max_size=1 << 21, timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
