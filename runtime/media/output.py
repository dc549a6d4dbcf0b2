"""The output file's contract: checked before any work, never an input, written atomically.

Everything an output writer creates next to the output (the partial MP4, NVENC's raw H.264,
segment folders) is named ``.talkrt-<kind>-<random>`` with no part of the output's own name,
so any output name the filesystem accepts also has room for its temporary files.
"""

from __future__ import annotations

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
            raise InputError(folder, f"cannot create a file in this folder ({exc.strerror})") from exc
        os.close(fd)
        return path
    raise InputError(folder, "could not create a unique temporary file in this folder")


def check_file_path(path: Path, suffix: str) -> None:
    """Refuse a file path that cannot be written: another suffix than ``suffix``, no such
    folder, a folder itself, or a file name longer than the filesystem allows.

    Raises:
        InputError: naming the path and the problem.
    """
    parent = path.parent
    if not parent.is_dir():
        problem = "is not a directory" if parent.exists() else "folder does not exist"
        raise InputError(parent, problem)
    name_bytes = len(os.fsencode(path.name))
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    if name_bytes > limit:        # checked first: the file system refuses to even look such a name up
        raise InputError(path, f"the file name is {name_bytes} bytes; this filesystem allows {limit}")
    if path.is_dir():
        raise InputError(path, "is a directory; give a file name")
    if path.suffix.lower() != suffix:
        raise InputError(path, f"file name must end with {suffix}")


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


def check_writable_folder(folder: Path) -> None:
    """Create and remove a temporary file in ``folder`` (creating the folder if needed).

    Raises:
        InputError: naming ``folder`` and the operating system's reason.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(folder, f"cannot create this folder ({exc.strerror})") from exc
    create_temp_file(folder, "probe", "").unlink()


def preflight_file(path: Path, suffix: str, inputs: dict[str, Path]) -> None:
    """Every check of a file to be written that can be made before any work: the path, the
    inputs it must not be, the right to create files in its folder (a temporary file is
    created and removed) and, where it exists, the right to replace it.

    Args:
        path: the file to write.
        suffix: the suffix it must have (``.mp4``, ``.json``).
        inputs: role (e.g. ``"--video"``) -> input path (see :func:`check_not_an_input`).
    Raises:
        InputError: naming the path and the problem.
    """
    check_file_path(path, suffix)
    check_not_an_input(path, inputs)
    check_writable_folder(path.parent)
    if path.exists():
        try:
            os.close(os.open(path, os.O_WRONLY))       # opens without truncating
        except OSError as exc:
            raise InputError(path, f"exists and cannot be replaced ({exc.strerror})") from exc


def check_free_space(folder: Path, estimated_bytes: int) -> None:
    """Refuse when ``folder``'s filesystem has less free space than ``estimated_bytes`` plus a margin.

    Raises:
        InputError: naming the folder, the free and the needed megabytes.
    """
    free = shutil.disk_usage(folder).free
    needed = estimated_bytes + SPACE_MARGIN_BYTES
    if free < needed:
        raise InputError(folder, f"only {free / 1e6:.0f} MB free there; the output needs about {needed / 1e6:.0f} MB")
