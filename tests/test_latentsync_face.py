"""LatentSync 1.6 face preparation on the CPU: alignment (template, fit, bias average), the
tracker's alignment points, the lower-face mask, and the crop -> restore round trip of a
synthetic face on the reference kernels (and once at full size on the CPU emulator of warp.cu).

The synthetic face is an analytic image g defined in the face-crop (template) frame, rendered
into a video frame through a known similarity T, so every expected pixel value is computed
exactly rather than by another resampler.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

import kernel_emulate as emulate
from talkrt.errors import InputError, TalkrtError
from talkrt.face import FaceDetection, track_frames
from talkrt.face.align import (BIAS_KEEP, AlignSpec, align_track, align_transforms, apply_affine,
                               fit_similarity, invert_affine)
from talkrt.face.align_mask import MASK_SOURCE_SIZE, load_mask, lower_face_mask, mask_file
from talkrt.face.align_points import ibug68_to_align3, mesh_to_align3
from talkrt.kernels import gpu, reference as ref, warp_launch as wl, warp_reference as wref

SPEC = AlignSpec(512)


def _similarity(scale: float, angle: float, shift: tuple[float, float]) -> np.ndarray:
    c, s = math.cos(angle) * scale, math.sin(angle) * scale
    return np.array([[c, -s, shift[0]], [s, c, shift[1]]])


# ------------------------------------------------------------------ template and fit

def test_template_and_crop_geometry_of_latentsync_512() -> None:
    assert SPEC.ratio == pytest.approx(5.6)
    assert SPEC.face_size == (420, 560)
    np.testing.assert_allclose(SPEC.template, [[95.2, 112], [324.8, 112], [210, 224]])
    # OpenCV's half-pixel resize: the crop's pixel-area corners map onto each other
    np.testing.assert_allclose(apply_affine(SPEC.resize, [[-0.5, -0.5], [419.5, 559.5]]),
                               [[-0.5, -0.5], [511.5, 511.5]])
    assert AlignSpec(256).face_size == (210, 280)
    with pytest.raises(TalkrtError):
        AlignSpec(4)


@pytest.mark.parametrize("angle", [0.0, 0.3, -1.2])
def test_fit_inverts_an_exact_similarity(angle: float) -> None:
    to_frame = _similarity(0.43, angle, (310.0, 95.0))       # template -> frame
    points = apply_affine(to_frame, SPEC.template)
    m, bias = fit_similarity(points, SPEC.template)
    np.testing.assert_allclose(m, invert_affine(to_frame), atol=1e-9)
    # the bias compares the normalised nose positions without undoing the rotation
    pc, qc = points - points.mean(0), SPEC.template - SPEC.template.mean(0)
    np.testing.assert_allclose(bias, qc[2] / qc.std(ddof=1) - pc[2] / pc.std(ddof=1), atol=1e-12)
    assert (np.abs(bias).max() < 1e-12) == (angle == 0.0)


def test_fit_never_reflects_and_rejects_degenerate_points() -> None:
    mirrored = SPEC.template * [-1.0, 1.0] + [600.0, 0.0]     # brows swapped sides
    m, _ = fit_similarity(mirrored, SPEC.template)
    assert np.linalg.det(m[:, :2]) > 0
    with pytest.raises(TalkrtError, match="coincide"):
        fit_similarity(np.ones((3, 2)), SPEC.template)
    with pytest.raises(TalkrtError, match=r"\[3, 2\]"):
        fit_similarity(np.ones((4, 2)), SPEC.template)


def test_transforms_put_the_points_on_the_template() -> None:
    points = apply_affine(_similarity(0.5, 0.2, (200.0, 40.0)), SPEC.template)[None]
    exact = align_transforms(points, np.array([True]), SPEC, smooth=False)[0]
    target = apply_affine(SPEC.resize, SPEC.template)
    np.testing.assert_allclose(apply_affine(exact, points[0]), target, atol=1e-9)
    smoothed = align_transforms(points, np.array([True]), SPEC)[0]
    # upstream's bias is a normalised (unitless) offset added in face-crop pixels: sub-pixel
    shift = np.abs(apply_affine(smoothed, points[0]) - target).max()
    assert 0 < shift < 0.6


def test_bias_average_follows_upstream_rule_and_restarts_after_gaps() -> None:
    rng = np.random.default_rng(5)
    n = 7
    points = np.stack([apply_affine(_similarity(0.5, a, (200.0, 40.0)), SPEC.template)
                       for a in rng.uniform(-0.5, 0.5, n)]) + rng.normal(0, 2, (n, 3, 2))
    found = np.array([True, True, True, False, True, True, True])
    got = align_transforms(points, found, SPEC)
    assert not got[3].any()
    prev = None
    for i in range(n):
        if not found[i]:
            prev = None
            continue
        m, bias = fit_similarity(points[i], SPEC.template)
        bias = bias if prev is None else BIAS_KEEP * prev + (1 - BIAS_KEEP) * bias
        prev = bias
        m[:, 2] += bias
        r = SPEC.resize
        want = np.concatenate([r[:, :2] @ m[:, :2], r[:, :2] @ m[:, 2:] + r[:, 2:]], axis=1)
        np.testing.assert_allclose(got[i], want, atol=1e-9)
    # constant points: the average is constant, so are the transforms
    still = align_transforms(np.repeat(points[:1], 4, axis=0), np.ones(4, bool), SPEC)
    np.testing.assert_allclose(still, np.repeat(still[:1], 4, axis=0), atol=1e-12)


# ------------------------------------------------------------------- tracker points

def _hand_landmarks(shift: float = 0.0) -> np.ndarray:
    lm = np.zeros((68, 2), np.float32)
    lm[:17] = np.stack([np.linspace(40, 140, 17), 110 + 60 * np.sin(np.linspace(0, np.pi, 17))], 1)
    lm[17:22], lm[22:27] = (np.stack([np.linspace(55, 85, 5), np.full(5, 80.0)], 1),
                            np.stack([np.linspace(95, 125, 5), np.full(5, 80.0)], 1))
    lm[27:36] = (90.0, 120.0)
    lm[36:] = (90.0, 150.0)
    lm[:, 0] += shift
    return lm


class _PointsTracker:
    """A face per frame whose top-left pixel is non-zero, shifted by that value, with the
    alignment points given by the tracker (``with_points``) or left to the iBUG fallback."""

    def __init__(self, with_points: bool) -> None:
        self.with_points = with_points

    def detect(self, frame_rgb: np.ndarray, near=None) -> list[FaceDetection]:
        shift = float(frame_rgb[0, 0, 0])
        if shift == 0:
            return []
        pts = ibug68_to_align3(_hand_landmarks(shift)) + (0.0, -3.0) if self.with_points else None
        return [FaceDetection(_hand_landmarks(shift), 0.9, (0, 0, 1, 1), align3=pts)]


def test_track_frames_carries_alignment_points_and_musetalk_outputs_are_unchanged() -> None:
    pattern = [1, 2, 0, 6, 4, 5]            # frame 2 has no face: bridged (one-frame gap)
    frames = [np.full((240, 320, 3), v, np.uint8) for v in pattern]
    given = track_frames(iter(frames), _PointsTracker(True), smooth_window=3)
    derived = track_frames(iter(frames), _PointsTracker(False), smooth_window=3)
    for name in ("found", "landmarks68", "boxes", "crop_boxes", "scores", "bridged"):
        np.testing.assert_array_equal(getattr(given, name), getattr(derived, name))
    assert given.bridged.tolist() == [False, False, True, False, False, False]
    raw = np.stack([ibug68_to_align3(_hand_landmarks(v)) for v in (1, 2, 4, 6, 4, 5)])
    raw[2] = (raw[1] + raw[3]) / 2           # the bridged frame: halfway between its neighbours
    smoothed = raw.copy()
    smoothed[1:-1] = (raw[:-2] + raw[1:-1] + raw[2:]) / 3   # centred 3-frame average
    np.testing.assert_allclose(derived.align3, smoothed, atol=1e-4)
    np.testing.assert_allclose(given.align3, smoothed + (0.0, -3.0), atol=1e-4)
    aligned = align_track(given, SPEC)
    assert aligned.found.all() and aligned.to_crop.shape == (6, 2, 3) and len(aligned) == 6
    np.testing.assert_allclose(apply_affine(aligned.from_crop[0], apply_affine(aligned.to_crop[0], raw[0])),
                               raw[0], atol=1e-9)
    assert aligned.select([5, 4]).to_crop[0].tolist() == aligned.to_crop[5].tolist()


def test_face_detection_validates_alignment_points() -> None:
    with pytest.raises(TalkrtError, match=r"align3 must be \[3, 2\]"):
        FaceDetection(_hand_landmarks(), 0.9, (0, 0, 1, 1), align3=np.zeros((2, 2)))
    assert FaceDetection(_hand_landmarks(), 0.9, (0, 0, 1, 1)).align3 is None
    with pytest.raises(TalkrtError, match="468"):
        mesh_to_align3(np.zeros((68, 2)))


@pytest.fixture(scope="module")
def astronaut() -> tuple[np.ndarray, FaceDetection]:
    skdata = pytest.importorskip("skimage.data")
    from talkrt.face import create_tracker
    image = skdata.astronaut()
    faces = create_tracker(num_threads=2).detect(image)
    assert len(faces) == 1
    return image, faces[0]


def test_astronaut_alignment_points_sit_on_brows_and_nose(astronaut) -> None:
    faces = [astronaut[1]]
    assert faces[0].align3 is not None
    (lx, ly), (rx, ry), (nx, ny) = faces[0].align3
    # hand-checked: eyes near y 101 (x 203, 248), mouth centre near (223, 145)
    assert 190 <= lx < 215 and 235 <= rx < 262 and 70 < ly < 98 and 70 < ry < 98
    assert lx < nx < rx and 105 < ny < 140
    m, _ = fit_similarity(faces[0].align3, SPEC.template)
    residual = np.abs(apply_affine(m, faces[0].align3) - SPEC.template).max()
    assert residual < 0.1 * (SPEC.template[1, 0] - SPEC.template[0, 0])


def test_crop_equals_upstreams_warp_then_resize(astronaut) -> None:
    # upstream: bilinear warp to the 420 x 560 face crop (127 outside), then a Lanczos-4 resize
    # to 512 (here with OpenCV, whose warpAffine uses the same pixel-centre convention as
    # kornia). talkrt samples once through the composed affine; the two differ by the
    # interpolators only (a half-pixel slip in the composition would cost a mean of ~1.4)
    image, face = astronaut
    m, bias = fit_similarity(face.align3, SPEC.template)
    m[:, 2] += bias
    upstream = cv2.warpAffine(image, m, SPEC.face_size, flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=(127, 127, 127))
    upstream = cv2.resize(upstream, (512, 512), interpolation=cv2.INTER_LANCZOS4)
    to_crop = align_transforms(face.align3[None], np.array([True]), SPEC)[0]
    diff = np.abs(wref.warp_crop_rgb(image, to_crop, size=512).astype(np.int64) - upstream)
    assert diff.mean() < 0.5 and np.percentile(diff, 99) <= 2


# ---------------------------------------------------------------------------- mask

def test_lower_face_mask_shape() -> None:
    m = lower_face_mask()
    assert m.shape == (MASK_SOURCE_SIZE, MASK_SOURCE_SIZE) and m.dtype == np.uint8
    assert set(np.unique(m).tolist()) == {0, 255}
    np.testing.assert_array_equal(m, m[:, ::-1])             # symmetric about x = 128
    generated = m == 0
    assert 0.40 < generated.mean() < 0.41                    # upstream's file: 26673 px = 0.407
    assert not generated[:95].any() and not generated[243:].any()
    assert generated[100, 40] and generated[100, 215] and not generated[100, 128]   # cheeks, nose
    assert generated[130, 10] and not generated[130, 8] and generated[240, 128]
    rows = generated.sum(axis=1)
    assert np.all(np.diff(rows[128:243]) <= 0)               # the U narrows towards the chin


def test_load_mask_procedural_and_from_file(tmp_path) -> None:
    mask = load_mask(None, 512)
    assert mask.source == "procedural" and mask.resolution == 512
    assert mask.keep.dtype == np.float32 and 0 <= mask.keep.min() and mask.keep.max() <= 1
    np.testing.assert_array_equal(mask.paste, np.floor((1 - mask.keep.astype(np.float64)) * 255 + 0.5))
    assert mask.paste[400, 256] == 255 and mask.paste[150, 256] == 0 and mask.paste[220, 256] == 0
    assert mask.paste[220, 60] == 255                         # cheek beside the nose
    torch = pytest.importorskip("torch")
    nearest = torch.nn.functional.interpolate(torch.from_numpy(mask.keep.copy())[None, None], size=(64, 64))
    np.testing.assert_array_equal(mask.latent(64), nearest[0, 0].numpy())
    path = tmp_path / "mask.png"
    colour = np.repeat(lower_face_mask()[..., None], 3, axis=2)
    assert cv2.imwrite(str(path), colour)
    assert mask_file(tmp_path) == path and mask_file(tmp_path / "none") is None
    from_file = load_mask(path, 512)
    np.testing.assert_array_equal(from_file.keep, mask.keep)
    assert from_file.source == str(path)
    assert load_mask(path, 256).keep.shape == (256, 256)


def test_load_mask_refuses_bad_files(tmp_path) -> None:
    with pytest.raises(InputError, match="not found"):
        load_mask(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("not a png")
    with pytest.raises(InputError, match="not an image"):
        load_mask(tmp_path / "text.png")
    cv2.imwrite(str(tmp_path / "white.png"), np.full((64, 64, 3), 255, np.uint8))
    with pytest.raises(InputError, match="no dark"):
        load_mask(tmp_path / "white.png")


# ----------------------------------------------------------------- crop and restore

def _g(cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
    """The synthetic face, float64 RGB in face-crop (template) coordinates: smooth shading,
    dark brows and a dark nose blob at the template points."""
    base = 120 + 45 * np.sin(2 * np.pi * cx / 150) * np.cos(2 * np.pi * cy / 190)
    for (px, py), amp in zip(SPEC.template, (-50, -50, -40)):
        base = base + amp * np.exp(-((cx - px) ** 2 + (cy - py) ** 2) / (2 * 25.0 ** 2))
    return np.stack([base + 30 * np.sin(2 * np.pi * (cx + cy) / 230), base,
                     base - 25 * np.cos(2 * np.pi * cx / 170)], axis=-1)


T_FACE = _similarity(0.5, 0.21, (118.0, 42.0))   # template -> frame: a 210 x 280 px face


def _scene(height: int = 360, width: int = 480) -> tuple[np.ndarray, np.ndarray]:
    """(frame uint8 [H, W, 3] rendered exactly from g, frame -> crop affine from the points)."""
    inv = invert_affine(T_FACE)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    frame = np.clip(np.floor(_g(inv[0, 0] * x + inv[0, 1] * y + inv[0, 2],
                                inv[1, 0] * x + inv[1, 1] * y + inv[1, 2]) + 0.5), 0, 255)
    points = apply_affine(T_FACE, SPEC.template)
    return frame.astype(np.uint8), align_transforms(points[None], np.array([True]), SPEC)[0]


def _footprint(to_crop: np.ndarray, height: int, width: int, inset: float) -> np.ndarray:
    """[H, W] bool: frame pixels whose crop position is more than ``inset`` crop pixels inside."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    u = to_crop[0, 0] * x + to_crop[0, 1] * y + to_crop[0, 2]
    v = to_crop[1, 0] * x + to_crop[1, 1] * y + to_crop[1, 2]
    lo, hi = -0.5 + inset, SPEC.resolution - 0.5 - inset
    return (u > lo) & (u < hi) & (v > lo) & (v < hi)


