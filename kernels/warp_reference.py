"""CPU references of the affine face warps (LatentSync's aligned crop and restore); the
definition warp.cu is tested against, and the CPU implementation.

Same signatures as :mod:`talkrt.kernels.gpu_warp` (``stream`` accepted and ignored). Frames
without a face carry an all-zero ``to_crop`` affine: their crop is 127 grey and the restore
leaves them alone. The arithmetic (float32, in the kernels' order; records from
:mod:`talkrt.kernels.warp_launch`):

* **crop** (``warp_crop_rgb`` / ``warp_crop_nv12``): crop pixel (u, v) averages nu x nv
  bilinear samples of the frame at ``inverse(to_crop) (u + (i + 0.5) / nu - 0.5, ...)``, taps
  outside the frame read 127; NV12 frames are read as ``reference.nv12_to_rgb`` decodes them.
  Rounded half up.
* **restore** (``restore_rgb`` / ``restore_nv12``): frame pixel p maps to crop pixel
  (u, v) = to_crop(p); its weight is ``m = round(feather_u * feather_v * paste(u, v))`` (paste
  bilinear, edges replicated), the face sample is the mean of nx x ny bilinear samples of
  ``faces[b]`` spread over the pixel (as the crop's taps) rounded to uint8, and the frame pixel
  becomes ``reference.blend_region(body, face, m)``. NV12: the chroma
  rule of ``reference.compose_nv12`` (``reference.blend_nv12_box``) on the region.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import warp_launch as wl
from .reference import _finish, _host, _round_u8, _target, blend_nv12_box, blend_region, nv12_to_rgb
from .validate import as_image_batch, as_nv12_batch

__all__ = ["warp_crop_rgb", "warp_crop_nv12", "restore_rgb", "restore_nv12"]

_F = np.float32


def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    return a + t * (b - a)


def _floor_frac(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.floor(x)
    return f.astype(np.int64), x - f


def _tap_offset(i: int, n: int) -> np.float32:
    """Sub-pixel offset (2i + 1) / (2n) - 0.5 of supersampling tap i of n (float32)."""
    return _F(2 * i + 1) / _F(2 * n) - _F(0.5)


def _sample_clamped(img: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear samples float32 [..., C] of an [S, S, C] image at (u, v), edges replicated."""
    size = img.shape[0]
    u0, fu = _floor_frac(u)
    v0, fv = _floor_frac(v)
    i0, i1 = np.clip(u0, 0, size - 1), np.clip(u0 + 1, 0, size - 1)
    j0, j1 = np.clip(v0, 0, size - 1), np.clip(v0 + 1, 0, size - 1)
    img = img.astype(_F)
    fu, fv = fu[..., None], fv[..., None]
    return _lerp(_lerp(img[j0, i0], img[j0, i1], fu), _lerp(img[j1, i0], img[j1, i1], fu), fv)


def _crop_frame(rgb: np.ndarray, rec: np.void, size: int) -> np.ndarray:
    """One crop [S, S, 3] from one RGB frame [H, W, 3] (the kernel's order of operations)."""
    nu, nv = int(rec["nu"]), int(rec["nv"])
    if nu == 0:
        return np.full((size, size, 3), wl.FILL_VALUE, np.uint8)
    m = rec["m"].astype(_F)
    height, width = rgb.shape[:2]
    padded = np.full((height + 2, width + 2, 3), wl.FILL_VALUE, _F)   # 127 outside the frame
    padded[1:-1, 1:-1] = rgb
    uf = np.arange(size, dtype=_F)[None, :]
    vf = np.arange(size, dtype=_F)[:, None]
    acc = None
    for j in range(nv):
        vv = vf + _tap_offset(j, nv)
        for i in range(nu):
            uu = uf + _tap_offset(i, nu)
            x = (m[0] * uu + m[1] * vv) + m[2]
            y = (m[3] * uu + m[4] * vv) + m[5]
            x0, fx = _floor_frac(x)
            y0, fy = _floor_frac(y)
            # padded index of frame pixel k is k + 1; everything past the frame reads the border
            xa, xb = np.clip(x0 + 1, 0, width + 1), np.clip(x0 + 2, 0, width + 1)
            ya, yb = np.clip(y0 + 1, 0, height + 1), np.clip(y0 + 2, 0, height + 1)
            fx, fy = fx[..., None], fy[..., None]
            val = _lerp(_lerp(padded[ya, xa], padded[ya, xb], fx),
                        _lerp(padded[yb, xa], padded[yb, xb], fx), fy)
            acc = val if acc is None else acc + val
    return _round_u8(acc / _F(nu * nv))


def warp_crop_rgb(frames: Any, to_crop: Any, *, size: int = 512, out: Any = None,
                  stream: Any = None) -> np.ndarray:
    """Aligned crops [B, S, S, 3] uint8 of RGB frames [B, H, W, 3] (or one [H, W, 3]) for the
    frame -> crop affines ``to_crop`` [B, 2, 3]."""
    batch, single = as_image_batch(_host(frames, "frames"), "frames")
    size = wl.check_size(size)
    params = wl.crop_params(wl.check_affines(to_crop, batch.shape[0]), size)
    result = np.stack([_crop_frame(batch[i], params[i], size) for i in range(batch.shape[0])])
    return _finish(result, out, single)


