"""Kernel signatures and argument blocks (talkrt.kernels.kernel_args): CPU tests.

The GPU launcher writes each launch's arguments into an ArgBlock and hands its pointer table to
cuLaunchKernel, so what these tests read back from the block is what the driver would copy.
"""

from __future__ import annotations

import ctypes
from importlib import resources

import numpy as np
import pytest

import kernel_emulate as emulate
from talkrt.kernels import _cuda, kernel_args, launch
from talkrt.kernels.kernel_args import STRUCT_BYTES, ArgBlock, parse_kernels

SOURCES = ("color.cu", "compose.cu", "compose_nv12.cu", "filter.cu", "resize.cu")


def _read(block: ArgBlock, index: int, ctype) -> object:
    """The value that parameter ``index``'s pointer in the launch table points at."""
    return ctypes.cast(block.pointers[index], ctypes.POINTER(ctype)).contents.value


def test_every_kernel_parameter_has_a_known_kind() -> None:
    seen = set()
    for source in SOURCES:
        kernels = parse_kernels(_cuda.kernel_source(source))
        assert kernels, source
        for name, params in kernels.items():
            assert len({p.name for p in params}) == len(params), name
            seen.update(p.kind for p in params)
    assert seen == {"pointer", "int", "float", "struct"}


def test_compose_nv12_signature_is_parsed_in_order() -> None:
    params = parse_kernels(_cuda.kernel_source("compose_nv12.cu"))["compose_nv12_kernel"]
    assert [(p.name, p.kind, p.struct) for p in params] == [
        ("nv12", "pointer", None), ("height", "int", None), ("width", "int", None),
        ("faces", "pointer", None), ("face_h", "int", None), ("face_w", "int", None),
        ("masks", "pointer", None), ("dk", "struct", "DecodeCoeffs"),
        ("ek", "struct", "EncodeCoeffs"), ("table", "struct", "NV12ComposeTable")]
    assert params[-1].c_type == "const __grid_constant__ NV12ComposeTable"


def test_unsupported_parameter_type_is_named() -> None:
    with pytest.raises(TypeError, match=r"k.*'x'.*double"):
        parse_kernels('extern "C" __global__ void k(int a, double x) {}')


def test_table_sizes_match_the_launch_constants() -> None:
    assert STRUCT_BYTES["NV12ComposeTable"] == launch.NV12_TABLE_FRAMES * launch.NV12_PARAMS * 4
    assert STRUCT_BYTES["NV12ComposeTable"] < 4096 - 256   # + the other arguments: < 4 KB
    text = resources.files("talkrt.kernels").joinpath("filter.cu").read_text()
    assert f"#define MAX_RADIUS {(launch.FILTER_MAX_TAPS - 1) // 2}" in text
    text = resources.files("talkrt.kernels").joinpath("compose_nv12.cu").read_text()
    assert f"#define NV12_TABLE_FRAMES {launch.NV12_TABLE_FRAMES} " in text


@pytest.mark.skipif(not emulate.compiler_available(), reason="g++ not available")
@pytest.mark.parametrize("source", ["color.cu", "compose_nv12.cu", "filter.cu"])
def test_struct_sizes_match_the_compiled_structs(source: str) -> None:
    sizes = emulate.struct_sizes(source)
    assert sizes
    for name, size in sizes.items():
        assert STRUCT_BYTES[name] == size, name


def _block() -> ArgBlock:
    source = ('extern "C" __global__ void k(const u8* __restrict__ src, int n, float amount, '
              "DecodeCoeffs coeffs, u8* dst) {}")
    return ArgBlock("k", parse_kernels(source)["k"], device_pointer=lambda a: a.ptr)


class _FakeArray:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


