"""CPU emulation of the talkrt CUDA kernels, for tests on machines without a GPU.

The real ``.cu`` sources are compiled as C++ with g++ (CUDA built-ins mapped to host
equivalents: ``__fadd_rn`` etc. become plain IEEE float operations, compiled with
``-ffp-contract=off`` so nothing is fused) and every launch runs its grid thread by thread.
Kernels that synchronise a block (``__syncthreads``) are written with block-strided loops, so
they are run with one thread per block, which computes the same result.

:func:`emulated_gpu` swaps CuPy for a numpy stand-in and the kernel loader for this emulator, so
the real GPU wrappers of :mod:`talkrt.kernels.gpu` (validation, tables, offsets, grids, argument
lists) run end to end on host arrays. Not covered: real parallelism, DLPack, streams, NVRTC.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import re
import shutil
import subprocess
import tempfile
import types
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from talkrt.kernels import _cuda

__all__ = ["compiler_available", "EmulatedKernel", "emulated_gpu", "signature"]

_PRELUDE = r"""
#include <cmath>
#include <cstring>
#include <cstdlib>
#include <algorithm>
struct uint3 { unsigned x, y, z; };
static uint3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __grid_constant__
#define __shared__ static
#define __align__(n) alignas(n)
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline int __float2int_rn(float x) { return (int)std::nearbyint(x); }
static inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
static inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
// byte n of the result = byte (s >> 4n) & 7 of the 8 bytes y:x (x = bytes 0..3)
static inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    const unsigned long long v = ((unsigned long long)y << 32) | x;
    unsigned r = 0;
    for (int n = 0; n < 4; ++n)
        r |= (unsigned)((v >> (8 * ((s >> (4 * n)) & 7u))) & 0xFFu) << (8 * n);
    return r;
}
// a + b rounded toward -inf: the double sum rounded down to float; correct whenever the double
// sum is exact, and for the kernels' z + 2^23 with z in [0, 255] (round_u8)
static inline float __fadd_rd(float a, float b) {
    const double s = (double)a + (double)b;
    float f = (float)s;
    if ((double)f > s) f = std::nextafter(f, -INFINITY);
    return f;
}
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
static inline void __syncthreads() {}
using std::min; using std::max;
alignas(16) static unsigned char g_smem[1 << 17];
"""

# Launch and signature of any kernel, from its C++ function type (no parsing): each argument is
# read from the address at args[i], as cuLaunchKernel reads it; sizeof and kind of each parameter
# let the Python side check what a launch passes, as the GPU would silently misread it.
_LAUNCHER = r"""
#include <cstddef>
#include <type_traits>
#include <utility>
template <class T> static T emu_arg(void* p) { T v; std::memcpy(&v, p, sizeof(T)); return v; }
template <class... A, std::size_t... I>
static void emu_call(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(emu_arg<A>(args[I])...);
}
template <class... A>
static void emu_launch(void (*k)(A...), const unsigned* d, void** args) {
    gridDim = {d[0], d[1], d[2]}; blockDim = {d[3], d[4], d[5]};
    for (unsigned z = 0; z < d[2]; ++z) for (unsigned y = 0; y < d[1]; ++y) for (unsigned x = 0; x < d[0]; ++x) {
        blockIdx = {x, y, z};
        for (unsigned tz = 0; tz < d[5]; ++tz) for (unsigned ty = 0; ty < d[4]; ++ty) for (unsigned tx = 0; tx < d[3]; ++tx) {
            threadIdx = {tx, ty, tz};
            emu_call(k, args, std::index_sequence_for<A...>{});
        }
    }
}
template <class T> static constexpr char emu_kind() {
    return std::is_pointer<T>::value ? 'p' : std::is_integral<T>::value ? 'i'
         : std::is_floating_point<T>::value ? 'f' : 's';
}
template <class... A>
static unsigned emu_signature(void (*)(A...), char* kinds, unsigned* sizes) {
    const char k[] = {emu_kind<A>()..., 0};
    const unsigned s[] = {(unsigned)sizeof(A)..., 0};
    for (std::size_t i = 0; i < sizeof...(A); ++i) { kinds[i] = k[i]; sizes[i] = s[i]; }
    return sizeof...(A);
}
"""

_KERNEL = re.compile(r'extern "C" __global__ void (\w+)\s*\(')
_MAX_PARAMS = 64
_cache: dict[str, ctypes.CDLL] = {}


def compiler_available() -> bool:
    """True when g++ is on PATH."""
    return shutil.which("g++") is not None


def _library(source_name: str) -> ctypes.CDLL:
    """The emulator build of ``source_name`` (compiled once per content, kept in the temp dir)."""
    lib = _cache.get(source_name)
    if lib is not None:
        return lib
    text = (_cuda.KERNEL_DIR / source_name).read_text(encoding="utf-8")
    body = re.sub(r"extern __shared__[^;]*\bsmem\[\];", "u8* smem = g_smem;", text)
    entries = "".join(
        f'extern "C" void emu_{name}(const unsigned* d, void** a) {{ emu_launch({name}, d, a); }}\n'
        f'extern "C" unsigned emu_sig_{name}(char* k, unsigned* s) '
        f'{{ return emu_signature({name}, k, s); }}\n' for name in _KERNEL.findall(text))
    code = _PRELUDE + _LAUNCHER + body + "\n" + entries
    header = (_cuda.KERNEL_DIR / "common.cuh").read_bytes()
    digest = hashlib.sha256(code.encode() + header).hexdigest()[:16]
    out_dir = Path(tempfile.gettempdir()) / "talkrt_kernel_emulator"
    out_dir.mkdir(exist_ok=True)
    lib_path = out_dir / f"{Path(source_name).stem}_{digest}.so"
    if not lib_path.exists():
        src_path = out_dir / f"{Path(source_name).stem}_{digest}.cpp"
        src_path.write_text(code, encoding="utf-8")
        tmp_lib = lib_path.with_suffix(f".{id(code)}.tmp")
        done = subprocess.run(["g++", "-std=c++17", "-O2", "-shared", "-fPIC", "-ffp-contract=off",
                               "-fno-strict-aliasing", "-Wno-unknown-pragmas",
                               f"-I{_cuda.KERNEL_DIR}", "-o", str(tmp_lib), str(src_path)],
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"g++ failed on {src_path}:\n{done.stderr[-4000:]}")
        tmp_lib.replace(lib_path)
    lib = _cache[source_name] = ctypes.CDLL(str(lib_path))
    return lib


def signature(source_name: str, name: str) -> list[tuple[str, int]]:
    """(kind, sizeof) of each parameter of kernel ``name`` as g++ compiled it: kind "p"
    (pointer), "i" (integer), "f" (floating point) or "s" (a struct passed by value)."""
    fn = getattr(_library(source_name), f"emu_sig_{name}")
    fn.restype = ctypes.c_uint
    kinds = ctypes.create_string_buffer(_MAX_PARAMS)
    sizes = (ctypes.c_uint * _MAX_PARAMS)()
    count = fn(kinds, sizes)
    return [(kinds.raw[i:i + 1].decode(), int(sizes[i])) for i in range(count)]


def _argument(kernel: str, index: int, kind: str, size: int, value: Any) -> Any:
    """A ctypes object holding what the GPU would read for this parameter (TypeError /
    ValueError for an argument that CuPy would pass with another type or size)."""
    where = f"{kernel} argument {index}"
    if kind == "p":
        if not (isinstance(value, np.ndarray) and value.dtype.kind != "V"
                and value.flags.c_contiguous):
            raise TypeError(f"{where}: expected a contiguous device array, got {type(value)}")
        return ctypes.c_void_p(value.__array_interface__["data"][0])
    if kind == "s":
        if not (isinstance(value, np.ndarray) and value.dtype.kind == "V" and value.size == 1):
            raise TypeError(f"{where}: expected a 1-element numpy array of a struct dtype (a "
                            f"struct by value), got {type(value).__name__}")
        if value.itemsize != size:
            raise ValueError(f"{where}: a {value.itemsize}-byte struct for a {size}-byte "
                             "parameter")
        return ctypes.create_string_buffer(value.tobytes(), size)
    numpy_kind = np.integer if kind == "i" else np.floating
    if not isinstance(value, numpy_kind) or value.itemsize != size:
        raise TypeError(f"{where}: expected a {size}-byte numpy "
                        f"{'integer' if kind == 'i' else 'float'}, got {type(value).__name__}")
    return ctypes.create_string_buffer(value.tobytes(), size)


class EmulatedKernel:
    """Callable like a CuPy RawKernel: ``kernel(grid, block, args, shared_mem=0)``. Every
    launch is appended to ``launched`` (the kernel's name and grid)."""

    def __init__(self, source_name: str, name: str, launched: list) -> None:
        self.name = name
        self.params = signature(source_name, name)
        self._fn = getattr(_library(source_name), f"emu_{name}")
        self._fn.restype = None
        text = (_cuda.KERNEL_DIR / source_name).read_text(encoding="utf-8")
        self._single_thread = "__syncthreads" in text
        self._launched = launched

    def __call__(self, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0) -> None:
        if len(args) != len(self.params):
            raise TypeError(f"{self.name} takes {len(self.params)} arguments, got {len(args)}")
        if shared_mem > (1 << 17):
            raise ValueError(f"{self.name}: {shared_mem} bytes of shared memory requested")
        held = [_argument(self.name, i, kind, size, value)
                for i, ((kind, size), value) in enumerate(zip(self.params, args))]
        pointers = (ctypes.c_void_p * len(held))(*[ctypes.addressof(h) for h in held])
        block = (1, 1, 1) if self._single_thread else tuple(block)
        dims = (ctypes.c_uint * 6)(*(int(g) for g in grid), *(int(b) for b in block))
        self._launched.append((self.name, tuple(int(g) for g in grid)))
        self._fn(dims, pointers)


class _Context:
    ptr = 0   # a stream handle

    def __init__(self, *_: Any) -> None:
        self.id = 0

    def __enter__(self) -> "_Context":
        return self

    def __exit__(self, *_: Any) -> None:
        return None


def _fake_cupy() -> types.SimpleNamespace:
    cuda = types.SimpleNamespace(
        Device=_Context, Stream=_Context, ExternalStream=_Context,
        get_current_stream=lambda: _Context(),
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, getDevice=lambda: 0))
    return types.SimpleNamespace(
        ndarray=np.ndarray, uint8=np.uint8, float32=np.float32, cuda=cuda,
        empty=np.empty, asarray=lambda a, dtype=None: np.array(a, dtype=dtype, copy=True),
        copyto=np.copyto, from_dlpack=np.from_dlpack)


def _upload(host: np.ndarray) -> np.ndarray:
    """_cuda.upload on the host: a copy (tables of structs as their bytes, like the GPU's)."""
    host = np.array(host, copy=True)
    return host.reshape(-1).view(np.uint8) if host.dtype.names is not None else host


@contextlib.contextmanager
def emulated_gpu() -> Iterator[list]:
    """Run :mod:`talkrt.kernels.gpu` on host arrays through the emulator (not thread safe).
    Yields the list of launches made inside the block: (kernel name, grid)."""
    launched: list = []
    saved = (_cuda.cupy, _cuda.get_kernel, _cuda.upload)
    _cuda.cupy = _fake_cupy()
    _cuda.get_kernel = lambda source, name: EmulatedKernel(source, name, launched)
    _cuda.upload = _upload
    try:
        yield launched
    finally:
        _cuda.cupy, _cuda.get_kernel, _cuda.upload = saved
