"""Kernel signatures of the ``.cu`` sources and the argument blocks that launch them.

Both launchers read the parameter lists from the sources themselves: the GPU one
(:class:`ArgBlock`, used by ``_cuda.Kernel``) and the CPU emulator (:mod:`the test suite's CPU emulator (tests/kernel_emulate.py)`).

Argument conventions, checked by both:

* ``T*`` parameter: a device array (CuPy; a numpy array under the emulator);
* ``int``: a Python int or ``np.int32``; ``float``: ``np.float32`` (explicit, so that no value
  is rounded from a double by accident);
* a struct passed by value (its name is a key of :data:`STRUCT_BYTES`): a ``bytes`` object of at
  most the struct's size; a shorter one fills a prefix (the compose table of a batch smaller
  than the table: the kernel reads only the entries of its grid's frames).

Why an argument block: CuPy's ``RawKernel.__call__`` converts every argument on every launch
(about 10 us for 6 arguments and 19 us for 28 on an H100 host), more than most of these kernels
run. An :class:`ArgBlock` keeps one ctypes record of the parameters per kernel, so a launch
writes the changed values into it and hands its pointer table to ``cuLaunchKernel`` (which
copies the values at the call): about 4 us.
"""

from __future__ import annotations

import ctypes
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable

from . import launch

__all__ = ["Param", "STRUCT_BYTES", "parse_kernels", "ArgBlock", "struct_prefix"]

#: Bytes of each struct that a kernel takes by value; every ``.cu`` that defines one checks the
#: same number with a static_assert (the emulator test compares g++'s sizeof too).
STRUCT_BYTES = {
    "DecodeCoeffs": 6 * 4,
    "EncodeCoeffs": 10 * 4,
    "FilterTaps": launch.FILTER_MAX_TAPS * 4,
    "NV12ComposeTable": launch.NV12_TABLE_FRAMES * launch.NV12_PARAMS * 4,
}

_SIGNATURE = re.compile(r'extern "C" __global__ void (\w+)\s*\(([^)]*)\)', re.S)
_QUALIFIERS = {"const", "__grid_constant__", "__restrict__", "volatile"}


@dataclass(frozen=True)
class Param:
    """One kernel parameter: its C type as written, its name and its kind ("pointer", "int",
    "float" or "struct"; ``struct`` names the struct of a by-value struct)."""

    c_type: str
    name: str
    kind: str
    struct: str | None = None


def _strip_comments(text: str) -> str:
    return re.sub(r"//[^\n]*", "", text)


def _param(raw: str, kernel: str) -> Param:
    words = re.findall(r"\w+|\*", raw)
    name = words[-1]
    flat = " ".join(raw.split())
    c_type = flat[: flat.rfind(name)].strip()
    base = [w for w in words[:-1] if w not in _QUALIFIERS]
    if "*" in base:
        return Param(c_type, name, "pointer")
    if base == ["int"]:
        return Param(c_type, name, "int")
    if base == ["float"]:
        return Param(c_type, name, "float")
    if len(base) == 1 and base[0] in STRUCT_BYTES:
        return Param(c_type, name, "struct", base[0])
    raise TypeError(f"kernel {kernel}: parameter {name!r} has type {c_type!r}; supported: "
                    f"pointers, int, float and the structs {sorted(STRUCT_BYTES)}")


def parse_kernels(source_text: str) -> dict[str, list[Param]]:
    """{kernel name: its parameters} of every ``extern "C" __global__`` function in a source."""
    text = _strip_comments(source_text)
    return {m.group(1): [_param(raw, m.group(1)) for raw in m.group(2).split(",")]
            for m in _SIGNATURE.finditer(text)}


def struct_prefix(value: Any, param: Param, kernel: str) -> bytes:
    """Check a by-value struct argument (bytes, at most the struct's size) and return it."""
    size = STRUCT_BYTES[param.struct]
    if not isinstance(value, bytes):
        raise TypeError(f"{kernel}.{param.name}: expected bytes for struct {param.struct}, "
                        f"got {type(value).__name__}")
    if not 0 < len(value) <= size:
        raise ValueError(f"{kernel}.{param.name}: {len(value)} bytes for struct {param.struct} "
                         f"of {size} bytes")
    return value


def _ctype(param: Param) -> Any:
    if param.kind == "pointer":
        return ctypes.c_void_p
    if param.kind == "int":
        return ctypes.c_int32
    if param.kind == "float":
        return ctypes.c_float
    return ctypes.c_ubyte * STRUCT_BYTES[param.struct]


class ArgBlock:
    """One kernel's parameter values in a ctypes record, plus the table of pointers to them that
    ``cuLaunchKernel`` takes (``pointers``). ``fill(args)`` writes a launch's arguments; the
    caller holds ``lock`` from ``fill`` until the launch has returned (the driver copies the
    values at launch)."""

    def __init__(self, kernel: str, params: list[Param], device_pointer: Callable[[Any], int]):
        self.kernel = kernel
        self.params = params
        fields = [(f"a{i}", _ctype(p)) for i, p in enumerate(params)]
        record_type = type(f"{kernel}_args", (ctypes.Structure,), {"_fields_": fields})
        self.values = record_type()
        base = ctypes.addressof(self.values)
        self.pointers = (ctypes.c_void_p * len(params))(
            *[base + getattr(record_type, f"a{i}").offset for i in range(len(params))])
        self.pointers_address = ctypes.addressof(self.pointers)
        self.lock = threading.Lock()
        self._device_pointer = device_pointer
        self._setters = [self._setter(i, p) for i, p in enumerate(params)]

    def _setter(self, index: int, param: Param) -> Callable[[Any], None]:
        values, field = self.values, f"a{index}"
        if param.kind == "pointer":
            pointer = self._device_pointer
            return lambda v: setattr(values, field, pointer(v))
        if param.kind == "struct":
            address = ctypes.addressof(values) + getattr(type(values), field).offset

            def set_struct(v: Any) -> None:
                data = struct_prefix(v, param, self.kernel)
                ctypes.memmove(address, data, len(data))
            return set_struct
        return lambda v: setattr(values, field, v)

    def fill(self, args: tuple) -> None:
        """Write one launch's arguments (see the module docstring for their types)."""
        if len(args) != len(self._setters):
            raise TypeError(f"{self.kernel} takes {len(self._setters)} arguments, got {len(args)}")
        for setter, value, param in zip(self._setters, args, self.params):
            try:
                setter(value)
            except (TypeError, AttributeError) as exc:
                raise TypeError(f"{self.kernel}.{param.name} ({param.c_type}): cannot pass "
                                f"{type(value).__name__}: {exc}") from None
