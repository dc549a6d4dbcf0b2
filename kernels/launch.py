"""Host-side launch arithmetic of the CUDA kernels: grids, parameter tables, shared memory.

Pure numpy, no CuPy, so CI exercises it; the GPU wrappers only upload or pass what these
functions build. The structs that the kernels take (by value, or as uploaded tables) are
declared in the ``.cu`` sources; the numpy dtypes here mirror them field for field, and the
CPU emulator checks every launch's argument sizes against the compiled structs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .gaussian import MAX_KSIZE
from .resize_tables import ResizePlan, plan_resize

__all__ = [
    "BLOCK", "COLOR_GROUP", "FILTER_TILE", "NV12_COMPOSE_BLOCKS", "NV12_COMPOSE_BLOCK",
    "NV12_TABLE_FRAMES", "FILTER_MAX_TAPS", "FRAME_BOX", "NV12_FRAME", "NV12_TABLE",
    "FILTER_TAPS", "grid_2d", "color_grid", "CropTables", "crop_tables", "box_params",
    "nv12_compose_params", "nv12_compose_table", "nv12_compose_grid", "filter_grid",
    "filter_taps", "filter_smem_bytes",
]

BLOCK = (32, 8, 1)          #: thread block of the talkrt kernels (but NV12_COMPOSE_BLOCK)
COLOR_GROUP = 8             #: pixels per thread and row in color.cu (GROUP)
FILTER_TILE = (256, 32)     #: (elements, rows) per block in filter.cu (TILE_X, TILE_Y)
FILTER_MIN_HALO = 3         #: filter.cu's halo rows never go below its fast-path radius
NV12_COMPOSE_BLOCKS = 2     #: 2x2 blocks per thread, stacked vertically (compose_nv12.cu)
#: compose_nv12.cu's thread block: ~56 registers per thread let 9 blocks of 128 threads share an
#: SM (36 warps) where only 4 of 256 threads (32 warps) would fit
NV12_COMPOSE_BLOCK = (32, 4, 1)
#: frames per compose_nv12 launch (compose_nv12.cu's NV12_TABLE_FRAMES): the table travels by
#: value in the kernel's 4 KB parameter block; larger batches take one launch per this many
NV12_TABLE_FRAMES = 64
FILTER_MAX_TAPS = MAX_KSIZE  #: filter.cu's MAX_TAPS
MAX_GRID_YZ = 65535

#: compose.cu's FrameBox, one per frame in an uploaded table
FRAME_BOX = np.dtype([("x1", "<i4"), ("y1", "<i4"), ("x2", "<i4"), ("y2", "<i4"),
                      ("mask_off", "<i8"), ("region_off", "<i8")])
#: compose_nv12.cu's NV12Frame (see there for the fields)
NV12_FRAME = np.dtype([("cols", "<i4"), ("rows", "<i4"), ("ex1", "<i4"), ("ey1", "<i4"),
                       ("x_odd", "<i4"), ("y_odd", "<i4"), ("w", "<i4"), ("h", "<i4"),
                       ("mask_off", "<i8"), ("scale_x", "<f4"), ("scale_y", "<f4")])
#: compose_nv12.cu's NV12ComposeTable, passed by value
NV12_TABLE = np.dtype([("frames", NV12_FRAME, (NV12_TABLE_FRAMES,))])
#: filter.cu's FilterTaps, passed by value
FILTER_TAPS = np.dtype([("w", "<i4", (FILTER_MAX_TAPS,))])


def _ceil_div(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _grid(x: int, y: int, z: int) -> tuple[int, int, int]:
    """A launch grid, checked against CUDA's limits (ValueError when y or z is too large)."""
    grid = (int(x), int(y), int(z))
    if grid[1] > MAX_GRID_YZ or grid[2] > MAX_GRID_YZ:
        raise ValueError(f"launch too large: grid {grid} (y and z are limited to {MAX_GRID_YZ})")
    return grid


def grid_2d(items_x: int, items_y: int, batch: int) -> tuple[int, int, int]:
    """Grid covering items_x x items_y threads per frame with :data:`BLOCK`, z = frame."""
    return _grid(_ceil_div(items_x, BLOCK[0]), _ceil_div(items_y, BLOCK[1]), batch)


