"""Host-side launch arithmetic of the CUDA kernels: grids, parameter tables, shared memory.

Pure numpy, no CuPy, so CI exercises it; the GPU wrappers only upload what these functions
build. Each function documents the kernel layout it serves (see the .cu files).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from .gaussian import MAX_KSIZE
from .resize_tables import ResizePlan, plan_resize

__all__ = [
    "BLOCK", "COLOR_GROUP", "FILTER_TILE", "PARAM_STRIDE", "NV12_COMPOSE_BLOCKS",
    "NV12_COMPOSE_BLOCK", "NV12_PARAMS", "NV12_TABLE_FRAMES", "FILTER_MAX_TAPS", "grid_2d",
    "color_grid", "CropTables", "crop_tables", "box_params", "nv12_compose_params",
    "nv12_compose_grid", "nv12_compose_rows_small", "pack_nv12_rows", "SMALL_BATCH", "filter_grid",
    "filter_smem_bytes",
]

BLOCK = (32, 8, 1)          #: thread block of the talkrt kernels (but NV12_COMPOSE_BLOCK)
COLOR_GROUP = 8             #: pixels per thread and row in color.cu (GROUP)
FILTER_TILE = (256, 32)     #: (elements, rows) per block in filter.cu (TILE_X, TILE_Y)
FILTER_MIN_HALO = 3         #: filter.cu's halo rows never go below its fast-path radius
PARAM_STRIDE = 8            #: int64 per frame in compose.cu's params table
NV12_COMPOSE_BLOCKS = 2     #: 2x2 blocks per thread, stacked vertically (compose_nv12.cu)
#: compose_nv12.cu's thread block: ~56 registers per thread let 9 blocks of 128 threads share an
#: SM (36 warps) where only 4 of 256 threads (32 warps) would fit
NV12_COMPOSE_BLOCK = (32, 4, 1)
NV12_PARAMS = 12            #: int32 per frame in compose_nv12.cu's params table
#: frames per compose_nv12 launch: its params table travels by value in the kernel's parameter
#: block (64 x 48 bytes + the rest stays under the 4 KB limit); larger batches take more launches
NV12_TABLE_FRAMES = 64
FILTER_MAX_TAPS = MAX_KSIZE  #: filter.cu's MAX_TAPS: the size of its FilterTaps struct
#: up to this many frames compose_nv12 builds its table in plain Python (~2 us per frame on the
#: host; the numpy path costs ~75 us of small-array operations whatever the batch)
SMALL_BATCH = 32
MAX_GRID_YZ = 65535


def _ceil_div(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def grid_2d(items_x: int, items_y: int, batch: int) -> tuple[int, int, int]:
    """Grid covering items_x x items_y threads per frame with :data:`BLOCK`, z = frame."""
    grid = (_ceil_div(items_x, BLOCK[0]), _ceil_div(items_y, BLOCK[1]), int(batch))
    if grid[1] > MAX_GRID_YZ or grid[2] > MAX_GRID_YZ:
        raise ValueError(f"launch too large: grid {grid} (y and z are limited to {MAX_GRID_YZ})")
    return grid


def color_grid(height: int, width: int, batch: int) -> tuple[int, int, int]:
    """color.cu: one thread per :data:`COLOR_GROUP` pixels x 2 rows."""
    return grid_2d(_ceil_div(width, COLOR_GROUP), height // 2, batch)


@dataclass(frozen=True)
class CropTables:
    """crop_resize_kernel's tables in ONE int32 buffer (uploaded with a single copy).

    ``buffer[slices[name]]`` holds, C order: x_index [B, out_w, x_taps] int32 (absolute frame
    columns), x_weight (float32 bits), y_index [B, out_h, y_taps] (absolute rows), y_weight,
    meta [B, 4] = (kind, shift, round_add, float32 bits of post_scale).
    """

    buffer: np.ndarray
    slices: dict[str, slice]
    x_taps: int
    y_taps: int

    def view(self, name: str, buffer: np.ndarray | None = None) -> np.ndarray:
        """Section ``name`` of ``buffer`` (default: the host buffer), weights as float32."""
        section = (self.buffer if buffer is None else buffer)[self.slices[name]]
        return section.view(np.float32) if name.endswith("weight") else section


def crop_tables(boxes: np.ndarray, out_w: int, out_h: int, method: str) -> CropTables:
    """Per-frame OpenCV-equivalent tables for cropping boxes [B, 4] and resizing to out_w x out_h."""
    plans: list[ResizePlan] = [
        plan_resize(int(x2 - x1), int(y2 - y1), out_w, out_h, method) for x1, y1, x2, y2 in boxes]
    n = len(plans)
    x_taps = max(p.x.taps for p in plans)
    y_taps = max(p.y.taps for p in plans)
    sizes = {"x_index": n * out_w * x_taps, "x_weight": n * out_w * x_taps,
             "y_index": n * out_h * y_taps, "y_weight": n * out_h * y_taps, "meta": n * 4}
    slices, start = {}, 0
    for name, size in sizes.items():
        slices[name] = slice(start, start + size)
        start += size
    tables = CropTables(np.zeros(start, np.int32), slices, x_taps, y_taps)
    x_index = tables.view("x_index").reshape(n, out_w, x_taps)
    x_weight = tables.view("x_weight").reshape(n, out_w, x_taps)
    y_index = tables.view("y_index").reshape(n, out_h, y_taps)
    y_weight = tables.view("y_weight").reshape(n, out_h, y_taps)
    meta = tables.view("meta").reshape(n, 4)
    for i, (plan, (x1, y1, _, _)) in enumerate(zip(plans, boxes)):
        tx, ty = plan.x.taps, plan.y.taps
        # padding taps: weight 0 (skipped by the kernel), index of a valid pixel
        x_index[i] = x1 + plan.x.index[:, :1]
        x_index[i, :, :tx] = x1 + plan.x.index
        x_weight[i, :, :tx] = plan.x.weight
        y_index[i] = y1 + plan.y.index[:, :1]
        y_index[i, :, :ty] = y1 + plan.y.index
        y_weight[i, :, :ty] = plan.y.weight
        meta[i, :3] = (plan.kind, plan.shift, plan.round_add)
        meta[i, 3] = np.float32(plan.post_scale).view(np.int32)
    return tables


def box_params(boxes: np.ndarray, mask_offsets: np.ndarray | None = None,
               region_offsets: np.ndarray | None = None) -> np.ndarray:
    """compose.cu's params [B, 8] int64: x1, y1, x2, y2, mask_offset, region_offset, 0, 0."""
    n = len(boxes)
    params = np.zeros((n, PARAM_STRIDE), np.int64)
    params[:, :4] = boxes
    if mask_offsets is not None:
        params[:, 4] = mask_offsets
    if region_offsets is not None:
        params[:, 5] = region_offsets
    return params


