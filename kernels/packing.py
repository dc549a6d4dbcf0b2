"""Variable-size per-frame regions (blend masks, faces resized to their box) in one flat buffer.

Frame b's region has shape (h_b, w_b) for masks or (h_b, w_b, c) for images and lives at
``data[offsets[b] : offsets[b] + h_b*w_b*c]`` (C order). Offsets are multiples of 16 bytes.
``data`` is a 1-D uint8 numpy or CuPy array; ``offsets`` and ``shapes`` stay on the host so that
wrappers can validate them without a device round trip. Masks packed by :func:`pack_masks` also
carry ``row_spans``: per region the rows [first, end) outside which every value is 0, so that
compose_nv12 launches no threads for the rows it would leave alone (MuseTalk's masks are 0 over
the upper part of the face box).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .validate import check_uint8

__all__ = ["Packed", "pack_regions", "pack_masks", "mask_row_spans", "empty_packed",
           "packed_layout"]

ALIGN = 16


@dataclass
class Packed:
    """Per-frame regions of different sizes in one flat uint8 buffer (see module docstring)."""

    data: Any            # 1-D uint8, numpy or CuPy
    offsets: np.ndarray  # int64 [B]
    shapes: np.ndarray   # int64 [B, 3]: (h, w, c)
    row_spans: np.ndarray | None = None   # int64 [B, 2]: rows [first, end) may be non-zero

    def select(self, indices: Any) -> "Packed":
        """The regions ``indices`` (an index array) of the same buffer, in that order."""
        spans = None if self.row_spans is None else self.row_spans[indices]
        return Packed(self.data, self.offsets[indices], self.shapes[indices], spans)

    def with_data(self, data: Any) -> "Packed":
        """The same layout over another buffer (e.g. ``data`` copied to the GPU)."""
        return dataclasses.replace(self, data=data)

    def __len__(self) -> int:
        return int(self.shapes.shape[0])

    @property
    def channels(self) -> int:
        return int(self.shapes[0, 2]) if len(self) else 0

    def region(self, index: int) -> Any:
        """View of frame ``index``'s region: [h, w] when c == 1, else [h, w, c]."""
        h, w, c = (int(v) for v in self.shapes[index])
        start = int(self.offsets[index])
        flat = self.data[start:start + h * w * c]
        return flat.reshape((h, w) if c == 1 else (h, w, c))

    def regions(self) -> list[Any]:
        return [self.region(i) for i in range(len(self))]

    def check_matches(self, boxes: np.ndarray, channels: int, name: str) -> None:
        """Require one region per box of exactly the box size with ``channels`` channels."""
        check_uint8(self.data, f"{name}.data")
        if self.data.ndim != 1:
            raise ValueError(f"{name}.data must be 1-D, got {self.data.ndim}-D")
        if len(self) != len(boxes):
            raise ValueError(f"{name} has {len(self)} regions for {len(boxes)} boxes")
        want = np.empty((len(boxes), 3), np.int64)   # (h, w, c) of each box
        want[:, 0] = boxes[:, 3] - boxes[:, 1]
        want[:, 1] = boxes[:, 2] - boxes[:, 0]
        want[:, 2] = channels
        bad = (self.shapes != want).any(axis=1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{name}[{i}] has shape {tuple(int(v) for v in self.shapes[i])} "
                             f"(h, w, c) but box {i} needs {tuple(int(v) for v in want[i])}")
        ends = self.offsets + want.prod(axis=1)
        if (self.offsets < 0).any() or (ends > self.data.shape[0]).any():
            raise ValueError(f"{name}: a region lies outside its data buffer "
                             f"({self.data.shape[0]} bytes)")
        if self.row_spans is not None:
            spans = np.asarray(self.row_spans)
            if spans.shape != (len(boxes), 2) or (spans[:, 0] < 0).any() or \
                    (spans[:, 0] > spans[:, 1]).any() or (spans[:, 1] > want[:, 0]).any():
                raise ValueError(f"{name}.row_spans must be [B, 2] rows 0 <= first <= end <= h "
                                 "of each region")