def color_grid(height: int, width: int, batch: int) -> tuple[int, int, int]:
    """color.cu: one thread per :data:`COLOR_GROUP` pixels x 2 rows."""
    return grid_2d(_ceil_div(width, COLOR_GROUP), height // 2, batch)


@dataclass(frozen=True)
class CropTables:
    """crop_resize_kernel's tables in ONE int32 buffer (uploaded with a single copy):
    ``buffer[slices[name]]`` is its parameter ``name`` (resize.cu gives their shapes), the
    weights as float32 bits."""

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
    """compose.cu's table: :data:`FRAME_BOX` [B] from boxes [B, 4] and the packed offsets
    (0 where not given)."""
    boxes = np.asarray(boxes, np.int64)
    table = np.zeros(len(boxes), FRAME_BOX)
    for i, name in enumerate(("x1", "y1", "x2", "y2")):
        table[name] = boxes[:, i]
    if mask_offsets is not None:
        table["mask_off"] = mask_offsets
    if region_offsets is not None:
        table["region_off"] = region_offsets
    return table


def nv12_compose_params(boxes: np.ndarray, mask_offsets: np.ndarray, face_w: int,
                        face_h: int, row_spans: np.ndarray | None = None) -> np.ndarray:
    """compose_nv12.cu's per-frame records, :data:`NV12_FRAME` [B]: the 2x2 block grid of the
    box grown to even coordinates, the box, the mask offset and the float32 face / box scales
    (numpy's float32 division is IEEE, like __fdiv_rn).

    With ``row_spans`` ([B, 2], the mask rows [first, end) that may be non-zero) the block rows
    outside them are left out of the grid: the block rows start at the first one with a row in
    the span (ey1 moves down, y_odd becomes y1 & 1 - 2 * skipped: the kernel only uses it to
    map a block row to its box row) and end at the last such block row."""
    boxes = np.asarray(boxes, np.int64)
    x1, y1, x2, y2 = boxes.T
    ex1, ey1 = x1 & ~1, y1 & ~1
    w, h = x2 - x1, y2 - y1
    params = np.empty(len(boxes), NV12_FRAME)
    params["cols"] = (((x2 + 1) & ~1) - ex1) >> 1
    params["rows"] = (((y2 + 1) & ~1) - ey1) >> 1
    params["ex1"], params["ey1"] = ex1, ey1
    params["x_odd"], params["y_odd"] = x1 & 1, y1 & 1
    params["w"], params["h"] = w, h
    params["mask_off"] = mask_offsets
    params["scale_x"] = np.float32(face_w) / w.astype(np.float32)
    params["scale_y"] = np.float32(face_h) / h.astype(np.float32)
    if row_spans is not None:
        first, end = np.asarray(row_spans, np.int64).T
        odd = y1 & 1
        skip = (first + odd) >> 1                        # block rows above the span
        last = (end - 1 + odd) >> 1                      # the span's last block row
        params["rows"] = np.where(end > first, last - skip + 1, 0)
        params["ey1"] = ey1 + 2 * skip
        params["y_odd"] = odd - 2 * skip
    return params


def nv12_compose_table(params: np.ndarray) -> np.ndarray:
    """The by-value :data:`NV12_TABLE` (a 1-element array) holding up to
    :data:`NV12_TABLE_FRAMES` records of :func:`nv12_compose_params`; the rest stay zero."""
    if len(params) > NV12_TABLE_FRAMES:
        raise ValueError(f"{len(params)} frames for a table of {NV12_TABLE_FRAMES}")
    table = np.zeros(1, NV12_TABLE)
    table["frames"][0, :len(params)] = params
    return table


def box_extent(boxes: np.ndarray) -> tuple[int, int]:
    """Largest box (width, height) of a batch: the per-frame thread extent of compose.cu."""
    return int((boxes[:, 2] - boxes[:, 0]).max()), int((boxes[:, 3] - boxes[:, 1]).max())


def nv12_compose_grid(params: np.ndarray) -> tuple[int, int, int]:
    """compose_nv12.cu with :data:`NV12_COMPOSE_BLOCK` for :func:`nv12_compose_params` records:
    a thread per column of :data:`NV12_COMPOSE_BLOCKS` 2x2 blocks of the box grown to even
    coordinates, z = frame."""
    rows = _ceil_div(int(params["rows"].max()), NV12_COMPOSE_BLOCKS)
    return _grid(_ceil_div(int(params["cols"].max()), NV12_COMPOSE_BLOCK[0]),
                 _ceil_div(rows, NV12_COMPOSE_BLOCK[1]), len(params))


def filter_grid(height: int, width: int, channels: int, batch: int) -> tuple[int, int, int]:
    """filter.cu: one block per TILE_X elements x TILE_Y rows."""
    return _grid(_ceil_div(width * channels, FILTER_TILE[0]), _ceil_div(height, FILTER_TILE[1]),
                 batch)


def filter_taps(weights: Sequence[int]) -> np.ndarray:
    """The by-value :data:`FILTER_TAPS` (a 1-element array): ``weights`` (at most
    :data:`FILTER_MAX_TAPS`), zero-padded."""
    taps = np.zeros(1, FILTER_TAPS)
    taps["w"][0, :len(weights)] = weights
    return taps


def filter_smem_bytes(radius: int, channels: int) -> int:
    """Dynamic shared memory of filter.cu: the source tile + halo (bytes, padded to 16), then the
    uint16 vertical sums of its TILE_Y rows. Halo: R = max(radius, 3) rows and
    H = round_up(R * channels, 16) elements each side; shared row stride S = TILE_X + 2H."""
    tile_x, tile_y = FILTER_TILE
    rows = max(int(radius), FILTER_MIN_HALO)
    stride = tile_x + 2 * (-(-rows * int(channels) // 16) * 16)
    return ((tile_y + 2 * rows) * stride + 15) // 16 * 16 + tile_y * stride * 2
