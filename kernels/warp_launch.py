"""Host side of the affine face warps (warp.cu): per-frame records, the feather, grids.

Pure numpy (no CuPy): the CPU references (:mod:`talkrt.kernels.warp_reference`) evaluate the
same float32 records as the kernels, so both sides start from identical numbers.

**Crop** (crop pixel -> frame pixel): each crop pixel averages ``nu x nv`` bilinear taps spread
over the pixel, ``n = clamp(ceil(frame pixels per crop pixel along that axis), 1, 8)``: one tap
when the crop enlarges the frame, a box prefilter over the pixel's footprint when it shrinks it.
Outside the frame a tap reads 127 (upstream's kornia fill value). The restore samples the
generated face the same way, ``nx x ny`` taps per frame pixel by the crop pixels per frame pixel
(upstream shrinks the face with an antialiased resize to 420 x 560 before its bilinear warp).

**Feather** of the restore (upstream: ``AlignRestore.restore_img`` in LatentSync's
``latentsync/utils/affine_transform.py``): the crop's footprint in the frame, a rectangle of
``Wf x Hf`` frame pixels, eroded by about ``w = sqrt(Wf * Hf) / 20`` and Gaussian-blurred with
OpenCV's sigma for a ``2w + 1`` kernel, ``sigma = 0.3 * w + 0.5``. talkrt evaluates that in
closed form: the isotropic blur of a rectangle factors along its own axes into two edge
profiles, each the Gaussian CDF truncated at +-3 sigma (renormalised: 0 and 1 exactly), centred
``e = max(w, 3 sigma + 0.5)`` frame pixels inside the edge, so the weight is 0 at least half a
pixel inside the footprint. Against upstream (tests/test_latentsync_face.py measures it): the
weights agree within 0.04 on average across the ramp for w = 18; below w ~ 15 (footprints under
~300 px) upstream's kernel cuts its Gaussian at w < 3 sigma and talkrt's ramp sits about a pixel
further in; upstream's ``w`` is an integer, ``int(sqrt(area)) // 20``, talkrt's is continuous
so the width does not jump as a face changes size. The profile is tabulated at
:data:`FEATHER_TAPS` points and interpolated linearly (error < 2e-4).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .validate import as_image_batch

__all__ = ["WARP_TABLE_FRAMES", "FEATHER_TAPS", "FEATHER_TRUNCATE", "MAX_TAPS", "FILL_VALUE",
           "CROP_FRAME", "CROP_TABLE", "RESTORE_FRAME", "RESTORE_TABLE", "FEATHER_TABLE",
           "check_affines", "check_size", "check_faces", "crop_params", "restore_params",
           "feather_geometry", "feather_profile", "feather_table", "table", "crop_grid",
           "restore_grid"]

WARP_TABLE_FRAMES = 32   #: frames per launch (warp.cu's WARP_TABLE_FRAMES): tables travel by value
FEATHER_TAPS = 129       #: feather profile samples (warp.cu's FEATHER_TAPS)
FEATHER_TRUNCATE = 3.0   #: the profile spans +-3 sigma
MAX_TAPS = 8             #: supersampling taps per axis at most
FILL_VALUE = 127         #: crop value outside the frame
BLOCK = (32, 8, 1)

#: warp.cu's CropFrame
CROP_FRAME = np.dtype([("m", "<f4", (6,)), ("nu", "<i4"), ("nv", "<i4")])
CROP_TABLE = np.dtype([("frames", CROP_FRAME, (WARP_TABLE_FRAMES,))])
#: warp.cu's RestoreFrame (64 bytes, 16-byte aligned)
RESTORE_FRAME = np.dtype([("a", "<f4", (6,)), ("su", "<f4"), ("sv", "<f4"), ("off", "<f4"),
                          ("x1", "<i4"), ("y1", "<i4"), ("w", "<i4"), ("h", "<i4"),
                          ("nx", "<i4"), ("ny", "<i4"), ("pad", "<i4")])
RESTORE_TABLE = np.dtype([("frames", RESTORE_FRAME, (WARP_TABLE_FRAMES,))])
#: warp.cu's FeatherTable
FEATHER_TABLE = np.dtype([("p", "<f4", (FEATHER_TAPS,))])


def check_affines(affines: Any, batch: int, name: str = "to_crop") -> np.ndarray:
    """Validate per-frame affines ([2, 3] when batch == 1, or [B, 2, 3]; host or CuPy) and
    return float64 [B, 2, 3]. An all-zero affine marks a frame without a face.

    Raises:
        TypeError / ValueError: not numbers, wrong shape, non-finite or singular.
    """
    if hasattr(affines, "get") and not isinstance(affines, np.ndarray):  # CuPy -> host
        affines = affines.get()
    arr = np.asarray(affines)
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"{name} must hold numbers, got dtype {arr.dtype}")
    if arr.shape == (2, 3) and batch == 1:
        arr = arr[None]
    if arr.shape != (batch, 2, 3):
        raise ValueError(f"{name} must have shape [{batch}, 2, 3] (one affine per frame), got "
                         f"{list(arr.shape)}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    det = arr[:, 0, 0] * arr[:, 1, 1] - arr[:, 0, 1] * arr[:, 1, 0]
    bad = (np.abs(det) < 1e-12) & arr.any(axis=(1, 2))
    if bad.any():
        raise ValueError(f"{name}[{int(np.flatnonzero(bad)[0])}] is singular")
    return arr


def check_size(size: Any) -> int:
    """A crop size S (int in [2, 8192]), else ValueError."""
    if not isinstance(size, (int, np.integer)) or not 2 <= int(size) <= 8192:
        raise ValueError(f"size must be an int in [2, 8192], got {size!r}")
    return int(size)


def check_faces(faces: Any, paste: Any, batch: int) -> tuple[Any, int]:
    """Validate generated faces [B, S, S, 3] (or [S, S, 3] when batch == 1) and the paste mask
    [S, S] uint8 (numpy or CuPy). Returns (faces as [B, S, S, 3], S)."""
    face_batch, _ = as_image_batch(faces, "faces")
    if face_batch.shape[0] != batch:
        raise ValueError(f"faces has {face_batch.shape[0]} images for {batch} frames")
    size = int(face_batch.shape[1])
    if face_batch.shape[2] != size or size < 2:
        raise ValueError(f"faces must be square crops [B, S, S, 3], got {list(face_batch.shape)}")
    if getattr(paste, "dtype", None) != np.uint8 or tuple(paste.shape) != (size, size):
        raise ValueError(f"paste must be a uint8 [{size}, {size}] mask, got "
                         f"{getattr(paste, 'dtype', type(paste).__name__)} {list(getattr(paste, 'shape', []))}")
    if not paste.flags.c_contiguous:
        raise ValueError("paste must be C-contiguous")
    return face_batch, size


def _inverse(affine: np.ndarray) -> np.ndarray:
    lin = affine[:, :2]
    inv = np.linalg.inv(lin)
    return np.concatenate([inv, -(inv @ affine[:, 2:])], axis=1)


def _taps(affine: np.ndarray, axis: int) -> int:
    """Supersampling taps along source ``axis`` of an affine: clamp(ceil(how many output
    pixels one source pixel step spans), 1, MAX_TAPS)."""
    return min(MAX_TAPS, max(1, math.ceil(float(np.hypot(*affine[:, axis])) - 1e-9)))


def crop_params(to_crop: np.ndarray, size: int) -> np.ndarray:
    """:data:`CROP_FRAME` [B] for frame -> crop affines [B, 2, 3] (float64, zeros: no face)."""
    params = np.zeros(len(to_crop), CROP_FRAME)
    for i, affine in enumerate(to_crop):
        if not affine.any():
            continue
        inv = _inverse(affine)
        params["m"][i] = inv.reshape(-1)
        params["nu"][i], params["nv"][i] = _taps(inv, 0), _taps(inv, 1)
    return params


def feather_geometry(to_crop: np.ndarray, size: int) -> dict[str, float]:
    """The feather of one frame (frame pixels): ``ku``/``kv`` frame pixels per crop pixel along
    the crop's axes, footprint ``wf x hf``, ``w``, ``sigma`` and the inset ``e`` (module
    docstring). Distances to the edges scale by ``ku``/``kv``: exact for the rectangular
    footprints of a similarity followed by an axis-aligned scale, as the alignment makes."""
    inv = _inverse(np.asarray(to_crop, np.float64))
    ku, kv = float(np.hypot(*inv[:, 0])), float(np.hypot(*inv[:, 1]))
    wf, hf = size * ku, size * kv
    w = math.sqrt(wf * hf) / 20.0
    sigma = 0.3 * w + 0.5
    return {"ku": ku, "kv": kv, "wf": wf, "hf": hf, "w": w, "sigma": sigma,
            "e": max(w, FEATHER_TRUNCATE * sigma + 0.5)}


def restore_params(to_crop: np.ndarray, size: int, height: int, width: int,
                   even: bool) -> np.ndarray:
    """:data:`RESTORE_FRAME` [B]: the affines as float32, the feather (profile position
    ``t = s * d + off`` for a distance ``d`` in crop pixels), and the frame region that the
    crop's footprint covers, clipped to the frame (``even``: grown to even coordinates, for
    NV12's 2x2 blocks). Zero affines and footprints outside the frame get an empty region."""
    params = np.zeros(len(to_crop), RESTORE_FRAME)
    steps = (FEATHER_TAPS - 1) / (2 * FEATHER_TRUNCATE)   # table steps per sigma
    edge = np.array([[-0.5, -0.5], [size - 0.5, -0.5], [-0.5, size - 0.5], [size - 0.5, size - 0.5]])
    for i, affine in enumerate(to_crop):
        if not affine.any():
            continue
        g = feather_geometry(affine, size)
        params["a"][i] = affine.reshape(-1)
        params["su"][i] = g["ku"] / g["sigma"] * steps
        params["sv"][i] = g["kv"] / g["sigma"] * steps
        params["off"][i] = (FEATHER_TRUNCATE - g["e"] / g["sigma"]) * steps
        params["nx"][i], params["ny"][i] = _taps(affine, 0), _taps(affine, 1)
        inv = _inverse(affine)
        corners = edge @ inv[:, :2].T + inv[:, 2]
        x1, y1 = np.floor(corners.min(axis=0)).astype(np.int64)
        x2, y2 = np.ceil(corners.max(axis=0)).astype(np.int64) + 1
        x1, y1 = max(0, int(x1)), max(0, int(y1))
        x2, y2 = min(width, int(x2)), min(height, int(y2))
        if even:
            x1, y1 = x1 & ~1, y1 & ~1
            x2, y2 = min(width, (x2 + 1) & ~1), min(height, (y2 + 1) & ~1)
        if x2 > x1 and y2 > y1:
            params["x1"][i], params["y1"][i] = x1, y1
            params["w"][i], params["h"][i] = x2 - x1, y2 - y1
    return params


