"""Host-side launch arithmetic of the CUDA kernels: grids, parameter tables, shared memory.

Pure numpy, no CuPy, so CI exercises it; the GPU wrappers only upload what these functions
build. Each function documents the kernel layout it serves (see the .cu files).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .resize_tables import ResizePlan, plan_resize

__all__ = [
    "BLOCK", "COLOR_GROUP", "FILTER_TILE", "PARAM_STRIDE", "NV12_COMPOSE_BLOCKS",
    "NV12_COMPOSE_BLOCK", "NV12_PARAMS", "grid_2d", "color_grid", "CropTables", "crop_tables",
    "box_params", "nv12_compose_params", "nv12_compose_grid", "filter_grid",
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
                        face_h: int) -> np.ndarray:
    """compose_nv12.cu's params [B, 12] int32 (see there): per frame the 2x2 block grid of the
    box grown to even coordinates, the box, the mask offset and the float32 face / box scales
    (numpy's float32 division is IEEE, like __fdiv_rn)."""
    boxes = np.asarray(boxes, np.int64)
    x1, y1, x2, y2 = boxes.T
    ex1, ey1 = x1 & ~1, y1 & ~1
    params = np.zeros((len(boxes), NV12_PARAMS), np.int32)
    params[:, 0] = (((x2 + 1) & ~1) - ex1) // 2
    params[:, 1] = (((y2 + 1) & ~1) - ey1) // 2
    params[:, 2], params[:, 3] = ex1, ey1
    params[:, 4], params[:, 5] = x1 & 1, y1 & 1
    params[:, 6], params[:, 7] = x2 - x1, y2 - y1
    offsets = np.asarray(mask_offsets, np.int64)
    params[:, 8] = (offsets & 0xFFFFFFFF).astype(np.uint32).view(np.int32)
    params[:, 9] = (offsets >> 32).astype(np.int32)
    params[:, 10] = (np.float32(face_w) / (x2 - x1).astype(np.float32)).view(np.int32)
    params[:, 11] = (np.float32(face_h) / (y2 - y1).astype(np.float32)).view(np.int32)
    return params


def box_extent(boxes: np.ndarray) -> tuple[int, int]:
    """Largest box (width, height) of a batch: the per-frame thread extent of compose.cu."""
    return int((boxes[:, 2] - boxes[:, 0]).max()), int((boxes[:, 3] - boxes[:, 1]).max())


def nv12_compose_grid(params: np.ndarray) -> tuple[int, int, int]:
    """compose_nv12.cu with :data:`NV12_COMPOSE_BLOCK`, from its :func:`nv12_compose_params`
    table (whose first two columns count each frame's 2x2 block columns and rows): a thread per
    column of :data:`NV12_COMPOSE_BLOCKS` 2x2 blocks of the box grown to even coordinates,
    z = frame."""
    cols, rows = int(params[:, 0].max()), int(params[:, 1].max())
    grid = (_ceil_div(cols, NV12_COMPOSE_BLOCK[0]),
            _ceil_div(_ceil_div(rows, NV12_COMPOSE_BLOCKS), NV12_COMPOSE_BLOCK[1]), len(params))
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
