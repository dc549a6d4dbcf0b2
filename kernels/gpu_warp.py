"""CuPy wrappers of the affine face warps (warp.cu): LatentSync's aligned crop cut from RGB or
NV12 frames, and the generated face warped back with the feathered mask, in place.

Same signatures and results as :mod:`talkrt.kernels.warp_reference` (bit for bit). Frames are
CuPy arrays or CUDA tensors (DLPack, no copy); the affines are host arrays (the per-frame records
travel in the launch's parameter block: nothing is uploaded for them); ``paste`` may be a host
array (uploaded on each call) or, better, a device array kept by the caller. One launch per
:data:`talkrt.kernels.warp_launch.WARP_TABLE_FRAMES` frames.

Why a kernel rather than ``torch.nn.functional.grid_sample``: grid_sample needs the whole frame
as float RGB (an NV12 -> RGB pass and a float copy of every frame), has no prefilter when the
crop shrinks the face, and rounds differently from the CPU path; the kernel reads only the
pixels its taps touch, straight from NV12, and equals the reference exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _cuda
from . import warp_launch as wl
from .colorspace import color_spec
from .gpu_compose import _in_place_target
from .gpu_ops import _output
from .validate import as_image_batch, as_nv12_batch

__all__ = ["warp_crop_rgb", "warp_crop_nv12", "restore_rgb", "restore_nv12"]


def _crop(frames: Any, single: bool, height: int, width: int, to_crop: Any, size: int,
          out: Any, stream: Any, kernel_name: str, extra: tuple) -> Any:
    n = frames.shape[0]
    size = wl.check_size(size)
    params = wl.crop_params(wl.check_affines(to_crop, n), size)
    with _cuda.on_device(frames, stream):
        target, result = _output(out, (n, size, size, 3), single, frames)
        kernel = _cuda.get_kernel("warp.cu", kernel_name)
        step = wl.WARP_TABLE_FRAMES
        for start in range(0, n, step):
            part = params[start:start + step]
            src, dst = ((frames, target) if n <= step else
                        (frames[start:start + step], target[start:start + step]))
            _cuda.launch(kernel, wl.crop_grid(size, len(part)), wl.BLOCK,
                         (src, height, width, dst, size, *extra, wl.table(part, wl.CROP_TABLE)))
    return result


def warp_crop_rgb(frames: Any, to_crop: Any, *, size: int = 512, out: Any = None,
                  stream: Any = None) -> Any:
    """Aligned crops [B, S, S, 3] uint8 of RGB frames [B, H, W, 3] (or one [H, W, 3]) for the
    frame -> crop affines ``to_crop`` [B, 2, 3] (host). One launch per 32 frames."""
    frames = _cuda.adopt(frames, "frames")
    batch, single = as_image_batch(frames, "frames")
    return _crop(batch, single, batch.shape[1], batch.shape[2], to_crop, size, out, stream,
                 "warp_crop_rgb_kernel", ())


def warp_crop_nv12(nv12: Any, to_crop: Any, *, size: int = 512, matrix: str = "bt709",
                   full_range: bool = False, out: Any = None, stream: Any = None) -> Any:
    """Aligned RGB crops [B, S, S, 3] straight from NV12 frames [B, H*3/2, W] (each tap decodes
    its pixel as ``nv12_to_rgb`` does). One launch per 32 frames."""
    nv12 = _cuda.adopt(nv12, "nv12")
    batch, single, height, width = as_nv12_batch(nv12)
    return _crop(batch, single, height, width, to_crop, size, out, stream,
                 "warp_crop_nv12_kernel", (color_spec(matrix, full_range).decode_struct,))


def _device_paste(paste: Any, like: Any) -> Any:
    if isinstance(paste, np.ndarray):
        return _cuda.upload(np.ascontiguousarray(paste))
    paste = _cuda.adopt(paste, "paste")
    _cuda.same_device(like, {"paste": paste})
    return paste


def _restore(original: Any, frames: Any, single: bool, height: int, width: int, faces: Any,
             to_crop: Any, paste: Any, out: Any, stream: Any, nv12: bool, extra: tuple) -> Any:
    n = frames.shape[0]
    face_batch, _ = as_image_batch(_cuda.adopt(faces, "faces"), "faces")
    with _cuda.on_device(frames, stream):
        paste_dev = _device_paste(paste, frames)
        face_batch, size = wl.check_faces(face_batch, paste_dev, n)
        _cuda.same_device(frames, {"faces": face_batch})
        params = wl.restore_params(wl.check_affines(to_crop, n), size, height, width, even=nv12)
        target, result = _in_place_target(original, single, out)
        name = "restore_nv12_kernel" if nv12 else "restore_rgb_kernel"
        kernel = _cuda.get_kernel("warp.cu", name)
        feather = wl.feather_table()
        step = wl.WARP_TABLE_FRAMES
        for start in range(0, n, step):
            part = params[start:start + step]
            dst, src = ((target, face_batch) if n <= step else
                        (target[start:start + step], face_batch[start:start + step]))
            _cuda.launch(kernel, wl.restore_grid(part, nv12), wl.BLOCK,
                         (dst, height, width, src, size, paste_dev, *extra, feather,
                          wl.table(part, wl.RESTORE_TABLE)))
    return result


def restore_rgb(frames: Any, faces: Any, to_crop: Any, paste: Any, *, out: Any = None,
                stream: Any = None) -> Any:
    """Warp generated faces [B, S, S, 3] back into RGB frames [B, H, W, 3] with the feathered
    paste mask [S, S] uint8 (255 = generated face), in place when ``out`` is None."""
    frames = _cuda.adopt(frames, "frames")
    batch, single = as_image_batch(frames, "frames")
    return _restore(frames, batch, single, batch.shape[1], batch.shape[2], faces, to_crop, paste,
                    out, stream, False, ())


def restore_nv12(nv12: Any, faces: Any, to_crop: Any, paste: Any, *, matrix: str = "bt709",
                 full_range: bool = False, out: Any = None, stream: Any = None) -> Any:
    """:func:`restore_rgb` straight into NV12 frames [B, H*3/2, W], in place when ``out`` is
    None (compose_nv12's chroma rule, kernels/README.md)."""
    nv12 = _cuda.adopt(nv12, "nv12")
    batch, single, height, width = as_nv12_batch(nv12)
    spec = color_spec(matrix, full_range)
    return _restore(nv12, batch, single, height, width, faces, to_crop, paste, out, stream, True,
                    (spec.decode_struct, spec.encode_struct))