def test_aligned_crop_is_the_template_face() -> None:
    frame, to_crop = _scene()
    crop = wref.warp_crop_rgb(frame, to_crop, size=512)
    # every crop pixel is g where its frame position lies in template space: the frame's own
    # rounding (0.5) + the bilinear error of this smooth g (< 0.05) is under 1, so the rounded
    # crop is within 1 of the rounded g
    u, v = np.meshgrid(np.arange(512.0), np.arange(512.0))
    frame_xy = apply_affine(invert_affine(to_crop), np.stack([u, v], -1))
    tmpl = apply_affine(invert_affine(T_FACE), frame_xy)
    want = np.clip(np.floor(_g(tmpl[..., 0], tmpl[..., 1]) + 0.5), 0, 255)
    diff = np.abs(crop.astype(np.int64) - want)
    assert diff.max() <= 1 and diff.mean() < 0.3
    # and up to upstream's sub-pixel bias, the crop frame is the template frame resized to 512
    cx, cy = apply_affine(invert_affine(SPEC.resize), np.stack([u, v], -1)).transpose(2, 0, 1)
    assert np.abs(crop.astype(np.float64) - _g(cx, cy)).mean() < 0.6


def test_round_trip_restores_the_frame() -> None:
    frame, to_crop = _scene()
    crop = wref.warp_crop_rgb(frame, to_crop, size=512)
    paste = np.full((512, 512), 255, np.uint8)
    out = wref.restore_rgb(frame.copy(), crop, to_crop, paste)
    outside = ~_footprint(to_crop, *frame.shape[:2], 0.0)
    np.testing.assert_array_equal(out[outside], frame[outside])   # never touched
    # the crop is within 1.05 of g (above); sampled back bilinearly, within 1.1 of g at the
    # frame pixel, whose stored value is within 0.5 of g: rounded, within 2 of the frame
    diff = np.abs(out.astype(np.int64) - frame)
    assert diff.max() <= 2 and diff.mean() < 0.05
    # on NV12, straight from and into the frames: RGB within 2 moves Y (coefficients sum to
    # 219/255 at limited range) and the 2x2 chroma mean by under 2, plus a rounding: <= 3
    nv12 = ref.rgb_to_nv12(frame)
    crop_nv = wref.warp_crop_nv12(nv12, to_crop, size=512)
    out_nv = wref.restore_nv12(nv12.copy(), crop_nv, to_crop, paste)
    d = np.abs(out_nv.astype(np.int64) - nv12)
    assert d.max() <= 3 and d.mean() < 0.05
    assert (d[:360][~_footprint(to_crop, 360, 480, -2.0)] == 0).all()   # Y outside: untouched


