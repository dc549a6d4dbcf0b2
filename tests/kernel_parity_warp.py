"""Parity cases of the affine face warps (warp.cu vs kernels/warp_reference.py).

Run on the CPU emulator by ``tests/test_kernels_warp.py`` and on CuPy by its gpu-marked test,
with :func:`kernel_parity.run_case`. Every case is exact (tolerance 0): the kernels evaluate the
reference's float32 operations in the same order with round-to-nearest intrinsics (no FMA), the
blend and the NV12 encode are integer / the shared colour code, and the feather profile is a
table both sides read. Inputs cover: enlarging and shrinking crops (1 to 8 supersampling taps),
rotation, footprints partly or wholly outside the frame, frames without a face (zero affines),
odd frame positions, batches over one launch's table (32 frames), single frames, ``out=``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kernel_parity import Case
from talkrt.kernels import warp_reference as wref
from talkrt.kernels.reference import rgb_to_nv12

__all__ = ["CASES", "similarity"]


def similarity(scale: float, angle: float, tx: float, ty: float) -> np.ndarray:
    """[2, 3] frame -> crop affine: rotate by ``angle`` (radians), scale, then shift."""
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    return np.array([[c, -s, tx], [s, c, ty]])


def _affines(size: int, height: int, width: int) -> np.ndarray:
    """A spread of frame -> crop affines for an S x S crop of a height x width frame."""
    # the crop spans 0.6, 1.7 and 5.5 frame heights (the crop's 1 to 8 taps per axis, by
    # size), none, half outside, wholly outside
    out = [
        similarity(size / (0.6 * height), 0.05, -0.2 * width * size / (0.6 * height), -0.1 * size),
        similarity(size / (1.7 * height), -0.35, 0.1 * size, 0.3 * size),
        similarity(size / (5.5 * height), 0.6, 0.4 * size, 0.35 * size),
        np.zeros((2, 3)),
        similarity(size / (0.5 * height), 0.0, 0.3 * size, 0.25 * size),
        similarity(size / (0.3 * height), 0.2, 5.0 * size, 4.0 * size),
    ]
    for scale, angle in ((2.6, 0.4), (6.3, -0.1)):   # the frame shows the crop 2.6x / 6.3x smaller
        zoom = similarity(scale, angle, 0.0, 0.0)       # (the restore's 3 and 7 taps per axis)
        zoom[:, 2] = (size / 2, size / 2) - zoom[:, :2] @ (width / 2 + 0.3, height / 2 - 0.2)
        out.append(zoom)
    aniso = similarity(size / (0.9 * height), 0.15, 0.0, 0.0)
    aniso[0] *= 512 / 420                                                      # LatentSync's squeeze
    aniso[1] *= 512 / 560
    aniso[:, 2] = (size / 2, size / 2) - aniso[:, :2] @ (width / 2 + 0.37, height / 2 - 0.61)
    out.append(aniso)
    return np.stack(out)


def _frames(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def _paste(rng: np.random.Generator, size: int) -> np.ndarray:
    """0 on top, a band of partial weights, 255 below, random partial pixels scattered."""
    m = np.zeros((size, size), np.uint8)
    m[size // 3: size // 2] = rng.integers(0, 256, (size // 2 - size // 3, size), dtype=np.uint8)
    m[size // 2:] = 255
    holes = rng.random((size, size)) < 0.05
    m[holes] = rng.integers(0, 256, int(holes.sum()), dtype=np.uint8)
    return m


def _restore_inputs(rng: np.random.Generator, n: int, height: int, width: int, size: int) -> dict:
    affines = _affines(size, height, width)
    return {"frames": _frames(rng, n, height, width),
            "faces": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
            "paste": _paste(rng, size),
            "host_affines": affines[np.arange(n) % len(affines)]}


def _crop_cases() -> list[Case]:
    cases = []
    for n, height, width, size in ((7, 90, 120, 48), (40, 20, 26, 16)):
        def build(rng: np.random.Generator, n=n, h=height, w=width, s=size) -> dict:
            affines = _affines(s, h, w)
            return {"frames": _frames(rng, n, h, w), "host_affines": affines[np.arange(n) % len(affines)],
                    "host_size": s}
        tag = f"b{n}_{height}x{width}_s{size}"
        cases.append(Case(
            f"warp_crop_rgb_{tag}", build,
            lambda K, d: [K.warp_crop_rgb(d["frames"], d["host_affines"], size=d["host_size"])],
            lambda d: [wref.warp_crop_rgb(d["frames"], d["host_affines"], size=d["host_size"])]))
        for matrix, full in (("bt709", False), ("bt601", True)):
            kw = {"matrix": matrix, "full_range": full}
            cases.append(Case(
                f"warp_crop_nv12_{matrix}_{'full' if full else 'limited'}_{tag}", build,
                lambda K, d, kw=kw: [K.warp_crop_nv12(K.rgb_to_nv12(d["frames"], **kw),
                                                      d["host_affines"], size=d["host_size"], **kw)],
                lambda d, kw=kw: [wref.warp_crop_nv12(rgb_to_nv12(d["frames"], **kw),
                                                      d["host_affines"], size=d["host_size"], **kw)]))
    cases.append(Case(
        "warp_crop_single_frame_out",
        lambda rng: {"frames": _frames(rng, 1, 40, 30)[0], "out": np.zeros((24, 24, 3), np.uint8),
                     "host_affines": similarity(0.9, 0.3, 2.0, -5.0)},
        lambda K, d: [K.warp_crop_rgb(d["frames"], d["host_affines"], size=24, out=d["out"]), d["out"]],
        lambda d: [wref.warp_crop_rgb(d["frames"], d["host_affines"], size=24)] * 2))
    return cases


def _restore_call(B: Any, d: dict, nv12: bool, **kw: Any) -> list:
    if not nv12:
        return [B.restore_rgb(d["frames"], d["faces"], d["host_affines"], d["paste"], **kw)]
    color = {k: v for k, v in kw.items() if k in ("matrix", "full_range")}
    frames = B.rgb_to_nv12(d["frames"], **color) if B is not wref else rgb_to_nv12(d["frames"], **color)
    return [B.restore_nv12(frames, d["faces"], d["host_affines"], d["paste"], **kw)]


def _restore_cases() -> list[Case]:
    cases = []
    for n, height, width, size in ((7, 96, 128, 40), (35, 24, 30, 12)):
        build = lambda rng, n=n, h=height, w=width, s=size: _restore_inputs(rng, n, h, w, s)
        tag = f"b{n}_{height}x{width}_s{size}"
        cases.append(Case(f"restore_rgb_{tag}", build,
                          lambda K, d: _restore_call(K, d, False),
                          lambda d: _restore_call(wref, d, False)))
        for matrix, full in (("bt709", False), ("bt601", True), ("bt709", True)):
            kw = {"matrix": matrix, "full_range": full}
            cases.append(Case(f"restore_nv12_{matrix}_{'full' if full else 'limited'}_{tag}", build,
                              lambda K, d, kw=kw: _restore_call(K, d, True, **kw),
                              lambda d, kw=kw: _restore_call(wref, d, True, **kw)))
    cases.append(Case(
        "restore_nv12_single_out",
        lambda rng: {**_restore_inputs(rng, 1, 36, 48, 20), "out": np.zeros((54, 48), np.uint8)},
        lambda K, d: [K.restore_nv12(K.rgb_to_nv12(d["frames"][0]), d["faces"][0],
                                     d["host_affines"][0], d["paste"], out=d["out"]), d["out"]],
        lambda d: [wref.restore_nv12(rgb_to_nv12(d["frames"][0]), d["faces"][0],
                                     d["host_affines"][0], d["paste"])] * 2))
    return cases


CASES: list[Case] = _crop_cases() + _restore_cases()
