"""The output file's contract: checked before any work, never an input, written atomically.

Everything an output writer creates next to the output (the partial MP4, NVENC's raw H.264,
segment folders) is named ``.talkrt-<kind>-<random>`` with no part of the output's own name,
so any output name the filesystem accepts also has room for its temporary files.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from pathlib import Path

from talkrt.errors import InputError

TEMP_PREFIX = ".talkrt-"
#: free space asked for beyond the estimate: the MP4 index and the audio track's worst case
SPACE_MARGIN_BYTES = 16 << 20


def temp_name(kind: str, suffix: str = "") -> str:
    """``.talkrt-<kind>-<16 hex digits><suffix>``: a short, unique-enough hidden file name."""
    return f"{TEMP_PREFIX}{kind}-{secrets.token_hex(8)}{suffix}"


def create_temp_file(folder: Path, kind: str, suffix: str) -> Path:
    """Create an empty ``temp_name(kind, suffix)`` file in ``folder`` (mode 0666 minus umask).

    Raises:
        InputError: naming ``folder`` and the operating system's reason when it cannot be created.
    """
    for _ in range(100):
        path = folder / temp_name(kind, suffix)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except OSError as exc:
            raise InputError(folder, f"cannot create a file in the output folder ({exc.strerror})") from exc
        os.close(fd)
        return path
    raise InputError(folder, "could not create a unique temporary file in the output folder")


def check_output_path(out_path: Path) -> None:
    """Refuse an output path that cannot work: not ``.mp4``, no such folder, a folder itself,
    or a file name longer than the filesystem allows.

    Raises:
        InputError: naming the path and the problem.
    """
    if out_path.suffix.lower() != ".mp4":
        raise InputError(out_path, "output file name must end with .mp4")
    parent = out_path.parent
    if not parent.is_dir():
        problem = "is not a directory" if parent.exists() else "output directory does not exist"
        raise InputError(parent, problem)
    name_bytes = len(os.fsencode(out_path.name))
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    if name_bytes > limit:
        raise InputError(out_path, f"the file name is {name_bytes} bytes; this filesystem allows {limit}")
    if out_path.is_dir():
        raise InputError(out_path, "output path is a directory")


def check_not_an_input(out_path: Path, inputs: dict[str, Path]) -> None:
    """Refuse an output that resolves to one of the inputs (symbolic links, relative paths and
    hard links included): writing it would destroy the source.

    Args:
        out_path: the output file (may not exist yet).
        inputs: role (e.g. ``"--video"``) -> input path.
    Raises:
        InputError: naming both paths.
    """
    out_real = os.path.realpath(out_path)
    for role, path in inputs.items():
        same = os.path.realpath(path) == out_real
        if not same and out_path.exists() and Path(path).exists():
            same = os.path.samefile(out_path, path)
        if same:
            raise InputError(out_path, f"is the same file as {role} {path}; writing it would destroy the "
                                       "input: choose another output name")


def preflight_output(out_path: Path, inputs: dict[str, Path], estimated_bytes: int) -> None:
    """Every check that can be made before any frame is computed: the path, the inputs, the
    right to create files in the folder (by creating and removing a temporary file of the
    same kind the writer will create) and the free space.

    Args:
        out_path: the output ``.mp4``.
        inputs: role -> input path (see :func:`check_not_an_input`).
        estimated_bytes: expected size of the output (bytes).
    Raises:
        InputError: naming the path and the problem.
    """
    check_output_path(out_path)
    check_not_an_input(out_path, inputs)
    probe = create_temp_file(out_path.parent, "partial", ".mp4")
    probe.unlink()
    free = shutil.disk_usage(out_path.parent).free
    needed = estimated_bytes + SPACE_MARGIN_BYTES
    if free < needed:
        raise InputError(out_path.parent, f"only {free / 1e6:.0f} MB free; the output needs about "
                                          f"{needed / 1e6:.0f} MB ({os.strerror(errno.ENOSPC).lower()})")
