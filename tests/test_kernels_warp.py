"""The affine face warps (LatentSync's aligned crop and feathered restore): the CPU references
against independent float64 / OpenCV computations, the launch records against the compiled
structs, validation, and every parity case of ``kernel_parity_warp`` on the CPU emulator of
warp.cu (CI) and on CuPy (``-m gpu``)."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

import kernel_emulate as emulate
import kernel_parity_warp as wparity
from kernel_parity import run_case
from talkrt.kernels import gpu, reference as ref, warp_launch as wl, warp_reference as wref

needs_gxx = pytest.mark.skipif(not emulate.compiler_available(), reason="g++ not available")


def _smooth(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    small = rng.uniform(20, 235, (max(2, h // 10), max(2, w // 10), 3)).astype(np.float32)
    return np.clip(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC), 0, 255).astype(np.uint8)


def _bilinear64(img: np.ndarray, x: np.ndarray, y: np.ndarray, fill: float) -> np.ndarray:
    """Exact bilinear sample (float64) of an [H, W, C] image; pixels outside read ``fill``."""
    h, w = img.shape[:2]
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]

    def at(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        ok = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
        return np.where(ok[..., None], img[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)], fill)

    top = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx
    bottom = at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx
    return top * (1 - fy) + bottom * fy


# ----------------------------------------------------------------------- crop reference

def test_crop_equals_float64_bilinear_when_enlarging() -> None:
    # one tap per pixel: float32 positions and weights vs float64 exact, rounding can differ by 1
    rng = np.random.default_rng(3)
    frame = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    to_crop = wparity.similarity(1.7, 0.4, 30.0, 20.0)
    crop = wref.warp_crop_rgb(frame, to_crop, size=64)
    inv = cv2.invertAffineTransform(to_crop)
    u, v = np.meshgrid(np.arange(64.0), np.arange(64.0))
    x, y = inv[0, 0] * u + inv[0, 1] * v + inv[0, 2], inv[1, 0] * u + inv[1, 1] * v + inv[1, 2]
    want = np.floor(_bilinear64(frame.astype(np.float64), x, y, 127.0) + 0.5)
    assert np.abs(crop.astype(np.int64) - want).max() <= 1
    outside = (x < -1) | (y < -1) | (x > 90) | (y > 70)
    assert outside.any() and (crop[outside] == 127).all()   # outside the frame: upstream's fill


def test_crop_matches_opencv_warp_affine_on_smooth_frames() -> None:
    # cv2 quantises positions to 1/32 pixel: on smooth content that moves a sample by < 1 LSB
    rng = np.random.default_rng(4)
    frame = _smooth(rng, 120, 160)
    to_crop = wparity.similarity(1.3, -0.25, 10.0, 30.0)
    crop = wref.warp_crop_rgb(frame, to_crop, size=96)
    want = cv2.warpAffine(frame, to_crop, (96, 96), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(127, 127, 127))
    assert np.abs(crop.astype(np.int64) - want).max() <= 1


def test_shrinking_crop_is_prefiltered() -> None:
    # a 1-pixel checkerboard shrunk 2.5x: the box of 3x3 taps per pixel averages it to grey,
    # where one bilinear tap per pixel would alias it into stripes of 0 / 255
    board = ((np.indices((200, 200)).sum(axis=0) % 2) * 255).astype(np.uint8)
    frame = np.repeat(board[..., None], 3, axis=2)
    to_crop = wparity.similarity(0.4, 0.0, 0.0, 0.0)
    assert wl.crop_params(to_crop[None], 64)[["nu", "nv"]].tolist() == [(3, 3)]
    crop = wref.warp_crop_rgb(frame, to_crop, size=64)
    assert abs(float(crop.mean()) - 127.5) < 3 and crop.std() < 20


def test_restore_is_prefiltered_where_the_frame_shows_the_crop_smaller() -> None:
    # a checkerboard face restored at 1/3 size: 3x3 taps per frame pixel average it to grey
    board = ((np.indices((96, 96)).sum(axis=0) % 2) * 255).astype(np.uint8)
    faces = np.repeat(board[None, ..., None], 3, axis=3)
    to_crop = wparity.similarity(3.0, 0.0, -3.0 * 20, -3.0 * 10)    # footprint x 20..52, y 10..42
    assert wl.restore_params(to_crop[None], 96, 60, 80, False)[["nx", "ny"]].tolist() == [(3, 3)]
    out = wref.restore_rgb(np.zeros((60, 80, 3), np.uint8), faces, to_crop,
                           np.full((96, 96), 255, np.uint8))
    inner = out[20:32, 30:42].astype(np.float64)                     # where the weight is 255
    assert abs(inner.mean() - 127.5) < 15 and inner.std() < 30


def test_crop_taps_follow_the_footprint() -> None:
    affines = np.stack([wparity.similarity(s, 0.3, 0.0, 0.0) for s in (2.0, 1.0, 0.99, 0.5, 0.01)])
    params = wl.crop_params(affines, 32)
    assert params["nu"].tolist() == [1, 1, 2, 2, 8] and params["nv"].tolist() == [1, 1, 2, 2, 8]
    assert wl.crop_params(np.zeros((1, 2, 3)), 32)["nu"].tolist() == [0]   # no face


# -------------------------------------------------------------------------------- feather

def test_feather_profile_is_the_truncated_gaussian_cdf() -> None:
    prof = wl.feather_profile()
    assert prof[0] == 0.0 and prof[-1] == 1.0 and np.all(np.diff(prof) > 0)
    z = np.linspace(-3, 3, 4001)
    t = (z + 3) / 6 * (wl.FEATHER_TAPS - 1)
    approx = np.interp(t, np.arange(wl.FEATHER_TAPS), prof.astype(np.float64))
    cdf = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in z])
    exact = (cdf - cdf[0]) / (cdf[-1] - cdf[0])
    assert np.abs(approx - exact).max() < 2e-4


def test_feather_geometry_follows_upstream_rule() -> None:
    # a face 300 px wide in the frame: footprint = S * frame px per crop px on each axis
    to_crop = wparity.similarity(512 / 300, 0.0, 0.0, 0.0)
    to_crop[1] *= 420 / 560                     # anisotropic, like LatentSync's 420 x 560 crop
    g = wl.feather_geometry(to_crop, 512)
    assert g["wf"] == pytest.approx(300) and g["hf"] == pytest.approx(400)
    assert g["w"] == pytest.approx(math.sqrt(300 * 400) / 20)
    assert g["sigma"] == pytest.approx(0.3 * g["w"] + 0.5)
    assert g["e"] == pytest.approx(max(g["w"], 3 * g["sigma"] + 0.5))


def test_restore_weight_profile_across_an_edge() -> None:
    # black frame, white face, paste 255 everywhere: the output is the weight m. Along the
    # middle of the left edge the v feather is 1, so m = round(255 * P((d - e) / sigma)).
    size, height, width = 64, 200, 240
    to_crop = wparity.similarity(64 / 150, 0.0, -(64 / 150) * 40, -(64 / 150) * 25)
    frames = np.zeros((1, height, width, 3), np.uint8)
    faces = np.full((1, size, size, 3), 255, np.uint8)
    out = wref.restore_rgb(frames, faces, to_crop, np.full((size, size), 255, np.uint8))
    g = wl.feather_geometry(to_crop, size)
    row = 25 + 75                                # the footprint's middle row
    x = np.arange(30, 80)
    d = x - 40 + 0.5 * 150 / 64                  # inside the left edge u = -0.5, frame pixels
    z = (d - g["e"]) / g["sigma"]
    cdf = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in np.clip(z, -3, 3)])
    lo, hi = 0.5 * math.erfc(3 / math.sqrt(2)), 0.5 * math.erfc(-3 / math.sqrt(2))
    want = np.floor(255 * (cdf - lo) / (hi - lo) + 0.5)
    assert np.abs(out[0, row, x, 0].astype(np.int64) - want).max() <= 1
    assert out[0, :, :39].max() == 0 and out[0, row, 39].max() == 0      # outside / at the very edge
    assert (out[0, 25 + 40:25 + 110, 40 + 40:40 + 110] == 255).all()   # inside: the face


# --------------------------------------------------------------------- records, validation

def test_tables_fit_the_launch_parameter_block() -> None:
    # CUDA passes at most 4096 bytes of kernel parameters; the by-value tables must fit
    for name in ("warp_crop_rgb_kernel", "warp_crop_nv12_kernel", "restore_rgb_kernel",
                 "restore_nv12_kernel"):
        if not emulate.compiler_available():
            pytest.skip("g++ not available")
        params = emulate.signature("warp.cu", name)
        total = 0
        for _, size in params:
            total = -(-total // min(size, 16)) * min(size, 16) + size
        assert total <= 4096, (name, total)
    assert wl.CROP_FRAME.itemsize == 32 and wl.RESTORE_FRAME.itemsize == 64
    assert emulate.signature("warp.cu", "restore_nv12_kernel")[-2:] == [
        ("s", wl.FEATHER_TABLE.itemsize), ("s", wl.RESTORE_TABLE.itemsize)]


def _bad_calls(B):
    frames = np.zeros((2, 20, 24, 3), np.uint8)
    affines = np.stack([wparity.similarity(1.0, 0.0, 0.0, 0.0)] * 2)
    faces = np.zeros((2, 16, 16, 3), np.uint8)
    paste = np.zeros((16, 16), np.uint8)
    singular = affines.copy()
    singular[1, :, :2] = [[1, 2], [2, 4]]
    nan = affines.copy()
    nan[0, 0, 2] = np.nan
    return [
        (ValueError, r"\[2, 2, 3\]", lambda: B.warp_crop_rgb(frames, affines[0], size=16)),
        (ValueError, "singular", lambda: B.warp_crop_rgb(frames, singular, size=16)),
        (ValueError, "NaN", lambda: B.warp_crop_rgb(frames, nan, size=16)),
        (TypeError, "numbers", lambda: B.warp_crop_rgb(frames, [["a"] * 3] * 2, size=16)),
        (ValueError, "size", lambda: B.warp_crop_rgb(frames, affines, size=1)),
        (ValueError, "even", lambda: B.warp_crop_nv12(np.zeros((2, 30, 23), np.uint8), affines)),
        (ValueError, "2 frames", lambda: B.restore_rgb(frames, faces[:1], affines, paste)),
        (ValueError, "square", lambda: B.restore_rgb(frames, faces[:, :, :8].copy(), affines, paste)),
        (ValueError, "uint8 \\[16, 16\\]", lambda: B.restore_rgb(frames, faces, affines, paste[:8].copy())),
        (ValueError, "uint8 \\[16, 16\\]", lambda: B.restore_nv12(
            np.zeros((2, 30, 24), np.uint8), faces, affines, paste.astype(np.float32))),
    ]


@pytest.mark.parametrize("index", range(10))
def test_reference_validation_errors(index: int) -> None:
    error, match, call = _bad_calls(wref)[index]
    with pytest.raises(error, match=match):
        call()


@needs_gxx
@pytest.mark.parametrize("index", range(10))
def test_gpu_wrapper_validation_errors(index: int) -> None:
    with emulate.emulated_gpu():
        error, match, call = _bad_calls(gpu)[index]
        with pytest.raises(error, match=match):
            call()


# ------------------------------------------------------------------------------ parity

@needs_gxx
@pytest.mark.parametrize("case", wparity.CASES, ids=[c.name for c in wparity.CASES])
def test_warp_parity_on_emulated_gpu(case) -> None:
    with emulate.emulated_gpu() as launched:
        run_case(case, gpu, lambda a: np.array(a, copy=True), np.asarray)
    warps = [grid for name, grid in launched if name.startswith(("warp_", "restore_"))]
    assert warps and all(grid[2] <= wl.WARP_TABLE_FRAMES for grid in warps)
    if "_b40_" in case.name or "_b35_" in case.name:   # more frames than one table holds
        assert len(warps) >= 2


def _cupy_device():
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except Exception:  # noqa: BLE001 - no driver / driver too old
        pytest.skip("no usable CUDA device")
    return cupy


@pytest.mark.gpu
@pytest.mark.parametrize("case", wparity.CASES, ids=[c.name for c in wparity.CASES])
def test_warp_parity_on_gpu(case) -> None:
    cupy = _cupy_device()
    run_case(case, gpu, cupy.asarray, cupy.asnumpy)


@pytest.mark.gpu
def test_warp_1080p_latentsync_sizes_exact() -> None:
    # full size: 1080p NV12 frames, 512 crops of ~420 px faces (1-2 taps), torch tensors in
    cupy = _cupy_device()
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    n = 4
    frames = rng.integers(0, 256, (n, 1080, 1920, 3), dtype=np.uint8)
    nv12 = ref.rgb_to_nv12(frames)
    affines = np.stack([wparity.similarity(512 / (380 + 40 * i), 0.1 * i, 0.0, 0.0) for i in range(n)])
    affines[:, :, 2] = 256 - np.einsum("bij,j->bi", affines[:, :, :2], [960.0, 540.0])
    crops = wref.warp_crop_nv12(nv12, affines, size=512)
    got = gpu.warp_crop_nv12(torch.from_numpy(nv12).cuda(), affines, size=512)
    assert np.array_equal(cupy.asnumpy(got), crops)
    faces = rng.integers(0, 256, (n, 512, 512, 3), dtype=np.uint8)
    paste = np.zeros((512, 512), np.uint8)
    paste[250:] = 255
    want = wref.restore_nv12(nv12.copy(), faces, affines, paste)
    dev = cupy.asarray(nv12)
    gpu.restore_nv12(dev, cupy.asarray(faces), affines, cupy.asarray(paste))
    assert np.array_equal(cupy.asnumpy(dev), want)
