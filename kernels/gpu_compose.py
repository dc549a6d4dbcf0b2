"""CuPy wrappers of the face resize, mask blend and fused compose kernels (compose.cu,
compose_nv12.cu).

Masks and box-sized faces of different sizes travel as :class:`talkrt.kernels.Packed` (one flat
buffer + per-frame offsets); lists of arrays are packed on the fly (host lists with one upload).
The in-place ops (blend, compose_*) write into ``frames`` when ``out`` is None; with ``out`` they
first copy ``frames`` into it (a full-frame copy) and compose there.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from . import _cuda, launch
from .colorspace import color_spec
from .gpu_ops import unsharp_mask
from .packing import Packed, empty_packed, pack_regions
from .validate import SharpenParams, as_image_batch, as_nv12_batch, check_boxes, check_out

__all__ = ["resize_to_boxes", "blend", "compose_rgb", "compose_nv12"]


def _device_packed(regions: Packed | Sequence[Any], channels: int, boxes: np.ndarray,
                   name: str, like: Any) -> Packed:
    """Validate against boxes and return a Packed whose data is on ``like``'s device."""
    cp = _cuda.require_cupy()
    packed = regions if isinstance(regions, Packed) else pack_regions(regions, channels, cp)
    if isinstance(packed.data, np.ndarray):   # host-packed: one upload
        packed = packed.with_data(_cuda.upload(packed.data))
    else:
        packed = packed.with_data(_cuda.adopt(packed.data, f"{name}.data"))
    packed.check_matches(boxes, channels, name)
    _cuda.same_device(like, {name: packed.data})
    return packed


def _faces(faces: Any, n: int, like: Any, sharpen: SharpenParams | None) -> Any:
    """Validated face batch [B, fh, fw, 3] on the frames' device, sharpened when asked.

    Sharpening is a separate small pass over the 256x256 faces (unsharp_mask, one launch)
    before the fused compose kernel reads them."""
    face_batch, _ = as_image_batch(_cuda.adopt(faces, "faces"), "faces")
    if face_batch.shape[0] != n:
        raise ValueError(f"faces has {face_batch.shape[0]} images for {n} frames")
    _cuda.same_device(like, {"faces": face_batch})
    if sharpen is None:
        return face_batch
    if not isinstance(sharpen, SharpenParams):
        raise TypeError(f"sharpen must be SharpenParams or None, got {type(sharpen).__name__}")
    return unsharp_mask(face_batch, amount=sharpen.amount, sigma=sharpen.sigma,
                        threshold=sharpen.threshold, ksize=sharpen.ksize)


def _in_place_target(frames: Any, single: bool, out: Any) -> tuple[Any, Any]:
    """(batched array to write, array to return): ``frames`` itself, or ``out`` after a copy."""
    cp = _cuda.require_cupy()
    if out is None:
        result = frames
    else:
        result = _cuda.adopt(out, "out")
        check_out(result, frames.shape)
        _cuda.same_device(frames, {"out": result})
        if _cuda.data_ptr(result) != _cuda.data_ptr(frames):
            if _cuda.overlaps(result, frames):
                raise ValueError("out partially overlaps the frames; pass the frames themselves "
                                 "or a separate array")
            cp.copyto(result, frames)
    return (result[None] if single else result), result


def resize_to_boxes(faces: Any, boxes: Any, *, out: Packed | None = None,
                    stream: Any = None) -> Packed:
    """Bilinear-resize faces[b] ([B, fh, fw, 3]) to the size of boxes[b] (OpenCV INTER_LINEAR
    half-pixel mapping, float32 weights: within +-1 of cv2.resize) -> :class:`Packed` regions
    [h_b, w_b, 3] on the device. One launch."""
    face_batch, _ = as_image_batch(_cuda.adopt(faces, "faces"), "faces")
    n, face_h, face_w, _ = face_batch.shape
    box_arr = check_boxes(boxes, n, None, None)
    with _cuda.on_device(face_batch, stream):
        if out is None:
            shapes = np.stack([box_arr[:, 3] - box_arr[:, 1], box_arr[:, 2] - box_arr[:, 0],
                               np.full(n, 3)], axis=1)
            out = empty_packed(shapes, _cuda.require_cupy())
        else:
            out = _device_packed(out, 3, box_arr, "out", face_batch)
        params = _cuda.upload(launch.box_params(box_arr, region_offsets=out.offsets))
        kernel = _cuda.get_kernel("compose.cu", "resize_to_boxes_kernel")
        _cuda.launch(kernel, launch.grid_2d(*launch.box_extent(box_arr), n), launch.BLOCK,
                     (face_batch, face_h, face_w, out.data, params))
    return out


