"""CuPy plumbing: optional import, device detection, per-device module cache, array adoption.

Nothing here raises at import time when CuPy or a GPU is missing; :func:`gpu_available` says so.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import operator
import threading
from importlib import resources
from typing import Any, Callable, Iterator

import numpy as np

from . import kernel_args

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
_params: dict[str, dict[str, list]] = {}
_external_streams: dict[tuple[int, int], Any] = {}
_staged: collections.deque = collections.deque()   # (event, pinned buffer) of pending uploads
_staged_lock = threading.Lock()
_modules_lock = threading.Lock()
_recorder: tuple[list, bool] | None = None   # (launches, execute them) while recording
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


class Kernel:
    """A compiled kernel, launched through ``cuLaunchKernel`` with a reusable
    :class:`~talkrt.kernels.kernel_args.ArgBlock` (see there for why and for the argument
    types). Called like a CuPy RawKernel: ``kernel(grid, block, args, shared_mem=0)``, on the
    current CuPy stream of the current device (the one it was compiled for)."""

    def __init__(self, raw: Any, name: str, params: list) -> None:
        self.name = name
        self.params = params
        self._raw = raw
        self._function = int(raw.kernel.ptr)       # CUfunction on the current device
        self._args = kernel_args.ArgBlock(name, params, _device_pointer)
        self._last: tuple = ()                     # the arguments now in self._args
        self._smem_limit = 48 * 1024               # dynamic shared memory allowed without opt-in

    def _allow_smem(self, shared_mem: int) -> None:
        if shared_mem > self._smem_limit:
            self._raw.max_dynamic_shared_size_bytes = shared_mem
            self._smem_limit = shared_mem

    def __call__(self, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0) -> None:
        self._allow_smem(shared_mem)
        stream = cupy.cuda.get_current_stream().ptr
        block_args = self._args
        with block_args.lock:
            # the same objects again (arrays keep their memory, scalars and bytes are immutable)
            # leave the block as it is
            last = self._last
            if len(last) != len(args) or not all(map(operator.is_, args, last)):
                self._last = ()
                block_args.fill(args)
                self._last = args
            cupy.cuda.driver.launchKernel(
                self._function, grid[0], grid[1], grid[2], block[0], block[1], block[2],
                shared_mem, stream, block_args.pointers_address, 0)

    def bind(self, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0) -> Callable:
        """A launch with these arguments in its own argument block: ``bound(stream_ptr)``."""
        self._allow_smem(shared_mem)
        block_args = kernel_args.ArgBlock(self.name, self.params, _device_pointer)
        block_args.fill(args)
        function, address = self._function, block_args.pointers_address

        def bound(stream: int, _keep: tuple = (block_args, args)) -> None:
            cupy.cuda.driver.launchKernel(function, grid[0], grid[1], grid[2], block[0],
                                          block[1], block[2], shared_mem, stream, address, 0)
        return bound


def _device_pointer(array: Any) -> int:
    if type(array) is not cupy.ndarray:
        raise TypeError(f"expected a CuPy array, got {type(array).__name__}")
    return array.data.ptr


def kernel_params(source: str) -> dict[str, list]:
    """{kernel: parameters} of a ``.cu`` source (parsed once)."""
    params = _params.get(source)
    if params is None:
        params = _params[source] = kernel_args.parse_kernels(kernel_source(source))
    return params


def get_kernel(source: str, name: str, dtype: Any = np.uint8) -> Kernel:
    """Compiled kernel ``name`` of ``source`` for the current device, as a :class:`Kernel`.

    Modules are compiled once per (device id, source, dtype) and cached, as cupyx does; CuPy also
    keeps the compiled binary in its on-disk kernel cache. Every talkrt kernel works on uint8
    pixels today; ``dtype`` (a numpy scalar type or dtype) is part of the key so that other
    pixel types can be added.
    """
    cp = require_cupy()
    key = (cp.cuda.runtime.getDevice(), source, dtype)
    function = _functions.get((*key, name))
    if function is not None:
        return function
    with _modules_lock:
        module = _modules.get(key)
        if module is None:
            logger.debug("compiling %s for device %d", source, key[0])
            module = cp.RawModule(code=kernel_source(source))
            _modules[key] = module
        function = _functions[(*key, name)] = Kernel(module.get_function(name), name,
                                                     kernel_params(source)[name])
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


def synchronize(array: Any) -> None:
    """Wait for all work queued on ``array``'s device (nothing to wait for on the host arrays of
    the CPU emulator)."""
    if not isinstance(array, np.ndarray):
        require_cupy().cuda.Device(device_id(array)).synchronize()


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


class on_device:  # noqa: N801 - used like the context manager function it replaces
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
    stream without waiting for it.

    A copy from pageable memory would first wait for all work queued on the stream (~100 us in
    a busy pipeline); this one goes through pinned staging memory, which is kept until an event
    after the copy has completed, so that it is never reused while the copy may still read it.
    """
    cp = require_cupy()
    host = np.ascontiguousarray(host)
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


def launch(kernel: Any, grid: tuple[int, int, int], block: tuple[int, int, int], args: tuple,
           shared_mem: int = 0) -> None:
    """Launch on the current stream; empty grids are skipped."""
    if min(grid) <= 0:
        return
    if _recorder is None or _recorder[1]:
        kernel(grid, block, args, shared_mem=shared_mem)
    if _recorder is not None:
        _recorder[0].append((kernel, grid, block, args, shared_mem))


@contextlib.contextmanager
def record_launches(execute: bool = True) -> Iterator[list]:
    """Collect (kernel, grid, block, args, shared_mem) of every launch made inside the block,
    launching them too unless ``execute`` is False.

    The benchmark replays them to time the kernels alone, without the host-side validation,
    table building and uploads of the wrappers; :func:`talkrt.kernels.prepared.prepare` binds
    them. Not thread safe.
    """
    global _recorder
    saved, _recorder = _recorder, ([], execute)
    try:
        yield _recorder[0]
    finally:
        _recorder = saved


def replay(launches: list) -> None:
    """Launch recorded kernels again, in order, on the current stream."""
    for kernel, grid, block, args, shared_mem in launches:
        kernel(grid, block, args, shared_mem=shared_mem)
