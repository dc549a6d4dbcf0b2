"""CUDA side of the live renderer: every avatar's frames as NV12 in device memory, the CuPy
compose into them, and JPEG encoding with nvJPEG through ``torchvision.io.encode_jpeg``.

Colour: avatar frames are RGB (PyAV converts from the source's tags), uploaded once as BT.709
limited-range NV12, the output format of the pipeline's GPU compose
(:data:`talkrt.gpu_stages.OUTPUT_MATRIX`), and converted back to RGB for the encoder, so a
speech frame differs from the CPU path's by the 4:2:0 chroma of that round trip (the JPEG then
subsamples nothing: torchvision asks nvJPEG for 4:4:4).

Streams: torchvision's CUDA encoder runs on a stream of its own that does not wait for the
caller's, and copies the bitstreams out on the legacy default stream; :meth:`GpuFrames.jpeg`
synchronises before and after it (torchvision 0.19-0.26,
``torchvision/csrc/io/image/cuda/encode_jpegs_cuda.cpp``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from talkrt.errors import TalkrtError
from talkrt.pipeline import PipelineParts
from talkrt.serve.avatars import JPEG_QUALITY, LiveAvatar
from talkrt.stages import FrameBatch
from talkrt.streams import to_device

log = logging.getLogger(__name__)

UPLOAD_FRAMES = 32          # avatar frames converted to NV12 per upload (bounds the RGB staging memory)


def torchvision_wheel_hint() -> str:
    """Which torchvision build matches the running torch: torch 2.M pairs with torchvision
    0.(M+15) (the pairing PyTorch publishes), built for the same CUDA."""
    base = torch.__version__.split("+")[0]
    major, minor = (base.split(".") + ["0"])[:2]
    version = f"0.{int(minor) + 15}" if major == "2" and minor.isdigit() else "<the release made for this torch>"
    cuda = torch.version.cuda
    tag = f"cu{cuda.replace('.', '')}" if cuda else "cpu"
    return (f"install the CUDA build of torchvision {version} made for torch {base}"
            f"{f' / CUDA {cuda}' if cuda else ' (this torch has no CUDA)'}: "
            f"pip install --no-deps 'torchvision=={version}.*' --index-url https://download.pytorch.org/whl/{tag} "
            f"(a wheel named torchvision-{version}.*+{tag}-cp3XX-...-manylinux_2_28_x86_64.whl)")


def load_nvjpeg_encoder(device: torch.device) -> Callable:
    """``torchvision.io.encode_jpeg``, checked by encoding one small frame on ``device``.

    Raises:
        TalkrtError: torchvision is missing, does not match torch, or was built without
            nvJPEG; the message says which wheel to install.
    """
    try:
        import torchvision
        from torchvision.io import encode_jpeg
    except Exception as exc:  # noqa: BLE001 - a mismatched build fails in many ways at import
        raise TalkrtError(f"talkrt serve on CUDA encodes JPEG with nvJPEG through torchvision, which cannot be "
                          f"imported ({type(exc).__name__}: {exc}); {torchvision_wheel_hint()}") from exc
    probe = torch.full((3, 16, 16), 128, dtype=torch.uint8, device=device)
    try:
        encoded = encode_jpeg([probe], quality=JPEG_QUALITY)
        torch.cuda.default_stream(device).synchronize()
        data = encoded[0].cpu().numpy().tobytes()
    except Exception as exc:  # noqa: BLE001 - e.g. "not compiled with nvJPEG support", missing operator
        raise TalkrtError(f"torchvision {torchvision.__version__} cannot encode JPEG on {device} "
                          f"({type(exc).__name__}: {exc}); {torchvision_wheel_hint()}") from exc
    if not data.startswith(b"\xff\xd8"):
        raise TalkrtError(f"torchvision {torchvision.__version__}: nvJPEG returned no JPEG on {device}; "
                          f"{torchvision_wheel_hint()}")
    log.info("nvJPEG through torchvision %s on %s", torchvision.__version__, device)
    return encode_jpeg


class GpuFrames:
    """Device NV12 frames per avatar, compose per frame size, RGB conversion and nvJPEG.

    Raises (at construction):
        TalkrtError: nvJPEG cannot be used (see :func:`load_nvjpeg_encoder`).
        RuntimeError: the CuPy kernels cannot run (the reason from :mod:`talkrt.kernels`).
    """

    def __init__(self, parts: PipelineParts):
        from talkrt import kernels
        from talkrt.gpu_stages import OUTPUT_FULL_RANGE, OUTPUT_MATRIX, GpuComposeStage
        self.encode_jpeg = load_nvjpeg_encoder(parts.device)
        self.kernels, self.matrix, self.full_range = kernels, OUTPUT_MATRIX, OUTPUT_FULL_RANGE
        self.device, self.stream = parts.device, parts.stream
        self.cupy_stream = kernels.cupy_stream(parts.stream)
        self.composer = GpuComposeStage(parts.cfg.pipeline.sharpen, parts.stream)
        self.cache: dict[str, torch.Tensor] = {}          # avatar id -> [N, H*3//2, W] uint8 NV12

    def warm_up(self) -> None:
        """Compile and run each kernel once on a tiny frame (CuPy compiles a kernel at its first
        launch), so the first live frame does not pay for it."""
        rgb = torch.full((1, 16, 16, 3), 100, dtype=torch.uint8, device=self.device)
        nv12 = torch.from_dlpack(self.kernels.rgb_to_nv12(rgb, matrix=self.matrix, full_range=self.full_range,
                                                          stream=self.cupy_stream))
        faces = torch.full((1, 8, 8, 3), 200, dtype=torch.uint8, device=self.device)
        self.kernels.compose_nv12(nv12, faces, np.array([[2, 2, 10, 10]]), [np.full((8, 8), 255, np.uint8)],
                                  matrix=self.matrix, full_range=self.full_range,
                                  sharpen=self.composer.sharpen, stream=self.cupy_stream)
        self.jpeg([nv12[0]])

    def nv12(self, avatar: LiveAvatar) -> torch.Tensor:
        """[N, H*3//2, W] uint8 device NV12 of all of ``avatar``'s frames (uploaded on first use,
        on the current stream)."""
        cached = self.cache.get(avatar.id)
        if cached is None:
            h, w, _ = avatar.frames[0].shape
            cached = torch.empty((len(avatar.frames), h * 3 // 2, w), dtype=torch.uint8, device=self.device)
            for i in range(0, len(avatar.frames), UPLOAD_FRAMES):
                rgb = torch.from_numpy(np.stack(avatar.frames[i:i + UPLOAD_FRAMES])).to(self.device)
                self.kernels.rgb_to_nv12(rgb, matrix=self.matrix, full_range=self.full_range,
                                         out=cached[i:i + len(rgb)], stream=self.cupy_stream)
            self.cache[avatar.id] = cached
        return cached

    def frames(self, avatars: list[LiveAvatar], avatar_index: np.ndarray, src: np.ndarray) -> list[torch.Tensor]:
        """Per-frame device NV12 copies ([H*3//2, W] each; avatars may differ in size)."""
        return [self.nv12(avatars[a])[int(s)].clone() for a, s in zip(avatar_index, src)]

    def compose(self, batch: FrameBatch) -> None:
        """Compose each frame-size group of ``batch.nv12`` (a list of frames) with one kernel launch."""
        frames: list[torch.Tensor] = batch.nv12
        shapes = [tuple(f.shape) for f in frames]
        face_rows = batch.face_rows
        for shape in dict.fromkeys(shapes):
            rows = np.array([r for r in range(batch.size) if shapes[r] == shape], np.int64)
            with_face = rows[batch.found[rows]]
            if not len(with_face):
                continue
            sub = FrameBatch(index=batch.index, out_index=batch.out_index[rows], src_index=batch.src_index[rows],
                             avatars=batch.avatars, avatar_index=batch.avatar_index[rows], found=batch.found[rows])
            sub.nv12 = torch.stack([frames[r] for r in rows])
            faces_of = np.searchsorted(face_rows, with_face)           # rows of batch.faces, in order
            sub.faces = batch.faces[to_device(faces_of, batch.faces.device)]
            self.composer(sub)
            for k, r in enumerate(rows):
                frames[r] = sub.nv12[k]

    def rgb(self, frames: list[torch.Tensor]) -> list[torch.Tensor]:
        """[3, H, W] uint8 device RGB of each NV12 frame, in order (one launch per frame size)."""
        out: list[torch.Tensor | None] = [None] * len(frames)
        shapes = [tuple(f.shape) for f in frames]
        for shape in dict.fromkeys(shapes):
            rows = [r for r in range(len(frames)) if shapes[r] == shape]
            planar = self.kernels.nv12_to_rgb(torch.stack([frames[r] for r in rows]), matrix=self.matrix,
                                              full_range=self.full_range, layout="chw", stream=self.cupy_stream)
            planar = torch.from_dlpack(planar)                          # [k, 3, H, W], contiguous
            for k, r in enumerate(rows):
                out[r] = planar[k]
        return out

    def jpeg(self, frames: list[torch.Tensor]) -> list[bytes]:
        """NV12 device frames -> JPEG bytes (nvJPEG, quality :data:`JPEG_QUALITY`); call on the
        stream the frames were made on (waits for it)."""
        rgb = self.rgb(frames)
        torch.cuda.current_stream(self.device).synchronize()
        return self.encode(rgb)

    def encode(self, rgb: list[torch.Tensor]) -> list[bytes]:
        """[3, H, W] uint8 device RGB frames, already made (their stream synchronised or their
        event waited for: the encoder's stream does not wait for ours) -> JPEG bytes."""
        encoded = self.encode_jpeg(rgb, quality=JPEG_QUALITY)
        sizes = np.cumsum([0] + [int(e.numel()) for e in encoded])
        if encoded[0].is_cuda:
            torch.cuda.default_stream(self.device).synchronize()  # the bitstreams are copied out on stream 0
            host = torch.cat(encoded).cpu().numpy()
        else:
            host = torch.cat(encoded).numpy()
        return [host[a:b].tobytes() for a, b in zip(sizes[:-1], sizes[1:])]

    def release(self) -> None:
        """Free what can be rebuilt: the avatars' device frames (uploaded again on next use) and
        the cached blocks of torch's allocator and CuPy's pool (after an out-of-memory step)."""
        self.cache.clear()
        torch.cuda.empty_cache()
        self.kernels.cupy_module().get_default_memory_pool().free_all_blocks()
