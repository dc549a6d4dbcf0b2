"""Kernel arguments: the numpy dtypes that mirror the kernels' structs, the checks every launch
goes through, and the compose tables (CPU tests; the emulator ones need g++).

CuPy hands a by-value struct to the driver as the bytes of a 1-element numpy array, and the
driver copies sizeof(parameter) bytes from there: a dtype of another size would be misread
silently on the GPU. The emulator compiles the real sources and checks each launch's argument
kinds and sizes against the compiled parameter types, so these tests and every emulated parity
case check them.
"""

from __future__ import annotations

import numpy as np
import pytest

import kernel_emulate as emulate
from talkrt.kernels import _cuda, launch
from talkrt.kernels.colorspace import DECODE_COEFFS, ENCODE_COEFFS, color_spec

needs_gxx = pytest.mark.skipif(not emulate.compiler_available(), reason="g++ not available")

SOURCES = ("color.cu", "compose.cu", "compose_nv12.cu", "filter.cu", "resize.cu")


@needs_gxx
def test_struct_dtypes_match_the_compiled_structs() -> None:
    def structs(source: str, kernel: str) -> list[int]:
        return [size for kind, size in emulate.signature(source, kernel) if kind == "s"]

    assert structs("color.cu", "nv12_to_rgb_kernel") == [DECODE_COEFFS.itemsize]
    assert structs("color.cu", "rgb_to_nv12_kernel") == [ENCODE_COEFFS.itemsize]
    assert structs("compose_nv12.cu", "compose_nv12_kernel") == [
        DECODE_COEFFS.itemsize, ENCODE_COEFFS.itemsize, launch.NV12_TABLE.itemsize]
    assert structs("filter.cu", "gaussian_filter_kernel") == [launch.FILTER_TAPS.itemsize]
    for kernel in ("resize_to_boxes_kernel", "blend_kernel", "compose_rgb_kernel"):
        assert structs("compose.cu", kernel) == []   # FrameBox travels as an uploaded table
    assert structs("resize.cu", "crop_resize_kernel") == []


def test_struct_dtypes_have_the_c_layouts() -> None:
    # sizeof is asserted in the .cu sources (static_assert, also under g++); these are the sizes
    # and offsets the C rules give the declared fields
    assert DECODE_COEFFS.itemsize == 24 and ENCODE_COEFFS.itemsize == 40
    assert launch.FRAME_BOX.itemsize == 32 and launch.FRAME_BOX.fields["mask_off"][1] == 16
    assert launch.NV12_FRAME.itemsize == 48 and launch.NV12_FRAME.fields["mask_off"][1] == 32
    assert launch.NV12_FRAME.fields["scale_y"][1] == 44
    assert launch.NV12_TABLE.itemsize == 48 * launch.NV12_TABLE_FRAMES
    assert launch.NV12_TABLE.itemsize < 4096 - 256   # + the other arguments: < 4 KB
    assert launch.FILTER_TAPS.itemsize == 4 * launch.FILTER_MAX_TAPS
    text = (_cuda.KERNEL_DIR / "filter.cu").read_text()
    assert f"#define MAX_RADIUS {(launch.FILTER_MAX_TAPS - 1) // 2}" in text


def test_color_structs_hold_the_coefficients_read_only() -> None:
    spec = color_spec("bt601", True)
    assert spec.decode_struct.shape == (1,) and spec.decode_struct["r_v"][0] == spec.r_v
    assert spec.encode_struct["y_offset"][0] == spec.y_offset == 0
    with pytest.raises(ValueError, match="read-only"):
        spec.encode_struct["y_r"] = 0


