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
from talkrt.kernels.kernel_args import STRUCT_BYTES, Param, parse_kernels, struct_prefix

__all__ = ["compiler_available", "EmulatedKernel", "emulated_gpu", "struct_sizes"]

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

_cache: dict[str, tuple[ctypes.CDLL, dict[str, list[Param]]]] = {}


def compiler_available() -> bool:
    """True when g++ is on PATH."""
    return shutil.which("g++") is not None


def _c_decl(param: Param) -> str:
    """The emulator wrapper's parameter: by-value structs travel as pointers to their bytes."""
    if param.kind == "struct":
        return f"const {param.struct}* {param.name}"
    return f"{param.c_type} {param.name}"


def _ctype(param: Param) -> Any:
    if param.kind in ("pointer", "struct"):
        return ctypes.c_void_p
    return ctypes.c_float if param.kind == "float" else ctypes.c_int


def _build(source_name: str) -> tuple[ctypes.CDLL, dict[str, list[Param]]]:
    text = _cuda.kernel_source(source_name)
    kernels = parse_kernels(text)
    body = re.sub(r"extern __shared__[^;]*\bsmem\[\];", "u8* smem = g_smem;", text)
    wrappers = []
    for name, params in kernels.items():
        decl = ", ".join(_c_decl(p) for p in params)
        call = ", ".join(f"*{p.name}" if p.kind == "struct" else p.name for p in params)
        wrappers.append(f"""
extern "C" void emu_{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                           unsigned bz, {decl}) {{
    gridDim = {{gx, gy, gz}}; blockDim = {{bx, by, bz}};
    for (unsigned z = 0; z < gz; ++z) for (unsigned y = 0; y < gy; ++y) for (unsigned x = 0; x < gx; ++x) {{
        blockIdx = {{x, y, z}};
        for (unsigned tz = 0; tz < bz; ++tz) for (unsigned ty = 0; ty < by; ++ty) for (unsigned tx = 0; tx < bx; ++tx) {{
            threadIdx = {{tx, ty, tz}};
            {name}({call});
        }}
    }}
}}""")
    for struct in sorted({p.struct for params in kernels.values() for p in params if p.struct}):
        wrappers.append(f'extern "C" unsigned emu_sizeof_{struct}() {{ return sizeof({struct}); }}')
    code = _PRELUDE + body + "\n".join(wrappers)
    digest = hashlib.sha256(code.encode()).hexdigest()[:16]
    out_dir = Path(tempfile.gettempdir()) / "talkrt_kernel_emulator"
    out_dir.mkdir(exist_ok=True)
    lib_path = out_dir / f"{Path(source_name).stem}_{digest}.so"
    if not lib_path.exists():
        src_path = out_dir / f"{Path(source_name).stem}_{digest}.cpp"
        src_path.write_text(code, encoding="utf-8")
        tmp_lib = lib_path.with_suffix(f".{id(code)}.tmp")
        subprocess.run(["g++", "-std=c++17", "-O2", "-shared", "-fPIC", "-ffp-contract=off",
                        "-fno-strict-aliasing", "-Wno-unknown-pragmas", "-o", str(tmp_lib),
                        str(src_path)], check=True, capture_output=True, text=True)
        tmp_lib.replace(lib_path)
    lib = ctypes.CDLL(str(lib_path))
    for name, params in kernels.items():
        fn = getattr(lib, f"emu_{name}")
        fn.argtypes = [ctypes.c_uint] * 6 + [_ctype(p) for p in params]
        fn.restype = None
    return lib, kernels


def struct_sizes(source_name: str) -> dict[str, int]:
    """g++'s sizeof of every struct that a kernel of ``source_name`` takes by value."""
    lib, kernels = _cache.get(source_name) or _build(source_name)
    _cache[source_name] = (lib, kernels)
    names = {p.struct for params in kernels.values() for p in params if p.struct}
    sizes = {}
    for name in sorted(names):
        fn = getattr(lib, f"emu_sizeof_{name}")
        fn.restype = ctypes.c_uint
        sizes[name] = int(fn())
    return sizes


class EmulatedKernel:
    """Callable like a CuPy RawKernel: ``kernel(grid, block, args, shared_mem=0)``."""

    def __init__(self, source_name: str, name: str) -> None:
        lib, kernels = _cache.get(source_name) or _build(source_name)
        _cache[source_name] = (lib, kernels)
        self.name = name
        self.params = kernels[name]
        self._fn = getattr(lib, f"emu_{name}")
        self._single_thread = "__syncthreads" in _cuda.kernel_source(source_name)

    def __call__(self, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0) -> None:
        if len(args) != len(self.params):
            raise TypeError(f"{self.name} takes {len(self.params)} arguments, got {len(args)}")
        if shared_mem > (1 << 17):
            raise ValueError(f"{self.name}: {shared_mem} bytes of shared memory requested")
        converted: list[Any] = []
        for param, value in zip(self.params, args):
            where = f"{self.name}.{param.name}"
            if param.kind == "pointer":
                if not isinstance(value, np.ndarray) or not value.flags.c_contiguous:
                    raise TypeError(f"{where}: expected a contiguous array")
                converted.append(value.__array_interface__["data"][0])
            elif param.kind == "struct":   # a zero-padded copy of the struct's bytes
                data = struct_prefix(value, param, self.name)
                buffer = ctypes.create_string_buffer(data, STRUCT_BYTES[param.struct])
                converted.append(ctypes.cast(buffer, ctypes.c_void_p))
            elif param.kind == "int":
                if not isinstance(value, (np.int32, int)):
                    raise TypeError(f"{where}: expected np.int32, got {type(value)}")
                converted.append(int(value))
            else:
                if not isinstance(value, np.float32):
                    raise TypeError(f"{where}: expected np.float32, got {type(value)}")
                converted.append(float(value))
        block = (1, 1, 1) if self._single_thread else tuple(block)
        self._fn(*(int(g) for g in grid), *(int(b) for b in block), *converted)

    def bind(self, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0) -> Any:
        """Like the GPU Kernel.bind: a launch with fixed arguments, ``bound(stream)``."""
        return lambda stream: self(grid, block, args, shared_mem)


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


@contextlib.contextmanager
def emulated_gpu() -> Iterator[None]:
    """Run :mod:`talkrt.kernels.gpu` on host arrays through the emulator (not thread safe)."""
    saved = (_cuda.cupy, _cuda.get_kernel, _cuda.upload)
    _cuda.cupy = _fake_cupy()
    _cuda.get_kernel = lambda source, name, dtype=np.uint8: EmulatedKernel(source, name)
    _cuda.upload = lambda host: np.array(host, copy=True)
    try:
        yield
    finally:
        _cuda.cupy, _cuda.get_kernel, _cuda.upload = saved
