"""LatentSync's stage selection and its GPU restore stage, on the CPU.

The GPU restore stage runs here through the kernel emulator (``kernel_emulate.emulated_gpu``:
the real CUDA source compiled for the host, CuPy replaced by numpy), so its gathering of the
affines, its face-row subset and its colour arguments are checked against
:func:`talkrt.kernels.warp_reference.restore_nv12` without a GPU.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import kernel_emulate as emulate
from kernel_parity_warp import similarity
from talkrt.errors import TalkrtError
from talkrt.face.align_mask import FaceMask
from talkrt.families import get_family
from talkrt.families.latentsync import (
    FAMILY,
    DenoiseStage,
    GpuRestoreStage,
    LatentDecodeStage,
    LatentSyncParts,
    RestoreStage,
)
from talkrt.kernels import _cuda
from talkrt.kernels import warp_reference as wref
from talkrt.kernels.reference import rgb_to_nv12
from talkrt.session import resolve_compose
from talkrt.stages import FrameBatch

needs_gxx = pytest.mark.skipif(not emulate.compiler_available(), reason="g++ not available")
CPU = torch.device("cpu")
SIZE, HEIGHT, WIDTH = 24, 40, 50      # crop S, frame H x W (even: NV12)


def mask(size: int = SIZE) -> FaceMask:
    """A paste mask with 0, partial and 255 weights (lower half generated)."""
    paste = np.zeros((size, size), np.uint8)
    paste[size // 3: size // 2] = 128
    paste[size // 2:] = 255
    paste.setflags(write=False)                 # as load_mask leaves it
    return FaceMask(1 - paste.astype(np.float32) / 255, paste, "test")


@pytest.fixture
def host_tensors(monkeypatch):
    """The emulator's stand-in for DLPack: CPU tensors are adopted as numpy views (no copy), as
    CUDA tensors are adopted as CuPy views on a GPU."""
    adopt = _cuda.adopt
    monkeypatch.setattr(_cuda, "adopt", lambda a, name: a.numpy() if isinstance(a, torch.Tensor) else adopt(a, name))


def parts(compose: str) -> SimpleNamespace:
    return SimpleNamespace(compose=compose, device=CPU, stream=None,
                           models=LatentSyncParts(generator=object(), audio=None, mask=mask()))


def test_compose_modes_are_advertised_and_enforced():
    assert FAMILY.compose_modes == ("auto", "gpu", "numpy")
    assert "reference" in get_family("musetalk").compose_modes          # MuseTalk's PIL paste stays
    with pytest.raises(TalkrtError, match=r"--compose reference: the latentsync16 family .*use auto, gpu, numpy"):
        resolve_compose("reference", CPU, FAMILY)
    assert resolve_compose("auto", CPU, FAMILY) == "numpy"              # no CUDA: the CPU set
    assert resolve_compose("numpy", CPU, FAMILY) == "numpy"


def test_compose_gpu_is_refused_on_the_cpu_with_the_reason(tmp_path):
    from talkrt.families import load_family_config
    from talkrt.session import build_session
    with pytest.raises(TalkrtError, match="--compose gpu needs --device cuda"):
        build_session(load_family_config("latentsync16-tiny"), device="cpu", compose="gpu", cache_dir=tmp_path)


def test_numpy_compose_picks_the_host_stages():
    denoise, decode, restore = FAMILY.model_stages(parts("numpy"))
    assert isinstance(denoise, DenoiseStage) and isinstance(restore, RestoreStage)
    assert isinstance(decode, LatentDecodeStage) and not decode.on_device


@needs_gxx
def test_gpu_compose_picks_the_device_stages_and_uploads_the_paste_once():
    with emulate.emulated_gpu():
        _, decode, restore = FAMILY.model_stages(parts("gpu"))
    assert isinstance(restore, GpuRestoreStage) and decode.on_device
    assert isinstance(restore.paste, torch.Tensor) and restore.paste.device == CPU   # parts.device
    assert restore.paste.dtype == torch.uint8 and restore.paste.shape == (SIZE, SIZE)
    assert np.array_equal(restore.paste.numpy(), mask().paste)


@pytest.mark.parametrize("on_device", [False, True])
def test_latent_decode_keeps_faces_where_the_restore_wants_them(on_device):
    faces = torch.arange(2 * 4 * 4 * 3, dtype=torch.uint8).reshape(2, 3, 4, 4).permute(0, 2, 3, 1)   # strided
    generator = SimpleNamespace(decode=lambda latents: faces)
    batch = SimpleNamespace(latents=None, faces=None)
    LatentDecodeStage(generator, on_device=on_device)(batch)
    if on_device:
        assert isinstance(batch.faces, torch.Tensor) and batch.faces.is_contiguous()
    else:
        assert isinstance(batch.faces, np.ndarray)
    assert np.array_equal(np.asarray(batch.faces), faces.numpy())


@needs_gxx
@pytest.mark.parametrize("found", [[True, True, True], [False, True, False, True, True]])
def test_gpu_restore_stage_equals_the_nv12_reference(found, host_tensors):
    """Every face row restored as warp_reference.restore_nv12 restores it (BT.709 limited: the GPU
    frames' range), the rows without a face untouched."""
    rng = np.random.default_rng(len(found))
    found = np.array(found)
    n = len(found)
    to_crop = np.zeros((n, 2, 3))
    for i in np.flatnonzero(found):
        to_crop[i] = similarity(SIZE / (0.6 * HEIGHT), 0.1 * i, -0.1 * SIZE * i, 0.05 * SIZE)
    avatar = SimpleNamespace(found=found, to_crop=to_crop)
    src = np.arange(n)
    batch = FrameBatch.of_avatar(0, src, src, avatar)
    nv12 = rgb_to_nv12(rng.integers(0, 256, (n, HEIGHT, WIDTH, 3), dtype=np.uint8))
    faces = rng.integers(0, 256, (int(found.sum()), SIZE, SIZE, 3), dtype=np.uint8)
    batch.nv12, batch.faces = torch.from_numpy(nv12.copy()), torch.from_numpy(faces)
    with emulate.emulated_gpu() as launched:
        GpuRestoreStage(mask(), CPU, None)(batch)
    assert [name for name, _ in launched] == ["restore_nv12_kernel"]     # one launch for the batch
    rows = batch.face_rows
    want = nv12.copy()
    want[rows] = wref.restore_nv12(nv12[rows].copy(), faces, to_crop[rows], mask().paste,
                                   matrix="bt709", full_range=False)
    assert np.array_equal(batch.nv12.numpy(), want)
    assert not np.array_equal(want[rows], nv12[rows])                    # the restore did write