def packed_layout(shapes: np.ndarray) -> tuple[np.ndarray, int]:
    """16-byte aligned offsets for regions of ``shapes`` [B, 3]; returns (offsets, total bytes)."""
    sizes = np.asarray(shapes, np.int64).prod(axis=1)
    padded = (sizes + ALIGN - 1) // ALIGN * ALIGN
    offsets = np.zeros(len(sizes), np.int64)
    if len(sizes) > 1:
        offsets[1:] = np.cumsum(padded[:-1])
    return offsets, int(padded.sum())


def empty_packed(shapes: np.ndarray, xp: Any = np) -> Packed:
    """Uninitialised :class:`Packed` for regions of ``shapes`` [B, 3] (xp = numpy or cupy)."""
    shapes = np.asarray(shapes, np.int64).reshape(-1, 3)
    offsets, total = packed_layout(shapes)
    return Packed(xp.empty(max(total, 1), dtype=np.uint8), offsets, shapes)


def _is_cupy(array: Any) -> bool:
    return type(array).__module__.split(".")[0] == "cupy"


def pack_regions(regions: Sequence[Any], channels: int | None = None, xp: Any = None) -> Packed:
    """Pack uint8 regions ([h, w] or [h, w, c], numpy or CuPy) into one :class:`Packed`.

    Args:
        regions: one array per frame, all with the same number of channels.
        channels: expected channels (1 for [h, w] masks); inferred from the first region if None.
        xp: ``numpy`` or ``cupy`` for the packed buffer; default: CuPy if any region is CuPy.
    """
    if isinstance(regions, Packed):
        return regions
    if len(regions) == 0:
        raise ValueError("cannot pack an empty list of regions")
    shapes = []
    for i, region in enumerate(regions):
        check_uint8(region, f"regions[{i}]")
        if region.ndim == 2:
            shape = (*region.shape, 1)
        elif region.ndim == 3:
            shape = tuple(region.shape)
        else:
            raise ValueError(f"regions[{i}] must be [h, w] or [h, w, c], got shape {region.shape}")
        if channels is None:
            channels = shape[2]
        if shape[2] != channels:
            raise ValueError(f"regions[{i}] has {shape[2]} channels, expected {channels}")
        shapes.append(shape)
    all_host = not any(_is_cupy(r) for r in regions)
    if xp is None and not all_host:
        import cupy as xp  # noqa: PLC0415 - only reached when CuPy arrays were passed
    fill_xp = np if all_host else xp
    packed = empty_packed(np.asarray(shapes, np.int64), fill_xp)
    for i, region in enumerate(regions):
        start = int(packed.offsets[i])
        flat = region.reshape(-1)
        if fill_xp is not np and not _is_cupy(flat):
            flat = fill_xp.asarray(flat)
        elif fill_xp is np and _is_cupy(flat):
            flat = flat.get()
        packed.data[start:start + flat.shape[0]] = flat
    if xp is not None and xp is not fill_xp:
        packed.data = xp.asarray(packed.data)   # one host -> device copy
    return packed


def pack_masks(masks: Sequence[Any] | Packed, xp: Any = None) -> Packed:
    """Pack per-frame blend masks ([h_b, w_b] uint8, numpy or CuPy) into one :class:`Packed`,
    with each mask's span of rows that hold a non-zero value (``row_spans``)."""
    if isinstance(masks, Packed):
        if masks.channels not in (0, 1):
            raise ValueError(f"masks must have 1 channel, got {masks.channels}")
        return masks
    packed = pack_regions(masks, channels=1, xp=xp)
    return dataclasses.replace(packed, row_spans=mask_row_spans(masks))


def mask_row_spans(masks: Sequence[Any]) -> np.ndarray:
    """int64 [B, 2]: for each mask the rows [first, end) outside which it is all 0 ((0, 0) for
    a mask of zeros). One small reduction per CuPy mask, then a copy of its row flags."""
    spans = np.zeros((len(masks), 2), np.int64)
    for i, mask in enumerate(masks):
        if mask.size == 0:
            continue
        rows = mask.reshape(mask.shape[0], -1).any(axis=1)
        rows = rows.get() if _is_cupy(rows) else np.asarray(rows)
        nonzero = np.flatnonzero(rows)
        if nonzero.size:
            spans[i] = nonzero[0], nonzero[-1] + 1
    return spans