def test_arg_block_holds_each_launch_s_values() -> None:
    block = _block()
    coeffs = np.arange(6, dtype=np.float32)
    block.fill((_FakeArray(0x1000), 7, np.float32(1.25), coeffs.tobytes(), _FakeArray(0x2000)))
    assert _read(block, 0, ctypes.c_void_p) == 0x1000
    assert _read(block, 1, ctypes.c_int32) == 7
    assert _read(block, 2, ctypes.c_float) == 1.25
    struct = ctypes.string_at(block.pointers[3], STRUCT_BYTES["DecodeCoeffs"])
    assert np.array_equal(np.frombuffer(struct, np.float32), coeffs)
    assert _read(block, 4, ctypes.c_void_p) == 0x2000
    block.fill((_FakeArray(0x3000), -3, np.float32(0.5), coeffs[:2].tobytes(), _FakeArray(8)))
    assert _read(block, 0, ctypes.c_void_p) == 0x3000 and _read(block, 1, ctypes.c_int32) == -3
    struct = np.frombuffer(ctypes.string_at(block.pointers[3], 24), np.float32)
    assert np.array_equal(struct, coeffs)   # a 2-float prefix replaced the first two only


def test_arg_block_rejects_bad_arguments_by_name() -> None:
    block = _block()
    good = [_FakeArray(1), 1, np.float32(1), bytes(24), _FakeArray(2)]
    with pytest.raises(TypeError, match="takes 5 arguments, got 4"):
        block.fill(tuple(good[:4]))
    with pytest.raises(TypeError, match=r"k\.src .*int"):
        block.fill((5, *good[1:]))
    with pytest.raises(TypeError, match=r"k\.n "):
        block.fill((good[0], "seven", *good[2:]))
    with pytest.raises(ValueError, match=r"k\.coeffs: 28 bytes for struct DecodeCoeffs of 24"):
        block.fill((*good[:3], bytes(28), good[4]))
    with pytest.raises(TypeError, match=r"k\.coeffs: expected bytes"):
        block.fill((*good[:3], np.zeros(6, np.float32), good[4]))


def _random_layout(rng: np.random.Generator, n: int, height: int, width: int):
    x1 = rng.integers(0, width - 1, n)
    y1 = rng.integers(0, height - 1, n)
    x2 = x1 + 1 + rng.integers(0, width - x1)
    y2 = y1 + 1 + rng.integers(0, height - y1)
    boxes = np.stack([x1, y1, x2, y2], axis=1)
    shapes = np.stack([y2 - y1, x2 - x1, np.ones(n, np.int64)], axis=1)
    offsets = np.cumsum(np.r_[0, (shapes.prod(axis=1) + 15) // 16 * 16])[:n] + (5 << 32)
    return boxes, shapes, offsets, int(offsets[-1] + shapes[-1].prod())


@pytest.mark.parametrize("seed", range(20))
def test_small_batch_table_equals_the_numpy_table(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, launch.SMALL_BATCH + 1))
    boxes, shapes, offsets, total = _random_layout(rng, n, 1080, 1920)
    face_w, face_h = int(rng.integers(1, 300)), int(rng.integers(1, 300))
    rows, grid = launch.nv12_compose_rows_small(boxes, 1080, 1920, shapes, offsets, total)
    table = launch.nv12_compose_params(boxes, offsets, face_w, face_h)
    assert launch.pack_nv12_rows(rows, face_w, face_h) == table.tobytes()
    assert grid == launch.nv12_compose_grid(table)


def test_small_batch_table_defers_every_error_to_the_numpy_checks() -> None:
    rng = np.random.default_rng(7)
    boxes, shapes, offsets, total = _random_layout(rng, 2, 100, 120)
    small = launch.nv12_compose_rows_small
    assert small(boxes, 100, 120, shapes, offsets, total) is not None
    outside = boxes.copy()
    outside[1, 2] = 121
    assert small(outside, 100, 120, shapes, offsets, total) is None
    assert small(boxes.astype(np.float64), 100, 120, shapes, offsets, total) is None
    assert small(boxes.tolist(), 100, 120, shapes, offsets, total) is None
    assert small(boxes[:1], 100, 120, shapes, offsets, total) is None      # 1 box, 2 masks
    wrong = shapes.copy()
    wrong[0, 0] += 1
    assert small(boxes, 100, 120, wrong, offsets, total) is None
    assert small(boxes, 100, 120, shapes, offsets, total - 1) is None      # past the buffer
    many = launch.SMALL_BATCH + 1
    assert small(np.repeat(boxes[:1], many, axis=0), 100, 120, np.repeat(shapes[:1], many, axis=0),
                 offsets[:1].repeat(many), total) is None                  # > SMALL_BATCH


def _random_spans(rng: np.random.Generator, shapes: np.ndarray) -> np.ndarray:
    spans = []
    for h in shapes[:, 0]:
        first = int(rng.integers(0, h + 1))
        end = int(rng.integers(first, h + 1))
        spans.append((first, end) if rng.random() > 0.1 else (0, 0))
    return np.array(spans, np.int64)


@pytest.mark.parametrize("seed", range(20))
def test_row_spans_give_the_same_table_on_both_paths(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1, launch.SMALL_BATCH + 1))
    boxes, shapes, offsets, total = _random_layout(rng, n, 720, 1280)
    spans = _random_spans(rng, shapes)
    rows, grid = launch.nv12_compose_rows_small(boxes, 720, 1280, shapes, offsets, total, spans)
    table = launch.nv12_compose_params(boxes, offsets, 256, 256, spans)
    assert launch.pack_nv12_rows(rows, 256, 256) == table.tobytes()
    assert grid == launch.nv12_compose_grid(table)