def nv12_compose_params(boxes: np.ndarray, mask_offsets: np.ndarray, face_w: int,
                        face_h: int, row_spans: np.ndarray | None = None) -> np.ndarray:
    """compose_nv12.cu's params [B, 12] int32 (see there): per frame the 2x2 block grid of the
    box grown to even coordinates, the box, the mask offset and the float32 face / box scales
    (numpy's float32 division is IEEE, like __fdiv_rn). Columns in (x, y) pairs.

    With ``row_spans`` ([B, 2], the mask rows [first, end) that may be non-zero) the block rows
    outside them are left out of the grid: the table's block rows start at the first block
    row with a row in the span, moving ey1 down and taking y1 & 1 - 2 * skipped (the kernel
    only uses it to map a block row to its box row), and end at the last such block row."""
    boxes = np.asarray(boxes, np.int64)
    low, high = boxes[:, :2], boxes[:, 2:]            # (x1, y1), (x2, y2)
    even_low = low & ~1
    size = high - low
    params = np.empty((len(boxes), NV12_PARAMS), np.int32)
    params[:, 0:2] = (((high + 1) & ~1) - even_low) >> 1
    params[:, 2:4] = even_low
    params[:, 4:6] = low & 1
    params[:, 6:8] = size
    # the int64 offset as its (low, high) 32-bit words
    params[:, 8:10] = np.asarray(mask_offsets, "<i8").reshape(-1, 1).view("<i4")
    params[:, 10:12] = (np.array([face_w, face_h], np.float32)
                        / size.astype(np.float32)).view(np.int32)
    if row_spans is not None:
        first, end = np.asarray(row_spans, np.int64).T
        odd = params[:, 5].astype(np.int64)
        skip = (first + odd) >> 1                        # block rows above the span
        last = (end - 1 + odd) >> 1                      # the span's last block row
        params[:, 1] = np.where(end > first, last - skip + 1, 0)
        params[:, 3] += 2 * skip
        params[:, 5] = odd - 2 * skip
    return params


