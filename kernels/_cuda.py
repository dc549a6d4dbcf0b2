"""CuPy plumbing: optional import, device detection, kernel loading and launching, array
adoption, staged uploads.

Nothing here raises at import time when CuPy or a GPU is missing; :func:`gpu_available` says so.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import hashlib
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("talkrt.kernels")

try:  # CuPy is optional: the CPU references cover every op
    import cupy
    _IMPORT_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001 - ImportError, or a broken CUDA install
    cupy = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

#: the .cu sources and common.cuh, which they include (NVRTC's include path)
KERNEL_DIR = Path(__file__).resolve().parent
_HEADER = "common.cuh"
_DLPACK_CUDA_DEVICES = (2, 13)  # kDLCUDA, kDLCUDAManaged
_external_streams: dict[tuple[int, int], Any] = {}
_staged: collections.deque = collections.deque()   # (event, pinned buffer) of pending uploads
_staged_lock = threading.Lock()
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


@functools.cache
def get_kernel(source: str, name: str) -> Any:
    """Kernel ``name`` of the package's CUDA source ``source`` as a ``cupy.RawKernel``.

    CuPy compiles the source with NVRTC once per device, on the first launch there, and keeps
    the binary in its on-disk cache, keyed on the source text and the options: the options carry
    a digest of common.cuh, so that an edited header is never served from a stale binary.
    """
    cp = require_cupy()
    code = (KERNEL_DIR / source).read_text(encoding="utf-8")
    header = hashlib.sha256((KERNEL_DIR / _HEADER).read_bytes()).hexdigest()[:16]
    logger.debug("loading %s from %s", name, source)
    return cp.RawKernel(code, name, options=(f"-I{KERNEL_DIR}", f"-DTALKRT_HEADER_{header}"))


def launch(kernel: Any, grid: tuple[int, int, int], block: tuple[int, int, int], args: tuple,
           shared_mem: int = 0) -> None:
    """Launch ``kernel`` on the current stream; empty grids are skipped.

    ``args`` as CuPy takes them: device arrays for pointers, 1-element numpy arrays of a
    structured dtype for structs passed by value, ``np.float32`` for ``float``; a Python int
    becomes an ``int`` (int32; OverflowError when it does not fit). A Python float is refused
    (TypeError): CuPy would pass it as a double.
    """
    if min(grid) <= 0:
        return
    converted = []
    for arg in args:
        if type(arg) is int:
            arg = np.int32(arg)
        elif type(arg) is float:
            raise TypeError(f"{kernel.name}: pass float arguments as np.float32")
        elif type(arg) is np.ndarray and arg.dtype.names is not None:
            # CuPy takes a numpy argument's address from __array_interface__, which lists
            # every field of a structured dtype (~10 us a struct); the same bytes, opaque
            arg = arg.view(_opaque(arg.itemsize))
        converted.append(arg)
    kernel(grid, block, tuple(converted), shared_mem=shared_mem)


@functools.cache
def _opaque(itemsize: int) -> np.dtype:
    return np.dtype((np.void, itemsize))


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
    if isinstance(handle, int):   # one wrapper per handle and device (creating one costs ~3 us)
        key = (handle, cp.cuda.runtime.getDevice())
        wrapped = _external_streams.get(key)
        if wrapped is None:
            wrapped = _external_streams[key] = cp.cuda.ExternalStream(handle, key[1])
        return wrapped
    raise TypeError(f"stream must be a cupy Stream, an object with a cuda_stream handle, or None; "
                    f"got {type(stream).__name__}")


class on_device:  # noqa: N801 - a context manager, named like one
    """``with on_device(array, stream) as s``: ``array``'s device and ``stream`` (see
    :func:`as_stream`) are current for allocations, copies and launches inside the block;
    ``s`` is the CuPy stream. Switches only what differs from the current state."""

    __slots__ = ("_array", "_stream", "_device", "_entered")

    def __init__(self, array: Any, stream: Any) -> None:
        self._array, self._stream = array, stream
        self._device = self._entered = None

    def __enter__(self) -> Any:
        cp = require_cupy()
        wanted = device_id(self._array)
        if wanted != cp.cuda.runtime.getDevice():
            self._device = cp.cuda.Device(wanted)
            self._device.__enter__()
        if self._stream is None:
            return cp.cuda.get_current_stream()
        self._entered = as_stream(self._stream)
        self._entered.__enter__()
        return self._entered

    def __exit__(self, *exc: Any) -> None:
        if self._entered is not None:
            self._entered.__exit__(*exc)
        if self._device is not None:
            self._device.__exit__(*exc)


def upload(host: np.ndarray) -> Any:
    """Copy a small host table to a new array on the current device, queued on the current
    stream without waiting for it. A table of C structs (a structured dtype) arrives as its
    bytes (uint8).

    A copy from pageable memory would first wait for all work queued on the stream (~100 us in
    a busy pipeline); this one goes through pinned staging memory, which is kept until an event
    after the copy has completed, so that it is never reused while the copy may still read it.
    """
    cp = require_cupy()
    host = np.ascontiguousarray(host)
    if host.dtype.names is not None:
        host = host.reshape(-1).view(np.uint8)
    with _staged_lock:
        while _staged and _staged[0][0].done:
            _staged.popleft()
    device = cp.empty(host.shape, host.dtype)
    if host.nbytes == 0:
        return device
    pinned = cp.cuda.alloc_pinned_memory(host.nbytes)
    np.frombuffer(pinned, np.uint8, host.nbytes)[:] = host.reshape(-1).view(np.uint8)
    stream = cp.cuda.get_current_stream()
    device.data.copy_from_host_async(ctypes.c_void_p(pinned.ptr), host.nbytes, stream)
    event = stream.record()
    with _staged_lock:
        _staged.append((event, pinned))
    return device
