"""CPU tests of talkrt.kernels (CI): the references against independent implementations, the
host-side launch arithmetic, validation errors, and every GPU parity case run on the CPU
emulator of the CUDA sources (needs g++; skipped otherwise)."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
from PIL import Image

import talkrt.kernels as K
import kernel_emulate as emulate
import kernel_parity as parity
from talkrt.kernels import _cuda, gaussian, gpu, launch, reference as ref
from talkrt.kernels.colorspace import MATRICES
from talkrt.kernels.packing import pack_masks, pack_regions
from talkrt.kernels.resize_tables import apply_plan, plan_resize

COMBOS = [(m, f) for m in ("bt601", "bt709") for f in (False, True)]


def _smooth_rgb(rng: np.random.Generator, n: int, h: int, w: int, lo: int = 25,
                hi: int = 230) -> np.ndarray:
    """Low-frequency color content (stays inside the RGB gamut after chroma subsampling)."""
    small = rng.uniform(lo, hi, (n, max(2, h // 8), max(2, w // 8), 3)).astype(np.float32)
    return np.stack([np.clip(cv2.resize(s, (w, h), interpolation=cv2.INTER_LINEAR), 0, 255)
                     for s in small]).astype(np.uint8)


# ----------------------------------------------------------------------- color references

def _forward_matrix(matrix: str) -> np.ndarray:
    kr, kb = MATRICES[matrix]
    kg = 1 - kr - kb
    return np.array([[kr, kg, kb],
                     [-kr / (2 * (1 - kb)), -kg / (2 * (1 - kb)), 0.5],
                     [0.5, -kg / (2 * (1 - kr)), -kb / (2 * (1 - kr))]])


def _codes(full: bool) -> tuple[float, float, float]:
    return (0.0, 255.0, 255.0) if full else (16.0, 219.0, 224.0)


@pytest.mark.parametrize("matrix,full", COMBOS)
def test_nv12_to_rgb_matches_float64_inverse_matrix(matrix: str, full: bool) -> None:
    # Independent definition: invert the RGB -> (Y, Pb, Pr) matrix numerically, in float64.
    # The reference rounds float32 results: the two may differ by 1 next to a .5 boundary.
    rng = np.random.default_rng(1)
    nv12 = rng.integers(0, 256, (2, 30, 40), dtype=np.uint8)
    got = ref.nv12_to_rgb(nv12, matrix=matrix, full_range=full)
    y_off, y_span, c_span = _codes(full)
    y = (nv12[:, :20].astype(np.float64) - y_off) / y_span
    uv = nv12[:, 20:].astype(np.float64)
    pb = np.repeat(np.repeat((uv[:, :, 0::2] - 128) / c_span, 2, 1), 2, 2)
    pr = np.repeat(np.repeat((uv[:, :, 1::2] - 128) / c_span, 2, 1), 2, 2)
    rgb = np.einsum("ij,jbhw->bhwi", np.linalg.inv(_forward_matrix(matrix)), np.stack([y, pb, pr]))
    want = np.clip(np.floor(rgb * 255 + 0.5), 0, 255)
    diff = np.abs(got - want)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


@pytest.mark.parametrize("matrix,full", COMBOS)
def test_rgb_to_nv12_matches_float64_matrix(matrix: str, full: bool) -> None:
    # float64 definition with the 2x2 mean of RGB for chroma; +-1 for float32 rounding.
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (2, 24, 34, 3), dtype=np.uint8)
    got = ref.rgb_to_nv12(rgb, matrix=matrix, full_range=full)
    y_off, y_span, c_span = _codes(full)
    m = _forward_matrix(matrix)
    x = rgb.astype(np.float64) / 255
    y = y_off + y_span * (x @ m[0])
    mean = x.reshape(2, 12, 2, 17, 2, 3).mean(axis=(2, 4))
    u, v = 128 + c_span * (mean @ m[1]), 128 + c_span * (mean @ m[2])
    uv = np.stack([u, v], -1).reshape(2, 12, 34)
    want = np.clip(np.floor(np.concatenate([y, uv], 1) + 0.5), 0, 255)
    diff = np.abs(got - want)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_nv12_to_rgb_matches_opencv_bt601_limited() -> None:
    # OpenCV's NV12 decoder is BT.601 limited with 20-bit fixed-point coefficients (1.164,
    # 1.596, ...): within 1 of the exact formula for legal code values (OpenCV clamps Y < 16).
    rng = np.random.default_rng(3)
    y = rng.integers(16, 236, (48, 64), dtype=np.uint8)
    uv = rng.integers(16, 241, (24, 64), dtype=np.uint8)
    nv12 = np.concatenate([y, uv])
    ours = ref.nv12_to_rgb(nv12, matrix="bt601", full_range=False)
    assert np.abs(ours.astype(int) - cv2.cvtColor(nv12, cv2.COLOR_YUV2RGB_NV12)).max() <= 1
    bgr = ref.nv12_to_rgb(nv12, matrix="bt601", order="bgr")
    assert np.abs(bgr.astype(int) - cv2.cvtColor(nv12, cv2.COLOR_YUV2BGR_NV12)).max() <= 1


@pytest.mark.parametrize("matrix,full", COMBOS)
def test_nv12_rgb_nv12_roundtrip(matrix: str, full: bool) -> None:
    # Smooth in-gamut content: decode -> encode returns the NV12 codes within 1 (one rounding
    # to uint8 RGB in between; chroma is the mean of four pixels that share it).
    rng = np.random.default_rng(4)
    nv12 = ref.rgb_to_nv12(_smooth_rgb(rng, 2, 32, 48), matrix=matrix, full_range=full)
    back = ref.rgb_to_nv12(ref.nv12_to_rgb(nv12, matrix=matrix, full_range=full),
                           matrix=matrix, full_range=full)
    assert np.abs(back.astype(int) - nv12).max() <= 1


def test_layouts_and_orders_are_permutations() -> None:
    nv12 = np.random.default_rng(5).integers(0, 256, (1, 12, 16), dtype=np.uint8)
    hwc = ref.nv12_to_rgb(nv12)
    assert np.array_equal(ref.nv12_to_rgb(nv12, layout="chw"), hwc.transpose(0, 3, 1, 2))
    assert np.array_equal(ref.nv12_to_rgb(nv12, order="bgr"), hwc[..., ::-1])
    assert np.array_equal(ref.rgb_to_nv12(hwc[..., ::-1].copy(), order="bgr"), ref.rgb_to_nv12(hwc))


# ----------------------------------------------------------------------- resize references

RESIZE_SIZES = [(512, 512), (768, 1024), (400, 450), (257, 300), (256, 256), (300, 256),
                (200, 180), (33, 70), (3, 5), (1, 1), (255, 600), (1000, 1100), (513, 512)]


@pytest.mark.parametrize("method,interp", [("area", cv2.INTER_AREA),
                                           ("lanczos4", cv2.INTER_LANCZOS4)])
def test_resize_tables_equal_opencv(method: str, interp: int) -> None:
    # The GPU kernel evaluates these tables; on OpenCV's scalar/SIMD paths they are exact.
    rng = np.random.default_rng(6)
    for w, h in RESIZE_SIZES:
        src = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want = cv2.resize(src, (256, 256), interpolation=interp)
        got = apply_plan(src, plan_resize(w, h, 256, 256, method))
        assert np.array_equal(got, want), (method, w, h)


def test_resize_tables_other_output_sizes_within_one() -> None:
    # Other outputs: exact except INTER_AREA enlarging, where OpenCV's scalar row tail differs
    # from its SIMD rounding by at most 1.
    rng = np.random.default_rng(7)
    for (w, h), size in (((90, 70), (64, 48)), ((20, 30), (37, 41)), ((300, 200), (99, 101))):
        src = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for method, interp in (("area", cv2.INTER_AREA), ("lanczos4", cv2.INTER_LANCZOS4)):
            got = apply_plan(src, plan_resize(w, h, *size, method))
            assert np.abs(got.astype(int) - cv2.resize(src, size, interpolation=interp)).max() <= 1


def test_crop_tables_address_the_boxes() -> None:
    # Evaluate the packed batch tables exactly as resize.cu indexes them (absolute frame rows
    # and columns) and compare with the per-crop model.
    rng = np.random.default_rng(8)
    frames = rng.integers(0, 256, (3, 90, 120, 3), dtype=np.uint8)
    boxes = np.array([[0, 0, 120, 90], [7, 3, 50, 88], [101, 61, 120, 90]])
    tables = launch.crop_tables(boxes, 32, 24, "lanczos4")
    xi = tables.view("x_index").reshape(3, 32, tables.x_taps)
    xw = tables.view("x_weight").reshape(3, 32, tables.x_taps).astype(np.int64)
    yi = tables.view("y_index").reshape(3, 24, tables.y_taps)
    yw = tables.view("y_weight").reshape(3, 24, tables.y_taps).astype(np.int64)
    meta = tables.view("meta").reshape(3, 4)
    for b, (x1, y1, x2, y2) in enumerate(boxes):
        f = frames[b].astype(np.int64)
        acc = np.einsum("dkwic,dk,wi->dwc", f[yi[b]][:, :, xi[b]], yw[b], xw[b])
        got = np.clip((acc + meta[b, 2]) >> meta[b, 1], 0, 255)
        want = apply_plan(frames[b, y1:y2, x1:x2], plan_resize(x2 - x1, y2 - y1, 32, 24, "lanczos4"))
        assert np.array_equal(got, want)
        assert xi[b].min() >= x1 and xi[b].max() < x2 and yi[b].min() >= y1 and yi[b].max() < y2


def test_crop_resize_reference_is_cv2_of_the_crop() -> None:
    rng = np.random.default_rng(9)
    frames = rng.integers(0, 256, (2, 60, 80, 3), dtype=np.uint8)
    boxes = [[0, 0, 80, 60], [13, 9, 44, 58]]
    out = ref.crop_resize(frames, boxes, method="lanczos4")
    for b, (x1, y1, x2, y2) in enumerate(boxes):
        want = cv2.resize(frames[b, y1:y2, x1:x2], (256, 256), interpolation=cv2.INTER_LANCZOS4)
        assert np.array_equal(out[b], want)


def test_linear_model_within_one_of_opencv_and_float64() -> None:
    # The GPU's float32 bilinear vs cv2 INTER_LINEAR (11-bit weights) and vs a float64
    # half-pixel bilinear: both within 1, and unbiased (mean |diff| well below 0.5).
    rng = np.random.default_rng(10)
    face = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    for w, h in ((400, 450), (97, 131), (256, 256), (1, 1), (511, 13)):
        got = ref.resize_linear_model(face, w, h).astype(int)
        cv = cv2.resize(face, (w, h), interpolation=cv2.INTER_LINEAR).astype(int)
        assert np.abs(got - cv).max() <= 1 and np.abs(got - cv).mean() < 0.3
        xs = np.clip((np.arange(w) + 0.5) * 256 / w - 0.5, 0, 255)
        ys = np.clip((np.arange(h) + 0.5) * 256 / h - 0.5, 0, 255)
        x0, y0 = np.floor(xs).astype(int), np.floor(ys).astype(int)
        x1, y1 = np.minimum(x0 + 1, 255), np.minimum(y0 + 1, 255)
        fx, fy = (xs - x0)[None, :, None], (ys - y0)[:, None, None]
        f = face.astype(np.float64)
        top = f[y0][:, x0] * (1 - fx) + f[y0][:, x1] * fx
        bot = f[y1][:, x0] * (1 - fx) + f[y1][:, x1] * fx
        exact = np.floor(top * (1 - fy) + bot * fy + 0.5)
        assert np.abs(got - exact).max() <= 1


# ----------------------------------------------------------------------- filter references

def test_gaussian_fixed_point_weights() -> None:
    assert gaussian.gaussian_weights_fixed(7, 2.0) == (18, 34, 48, 56, 48, 34, 18)
    assert gaussian.default_ksize(1.0) == 7
    for k, s in ((3, 0.5), (7, 1.0), (15, 2.3), (31, 5.0)):
        assert sum(gaussian.gaussian_weights_fixed(k, s)) == 256


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_blur_model_equals_opencv(channels: int) -> None:
    # OpenCV's uint8 Gaussian is integer fixed point: the model (and filter.cu) is bit-exact.
    rng = np.random.default_rng(11)
    for sigma, ksize in ((1.0, None), (0.8, 3), (2.0, 5), (3.0, None)):
        k = gaussian.default_ksize(sigma) if ksize is None else ksize
        for h, w in ((31, 45), (3, 2), (1, 7)):
            img = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
            want = cv2.GaussianBlur(img, (k, k), sigma, borderType=cv2.BORDER_REFLECT_101)
            assert np.array_equal(gaussian.blur_model(img[None], k, sigma)[0],
                                  want.reshape(img.shape))
            assert np.array_equal(ref.gaussian_blur(img, sigma=sigma, ksize=ksize),
                                  want.reshape(img.shape))


@pytest.mark.parametrize("amount,sigma,threshold", [(1.2, 1.0, 5), (0.5, 1.5, 0), (2.0, 2.0, 10)])
def test_unsharp_reference_vs_float64(amount: float, sigma: float, threshold: int) -> None:
    # Straightforward float64 unsharp mask (exact Gaussian, unrounded blur). The reference's
    # blur is OpenCV's: 8-bit weights, rounded to uint8. Its distance to the float64 blur is
    # bounded by 0.5 + 255 * sum|w8 (x) w8 - w (x) w| (computed below); amplified by `amount`,
    # plus 1 for the final roundings, away from pixels whose threshold test that error can flip.
    rng = np.random.default_rng(12)
    img = rng.integers(0, 256, (2, 40, 50, 3), dtype=np.uint8)
    k = gaussian.default_ksize(sigma)
    r = k // 2
    x = np.arange(-r, r + 1)
    w = np.exp(-x ** 2 / (2 * sigma ** 2))
    w /= w.sum()
    w8 = np.asarray(gaussian.gaussian_weights_fixed(k, sigma)) / 256
    blur_error = 0.5 + 255 * np.abs(np.outer(w8, w8) - np.outer(w, w)).sum()
    pad = np.pad(img.astype(np.float64), ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
    horiz = sum(w[i] * pad[:, :, i:i + 50] for i in range(k))
    blur = sum(w[i] * horiz[:, i:i + 40] for i in range(k))
    d = img - blur
    want = np.where(np.abs(d) >= threshold, np.clip(np.floor(img + amount * d + 0.5), 0, 255), img)
    got = ref.unsharp_mask(img, amount=amount, sigma=sigma, threshold=threshold)
    clear = np.abs(np.abs(d) - threshold) > blur_error
    assert clear.mean() > 0.5
    assert np.abs(got - want)[clear].max() <= np.floor(amount * blur_error + 1)


# ------------------------------------------------------------------ blend / compose references

def test_div255_rounding_equals_pil() -> None:
    # PIL's paste computes DIV255(v) = ((v + 128) >> 8 + v + 128) >> 8; on every possible
    # v = body*(255-m) + face*m it equals our round-half-up (2v + 255) // 510.
    v = np.arange(0, 255 * 255 + 1)
    t = v + 128
    assert np.array_equal(((t >> 8) + t) >> 8, (2 * v + 255) // 510)


@pytest.mark.parametrize("matrix,full", COMBOS)
def test_nv12_encode_clamps_are_no_ops(matrix: str, full: bool) -> None:
    # compose_nv12.cu rounds Y without clamps and U, V with the upper clamp only. Y, U and V
    # are sums of products with fixed-sign coefficients, monotonic in each of R, G, B (float
    # rounding is monotonic), so over RGB in [0, 255]^3 their extremes are at the cube's corners.
    from talkrt.kernels.colorspace import color_spec
    s = color_spec(matrix, full)
    corners = np.array([(r, g, b) for r in (0, 255) for g in (0, 255) for b in (0, 255)],
                       np.float32).T
    r, g, b = corners
    half = np.float32(0.5)
    y = ((s.y_r * r + s.y_g * g) + s.y_b * b) + s.y_offset
    assert y.dtype == np.float32
    assert (y + half >= 0).all() and (y + half < 256).all()
    for cr, cg, cb in ((s.u_r, s.u_g, s.u_b), (s.v_r, s.v_g, s.v_b)):
        c = ((cr * r + cg * g) + cb * b) + np.float32(128)
        assert (c + half >= 0).all()


def test_compose_nv12_launch_constants_and_params() -> None:
    text = (_cuda.KERNEL_DIR / "compose_nv12.cu").read_text()
    assert f"#define NV12_BLOCKS {launch.NV12_COMPOSE_BLOCKS} " in text
    assert f"#define NV12_TABLE_FRAMES {launch.NV12_TABLE_FRAMES} " in text
    boxes = np.array([[1, 3, 400, 452], [0, 0, 2, 2], [1919, 1079, 1920, 1080]])
    params = launch.nv12_compose_params(boxes, np.array([0, 16, 2**33 + 48]), 256, 256)
    assert params.dtype == launch.NV12_FRAME and params.shape == (3,)
    ints = ["cols", "rows", "ex1", "ey1", "x_odd", "y_odd", "w", "h"]
    assert [int(params[0][k]) for k in ints] == [200, 225, 0, 2, 1, 1, 399, 449]
    assert [int(params[2][k]) for k in ints] == [1, 1, 1918, 1078, 1, 1, 1, 1]
    assert params[2]["mask_off"] == 2**33 + 48
    assert params[0]["scale_x"] == np.float32(256) / np.float32(399)
    assert params[1]["scale_y"] == np.float32(128)
    grid, block = launch.nv12_compose_grid(params), launch.NV12_COMPOSE_BLOCK
    assert grid[1] * block[1] * launch.NV12_COMPOSE_BLOCKS >= 225 and grid[2] == 3
    assert (grid[1] - 1) * block[1] * launch.NV12_COMPOSE_BLOCKS < 225
    assert grid[0] * block[0] >= 200 > (grid[0] - 1) * block[0]
    table = launch.nv12_compose_table(params)
    assert table.shape == (1,) and table.itemsize == launch.NV12_TABLE_FRAMES * 48
    assert table["frames"][0, :3].tobytes() == params.tobytes()
    assert not table["frames"][0, 3:].tobytes().strip(b"\0")   # the rest stays zero
    with pytest.raises(ValueError, match="65 frames"):
        launch.nv12_compose_table(np.zeros(65, launch.NV12_FRAME))


def test_blend_reference_equals_pil_paste() -> None:
    # Exact: see test_div255_rounding_equals_pil (the +-1 the issue allows is not needed).
    rng = np.random.default_rng(13)
    frames = rng.integers(0, 256, (2, 60, 80, 3), dtype=np.uint8)
    boxes = np.array([[0, 0, 37, 41], [43, 19, 80, 60]])
    faces = [rng.integers(0, 256, (y2 - y1, x2 - x1, 3), dtype=np.uint8) for x1, y1, x2, y2 in boxes]
    masks = [rng.integers(0, 256, f.shape[:2], dtype=np.uint8) for f in faces]
    want = []
    for b, (x1, y1, _, _) in enumerate(boxes):
        im = Image.fromarray(frames[b].copy())
        im.paste(Image.fromarray(faces[b]), (int(x1), int(y1)), Image.fromarray(masks[b]))
        want.append(np.asarray(im))
    got = ref.blend(frames.copy(), faces, boxes, masks)
    assert np.array_equal(got, np.stack(want))


def test_compose_rgb_reference_is_musetalk_paste() -> None:
    # MuseTalk: cv2.resize(face, box size) then PIL paste with the mask.
    rng = np.random.default_rng(14)
    frames = rng.integers(0, 256, (1, 100, 120, 3), dtype=np.uint8)
    face = rng.integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)
    box, mask = (21, 13, 98, 99), rng.integers(0, 256, (86, 77), dtype=np.uint8)
    im = Image.fromarray(frames[0].copy())
    resized = cv2.resize(face[0], (77, 86), interpolation=cv2.INTER_LINEAR)
    im.paste(Image.fromarray(resized), box[:2], Image.fromarray(mask))
    got = ref.compose_rgb(frames.copy(), face, [box], [mask])
    assert np.array_equal(got[0], np.asarray(im))


@pytest.mark.parametrize("matrix,full", COMBOS)
def test_compose_nv12_reference_rules(matrix: str, full: bool) -> None:
    rng = np.random.default_rng(15)
    frames = rng.integers(0, 256, (1, 40, 50, 3), dtype=np.uint8)
    nv12 = ref.rgb_to_nv12(frames, matrix=matrix, full_range=full)
    face = rng.integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)
    box = (5, 7, 36, 30)   # odd x1, y1 and odd width: the region grows to (4, 6, 36, 30)
    mask = rng.integers(0, 256, (23, 31), dtype=np.uint8)
    mask[:4] = 0
    out = ref.compose_nv12(nv12.copy(), face, [box], [mask], matrix=matrix, full_range=full)
    changed = out[0] != nv12[0]
    assert not changed[:6].any() and not changed[30:40].any()        # luma rows outside
    assert not changed[:, :4].any() and not changed[:, 36:].any()     # columns outside
    assert not changed[7:11, 5:36].any()                              # mask == 0 rows keep Y
    # touched pixels: RGB compose of the decoded frame, then encoded (Y per pixel)
    body = ref.nv12_to_rgb(nv12, matrix=matrix, full_range=full)
    rgb = ref.compose_rgb(body, face, [box], [mask])
    y_full = ref.rgb_to_nv12(rgb, matrix=matrix, full_range=full)[0, :40]
    sel = np.zeros((40, 50), bool)
    sel[7:30, 5:36] = mask > 0
    assert np.array_equal(out[0, :40][sel], y_full[sel])


# ---------------------------------------------------------------- host arithmetic / packing

def test_pack_regions_roundtrip_and_alignment() -> None:
    rng = np.random.default_rng(16)
    masks = [rng.integers(0, 256, s, dtype=np.uint8) for s in ((3, 5), (17, 1), (8, 8))]
    packed = pack_masks(masks)
    assert (packed.offsets % 16 == 0).all() and len(packed) == 3
    for m, r in zip(masks, packed.regions()):
        assert np.array_equal(m, r)
    faces = pack_regions([rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)])
    assert faces.region(0).shape == (4, 6, 3)


def test_launch_grids_cover_the_work() -> None:
    boxes = np.array([[1, 3, 400, 452], [0, 0, 2, 2], [1919, 1079, 1920, 1080]])
    assert launch.box_extent(boxes) == (399, 449)
    params = launch.nv12_compose_params(boxes, np.zeros(3, np.int64), 256, 256)
    bw, bh = int(params["cols"].max()), int(params["rows"].max())
    assert (bw, bh) == (200, 225)   # x: [0, 400) -> 200 blocks, y: [2, 452) -> 225
    grid = launch.grid_2d(bw, bh, 3)
    assert grid[0] * launch.BLOCK[0] >= bw and grid[1] * launch.BLOCK[1] >= bh
    g = launch.color_grid(1080, 1922, 32)
    per_block = launch.BLOCK[0] * launch.COLOR_GROUP   # pixels of a row per block
    assert g[0] * per_block >= 1922 > (g[0] - 1) * per_block
    assert g[1] * 8 * 2 >= 1080 and g[2] == 32
    assert launch.filter_smem_bytes(15, 4) + 512 <= 48 * 1024   # + filter.cu's static arrays
    params = launch.box_params(boxes, np.array([0, 16, 32]), np.array([5, 6, 7]))
    assert params.dtype == launch.FRAME_BOX and params.shape == (3,)
    assert params[2]["mask_off"] == 32 and params[1]["region_off"] == 6
    assert params[2].tolist()[:4] == (1919, 1079, 1920, 1080)
    for make in (lambda: launch.grid_2d(10, 10, 70000), lambda: launch.filter_grid(8, 8, 3, 70000),
                 lambda: launch.color_grid(2 * 8 * 70000, 8, 1),
                 lambda: launch.nv12_compose_grid(np.zeros(70000, launch.NV12_FRAME))):
        with pytest.raises(ValueError, match="too large"):
            make()


# --------------------------------------------------------------------- validation errors

def _bad_calls(B):  # noqa: N803 - B is a backend module
    nv12 = np.zeros((2, 12, 8), np.uint8) + 7
    frames = np.full((2, 16, 20, 3), 9, np.uint8)
    faces = np.full((2, 256, 256, 3), 3, np.uint8)
    boxes = np.array([[0, 0, 10, 10], [2, 2, 20, 16]])
    masks = [np.full((10, 10), 5, np.uint8), np.full((14, 18), 5, np.uint8)]
    return [
        (TypeError, "uint8", lambda: B.nv12_to_rgb(nv12.astype(np.float32))),
        (ValueError, "rows", lambda: B.nv12_to_rgb(np.zeros((2, 13, 8), np.uint8))),
        (ValueError, "even", lambda: B.nv12_to_rgb(np.zeros((2, 12, 7), np.uint8))),
        (ValueError, "even", lambda: B.rgb_to_nv12(np.zeros((1, 5, 8, 3), np.uint8))),
        (ValueError, "contiguous", lambda: B.rgb_to_nv12(frames[:, :, ::2])),
        (ValueError, "shape", lambda: B.nv12_to_rgb(nv12, out=np.zeros((2, 8, 8, 4), np.uint8))),
        (TypeError, "uint8", lambda: B.nv12_to_rgb(nv12, out=np.zeros((2, 8, 8, 3), np.int16))),
        (ValueError, "matrix", lambda: B.nv12_to_rgb(nv12, matrix="bt2020")),
        (ValueError, "layout", lambda: B.nv12_to_rgb(nv12, layout="nchw")),
        (ValueError, "inside", lambda: B.crop_resize(frames, [[0, 0, 21, 10], [0, 0, 5, 5]])),
        (ValueError, "inside", lambda: B.crop_resize(frames, [[-1, 0, 5, 5], [0, 0, 5, 5]])),
        (ValueError, "non-empty", lambda: B.crop_resize(frames, [[5, 0, 5, 5], [0, 0, 5, 5]])),
        (ValueError, r"\[2, 4\]", lambda: B.crop_resize(frames, [[0, 0, 5, 5]])),
        (TypeError, "integers", lambda: B.crop_resize(frames, boxes.astype(np.float64))),
        (ValueError, "method", lambda: B.crop_resize(frames, boxes, method="cubic")),
        (ValueError, "channels", lambda: B.crop_resize(frames[..., :2].copy(), boxes)),
        (ValueError, "sigma", lambda: B.gaussian_blur(frames, sigma=0.0)),
        (ValueError, "ksize", lambda: B.gaussian_blur(frames, ksize=4)),
        (ValueError, "threshold", lambda: B.unsharp_mask(frames, threshold=-1)),
        (ValueError, "box 1 needs", lambda: B.compose_rgb(
            frames, faces, boxes, [masks[0], masks[0]])),
        (ValueError, "inside", lambda: B.compose_nv12(
            np.zeros((2, 12, 20), np.uint8), faces, boxes, masks)),
        (ValueError, "2 frames", lambda: B.compose_rgb(frames, faces[:1], boxes, masks)),
        (TypeError, "SharpenParams", lambda: B.compose_rgb(frames, faces, boxes, masks,
                                                           sharpen={"amount": 1.0})),
        (ValueError, "shape", lambda: B.blend(frames, [f[:5] for f in B.resize_to_boxes(
            faces, boxes).regions()], boxes, masks)),
    ]


@pytest.mark.parametrize("index", range(24))
def test_reference_validation_errors(index: int) -> None:
    error, match, call = _bad_calls(ref)[index]
    with pytest.raises(error, match=match):
        call()


needs_gxx = pytest.mark.skipif(not emulate.compiler_available(), reason="g++ not available")


@needs_gxx
@pytest.mark.parametrize("index", range(24))
def test_gpu_wrapper_validation_errors(index: int) -> None:
    with emulate.emulated_gpu():
        error, match, call = _bad_calls(gpu)[index]
        with pytest.raises(error, match=match):
            call()


@needs_gxx
def test_gpu_wrapper_rejects_overlapping_out() -> None:
    images = np.full((2, 8, 8, 3), 4, np.uint8)
    flat = np.zeros(8 * 10 * 3 + 3, np.uint8)
    frame, shifted = flat[3:].reshape(8, 10, 3), flat[:-3].reshape(8, 10, 3)
    with emulate.emulated_gpu():
        with pytest.raises(ValueError, match="overlap"):
            gpu.unsharp_mask(images, out=images)
        with pytest.raises(ValueError, match="overlap"):
            gpu.compose_rgb(frame, np.zeros((1, 16, 16, 3), np.uint8), [0, 0, 4, 4],
                            [np.ones((4, 4), np.uint8)], out=shifted)


def test_gpu_wrappers_reject_host_arrays_without_cupy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cuda, "cupy", None)
    assert K.gpu_available() is False and "CuPy" in K.unavailable_reason()
    with pytest.raises(RuntimeError, match="unavailable"):
        gpu.nv12_to_rgb(np.zeros((6, 4), np.uint8))


def test_select_backend_falls_back_once(monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(K, "unavailable_reason", lambda: "no CUDA device (test)")
    monkeypatch.setattr(K, "_fallback_noted", False)
    with caplog.at_level(logging.WARNING, logger="talkrt.kernels"):
        assert K.select_backend() is ref and K.select_backend() is ref
    assert sum("CPU reference kernels" in r.message for r in caplog.records) == 1
    assert K.select_backend("cpu") is ref
    with pytest.raises(RuntimeError, match="unavailable"):
        K.select_backend("gpu")


# -------------------------------------------------- GPU parity cases on the CPU emulator

@needs_gxx
@pytest.mark.parametrize("case", parity.CASES, ids=[c.name for c in parity.CASES])
def test_parity_on_emulated_gpu(case: parity.Case) -> None:
    with emulate.emulated_gpu():
        parity.run_case(case, gpu, lambda a: np.array(a, copy=True), np.asarray)