def test_row_spans_keep_exactly_the_block_rows_that_hold_them() -> None:
    boxes = np.array([[0, 3, 10, 40], [0, 4, 10, 40], [0, 3, 10, 40]])   # y1 odd, even, odd
    spans = np.array([[10, 21], [10, 21], [0, 0]])
    table = launch.nv12_compose_params(boxes, np.zeros(3), 256, 256, spans)
    for i in range(2):
        rows, ey1, odd = (int(v) for v in table[i, [1, 3, 5]])
        # block row r covers box rows 2 r - odd, 2 r - odd + 1, at frame rows ey1 + 2 r, + 1
        covered = {2 * r - odd + k for r in range(rows) for k in (0, 1)}
        assert covered >= set(range(10, 21)) and len(covered - set(range(10, 21))) <= 2
        assert ey1 + odd == boxes[i, 1]          # frame row - box row: still y1
    assert table[2, 1] == 0                                                   # an all-zero mask


def test_pack_masks_records_the_non_zero_rows() -> None:
    from talkrt.kernels import Packed, pack_masks
    a = np.zeros((6, 4), np.uint8)
    a[2, 1] = a[4, 3] = 9
    masks = pack_masks([a, np.zeros((3, 3), np.uint8), np.full((2, 5), 255, np.uint8)])
    assert masks.row_spans.tolist() == [[2, 5], [0, 0], [0, 2]]
    picked = masks.select(np.array([2, 0]))
    assert picked.row_spans.tolist() == [[0, 2], [2, 5]] and picked.shapes[0].tolist() == [2, 5, 1]
    assert masks.with_data(masks.data.copy()).row_spans is masks.row_spans
    bad = Packed(masks.data, masks.offsets, masks.shapes, np.array([[2, 7], [0, 0], [0, 2]]))
    boxes = np.array([[0, 0, 4, 6], [0, 0, 3, 3], [0, 0, 5, 2]])
    masks.check_matches(boxes, 1, "masks")
    with pytest.raises(ValueError, match="row_spans"):
        bad.check_matches(boxes, 1, "masks")


@pytest.mark.skipif(not emulate.compiler_available(), reason="g++ not available")
def test_compose_with_all_zero_masks_launches_nothing() -> None:
    from talkrt.kernels import gpu, pack_masks
    frames = np.arange(2 * 24 * 16, dtype=np.uint8).reshape(2, 24, 16)
    before = frames.copy()
    masks = pack_masks([np.zeros((8, 8), np.uint8)] * 2)
    with emulate.emulated_gpu(), _cuda.record_launches() as launches:
        gpu.compose_nv12(frames, np.ones((2, 8, 8, 3), np.uint8), np.array([[0, 0, 8, 8]] * 2),
                         masks)
    assert launches == [] and np.array_equal(frames, before)