def warp_crop_nv12(nv12: Any, to_crop: Any, *, size: int = 512, matrix: str = "bt709",
                   full_range: bool = False, out: Any = None, stream: Any = None) -> np.ndarray:
    """:func:`warp_crop_rgb` of NV12 frames [B, H*3/2, W] (RGB crops)."""
    batch, single, _, _ = as_nv12_batch(_host(nv12, "nv12"))
    size = wl.check_size(size)
    params = wl.crop_params(wl.check_affines(to_crop, batch.shape[0]), size)
    rgb = nv12_to_rgb(batch, matrix=matrix, full_range=full_range)
    result = np.stack([_crop_frame(rgb[i], params[i], size) for i in range(batch.shape[0])])
    return _finish(result, out, single)


def _restore_region(rec: np.void, face: np.ndarray, paste: np.ndarray, profile: np.ndarray,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(weights uint8 [h, w], face samples uint8 [h, w, 3]) of one frame's region."""
    size = face.shape[0]
    a = rec["a"].astype(_F)
    x1, y1, w, h = (int(rec[k]) for k in ("x1", "y1", "w", "h"))
    xf = np.arange(x1, x1 + w, dtype=_F)[None, :]
    yf = np.arange(y1, y1 + h, dtype=_F)[:, None]
    u = (a[0] * xf + a[1] * yf) + a[2]
    v = (a[3] * xf + a[4] * yf) + a[5]
    far = _F(size) - _F(0.5)

    def feather(d: np.ndarray, scale: np.float32) -> np.ndarray:
        t = np.minimum(np.maximum(d * scale + _F(rec["off"]), _F(0)), _F(wl.FEATHER_TAPS - 1))
        i = np.minimum(np.floor(t).astype(np.int64), wl.FEATHER_TAPS - 2)
        return _lerp(profile[i], profile[i + 1], t - i.astype(_F))

    weight = (feather(np.minimum(u + _F(0.5), far - u), _F(rec["su"]))
              * feather(np.minimum(v + _F(0.5), far - v), _F(rec["sv"])))
    m = _round_u8(weight * _sample_clamped(paste[..., None], u, v)[..., 0])
    m[~(weight > 0)] = 0
    nx, ny = int(rec["nx"]), int(rec["ny"])
    acc = None
    for j in range(ny):
        ys = yf + _tap_offset(j, ny)
        for i in range(nx):
            xs = xf + _tap_offset(i, nx)
            val = _sample_clamped(face, (a[0] * xs + a[1] * ys) + a[2], (a[3] * xs + a[4] * ys) + a[5])
            acc = val if acc is None else acc + val
    return m, _round_u8(acc / _F(nx * ny))


def _regions(faces: Any, to_crop: Any, paste: Any, n: int, height: int, width: int, even: bool):
    """Per frame with a region: (index, box (x1, y1, x2, y2), weights [h, w], face samples)."""
    paste = _host(paste, "paste")
    face_batch, size = wl.check_faces(_host(faces, "faces"), paste, n)
    params = wl.restore_params(wl.check_affines(to_crop, n), size, height, width, even=even)
    profile = wl.feather_profile()
    for i, rec in enumerate(params):
        if rec["w"] > 0:
            m, face = _restore_region(rec, face_batch[i], paste, profile)
            x1, y1 = int(rec["x1"]), int(rec["y1"])
            yield i, (x1, y1, x1 + m.shape[1], y1 + m.shape[0]), m, face


def restore_rgb(frames: Any, faces: Any, to_crop: Any, paste: Any, *, out: Any = None,
                stream: Any = None) -> np.ndarray:
    """Warp the generated faces [B, S, S, 3] back into RGB frames [B, H, W, 3] with the
    feathered paste mask [S, S] (255 = the generated face), in place when ``out`` is None."""
    frames = _host(frames, "frames")
    batch, single = as_image_batch(frames, "frames")
    n, height, width, _ = batch.shape
    regions = list(_regions(faces, to_crop, paste, n, height, width, even=False))
    target, result = _target(frames, single, out)
    for i, (x1, y1, x2, y2), m, face in regions:
        target[i, y1:y2, x1:x2] = blend_region(target[i, y1:y2, x1:x2], face, m)
    return result


def restore_nv12(nv12: Any, faces: Any, to_crop: Any, paste: Any, *, matrix: str = "bt709",
                 full_range: bool = False, out: Any = None, stream: Any = None) -> np.ndarray:
    """:func:`restore_rgb` straight into NV12 frames [B, H*3/2, W], in place when ``out`` is
    None: Y of pixels with weight > 0 and UV of 2x2 blocks with any such pixel change, UV from
    the block's blended RGB mean (``reference.compose_nv12``'s rule)."""
    nv12 = _host(nv12, "nv12")
    batch, single, height, width = as_nv12_batch(nv12)
    regions = list(_regions(faces, to_crop, paste, batch.shape[0], height, width, even=True))
    target, result = _target(nv12, single, out)
    for i, box, m, face in regions:
        blend_nv12_box(target[i], height, box, face, m, matrix, full_range)
    return result
