"""``talkrt submit``: send a job or a batch to a ``talkrt serve`` and, with ``--wait``, follow it
with the CLI's progress display, download the MP4(s) and print the run's summary line.

Exit codes as ``run_pipeline``'s: 0 done, 2 refused or failed input (the server's message), 1
anything else (server unreachable, a job that failed inside the server, cancelled), 130
interrupted (the job keeps running on the server; its id is in the log).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from talkrt.errors import InputError
from talkrt.serve.auth import ENV_VAR

log = logging.getLogger("talkrt")

INPUT_CODES = ("bad_media", "too_long", "bad_options", "unknown_avatar", "avatar_failed", "missing_part",
               "bad_part", "bad_job", "bad_batch", "too_large", "quota", "unauthorized")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", required=True, help="base URL of the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--video", type=Path, action="append", default=[], help="avatar video (repeat with --batch)")
    p.add_argument("--avatar", action="append", default=[], help="id of an avatar stored on the server (repeatable)")
    p.add_argument("--audio", type=Path, action="append", default=[], help="speech track (repeat with --batch)")
    p.add_argument("--out", type=Path, help="output .mp4 (one job, with --wait)")
    p.add_argument("--out-dir", type=Path, help="folder for a batch's MP4s, named after the inputs (with --wait)")
    p.add_argument("--batch", action="store_true",
                   help="one job per --video/--avatar over one --audio, or per --audio over one video/avatar")
    p.add_argument("--wait", action="store_true", help="follow the job(s) to the end and download the result(s)")
    p.add_argument("--options", help='per-job options as JSON, e.g. \'{"pipeline.encoder.crf": 23, "fps": "25"}\'')
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="one per-job option (repeatable; wins over --options)")
    p.add_argument("--api-key", default=os.environ.get(ENV_VAR), help=f"bearer token (default: ${ENV_VAR}, preferred: a key on the command line "
                                                            f"shows in ps)")
    p.add_argument("--timeout", type=float, default=24 * 3600.0, help="give up waiting after this many seconds")
    p.add_argument("--no-progress", action="store_true", help="do not draw the progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def options_of(args: argparse.Namespace) -> dict[str, Any]:
    """``--options`` JSON with every ``--set KEY=VALUE`` on top (values read as YAML, as config
    overrides are).

    Raises:
        ValueError: bad JSON or a ``--set`` without ``=``.
    """
    try:
        options = json.loads(args.options) if args.options else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"--options is not valid JSON: {exc}") from None
    if not isinstance(options, dict):
        raise ValueError("--options must be a JSON object")
    for text in args.set:
        key, sep, value = text.partition("=")
        if not sep:
            raise ValueError(f"--set {text!r}: expected KEY=VALUE")
        options[key.strip()] = yaml.safe_load(value)
    return options


def _outputs(args: argparse.Namespace) -> list[Path]:
    """The output path of each job, in submission order (checked like run_pipeline's --out)."""
    from talkrt.media.output import check_writable_folder, preflight_file
    inputs = {f"--video {v}": v for v in args.video} | {f"--audio {a}": a for a in args.audio}
    if not args.batch:
        if args.out is None:
            raise InputError(None, "--wait needs --out")
        preflight_file(args.out, ".mp4", inputs)
        return [args.out]
    if args.out_dir is None:
        raise InputError(None, "--batch --wait needs --out-dir")
    check_writable_folder(args.out_dir)
    varying = args.audio if len(args.audio) > 1 else [*args.video, *(Path(a) for a in args.avatar)]
    outs, seen = [], set()
    for path in varying:
        stem, n = path.stem, 1
        while stem in seen:
            n += 1
            stem = f"{path.stem}-{n}"
        seen.add(stem)
        outs.append(args.out_dir / f"{stem}.mp4")
        preflight_file(outs[-1], ".mp4", inputs)
    return outs


def submit(args: argparse.Namespace) -> int:
    """Run ``talkrt submit`` (see the module docstring for exit codes)."""
    from talkrt.cli import QUIET_LOGGERS, ProgressBar
    from talkrt.serve.client import ClientError, JobClient
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    progress = ProgressBar(not args.no_progress and sys.stderr.isatty())
    client = JobClient(args.server, args.api_key, timeout=args.timeout)
    submitted: list[str] = []
    try:
        options = options_of(args)
        for path in [*args.video, *args.audio]:
            if not path.is_file():
                raise InputError(path, "no such file")
        outs = _outputs(args) if args.wait else []
        answer = client.submit(args.video, args.avatar, args.audio, options, args.batch)
        submitted = answer["jobs"] if args.batch else [answer["id"]]
        log.info("submitted: %s", json.dumps(answer))
        if not args.wait:
            print(json.dumps(answer))
            return 0
        from tqdm.contrib.logging import logging_redirect_tqdm
        with logging_redirect_tqdm():
            jobs = _follow(client, answer, args.batch, progress)
        progress.close()
        return _finish(client, jobs, outs, args.batch)
    except (ValueError, InputError) as exc:
        progress.close()
        log.error("%s", exc)
        return 2
    except ClientError as exc:
        progress.close()
        log.error("%s%s", f"{exc.status} {exc.code}: " if exc.status else "", exc.message)
        return 2 if exc.code in INPUT_CODES else 1
    except KeyboardInterrupt:
        progress.close()
        log.error("interrupted; job(s) %s keep running on the server (DELETE /v1/jobs/<id> cancels)",
                  ", ".join(submitted) or "none")
        return 130
    finally:
        progress.close()
        client.close()


def _follow(client, answer: dict, batch: bool, progress) -> list[dict]:
    """Follow to the end, drawing progress; returns the final job objects in submission order."""
    if not batch:
        phase, done, job = None, 0, None
        for job in client.events(answer["id"]):
            current = job.get("phase") or {}
            if current.get("name") and (current["name"], current["total"]) != phase:
                phase, done = (current["name"], current["total"]), 0
                progress.phase(current["name"], current["total"])
            if current.get("done", 0) > done:
                progress.advance(current["done"] - done)
                done = current["done"]
        return [job]
    state = {"done": 0, "started": False}

    def update(b: dict) -> None:
        if not state["started"]:
            progress.phase("lip-sync", b["frames_total"])
            state["started"] = True
        if b["frames_done"] > state["done"]:
            progress.advance(b["frames_done"] - state["done"])
            state["done"] = b["frames_done"]

    return client.wait_batch(answer["batch"], update)["jobs"]


def _finish(client, jobs: list[dict], outs: list[Path], batch: bool) -> int:
    """Download the done jobs, print their summary lines, report the others."""
    rc = 0
    for job, out in zip(jobs, outs):
        if job["status"] == "done":
            client.download(job["id"], out)
            log.info("job %s: %s", job["id"], out)
            line = job["summary"]["line"]
            print(f"job={job['id']} {line}" if batch else line)
            continue
        error = job.get("error") or {"code": job["status"], "message": f"job {job['status']}"}
        log.error("job %s %s: %s", job["id"], job["status"], error["message"])
        rc = max(rc, 2 if error["code"] in INPUT_CODES else 1)
    return rc