def feather_profile() -> np.ndarray:
    """float32 [FEATHER_TAPS]: the Gaussian CDF on [-3, 3] sigma, renormalised to [0, 1]."""
    z = np.linspace(-FEATHER_TRUNCATE, FEATHER_TRUNCATE, FEATHER_TAPS)
    cdf = np.array([0.5 * math.erfc(-v / math.sqrt(2.0)) for v in z])
    prof = (cdf - cdf[0]) / (cdf[-1] - cdf[0])
    prof[0], prof[-1] = 0.0, 1.0
    return prof.astype(np.float32)


def feather_table() -> np.ndarray:
    """The by-value :data:`FEATHER_TABLE` (a 1-element array)."""
    out = np.zeros(1, FEATHER_TABLE)
    out["p"][0] = feather_profile()
    return out


def table(params: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A by-value table (:data:`CROP_TABLE` / :data:`RESTORE_TABLE`) holding up to
    :data:`WARP_TABLE_FRAMES` records; the rest stay zero."""
    if len(params) > WARP_TABLE_FRAMES:
        raise ValueError(f"{len(params)} frames for a table of {WARP_TABLE_FRAMES}")
    out = np.zeros(1, dtype)
    out["frames"][0, :len(params)] = params
    return out


def _grid(x: int, y: int, z: int) -> tuple[int, int, int]:
    return (-(-int(x) // BLOCK[0]), -(-int(y) // BLOCK[1]), int(z))


def crop_grid(size: int, batch: int) -> tuple[int, int, int]:
    """warp_crop_*_kernel: a thread per crop pixel."""
    return _grid(size, size, batch)


def restore_grid(params: np.ndarray, nv12: bool) -> tuple[int, int, int]:
    """restore_*_kernel: a thread per region pixel (RGB) or 2x2 block (NV12)."""
    step = 2 if nv12 else 1
    return _grid(-(-int(params["w"].max()) // step), -(-int(params["h"].max()) // step), len(params))