@needs_gxx
def test_launch_arguments_are_checked_against_the_compiled_parameters() -> None:
    spec = color_spec()
    src, out = np.zeros((1, 6, 8), np.uint8), np.zeros((1, 4, 8, 3), np.uint8)
    grid, block = launch.color_grid(4, 8, 1), launch.BLOCK
    with emulate.emulated_gpu() as launched:
        kernel = _cuda.get_kernel("color.cu", "nv12_to_rgb_kernel")
        _cuda.launch(kernel, grid, block, (src, out, 4, 8, 0, 0, spec.decode_struct))
        assert launched == [("nv12_to_rgb_kernel", grid)]
        with pytest.raises(ValueError, match="argument 6: a 40-byte struct for a 24-byte"):
            _cuda.launch(kernel, grid, block, (src, out, 4, 8, 0, 0, spec.encode_struct))
        with pytest.raises(TypeError, match="argument 2: expected a 4-byte numpy integer"):
            kernel(grid, block, (src, out, np.int64(4), np.int32(8), np.int32(0), np.int32(0),
                                 spec.decode_struct))
        with pytest.raises(TypeError, match="argument 0: expected a contiguous device array"):
            _cuda.launch(kernel, grid, block, (spec.decode_struct, out, 4, 8, 0, 0,
                                               spec.decode_struct))
        with pytest.raises(TypeError, match="takes 7 arguments, got 6"):
            _cuda.launch(kernel, grid, block, (src, out, 4, 8, 0, 0))
        filter_kernel = _cuda.get_kernel("filter.cu", "gaussian_filter_kernel")
        with pytest.raises(TypeError, match="np.float32"):
            _cuda.launch(filter_kernel, (1, 1, 1), block, (src, src, 1, 1, 1,
                                                           launch.filter_taps([256]), 0, 1, 1.2, 5))
        with pytest.raises(OverflowError):
            _cuda.launch(kernel, grid, block, (src, out, 2**31, 8, 0, 0, spec.decode_struct))
    assert len(launched) == 1


def test_row_spans_keep_exactly_the_block_rows_that_hold_them() -> None:
    boxes = np.array([[0, 3, 10, 40], [0, 4, 10, 40], [0, 3, 10, 40]])   # y1 odd, even, odd
    spans = np.array([[10, 21], [10, 21], [0, 0]])
    table = launch.nv12_compose_params(boxes, np.zeros(3), 256, 256, spans)
    for i in range(2):
        rows, ey1, odd = (int(table[i][k]) for k in ("rows", "ey1", "y_odd"))
        # block row r covers box rows 2 r - odd, 2 r - odd + 1, at frame rows ey1 + 2 r, + 1
        covered = {2 * r - odd + k for r in range(rows) for k in (0, 1)}
        assert covered >= set(range(10, 21)) and len(covered - set(range(10, 21))) <= 2
        assert ey1 + odd == boxes[i, 1]          # frame row - box row: still y1
    assert table[2]["rows"] == 0                                              # an all-zero mask
    whole = [[0, h] for h in boxes[:, 3] - boxes[:, 1]]        # every row may be non-zero
    full = launch.nv12_compose_params(boxes, np.zeros(3), 256, 256, whole)
    assert full.tobytes() == launch.nv12_compose_params(boxes, np.zeros(3), 256, 256).tobytes()


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


@needs_gxx
def test_compose_with_all_zero_masks_launches_nothing() -> None:
    from talkrt.kernels import gpu, pack_masks
    frames = np.arange(2 * 24 * 16, dtype=np.uint8).reshape(2, 24, 16)
    before = frames.copy()
    masks = pack_masks([np.zeros((8, 8), np.uint8)] * 2)
    with emulate.emulated_gpu() as launched:
        gpu.compose_nv12(frames, np.ones((2, 8, 8, 3), np.uint8), np.array([[0, 0, 8, 8]] * 2),
                         masks)
    assert launched == [] and np.array_equal(frames, before)


@needs_gxx
def test_batches_over_one_table_take_one_launch_per_table() -> None:
    from talkrt.kernels import gpu, pack_masks
    n = launch.NV12_TABLE_FRAMES + 6
    frames = np.zeros((n, 12, 8), np.uint8)
    masks = pack_masks([np.full((4, 4), 255, np.uint8)] * n)
    with emulate.emulated_gpu() as launched:
        gpu.compose_nv12(frames, np.ones((n, 4, 4, 3), np.uint8), np.array([[0, 0, 4, 4]] * n),
                         masks)
    assert [(name, grid[2]) for name, grid in launched] == [
        ("compose_nv12_kernel", launch.NV12_TABLE_FRAMES), ("compose_nv12_kernel", 6)]
