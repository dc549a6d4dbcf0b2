"""GPU parity tests of talkrt.kernels (CuPy on a CUDA device; skipped elsewhere).

Every case of kernel_parity runs on the real kernels and is compared with the
reference under the tolerance the case documents; a few extra tests cover what the CPU
emulator cannot: DLPack (torch), streams, misaligned views, realistic frame sizes, NVRTC.
"""

from __future__ import annotations

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")
try:
    _DEVICES = cupy.cuda.runtime.getDeviceCount()
except Exception:  # noqa: BLE001 - no driver / driver too old
    _DEVICES = 0
if _DEVICES < 1:
    pytest.skip("no CUDA device", allow_module_level=True)

import kernel_parity as parity  # noqa: E402
from talkrt.kernels import _cuda, gpu, reference as ref  # noqa: E402
from talkrt.kernels.validate import SharpenParams  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("case", parity.CASES, ids=[c.name for c in parity.CASES])
def test_parity(case: parity.Case) -> None:
    parity.run_case(case, gpu, cupy.asarray, cupy.asnumpy)


def _face_inputs(rng: np.random.Generator, n: int, height: int, width: int):
    boxes = np.array([[760 + 7 * i, 300 + 5 * i, 1160 + 7 * i, 751 + 5 * i] for i in range(n)])
    boxes = np.minimum(boxes, [width, height, width, height])
    masks = []
    for x1, y1, x2, y2 in boxes:
        m = rng.integers(0, 256, (y2 - y1, x2 - x1), dtype=np.uint8)
        m[: (y2 - y1) // 2] = 0
        masks.append(m)
    frames = rng.integers(0, 256, (n, height, width, 3), dtype=np.uint8)
    faces = rng.integers(0, 256, (n, 256, 256, 3), dtype=np.uint8)
    return frames, faces, boxes, masks


@pytest.mark.parametrize("matrix,full", [("bt709", False), ("bt601", True)])
def test_compose_nv12_1080p_exact(matrix: str, full: bool) -> None:
    # Realistic 1080p batch with ~400x450 face boxes: bit-exact with the kernel-arithmetic
    # reference (same float32 operation sequence, integer blend).
    rng = np.random.default_rng(100)
    frames, faces, boxes, masks = _face_inputs(rng, 4, 1080, 1920)
    nv12 = ref.rgb_to_nv12(frames, matrix=matrix, full_range=full)
    want = ref.compose_nv12(nv12.copy(), faces, boxes, masks, matrix=matrix, full_range=full,
                            sharpen=SharpenParams(), resize_impl="kernel")
    got = gpu.compose_nv12(cupy.asarray(nv12), cupy.asarray(faces), boxes, masks, matrix=matrix,
                           full_range=full, sharpen=SharpenParams())
    parity.assert_close(cupy.asnumpy(got), want, 0, "compose_nv12 1080p")


def test_compose_nv12_1080p_benchmark_layout_exact() -> None:
    # benchmarks.kernels' layout: 400x450 boxes (odd x1 for some frames), masks 0 on the top
    # 45%, a 10% ramp, 255 below: mostly all-0 and all-255 2x2 blocks, the shortcuts of
    # compose_nv12.cu, with partial rows between them.
    rng = np.random.default_rng(105)
    n, height, width, box_w, box_h = 8, 1080, 1920, 400, 450
    x1 = (width - box_w) // 2 + (np.arange(n) % 7) * 3
    y1 = (height - box_h) // 3 + (np.arange(n) % 5) * 2
    boxes = np.stack([x1, y1, x1 + box_w, y1 + box_h], axis=1).astype(np.int64)
    ramp = np.clip((np.arange(box_h) - box_h * 0.45) / (box_h * 0.1) * 255, 0, 255).astype(np.uint8)
    masks = [np.repeat(ramp[:, None], box_w, axis=1) for _ in range(n)]
    frames = rng.integers(0, 256, (n, height, width, 3), dtype=np.uint8)
    faces = rng.integers(0, 256, (n, 256, 256, 3), dtype=np.uint8)
    for matrix, full in (("bt709", False), ("bt601", True)):
        nv12 = ref.rgb_to_nv12(frames, matrix=matrix, full_range=full)
        want = ref.compose_nv12(nv12.copy(), faces, boxes, masks, matrix=matrix,
                                full_range=full, resize_impl="kernel")
        got = gpu.compose_nv12(cupy.asarray(nv12), cupy.asarray(faces), boxes, masks,
                               matrix=matrix, full_range=full)
        parity.assert_close(cupy.asnumpy(got), want, 0, f"compose_nv12 benchmark {matrix}")


def test_color_4k_exact() -> None:
    rng = np.random.default_rng(101)
    nv12 = rng.integers(0, 256, (1, 2160 * 3 // 2, 3840), dtype=np.uint8)
    rgb = gpu.nv12_to_rgb(cupy.asarray(nv12))
    parity.assert_close(cupy.asnumpy(rgb), ref.nv12_to_rgb(nv12), 0, "nv12_to_rgb 4K")
    back = gpu.rgb_to_nv12(rgb)
    parity.assert_close(cupy.asnumpy(back), ref.rgb_to_nv12(ref.nv12_to_rgb(nv12)), 0, "4K back")


def test_misaligned_views_use_the_byte_path() -> None:
    # A 1-byte offset view is still C-contiguous but not 4-byte aligned.
    rng = np.random.default_rng(102)
    host = rng.integers(0, 256, (2, 12 * 3 // 2, 16), dtype=np.uint8)
    buf = cupy.empty(host.size + 1, dtype=cupy.uint8)
    view = buf[1:].reshape(host.shape)
    view[...] = cupy.asarray(host)
    out_buf = cupy.empty(2 * 12 * 16 * 3 + 3, dtype=cupy.uint8)
    out = out_buf[3:].reshape(2, 12, 16, 3)
    gpu.nv12_to_rgb(view, out=out)
    parity.assert_close(cupy.asnumpy(out), ref.nv12_to_rgb(host), 0, "misaligned")


def test_stream_argument() -> None:
    rng = np.random.default_rng(103)
    images = cupy.asarray(rng.integers(0, 256, (3, 64, 80, 3), dtype=np.uint8))
    stream = cupy.cuda.Stream(non_blocking=True)
    out = gpu.unsharp_mask(images, stream=stream)
    stream.synchronize()
    parity.assert_close(cupy.asnumpy(out), ref.unsharp_mask(cupy.asnumpy(images)), 0, "stream")


def test_torch_cuda_tensors_via_dlpack() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    rng = np.random.default_rng(104)
    frames, faces, boxes, masks = _face_inputs(rng, 2, 720, 1280)
    t_frames = torch.from_numpy(frames).cuda()
    t_faces = torch.from_numpy(faces).cuda()
    t_out = torch.empty_like(t_frames)
    result = gpu.compose_rgb(t_frames, t_faces, boxes, masks, out=t_out)
    torch.cuda.synchronize()
    assert result.data.ptr == t_out.data_ptr()          # wrote into the tensor, no copy
    want = ref.compose_rgb(frames.copy(), faces, boxes, masks, resize_impl="kernel")
    parity.assert_close(t_out.cpu().numpy(), want, 0, "torch compose_rgb")
    with pytest.raises(TypeError, match="not on a CUDA device"):
        gpu.nv12_to_rgb(torch.zeros((6, 4), dtype=torch.uint8))


def test_host_arrays_are_rejected() -> None:
    with pytest.raises(TypeError, match="numpy array"):
        gpu.nv12_to_rgb(np.zeros((6, 4), np.uint8))


def test_kernels_are_loaded_once_and_share_their_module() -> None:
    to_rgb = _cuda.get_kernel("color.cu", "nv12_to_rgb_kernel")
    gpu.nv12_to_rgb(cupy.zeros((6, 4), cupy.uint8))
    assert _cuda.get_kernel("color.cu", "nv12_to_rgb_kernel") is to_rgb
    to_nv12 = _cuda.get_kernel("color.cu", "rgb_to_nv12_kernel")
    assert to_nv12.kernel.module is to_rgb.kernel.module    # one compile of color.cu per device


def test_launches_follow_a_torch_stream() -> None:
    """A kernel launched with a torch stream runs after the work queued before it there."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    stream = torch.cuda.Stream()
    rng = np.random.default_rng(105)
    host = rng.integers(0, 256, (4, 96, 128), dtype=np.uint8)
    staged = torch.from_numpy(host).cuda()
    src = torch.zeros((4, 96, 128), dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(20_000_000)                 # keep the stream busy (~10 ms)
        src.copy_(staged)                             # queued behind the sleep
        out = gpu.nv12_to_rgb(src, stream=stream)     # on another stream it would read zeros
    stream.synchronize()
    parity.assert_close(cupy.asnumpy(out), ref.nv12_to_rgb(host), 0, "torch stream")


def test_upload_is_queued_on_the_stream_and_releases_its_staging() -> None:
    stream = cupy.cuda.Stream(non_blocking=True)
    tables = [np.arange(i, i + 1000, dtype=np.int64) for i in range(8)]
    with stream:
        uploaded = [_cuda.upload(t) for t in tables]
    stream.synchronize()
    for host, device in zip(tables, uploaded):
        assert device.dtype == host.dtype and device.shape == host.shape
        assert np.array_equal(cupy.asnumpy(device), host)
    with stream:
        _cuda.upload(np.zeros(4, np.int32))   # drops every finished staging buffer first
    assert len(_cuda._staged) <= 1


def test_calls_on_a_stream_follow_their_refilled_inputs() -> None:
    rng = np.random.default_rng(106)
    frames, faces, boxes, masks = _face_inputs(rng, 3, 720, 1280)
    nv12_host = ref.rgb_to_nv12(frames)
    nv12, d_faces = cupy.asarray(nv12_host), cupy.asarray(faces)
    packed = gpu.pack_masks(masks, xp=cupy)
    rgb = cupy.empty((3, 720, 1280, 3), cupy.uint8)
    stream = cupy.cuda.Stream(non_blocking=True)
    for round_ in range(2):
        if round_:
            nv12_host = ref.rgb_to_nv12(rng.integers(0, 256, frames.shape, dtype=np.uint8))
            faces = rng.integers(0, 256, faces.shape, dtype=np.uint8)
            nv12.set(nv12_host, stream=stream)
            d_faces.set(faces, stream=stream)
        gpu.compose_nv12(nv12, d_faces, boxes, packed, sharpen=SharpenParams(), stream=stream)
        gpu.nv12_to_rgb(nv12, out=rgb, matrix="bt601", stream=stream)
        stream.synchronize()
        want = ref.compose_nv12(nv12_host.copy(), faces, boxes, masks, sharpen=SharpenParams(),
                                resize_impl="kernel")
        parity.assert_close(cupy.asnumpy(nv12), want, 0, f"compose on a stream {round_}")
        parity.assert_close(cupy.asnumpy(rgb), ref.nv12_to_rgb(want, matrix="bt601"), 0,
                            f"nv12_to_rgb on a stream {round_}")
