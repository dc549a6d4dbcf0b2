"""Encoder worker process for :mod:`talkrt.media.segments` (``python -m talkrt.media.segment_worker``).

Started with a plain ``subprocess`` so that it imports only PyAV and numpy (a multiprocessing
spawn would re-import the parent's main module: torch, the models, ...).  Frames arrive in a
shared-memory block (``/dev/shm/<name>``) cut into fixed-size slots; commands arrive on stdin,
one JSON object per line::

    {"op": "open", "path": "...segment000001.mp4"}
    {"op": "frame", "kind": "nv12" | "rgb", "slot": 3, "shape": [1620, 1920]}
    {"op": "close"}          # finish the current segment
    {"op": "quit"}

After encoding a frame the worker answers ``free <slot>`` on stdout so the parent can reuse the
slot; on any failure it answers ``error <message>`` and exits with status 1.
"""

from __future__ import annotations

import json
import mmap
import os
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np


def serve(shm_name: str, slot_bytes: int, spec: dict, commands, answers) -> None:
    from talkrt.media.writer import Mp4Writer

    spec = {**spec, "fps": Fraction(*spec["fps"])}
    fd = os.open(f"/dev/shm/{shm_name.lstrip('/')}", os.O_RDWR)
    shared = mmap.mmap(fd, 0)
    os.close(fd)
    writer = None
    try:
        for line in commands:
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "open":
                writer = Mp4Writer(Path(cmd["path"]), **spec)
            elif op == "frame":
                view = np.ndarray(tuple(cmd["shape"]), np.uint8, buffer=shared, offset=cmd["slot"] * slot_bytes)
                (writer.write_nv12 if cmd["kind"] == "nv12" else writer.write_rgb)(view)   # PyAV copies it
                del view
                answers.write(f"free {cmd['slot']}\n")
                answers.flush()
            elif op == "close":
                writer.close()
                writer = None
            elif op == "quit":
                break
    finally:
        if writer is not None:
            writer.abort()
        shared.close()


def main() -> int:
    shm_name, slot_bytes, spec = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    try:
        serve(shm_name, slot_bytes, spec, sys.stdin, sys.stdout)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        sys.stdout.write(f"error {type(exc).__name__}: {str(exc).replace(chr(10), ' ')}\n")
        sys.stdout.flush()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
