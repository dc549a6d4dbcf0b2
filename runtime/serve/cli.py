"""``talkrt serve``: the live avatar server (FastAPI on uvicorn, one process per GPU).

    talkrt serve --config tiny|musetalk --device cpu|cuda --host 127.0.0.1 --port 8000
                 [--max-sessions N] [--data-dir DIR] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from talkrt import __version__
from talkrt.cli import positive_int

log = logging.getLogger(__name__)


def default_data_dir() -> Path:
    """``$TALKRT_DATA_DIR``, else ``~/.cache/talkrt/serve``."""
    root = os.environ.get("TALKRT_DATA_DIR")
    return Path(root) if root else Path.home() / ".cache" / "talkrt" / "serve"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="talkrt", description="talkrt: MuseTalk-class lip-sync engine")
    p.add_argument("--version", action="version", version=f"talkrt {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve live avatars over WebSocket (protocol: docs/protocol.md)")
    s.add_argument("--config", help="musetalk or tiny or a YAML path (default: musetalk on CUDA, tiny on the CPU)")
    s.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-sessions", type=positive_int, default=16, help="live sessions at once (default 16)")
    s.add_argument("--data-dir", type=Path, default=None,
                   help="avatars and their prepared data (default: $TALKRT_DATA_DIR or ~/.cache/talkrt/serve)")
    s.add_argument("--backend", help="engine backend (default: the config's)")
    s.add_argument("--weights", help="folder with the MuseTalk v1.5 checkpoints (default: synthetic weights)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    s.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch
    import uvicorn

    from talkrt.config import load_config
    from talkrt.errors import TalkrtError
    from talkrt.serve.app import ServeSettings, create_app

    on_gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    config = args.config or ("musetalk" if on_gpu else "tiny")
    try:
        cfg = load_config(config, args.set)
    except TalkrtError as exc:
        log.error("%s", exc)
        return 2
    settings = ServeSettings(cfg=cfg, device=args.device, data_dir=args.data_dir or default_data_dir(),
                             max_sessions=args.max_sessions, backend=args.backend, weights_dir=args.weights)
    log.info("talkrt serve: config=%s device=%s data=%s on http://%s:%d", cfg.name, args.device,
             settings.data_dir, args.host, args.port)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level,
                ws_max_size=1 << 21)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
