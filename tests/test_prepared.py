"""Prepared calls (talkrt.kernels.gpu.prepare) on the CPU emulator of the CUDA kernels: the
wrapper runs once, nothing is launched until the prepared call, and each call launches the
bound kernels on the arrays' current contents."""

from __future__ import annotations

import numpy as np
import pytest

import kernel_emulate as emulate
from talkrt.kernels import SharpenParams, gpu, pack_masks, reference as ref

pytestmark = pytest.mark.skipif(not emulate.compiler_available(), reason="g++ not available")


def _nv12(rng: np.random.Generator, n: int = 2, height: int = 16, width: int = 24) -> np.ndarray:
    return rng.integers(0, 256, (n, height * 3 // 2, width), dtype=np.uint8)


def test_prepared_conversion_reads_the_inputs_current_contents() -> None:
    rng = np.random.default_rng(1)
    src = _nv12(rng)
    out = np.zeros((2, 16, 24, 3), np.uint8)
    with emulate.emulated_gpu():
        op = gpu.prepare(gpu.nv12_to_rgb, src, matrix="bt601", full_range=True, out=out)
        assert not out.any()                                # preparing launches nothing
        assert op() is out
        assert np.array_equal(out, ref.nv12_to_rgb(src, matrix="bt601", full_range=True))
        src[...] = _nv12(rng)                               # refill the bound input in place
        op()
        assert np.array_equal(out, ref.nv12_to_rgb(src, matrix="bt601", full_range=True))


def test_prepared_compose_runs_in_place_on_each_call() -> None:
    rng = np.random.default_rng(2)
    frames = ref.rgb_to_nv12(rng.integers(0, 256, (2, 32, 40, 3), dtype=np.uint8))
    faces = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    boxes = np.array([[3, 5, 21, 27], [10, 2, 40, 20]])
    masks = [rng.integers(0, 256, (y2 - y1, x2 - x1), dtype=np.uint8) for x1, y1, x2, y2 in boxes]
    original = frames.copy()
    with emulate.emulated_gpu():
        op = gpu.prepare(gpu.compose_nv12, frames, faces, boxes, pack_masks(masks),
                         sharpen=SharpenParams())
        assert np.array_equal(frames, original)
        op()
        want = ref.compose_nv12(original.copy(), faces, boxes, masks, sharpen=SharpenParams(),
                                resize_impl="kernel")
        assert np.array_equal(frames, want)
        frames[...] = original                              # a new batch in the same buffer
        faces[...] = faces[::-1]
        op()
        want = ref.compose_nv12(original.copy(), faces, boxes, masks, sharpen=SharpenParams(),
                                resize_impl="kernel")
        assert np.array_equal(frames, want)


def test_prepare_refuses_what_it_cannot_repeat() -> None:
    frames = np.zeros((1, 24, 16), np.uint8)
    with emulate.emulated_gpu():
        with pytest.raises(ValueError, match="in place"):
            gpu.prepare(gpu.compose_nv12, frames, np.zeros((1, 4, 4, 3), np.uint8), [0, 0, 4, 4],
                        [np.ones((4, 4), np.uint8)], out=np.zeros_like(frames))
        with pytest.raises(ValueError, match="cannot be prepared"):
            gpu.prepare(gpu.pack_masks, [np.ones((4, 4), np.uint8)])
        with pytest.raises(ValueError, match="2 pixels wide"):
            gpu.prepare(gpu.compose_nv12, frames, np.zeros((1, 4, 1, 3), np.uint8),
                        [0, 0, 4, 4], [np.ones((4, 4), np.uint8)])
        with pytest.raises(ValueError, match="W\\*3/2|H\\*3/2"):
            gpu.prepare(gpu.nv12_to_rgb, np.zeros((1, 5, 4), np.uint8))   # the op's own check


def test_reference_prepare_is_the_cpu_twin() -> None:
    rng = np.random.default_rng(3)
    src = _nv12(rng)
    op = ref.prepare(ref.nv12_to_rgb, src)
    first = op()
    src[...] = _nv12(rng)
    assert np.array_equal(op(), ref.nv12_to_rgb(src))
    assert not np.array_equal(first, op())
    with pytest.raises(ValueError, match="not a talkrt.kernels.reference op"):
        ref.prepare(gpu.nv12_to_rgb, src)
