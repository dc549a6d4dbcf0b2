"""CuPy plumbing: optional import, device detection, per-device module cache, array adoption.

Nothing here raises at import time when CuPy or a GPU is missing; :func:`gpu_available` says so.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from importlib import resources
from typing import Any, Iterator

import numpy as np

logger = logging.getLogger("talkrt.kernels")

try:  # CuPy is optional: the CPU references cover every op
    import cupy
    _IMPORT_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001 - ImportError, or a broken CUDA install
    cupy = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

_HEADER = "common.cuh"
_DLPACK_CUDA_DEVICES = (2, 13)  # kDLCUDA, kDLCUDAManaged
_modules: dict[tuple[int, str, str], Any] = {}
_functions: dict[tuple[int, str, str, str], Any] = {}
_modules_lock = threading.Lock()
_recorder: list | None = None
_gpu_seen = False                # a CUDA device was found once (see unavailable_reason)


def unavailable_reason() -> str | None:
    """Why the GPU kernels cannot run here (None when they can). Never raises.

    A positive answer is remembered (devices do not disappear from a running process), so the
    wrappers, which ask on every call, make no CUDA runtime call for it after the first."""
    global _gpu_seen
    if cupy is None:
        return f"CuPy is not importable ({_IMPORT_ERROR})"
    if _gpu_seen:
        return None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - no driver, driver too old, ...
        return f"no usable CUDA device ({type(exc).__name__}: {exc})"
    if count < 1:
        return "no CUDA device"
    _gpu_seen = True
    return None


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device. Never raises."""
    return unavailable_reason() is None


def require_cupy() -> Any:
    """The cupy module, or RuntimeError with the reason it cannot be used."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"talkrt GPU kernels unavailable: {reason}; use talkrt.kernels.reference")
    return cupy


def kernel_source(name: str) -> str:
    """CUDA source ``name`` from the package, with ``#include "common.cuh"`` pasted in."""
    root = resources.files("talkrt.kernels")
    text = root.joinpath(name).read_text(encoding="utf-8")
    header = root.joinpath(_HEADER).read_text(encoding="utf-8")
    return text.replace(f'#include "{_HEADER}"', header)


def get_kernel(source: str, name: str, dtype: Any = np.uint8) -> Any:
    """Compiled kernel ``name`` of ``source`` for the current device.

    Modules are compiled once per (device id, source, dtype) and cached, as cupyx does; CuPy also
    keeps the compiled binary in its on-disk kernel cache. Every talkrt kernel works on uint8
    pixels today; ``dtype`` is part of the key so that other pixel types can be added.
    """
    cp = require_cupy()
    key = (cp.cuda.Device().id, source, np.dtype(dtype).name)
    function = _functions.get((*key, name))
    if function is not None:
        return function
    with _modules_lock:
        module = _modules.get(key)
        if module is None:
            logger.debug("compiling %s for device %d", source, key[0])
            module = cp.RawModule(code=kernel_source(source))
            _modules[key] = module
        function = _functions[(*key, name)] = module.get_function(name)
    return function


def adopt(array: Any, name: str) -> Any:
    """View a CuPy array or a CUDA tensor (any ``__dlpack__`` producer) as CuPy, without a copy.

    Raises:
        TypeError: host arrays (numpy, CPU tensors) or non-arrays.
    """
    cp = require_cupy()
    if isinstance(array, cp.ndarray):
        return array
    if isinstance(array, np.ndarray):
        raise TypeError(f"{name} is a numpy array; the GPU kernels take CuPy arrays or CUDA tensors "
                        "(copy it with cupy.asarray, or use talkrt.kernels.reference)")
    if hasattr(array, "__dlpack__") and hasattr(array, "__dlpack_device__"):
        device_type = int(array.__dlpack_device__()[0])
        if device_type not in _DLPACK_CUDA_DEVICES:
            raise TypeError(f"{name} lives on DLPack device type {device_type}, not on a CUDA "
                            "device; move it to the GPU first")
        return cp.from_dlpack(array)
    raise TypeError(f"{name} must be a CuPy array or a CUDA tensor, got {type(array).__name__}")


def device_id(array: Any) -> int:
    """CUDA device of a CuPy array (0 for the host arrays of the CPU emulator)."""
    return 0 if isinstance(array, np.ndarray) else int(array.device.id)


def data_ptr(array: Any) -> int:
    """Address of the first element (device pointer; host pointer under the CPU emulator)."""
    if isinstance(array, np.ndarray):
        return int(array.__array_interface__["data"][0])
    return int(array.data.ptr)


def overlaps(a: Any, b: Any) -> bool:
    """True when the memory spans of two contiguous arrays intersect."""
    a_start, b_start = data_ptr(a), data_ptr(b)
    return a_start < b_start + b.nbytes and b_start < a_start + a.nbytes


def same_device(reference: Any, others: dict[str, Any]) -> None:
    """Raise ValueError unless every array in ``others`` is on ``reference``'s device."""
    for name, array in others.items():
        if array is not None and device_id(array) != device_id(reference):
            raise ValueError(f"{name} is on GPU {device_id(array)} but the frames are on GPU "
                             f"{device_id(reference)}")


def as_stream(stream: Any) -> Any:
    """A CuPy stream for ``stream``: None (current stream), a CuPy stream, or any object with a
    ``cuda_stream`` handle (e.g. ``torch.cuda.Stream``)."""
    cp = require_cupy()
    if stream is None:
        return cp.cuda.get_current_stream()
    if isinstance(stream, cp.cuda.Stream) or isinstance(stream, cp.cuda.ExternalStream):
        return stream
    handle = getattr(stream, "cuda_stream", None)
    if isinstance(handle, int):
        return cp.cuda.ExternalStream(handle)
    raise TypeError(f"stream must be a cupy Stream, an object with a cuda_stream handle, or None; "
                    f"got {type(stream).__name__}")


@contextlib.contextmanager
def on_device(array: Any, stream: Any) -> Iterator[Any]:
    """Make ``array``'s device and ``stream`` current for allocations, copies and launches."""
    cp = require_cupy()
    with cp.cuda.Device(device_id(array)):
        s = as_stream(stream)
        with s:
            yield s


def upload(host: np.ndarray) -> Any:
    """Copy a small host table to the current device on the current stream."""
    return require_cupy().asarray(np.ascontiguousarray(host))


def launch(kernel: Any, grid: tuple[int, int, int], block: tuple[int, int, int], args: tuple,
           shared_mem: int = 0) -> None:
    """Launch on the current stream; empty grids are skipped."""
    if min(grid) <= 0:
        return
    kernel(grid, block, args, shared_mem=shared_mem)
    if _recorder is not None:
        _recorder.append((kernel, grid, block, args, shared_mem))


@contextlib.contextmanager
def record_launches() -> Iterator[list]:
    """Collect (kernel, grid, block, args, shared_mem) of every launch made inside the block.

    The benchmark replays them to time the kernels alone, without the host-side validation,
    table building and uploads of the wrappers. Not thread safe; for benchmarks and tests.
    """
    global _recorder
    saved, _recorder = _recorder, []
    try:
        yield _recorder
    finally:
        _recorder = saved


def replay(launches: list) -> None:
    """Launch recorded kernels again, in order, on the current stream."""
    for kernel, grid, block, args, shared_mem in launches:
        kernel(grid, block, args, shared_mem=shared_mem)