def nv12_compose_rows_small(boxes: Any, height: int, width: int, mask_shapes: np.ndarray,
                            mask_offsets: np.ndarray, mask_bytes: int,
                            row_spans: np.ndarray | None = None
                            ) -> tuple[list[tuple[int, ...]], tuple[int, int, int]] | None:
    """The integer columns of :func:`nv12_compose_params` (one tuple of 10 per frame) and
    :func:`nv12_compose_grid`, for at most :data:`SMALL_BATCH` frames, in plain Python (below
    ~40 frames that beats numpy's fixed per-call cost, which was most of a compose call's host
    time). Also checks what ``check_boxes`` and ``Packed.check_matches`` check; returns None on
    anything unexpected, and the caller then takes the numpy path, whose checks raise the
    errors."""
    if not (isinstance(boxes, np.ndarray) and boxes.dtype.kind in "iu"):
        return None
    n = len(mask_shapes)
    rows = boxes.reshape(1, 4).tolist() if boxes.shape == (4,) and n == 1 else boxes.tolist()
    if not 0 < n <= SMALL_BATCH or boxes.ndim > 2 or len(rows) != n:
        return None
    shapes, offsets = mask_shapes.tolist(), mask_offsets.tolist()
    spans = [None] * n if row_spans is None else np.asarray(row_spans).tolist()
    if len(spans) != n:
        return None
    table, max_cols, max_rows = [], 0, 0
    for row, shape, offset, span in zip(rows, shapes, offsets, spans):
        if len(row) != 4:
            return None
        x1, y1, x2, y2 = row
        w, h = x2 - x1, y2 - y1
        if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height and shape == [h, w, 1]
                and 0 <= offset and offset + h * w <= mask_bytes):
            return None
        ex1, ey1, odd = x1 & ~1, y1 & ~1, y1 & 1
        cols, block_rows = (((x2 + 1) & ~1) - ex1) >> 1, (((y2 + 1) & ~1) - ey1) >> 1
        if span is not None:   # as in nv12_compose_params
            first, end = span
            if not 0 <= first <= end <= h:
                return None
            skip = (first + odd) >> 1
            block_rows = ((end - 1 + odd) >> 1) - skip + 1 if end > first else 0
            ey1, odd = ey1 + 2 * skip, odd - 2 * skip
        max_cols, max_rows = max(max_cols, cols), max(max_rows, block_rows)
        table.append((cols, block_rows, ex1, ey1, x1 & 1, odd, w, h, offset & 0xFFFFFFFF,
                      offset >> 32))
    return table, _nv12_grid(max_cols, max_rows, n)


def pack_nv12_rows(rows: list[tuple[int, ...]], face_w: int, face_h: int) -> bytes:
    """compose_nv12.cu's table bytes of :func:`nv12_compose_rows_small` rows plus the face /
    box scales: the same bytes as ``nv12_compose_params(...).tobytes()`` (tests/
    test_kernel_args.py). face / box is a double division rounded to float32 by ``struct``,
    which equals the float32 division: double rounding is innocuous for a division when the
    wide format has at least 2 * 24 + 2 bits (53 here)."""
    return b"".join(struct.pack("<8i2I2f", *row, face_w / row[6], face_h / row[7])
                    for row in rows)


def box_extent(boxes: np.ndarray) -> tuple[int, int]:
    """Largest box (width, height) of a batch: the per-frame thread extent of compose.cu."""
    return int((boxes[:, 2] - boxes[:, 0]).max()), int((boxes[:, 3] - boxes[:, 1]).max())


def nv12_compose_grid(params: np.ndarray) -> tuple[int, int, int]:
    """compose_nv12.cu with :data:`NV12_COMPOSE_BLOCK`, from its :func:`nv12_compose_params`
    table (whose first two columns count each frame's 2x2 block columns and rows): a thread per
    column of :data:`NV12_COMPOSE_BLOCKS` 2x2 blocks of the box grown to even coordinates,
    z = frame."""
    return _nv12_grid(int(params[:, 0].max()), int(params[:, 1].max()), len(params))


def _nv12_grid(max_cols: int, max_rows: int, frames: int) -> tuple[int, int, int]:
    """compose_nv12.cu's grid for frames of at most max_cols x max_rows 2x2 blocks."""
    grid = (_ceil_div(max_cols, NV12_COMPOSE_BLOCK[0]),
            _ceil_div(_ceil_div(max_rows, NV12_COMPOSE_BLOCKS), NV12_COMPOSE_BLOCK[1]), frames)
    if grid[1] > MAX_GRID_YZ or grid[2] > MAX_GRID_YZ:
        raise ValueError(f"launch too large: grid {grid} (y and z are limited to {MAX_GRID_YZ})")
    return grid


def filter_grid(height: int, width: int, channels: int, batch: int) -> tuple[int, int, int]:
    """filter.cu: one block per TILE_X elements x TILE_Y rows."""
    grid = (_ceil_div(width * channels, FILTER_TILE[0]), _ceil_div(height, FILTER_TILE[1]),
            int(batch))
    if grid[1] > MAX_GRID_YZ or grid[2] > MAX_GRID_YZ:
        raise ValueError(f"launch too large: grid {grid}")
    return grid


def filter_smem_bytes(radius: int, channels: int) -> int:
    """Dynamic shared memory of filter.cu: the source tile + halo (bytes, padded to 16), then the
    uint16 vertical sums of its TILE_Y rows. Halo: R = max(radius, 3) rows and
    H = round_up(R * channels, 16) elements each side; shared row stride S = TILE_X + 2H."""
    tile_x, tile_y = FILTER_TILE
    rows = max(int(radius), FILTER_MIN_HALO)
    stride = tile_x + 2 * (-(-rows * int(channels) // 16) * 16)
    return ((tile_y + 2 * rows) * stride + 15) // 16 * 16 + tile_y * stride * 2