def test_restore_pastes_the_generated_lower_face_only() -> None:
    frame, to_crop = _scene()
    crop = wref.warp_crop_rgb(frame, to_crop, size=512)
    generated = crop.copy()
    generated[...] = (0, 255, 0)                      # the model "generates" green everywhere
    out = wref.restore_rgb(frame.copy(), generated, to_crop, load_mask(None, 512).paste)
    mouth = np.round(apply_affine(T_FACE, [[210.0, 430.0]])[0]).astype(int)   # template mouth
    brow = np.round(apply_affine(T_FACE, SPEC.template[:1])[0]).astype(int)
    nose_top = np.round(apply_affine(T_FACE, [[210.0, 150.0]])[0]).astype(int)
    assert tuple(out[mouth[1], mouth[0]]) == (0, 255, 0)
    assert tuple(out[brow[1], brow[0]]) == tuple(frame[brow[1], brow[0]])
    assert tuple(out[nose_top[1], nose_top[0]]) == tuple(frame[nose_top[1], nose_top[0]])
    changed = (out != frame).any(axis=-1)
    assert 0.3 < changed.sum() / _footprint(to_crop, 360, 480, 0.0).sum() < 0.45


@pytest.mark.parametrize("face_scale, max_mean, max_diff", [(0.75, 0.05, 0.2), (0.25, 0.15, 0.5)])
def test_feather_matches_upstreams_eroded_blurred_footprint(face_scale: float, max_mean: float,
                                                           max_diff: float) -> None:
    # upstream (AlignRestore.restore_img), with OpenCV for kornia: warp a block of ones back
    # into the frame, erode 2x2 then by 2w (w = int(sqrt(area)) // 20), Gaussian-blur with a
    # 2w + 1 kernel. talkrt's closed form agrees across the band (measured: mean 0.036, at most
    # 0.12 at the corners, for w = 18; upstream's square erosion also eats ~w * |sin roll| more
    # of a rolled face); on small faces (face_scale 0.25: w = 6, where upstream's kernel cuts its
    # Gaussian at 2.6 sigma and talkrt keeps 3 sigma inside the footprint) talkrt's ramp sits
    # about a pixel further in (mean 0.11, at most 0.44)
    height, width = 720, 960
    m = invert_affine(_similarity(face_scale, 0.05, (300.0, 120.0)))   # frame -> face crop
    ones = np.ones((SPEC.face_size[1], SPEC.face_size[0]), np.float32)
    inv = cv2.warpAffine(ones, invert_affine(m), (width, height), flags=cv2.INTER_LINEAR)
    inv = cv2.erode(inv, np.ones((2, 2), np.uint8))
    w_edge = int(inv.sum() ** 0.5) // 20
    k = 2 * w_edge + 1
    upstream = cv2.GaussianBlur(cv2.erode(inv, np.ones((2 * w_edge, 2 * w_edge), np.uint8)), (k, k),
                                0.3 * ((k - 1) * 0.5 - 1) + 0.8)
    to_crop = np.concatenate([SPEC.resize[:, :2] @ m[:, :2], SPEC.resize[:, :2] @ m[:, 2:] + SPEC.resize[:, 2:]], 1)
    ours = wref.restore_rgb(np.zeros((height, width, 3), np.uint8), np.full((512, 512, 3), 255, np.uint8),
                            to_crop, np.full((512, 512), 255, np.uint8))[..., 0] / 255.0
    band = (upstream > 0.01) & (upstream < 0.99)
    diff = np.abs(ours - upstream)
    assert band.sum() > 1000 and diff[band].mean() < max_mean and diff.max() < max_diff
    assert ((ours > 0.01) & (ours < 0.99)).sum() == pytest.approx(band.sum(), rel=0.1)   # same width


@pytest.mark.skipif(not emulate.compiler_available(), reason="g++ not available")
def test_full_size_round_trip_on_the_emulated_kernels_equals_the_reference() -> None:
    frame, to_crop = _scene()
    nv12 = ref.rgb_to_nv12(frame)
    paste = load_mask(None, 512).paste
    with emulate.emulated_gpu() as launched:
        crop = gpu.warp_crop_nv12(nv12.copy(), to_crop, size=512)
        restored = gpu.restore_nv12(nv12.copy(), crop, to_crop, paste)
    assert [name for name, _ in launched] == ["warp_crop_nv12_kernel", "restore_nv12_kernel"]
    np.testing.assert_array_equal(crop, wref.warp_crop_nv12(nv12, to_crop, size=512))
    np.testing.assert_array_equal(restored, wref.restore_nv12(nv12.copy(), crop, to_crop, paste))
    assert wl.crop_params(to_crop[None], 512)[["nu", "nv"]].tolist() == [(1, 1)]
