"""Parity cases: one test body per op, run on any backend and compared with the reference.

``tests/test_kernels_gpu.py`` runs every case on CuPy (real GPU); ``tests/test_kernels_reference.py``
runs them on the CPU emulator of the CUDA sources (``tests/kernel_emulate.py``). Each case
builds fresh random inputs from a fixed seed, calls the backend op, and compares with the
reference under a tolerance whose justification is in ``why``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

import numpy as np

from talkrt.kernels import reference as ref
from talkrt.kernels.packing import Packed
from talkrt.kernels.resize_tables import apply_plan, plan_resize
from talkrt.kernels.validate import SharpenParams

__all__ = ["Case", "CASES", "run_case", "assert_close"]

EXACT = "same integer / float32 operation sequence as the reference (no FMA contraction)"
OPENCV_LINEAR = ("cv2 INTER_LINEAR uses 11-bit weights and SIMD truncations, the kernel float32 "
                 "weights: each differs from exact bilinear by < 1 LSB before rounding, so <= 1")


@dataclass(frozen=True)
class Case:
    """``run(backend, inputs) -> list of outputs``; ``expected(inputs) -> list of numpy arrays``."""

    name: str
    build: Callable[[np.random.Generator], dict]
    run: Callable[[ModuleType, dict], list]
    expected: Callable[[dict], list]
    max_abs: int = 0
    why: str = EXACT
    seed: int = 0
    tags: tuple[str, ...] = field(default_factory=tuple)


def assert_close(got: np.ndarray, want: np.ndarray, max_abs: int, label: str) -> None:
    """Assert equal shapes and ``|got - want| <= max_abs`` everywhere, with a useful message."""
    assert got.shape == want.shape, f"{label}: shape {got.shape} != {want.shape}"
    assert got.dtype == want.dtype, f"{label}: dtype {got.dtype} != {want.dtype}"
    diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
    worst = int(diff.max(initial=0))
    if worst > max_abs:
        where = tuple(int(i) for i in np.unravel_index(int(diff.argmax()), diff.shape))
        raise AssertionError(f"{label}: max |diff| {worst} > {max_abs} at {where} "
                             f"(got {got[where]}, want {want[where]}); "
                             f"{int((diff > max_abs).sum())} of {diff.size} elements out of tolerance")


def _flatten(result: Any, to_host: Callable[[Any], np.ndarray]) -> list[np.ndarray]:
    if isinstance(result, Packed):
        return [to_host(r) for r in result.regions()]
    if isinstance(result, (list, tuple)):
        return [a for r in result for a in _flatten(r, to_host)]
    return [to_host(result)]


def run_case(case: Case, backend: ModuleType, to_device: Callable[[np.ndarray], Any],
             to_host: Callable[[Any], np.ndarray]) -> None:
    """Build inputs, run ``case`` on ``backend`` (arrays moved with to_device) and compare."""
    inputs = case.build(np.random.default_rng(case.seed))
    device_inputs = {}
    for key, value in inputs.items():
        if key.startswith("host_") or not isinstance(value, (np.ndarray, list)):
            device_inputs[key] = value
        elif isinstance(value, list):
            device_inputs[key] = [to_device(v) for v in value]
        else:
            device_inputs[key] = to_device(value)
    got = _flatten(case.run(backend, device_inputs), to_host)
    want = _flatten(case.expected(inputs), np.asarray)
    assert len(got) == len(want), f"{case.name}: {len(got)} outputs, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, case.max_abs, f"{case.name}[{i}] ({case.why})")


# ------------------------------------------------------------------------------ input makers

def _nv12(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (n, height * 3 // 2, width), dtype=np.uint8)


def _frames(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def _boxes(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
    """Random boxes; the first touches all four frame edges, the second has odd coordinates."""
    boxes = []
    for i in range(n):
        if i == 0:
            boxes.append((0, 0, width, height))
            continue
        w = int(rng.integers(1, width + 1))
        h = int(rng.integers(1, height + 1))
        x1 = int(rng.integers(0, width - w + 1))
        y1 = int(rng.integers(0, height - h + 1))
        if i == 1 and w > 2 and h > 2:   # odd position and size
            x1, y1, w, h = x1 | 1, y1 | 1, (w - 2) | 1, (h - 2) | 1
        boxes.append((x1, y1, x1 + w, y1 + h))
    return np.asarray(boxes, np.int64)


def _masks(rng: np.random.Generator, boxes: np.ndarray) -> list[np.ndarray]:
    """Feather-like masks: a zero border band, a 255 core and random values in between."""
    masks = []
    for x1, y1, x2, y2 in boxes:
        h, w = int(y2 - y1), int(x2 - x1)
        m = rng.integers(0, 256, (h, w), dtype=np.uint8)
        m[: max(1, h // 5)] = 0
        if h > 8:
            m[h - h // 7:] = 0      # zero rows below too (packed masks skip both bands)
        m[:, : w // 6] = 0
        m[h // 2: h // 2 + max(1, h // 8), w // 3: w // 3 + max(1, w // 4)] = 255
        masks.append(m)
    return masks


def _compose_inputs(rng: np.random.Generator, n: int, height: int, width: int) -> dict:
    boxes = _boxes(rng, n, height, width)
    return {"frames": _frames(rng, n, height, width),
            "faces": rng.integers(0, 256, (n, 256, 256, 3), dtype=np.uint8),
            "host_boxes": boxes, "masks": _masks(rng, boxes)}


# ------------------------------------------------------------------------------------ cases

def _color_cases() -> list[Case]:
    cases = []
    for matrix in ("bt601", "bt709"):
        for full in (False, True):
            tag = f"{matrix}_{'full' if full else 'limited'}"
            kw = {"matrix": matrix, "full_range": full}
            variants = [(layout, order) for layout in ("hwc", "chw") for order in ("rgb", "bgr")]
            cases.append(Case(
                f"nv12_to_rgb_{tag}",
                lambda rng: {"nv12": _nv12(rng, 2, 38, 46), "single": _nv12(rng, 1, 8, 12)[0]},
                lambda K, d, kw=kw, v=variants: [K.nv12_to_rgb(d["nv12"], layout=lo, order=o, **kw)
                                                 for lo, o in v] + [K.nv12_to_rgb(d["single"], **kw)],
                lambda d, kw=kw, v=variants: [ref.nv12_to_rgb(d["nv12"], layout=lo, order=o, **kw)
                                              for lo, o in v] + [ref.nv12_to_rgb(d["single"], **kw)]))
            cases.append(Case(
                f"rgb_to_nv12_{tag}",
                lambda rng: {"rgb": _frames(rng, 2, 38, 46), "single": _frames(rng, 1, 8, 12)[0]},
                lambda K, d, kw=kw: [K.rgb_to_nv12(d["rgb"], order=o, **kw) for o in ("rgb", "bgr")]
                + [K.rgb_to_nv12(d["single"], **kw)],
                lambda d, kw=kw: [ref.rgb_to_nv12(d["rgb"], order=o, **kw) for o in ("rgb", "bgr")]
                + [ref.rgb_to_nv12(d["single"], **kw)]))
            cases.append(Case(
                f"nv12_roundtrip_{tag}",
                lambda rng: {"nv12": _nv12(rng, 3, 16, 24)},
                lambda K, d, kw=kw: [K.rgb_to_nv12(K.nv12_to_rgb(d["nv12"], **kw), **kw)],
                lambda d, kw=kw: [ref.rgb_to_nv12(ref.nv12_to_rgb(d["nv12"], **kw), **kw)]))
    # color.cu converts groups of 8 pixels: frames narrower than a group, rows ending in 2, 4 or
    # 6 pixels (byte accesses), single frames, rows of every alignment (8-, 4- and 2-byte paths)
    sizes = ((2, 2), (4, 6), (6, 18), (2, 20), (4, 28))   # (height, width)
    variants = [(layout, order) for layout in ("hwc", "chw") for order in ("rgb", "bgr")]
    cases.append(Case(
        "color_group_tails",
        lambda rng: {**{f"nv12_{h}x{w}": _nv12(rng, 1, h, w)[0] for h, w in sizes},
                     **{f"rgb_{h}x{w}": _frames(rng, 1, h, w)[0] for h, w in sizes}},
        lambda K, d: [K.nv12_to_rgb(d[f"nv12_{h}x{w}"], layout=lo, order=o, matrix="bt601")
                      for h, w in sizes for lo, o in variants]
        + [K.rgb_to_nv12(d[f"rgb_{h}x{w}"], order=o) for h, w in sizes for o in ("rgb", "bgr")],
        lambda d: [ref.nv12_to_rgb(d[f"nv12_{h}x{w}"], layout=lo, order=o, matrix="bt601")
                   for h, w in sizes for lo, o in variants]
        + [ref.rgb_to_nv12(d[f"rgb_{h}x{w}"], order=o) for h, w in sizes for o in ("rgb", "bgr")]))
    cases.append(Case(
        "color_batch64_out",
        lambda rng: {"nv12": _nv12(rng, 64, 6, 10), "out": np.zeros((64, 6, 10, 3), np.uint8),
                     "out_nv12": np.zeros((64, 9, 10), np.uint8)},
        lambda K, d: [K.nv12_to_rgb(d["nv12"], out=d["out"]),
                      K.rgb_to_nv12(K.nv12_to_rgb(d["nv12"], matrix="bt601"), matrix="bt601",
                                    out=d["out_nv12"])],
        lambda d: [ref.nv12_to_rgb(d["nv12"]),
                   ref.rgb_to_nv12(ref.nv12_to_rgb(d["nv12"], matrix="bt601"), matrix="bt601")]))
    return cases


def _crop_model(d: dict, method: str) -> list[np.ndarray]:
    frames, boxes = d["frames"], d["host_boxes"]
    return [np.stack([apply_plan(frames[i, y1:y2, x1:x2],
                                 plan_resize(int(x2 - x1), int(y2 - y1), 256, 256, method))
                      for i, (x1, y1, x2, y2) in enumerate(boxes)])]


def _resize_cases() -> list[Case]:
    cases = []
    for method in ("area", "lanczos4"):
        for n, height, width in ((3, 270, 480), (64, 40, 48), (1, 300, 256)):
            build = (lambda rng, n=n, h=height, w=width:
                     {"frames": _frames(rng, n, h, w), "host_boxes": _boxes(rng, n, h, w)})
            run = lambda K, d, m=method: [K.crop_resize(d["frames"], d["host_boxes"], method=m)]
            cases.append(Case(f"crop_resize_{method}_b{n}_vs_tables", build, run,
                              lambda d, m=method: _crop_model(d, m),
                              why="integer / float32 tables evaluated in OpenCV's order"))
            cases.append(Case(
                f"crop_resize_{method}_b{n}_vs_cv2", build, run,
                lambda d, m=method: [ref.crop_resize(d["frames"], d["host_boxes"], method=m)],
                max_abs=1, why="tables equal cv2 on the CI OpenCV build; another OpenCV build may "
                               "round its SIMD bilinear (INTER_AREA enlarging) differently: <= 1"))
    cases.append(Case(
        "crop_resize_single_frame_size",
        lambda rng: {"frames": _frames(rng, 1, 120, 90)[0], "host_boxes": np.array([5, 7, 86, 119])},
        lambda K, d: [K.crop_resize(d["frames"], d["host_boxes"], size=(64, 48), method="area")],
        lambda d: [ref.crop_resize(d["frames"], d["host_boxes"], size=(64, 48), method="area")]))
    for n, height, width in ((4, 300, 400), (64, 30, 34)):
        build = lambda rng, n=n, h=height, w=width: {
            "faces": rng.integers(0, 256, (n, 256, 256, 3), dtype=np.uint8),
            "host_boxes": _boxes(rng, n, h, w)}
        run = lambda K, d: [K.resize_to_boxes(d["faces"], d["host_boxes"])]
        cases.append(Case(f"resize_to_boxes_b{n}", build, run, lambda d: [
            ref.resize_to_boxes(d["faces"], d["host_boxes"], impl="kernel")]))
        cases.append(Case(f"resize_to_boxes_b{n}_vs_cv2", build, run, lambda d: [
            ref.resize_to_boxes(d["faces"], d["host_boxes"])], max_abs=1, why=OPENCV_LINEAR))
    return cases


def _filter_cases() -> list[Case]:
    cases = []
    # filter.cu: tiles of 256 elements x 32 rows; a tile whose halo lies inside the frame is
    # copied without reflection: frames of > 2 * 256 + 16 elements and > 32 + 32 + 3 rows have
    # such tiles, with rows 16-byte aligned (560; 768 below), 4-byte aligned (600) or not (543);
    # the fast path (ksize <= 7) is compiled per channel count.
    shapes = ((2, 37, 53, 3), (1, 3, 2, 3), (64, 9, 11, 3), (2, 40, 33, 1), (1, 20, 130, 4),
              (1, 70, 181, 3), (1, 67, 300, 2), (1, 40, 600, 1), (2, 70, 140, 4))
    for shape in shapes:
        build = lambda rng, s=shape: {"images": rng.integers(0, 256, s, dtype=np.uint8)}
        cases.append(Case(
            f"gaussian_blur_{'x'.join(map(str, shape))}", build,
            lambda K, d: [K.gaussian_blur(d["images"]),
                          K.gaussian_blur(d["images"], sigma=2.0, ksize=5)],
            lambda d: [ref.gaussian_blur(d["images"]),
                       ref.gaussian_blur(d["images"], sigma=2.0, ksize=5)],
            why="integer fixed-point blur, bit-exact with cv2.GaussianBlur"))
        cases.append(Case(
            f"unsharp_mask_{'x'.join(map(str, shape))}", build,
            lambda K, d: [K.unsharp_mask(d["images"]),
                          K.unsharp_mask(d["images"], amount=0.5, sigma=1.5, threshold=0)],
            lambda d: [ref.unsharp_mask(d["images"]),
                       ref.unsharp_mask(d["images"], amount=0.5, sigma=1.5, threshold=0)]))
    cases.append(Case(
        "gaussian_blur_ksizes",   # fast path with zero-padded taps (1, 3), generic up to 31
        lambda rng: {"rgb": rng.integers(0, 256, (1, 70, 181, 3), dtype=np.uint8),
                     "rgba": rng.integers(0, 256, (2, 50, 140, 4), dtype=np.uint8)},
        lambda K, d: [K.gaussian_blur(d[key], sigma=s, ksize=k) for key in ("rgb", "rgba")
                      for s, k in ((0.8, 1), (0.8, 3), (5.0, 19), (8.0, 31))],
        lambda d: [ref.gaussian_blur(d[key], sigma=s, ksize=k) for key in ("rgb", "rgba")
                   for s, k in ((0.8, 1), (0.8, 3), (5.0, 19), (8.0, 31))],
        why="integer fixed-point blur, bit-exact with cv2.GaussianBlur"))
    cases.append(Case(
        "unsharp_mask_face_out",
        lambda rng: {"images": rng.integers(0, 256, (2, 256, 256, 3), dtype=np.uint8),
                     "out": np.zeros((2, 256, 256, 3), np.uint8)},
        lambda K, d: [K.unsharp_mask(d["images"], out=d["out"]), d["out"]],
        lambda d: [ref.unsharp_mask(d["images"])] * 2))
    return cases


def _compose_cases() -> list[Case]:
    cases = []
    for n, height, width in ((3, 120, 160), (64, 24, 30), (1, 64, 64)):
        build = lambda rng, n=n, h=height, w=width: _compose_inputs(rng, n, h, w)
        cases.append(Case(
            f"blend_b{n}", build,
            lambda K, d: [K.blend(d["frames"], K.resize_to_boxes(d["faces"], d["host_boxes"]),
                                  d["host_boxes"], d["masks"])],
            lambda d: [ref.blend(d["frames"], ref.resize_to_boxes(d["faces"], d["host_boxes"],
                                                                  impl="kernel"),
                                 d["host_boxes"], d["masks"])],
            why="integer blend; resized faces from the float32 bilinear model"))
        for sharpen in (None, SharpenParams()):
            tag = f"b{n}_{'sharp' if sharpen else 'plain'}"
            cases.append(Case(
                f"compose_rgb_{tag}", build,
                lambda K, d, s=sharpen: [K.compose_rgb(d["frames"], d["faces"], d["host_boxes"],
                                                       d["masks"], sharpen=s)],
                lambda d, s=sharpen: [ref.compose_rgb(d["frames"], d["faces"], d["host_boxes"],
                                                      d["masks"], sharpen=s, resize_impl="kernel")]))
            cases.append(Case(
                f"compose_rgb_{tag}_vs_cv2", build,
                lambda K, d, s=sharpen: [K.compose_rgb(d["frames"], d["faces"], d["host_boxes"],
                                                       d["masks"], sharpen=s)],
                lambda d, s=sharpen: [ref.compose_rgb(d["frames"], d["faces"], d["host_boxes"],
                                                      d["masks"], sharpen=s)],
                max_abs=1, why=OPENCV_LINEAR + "; the blend cannot grow a 1 LSB face difference"))
    for matrix in ("bt601", "bt709"):
        for full in (False, True):
            for sharpen in (None, SharpenParams()):
                kw = {"matrix": matrix, "full_range": full, "sharpen": sharpen}
                tag = f"{matrix}_{'full' if full else 'limited'}_{'sharp' if sharpen else 'plain'}"
                build = lambda rng: {**_compose_inputs(rng, 3, 96, 128)}
                run = lambda K, d, kw=kw: [K.compose_nv12(
                    K.rgb_to_nv12(d["frames"], matrix=kw["matrix"], full_range=kw["full_range"]),
                    d["faces"], d["host_boxes"], d["masks"], **kw)]

                def want(d, kw=kw, impl="kernel"):
                    nv12 = ref.rgb_to_nv12(d["frames"], matrix=kw["matrix"],
                                           full_range=kw["full_range"])
                    return [ref.compose_nv12(nv12, d["faces"], d["host_boxes"], d["masks"],
                                             resize_impl=impl, **kw)]
                cases.append(Case(f"compose_nv12_{tag}", build, run, want))
                cases.append(Case(f"compose_nv12_{tag}_vs_cv2", build, run,
                                  lambda d, w=want: w(d, impl="opencv"), max_abs=1,
                                  why=OPENCV_LINEAR + "; Y/U/V coefficients have |sum| <= 1"))
    cases += _compose_nv12_shortcut_cases()
    cases.append(Case(
        "compose_nv12_batch64_out",
        lambda rng: {**_compose_inputs(rng, 64, 20, 26), "out": np.zeros((64, 30, 26), np.uint8)},
        lambda K, d: [K.compose_nv12(K.rgb_to_nv12(d["frames"]), d["faces"], d["host_boxes"],
                                     d["masks"], out=d["out"]), d["out"]],
        lambda d: [ref.compose_nv12(ref.rgb_to_nv12(d["frames"]), d["faces"], d["host_boxes"],
                                    d["masks"], resize_impl="kernel")] * 2))
    # more frames than one launch's table holds (launch.NV12_TABLE_FRAMES = 64): the wrapper
    # launches per 64 frames, each with its frames', faces' and table's slice; packed masks, so
    # the table also skips their zero rows
    cases.append(Case(
        "compose_nv12_batch70_two_launches",
        lambda rng: _compose_inputs(rng, 70, 20, 26),
        lambda K, d: [K.compose_nv12(K.rgb_to_nv12(d["frames"]), d["faces"], d["host_boxes"],
                                     K.pack_masks(d["masks"]))],
        lambda d: [ref.compose_nv12(ref.rgb_to_nv12(d["frames"]), d["faces"], d["host_boxes"],
                                    d["masks"], resize_impl="kernel")]))
    return cases


# compose_nv12.cu skips the luma / UV reads, the decode and the blend of mask-255 pixels and
# blocks, and shares face rows between output rows; these masks and boxes put every kind of
# 2x2 block (all 255, all 0, 0 / partial / 255 mixed) at every position: odd box coordinates
# (blocks half outside the box), frame edges, up- and downscaled faces, scale exactly 1.
_SHORTCUT_BOXES = ((0, 0, 320, 288), (33, 17, 290, 273), (2, 9, 130, 100), (201, 151, 320, 288))


def _shortcut_mask(rng: np.random.Generator, h: int, w: int, kind: int) -> np.ndarray:
    if kind == 0:     # MuseTalk-like: 0 on top, a ramp, 255 below (benchmarks.kernels._masks)
        ramp = np.clip((np.arange(h) - h * 0.45) / (h * 0.1) * 255, 0, 255).astype(np.uint8)
        return np.repeat(ramp[:, None], w, axis=1)
    if kind == 1:     # every pixel 0, 255 or partial at random: mixed 2x2 blocks
        return rng.choice(np.array([0, 255, 1, 128, 254], np.uint8), (h, w), p=[.3, .4, .1, .1, .1])
    if kind == 2:     # 255 with isolated 0 / partial pixels (mostly all-255 blocks)
        m = np.full((h, w), 255, np.uint8)
        holes = rng.random((h, w)) < 0.05
        m[holes] = rng.choice(np.array([0, 7, 200], np.uint8), int(holes.sum()))
        return m
    return np.full((h, w), 255, np.uint8)   # the whole box


def _shortcut_inputs(rng: np.random.Generator, boxes, kinds, height: int = 288,
                     width: int = 320, face: tuple[int, int] = (256, 256)) -> dict:
    boxes = np.asarray(boxes, np.int64)
    return {"frames": _frames(rng, len(boxes), height, width),
            "faces": rng.integers(0, 256, (len(boxes), *face, 3), dtype=np.uint8),
            "host_boxes": boxes,
            "masks": [_shortcut_mask(rng, int(y2 - y1), int(x2 - x1), k)
                      for (x1, y1, x2, y2), k in zip(boxes, kinds)]}


def _nv12_case(name: str, build: Callable, **kw: Any) -> Case:
    """compose_nv12 of the NV12 encoding of d["frames"]; one [H*3/2, W] frame if d["single"].
    The masks go in packed, as the pipeline passes them (with their row spans)."""
    color = {"matrix": kw.get("matrix", "bt709"), "full_range": kw.get("full_range", False)}

    def call(B: Any, d: dict, **extra: Any) -> list:
        nv12, faces = B.rgb_to_nv12(d["frames"], **color), d["faces"]
        if d.get("single"):
            nv12, faces = nv12[0], faces[0]
        return [B.compose_nv12(nv12, faces, d["host_boxes"], B.pack_masks(d["masks"]), **kw,
                               **extra)]

    return Case(name, build, call, lambda d: call(ref, d, resize_impl="kernel"))


def _compose_nv12_shortcut_cases() -> list[Case]:
    cases = []
    for i, (matrix, full) in enumerate((("bt601", False), ("bt601", True), ("bt709", False),
                                        ("bt709", True))):
        kinds = [(i + j) % 4 for j in range(4)]   # every mask kind in every box, over the loop
        sharpen = SharpenParams() if i % 2 else None
        cases.append(_nv12_case(
            f"compose_nv12_shortcuts_{matrix}_{'full' if full else 'limited'}",
            lambda rng, k=kinds: _shortcut_inputs(rng, _SHORTCUT_BOXES, k),
            matrix=matrix, full_range=full, sharpen=sharpen))
    # faces of flat primaries (the RGB cube's corners): full-range U / V reach 255.5 (rounded to
    # 256, clamped to 255) and 0.5, the encoders' extremes
    for matrix in ("bt601", "bt709"):
        cases.append(_nv12_case(f"compose_nv12_saturated_{matrix}_full", lambda rng: {
            **_shortcut_inputs(rng, _SHORTCUT_BOXES, [3, 2, 3, 0]),
            "faces": np.repeat(np.repeat(rng.integers(0, 2, (4, 8, 8, 3), dtype=np.uint8) * 255,
                                         32, axis=1), 32, axis=2)},
            matrix=matrix, full_range=True))
    # batch 1 (a single [H*3/2, W] frame) with a box of odd coordinates, all 255
    cases.append(_nv12_case("compose_nv12_shortcuts_single", lambda rng: {
        **_shortcut_inputs(rng, [(5, 3, 58, 41)], [3], 48, 64), "single": True}))
    # faces of 1 or 2 pixels on an axis (the wrapper widens 1-pixel-wide ones), odd sizes
    for fh, fw in ((1, 1), (1, 6), (5, 1), (2, 2), (3, 7)):
        cases.append(_nv12_case(f"compose_nv12_face_{fh}x{fw}", lambda rng, f=(fh, fw): (
            _shortcut_inputs(rng, [(0, 0, 24, 20), (3, 5, 20, 16)], [1, 2], 20, 24, f))))
    return cases


CASES: list[Case] = _color_cases() + _resize_cases() + _filter_cases() + _compose_cases()