def blend(frames: Any, faces_in_boxes: Packed | Sequence[Any], boxes: Any,
          masks: Packed | Sequence[Any], *, out: Any = None, stream: Any = None) -> Any:
    """Alpha-blend box-sized faces into frames [B, H, W, 3] inside the boxes, alpha = mask/255,
    in place (``out=None``): round_half_up((body*(255-m) + face*m)/255), exact. One launch."""
    frames = _cuda.adopt(frames, "frames")
    batch, single = as_image_batch(frames, "frames")
    n, height, width, _ = batch.shape
    box_arr = check_boxes(boxes, n, height, width)
    with _cuda.on_device(batch, stream):
        faces_p = _device_packed(faces_in_boxes, 3, box_arr, "faces_in_boxes", batch)
        masks_p = _device_packed(masks, 1, box_arr, "masks", batch)
        target, result = _in_place_target(frames, single, out)
        params = _cuda.upload(launch.box_params(box_arr, masks_p.offsets, faces_p.offsets))
        kernel = _cuda.get_kernel("compose.cu", "blend_kernel")
        _cuda.launch(kernel, launch.grid_2d(*launch.box_extent(box_arr), n), launch.BLOCK,
                     (target, height, width, faces_p.data, masks_p.data, params))
    return result


def compose_rgb(frames: Any, faces: Any, boxes: Any, masks: Packed | Sequence[Any], *,
                sharpen: SharpenParams | None = None, out: Any = None,
                stream: Any = None) -> Any:
    """Fused compose into RGB frames [B, H, W, 3], in place (``out=None``): optional unsharp
    of the faces (separate pass on the 256x256 faces), then ONE kernel that resizes each face
    bilinearly to its box and blends it with the mask. Only box pixels with mask > 0 are
    written."""
    frames = _cuda.adopt(frames, "frames")
    batch, single = as_image_batch(frames, "frames")
    n, height, width, _ = batch.shape
    box_arr = check_boxes(boxes, n, height, width)
    with _cuda.on_device(batch, stream):
        masks_p = _device_packed(masks, 1, box_arr, "masks", batch)
        face_batch = _faces(faces, n, batch, sharpen)
        target, result = _in_place_target(frames, single, out)
        params = _cuda.upload(launch.box_params(box_arr, masks_p.offsets))
        kernel = _cuda.get_kernel("compose.cu", "compose_rgb_kernel")
        _cuda.launch(kernel, launch.grid_2d(*launch.box_extent(box_arr), n), launch.BLOCK,
                     (target, height, width, face_batch, face_batch.shape[1],
                      face_batch.shape[2], masks_p.data, params))
    return result


def compose_nv12(nv12: Any, faces: Any, boxes: Any, masks: Packed | Sequence[Any], *,
                 matrix: str = "bt709", full_range: bool = False,
                 sharpen: SharpenParams | None = None, out: Any = None,
                 stream: Any = None) -> Any:
    """Fused compose straight into NV12 frames [B, H*3/2, W], in place (``out=None``).

    Optional unsharp of the 256x256 faces first (separate small pass), then ONE kernel
    (compose_nv12.cu) over the 2x2 blocks of the box grown to even coordinates: decode, resize
    the face bilinearly, blend with the mask, encode Y of the pixels with mask > 0 and the
    block's UV from the 2x2 mean of the blended RGB (mask-255 pixels skip the decode and blend).
    Blocks without a mask > 0 pixel, and Y of pixels with mask 0, are not touched. The per-frame
    table and the color coefficients go in the launch's parameter block (nothing is uploaded);
    batches over :data:`launch.NV12_TABLE_FRAMES` frames take one launch per that many. Equals
    :func:`talkrt.kernels.reference.compose_nv12` (``resize_impl="kernel"``) bit for bit."""
    nv12 = _cuda.adopt(nv12, "nv12")
    batch, single, height, width = as_nv12_batch(nv12)
    n = batch.shape[0]
    spec = color_spec(matrix, full_range)
    box_arr = check_boxes(boxes, n, height, width)
    with _cuda.on_device(batch, stream):
        masks_p = _device_packed(masks, 1, box_arr, "masks", batch)
        face_batch = _faces(faces, n, batch, sharpen)
        target, result = _in_place_target(nv12, single, out)
        if face_batch.shape[2] < 2:
            # compose_nv12.cu needs faces >= 2 pixels wide; a 1-pixel-wide face repeated to 2
            # resizes to the same values (every tap reads the same pixel)
            face_batch = face_batch.repeat(2, axis=2)
        face_h, face_w = int(face_batch.shape[1]), int(face_batch.shape[2])
        kernel = _cuda.get_kernel("compose_nv12.cu", "compose_nv12_kernel")
        params = launch.nv12_compose_params(box_arr, masks_p.offsets, face_w, face_h,
                                            masks_p.row_spans)
        step = launch.NV12_TABLE_FRAMES
        for start in range(0, n, step):
            part = params[start:start + step]
            frames, face_part = ((target, face_batch) if n <= step else
                                 (target[start:start + step], face_batch[start:start + step]))
            _cuda.launch(kernel, launch.nv12_compose_grid(part), launch.NV12_COMPOSE_BLOCK,
                         (frames, height, width, face_part, face_h, face_w, masks_p.data,
                          spec.decode_struct, spec.encode_struct,
                          launch.nv12_compose_table(part)))
    return result
