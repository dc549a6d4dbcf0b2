"""Speech frames of one scheduler step, whatever their sessions and avatars: one mixed
:class:`~talkrt.stages.FrameBatch` through Whisper windows, UNet, VAE decode, compose and JPEG.

The model stages are the pipeline's own classes (:mod:`talkrt.stages`, :mod:`talkrt.gpu_stages`).
On the CPU frames are RGB arrays and PIL encodes JPEG. On CUDA frames are NV12 in device memory
(each avatar's frames uploaded once), composed by the CuPy kernel and JPEG-encoded by nvJPEG
through ``torchvision.io.encode_jpeg``; that path is written against the documented APIs and has
not been run yet.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import torch

from talkrt.models.audio import SAMPLE_RATE
from talkrt.pipeline import PipelineParts
from talkrt.serve.audio import WindowEncoder
from talkrt.serve.avatars import JPEG_QUALITY, LiveAvatar, encode_jpeg_cpu
from talkrt.serve.session import WorkItem
from talkrt.stages import CpuComposeStage, FrameBatch, UNetStage, VaeDecodeStage
from talkrt.streams import on_stream

log = logging.getLogger(__name__)


class FrameRenderer:
    """Makes the JPEGs of a list of speech work items in one batch.

    ``__call__(items)`` -> one JPEG (bytes) per item, in item order; ``items`` must number at
    most the engines' max batch. ``last_seconds`` holds the wall time of the last call's model
    stages (Whisper to compose, the stream synchronised on CUDA).
    """

    def __init__(self, parts: PipelineParts):
        self.parts = parts
        self.max_batch = parts.unet.max_batch
        self.windows = WindowEncoder(parts.audio_features)
        self.unet = UNetStage(parts.unet, parts.device, parts.dtype, parts.stream)
        self.on_gpu = parts.compose == "gpu"
        self.vae = VaeDecodeStage(parts.vae_decoder, parts.stream, on_device=self.on_gpu)
        if self.on_gpu:
            self.gpu = GpuFrames(parts)
        else:
            self.compose = CpuComposeStage(parts.compose, parts.cfg.pipeline.sharpen)
        self.batches = 0
        self.last_seconds = 0.0

    def warm_up(self) -> None:
        """One Whisper, UNet and VAE decode call at batch 1, so that the first live frame does not
        pay for lazy initialisation (seconds on the CPU)."""
        f, m, stream = self.parts.audio_features, self.parts.cfg.model, self.parts.stream
        with torch.inference_mode(), on_stream(stream):
            mel = f.extractor([np.zeros(SAMPLE_RATE, np.float32)], sampling_rate=SAMPLE_RATE,
                              return_tensors="pt").input_features
            states = f.stack(mel.to(f.device, f.dtype))                      # [1, 1500, L+1, D]
            audio = states.new_zeros(1, m.audio.window_steps * states.shape[2], states.shape[3])
            latents = torch.zeros(1, 2 * m.vae.latent_channels, m.latent_size, m.latent_size,
                                  device=self.parts.device, dtype=self.parts.dtype)
            out = self.parts.unet.run({"latent_input": latents, "audio_features": audio}, stream)["pred_latents"]
            self.parts.vae_decoder.run({"latents": out}, stream)
            if stream is not None:
                stream.synchronize()

    def __call__(self, items: Sequence[WorkItem]) -> list[bytes]:
        if not 1 <= len(items) <= self.max_batch:
            raise ValueError(f"batch of {len(items)} items, engines take 1..{self.max_batch}")
        start = time.perf_counter()
        avatars: list[LiveAvatar] = []
        index_of: dict[str, int] = {}
        for it in items:
            index_of.setdefault(it.session.avatar.id, len(index_of))
            if len(avatars) < len(index_of):
                avatars.append(it.session.avatar)
        avatar_index = np.array([index_of[it.session.avatar.id] for it in items], np.int64)
        src = np.array([it.session.avatar.source_index(it.slot) for it in items], np.int64)
        found = np.array([avatars[a].prepared.found[s] for a, s in zip(avatar_index, src)], bool)
        batch = FrameBatch(index=self.batches, out_index=np.array([it.slot for it in items], np.int64), src_index=src,
                           avatars=tuple(a.prepared for a in avatars), avatar_index=avatar_index, found=found)
        self.batches += 1
        with torch.inference_mode(), on_stream(self.parts.stream):
            if self.on_gpu:
                batch.nv12 = self.gpu.frames(avatars, avatar_index, src)
            else:
                batch.frames = [avatars[a].frames[s].copy() for a, s in zip(avatar_index, src)]
            if found.any():
                batch.audio = self._audio([items[r] for r in batch.face_rows])
                self.unet(batch)
                self.vae(batch)
                if self.on_gpu:
                    self.gpu.compose(batch)
                else:
                    self.compose(batch)
            if self.parts.stream is not None:
                self.parts.stream.synchronize()
            self.last_seconds = time.perf_counter() - start
            if self.on_gpu:
                return self.gpu.jpeg(batch.nv12)
            return [encode_jpeg_cpu(frame) for frame in batch.frames]

    def _audio(self, rows: list[WorkItem]) -> torch.Tensor:
        """[f, window_steps*(L+1), D] windows of ``rows`` (in order), one Whisper call for all utterances."""
        groups: dict[int, list[int]] = {}
        for i, it in enumerate(rows):
            groups.setdefault(id(it.utterance), []).append(i)
        requests = [(rows[g[0]].utterance, np.array([rows[i].frame for i in g], np.int64)) for g in groups.values()]
        windows = self.windows(requests)
        out = windows[0].new_empty(len(rows), *windows[0].shape[1:])
        for g, w in zip(groups.values(), windows):
            out[torch.as_tensor(g, device=out.device)] = w
        return out


class GpuFrames:
    """CUDA side of the renderer: device NV12 frames per avatar, compose per frame size, nvJPEG.

    Not run yet: written against ``talkrt.kernels`` and ``torchvision.io.encode_jpeg`` (CUDA
    tensors, torchvision >= 0.19).
    """

    def __init__(self, parts: PipelineParts):
        from talkrt import kernels
        from talkrt.gpu_stages import OUTPUT_FULL_RANGE, OUTPUT_MATRIX, GpuComposeStage
        self.kernels, self.matrix, self.full_range = kernels, OUTPUT_MATRIX, OUTPUT_FULL_RANGE
        self.device, self.stream = parts.device, parts.stream
        self.cupy_stream = kernels.cupy_stream(parts.stream)
        self.composer = GpuComposeStage(parts.cfg.pipeline.sharpen, parts.stream)
        self.cache: dict[str, torch.Tensor] = {}          # avatar id -> [N, H*3//2, W] uint8 NV12
        try:
            from torchvision.io import encode_jpeg
        except ImportError as exc:
            raise RuntimeError("talkrt serve on CUDA needs torchvision for nvJPEG (pip install torchvision)") from exc
        self.encode_jpeg = encode_jpeg

    def _nv12(self, avatar: LiveAvatar) -> torch.Tensor:
        if avatar.id not in self.cache:
            rgb = torch.from_numpy(np.stack(avatar.frames)).to(self.device)
            nv12 = self.kernels.rgb_to_nv12(rgb, matrix=self.matrix, full_range=self.full_range,
                                            stream=self.cupy_stream)
            self.cache[avatar.id] = torch.as_tensor(nv12, device=self.device)
        return self.cache[avatar.id]

    def frames(self, avatars: list[LiveAvatar], avatar_index: np.ndarray, src: np.ndarray) -> list[torch.Tensor]:
        """Per-frame device NV12 copies ([H*3//2, W] each; avatars may differ in size)."""
        return [self._nv12(avatars[a])[int(s)].clone() for a, s in zip(avatar_index, src)]

    def compose(self, batch: FrameBatch) -> None:
        """Compose each frame-size group as one kernel launch (a FrameBatch's NV12 is one tensor)."""
        frames: list[torch.Tensor] = batch.nv12
        shapes = [tuple(f.shape) for f in frames]
        face_rows = batch.face_rows
        for shape in dict.fromkeys(shapes):
            rows = np.array([r for r in range(batch.size) if shapes[r] == shape], np.int64)
            sub = FrameBatch(index=batch.index, out_index=batch.out_index[rows], src_index=batch.src_index[rows],
                             avatars=batch.avatars, avatar_index=batch.avatar_index[rows], found=batch.found[rows])
            sub.nv12 = torch.stack([frames[r] for r in rows])
            faces_of = np.searchsorted(face_rows, rows[batch.found[rows]])
            sub.faces = batch.faces[torch.as_tensor(faces_of, device=batch.faces.device)]
            if len(faces_of):
                self.composer(sub)
            for k, r in enumerate(rows):
                frames[r] = sub.nv12[k]

    def jpeg(self, frames: list[torch.Tensor]) -> list[bytes]:
        """NV12 device frames -> JPEG bytes (nvJPEG, quality :data:`JPEG_QUALITY`)."""
        rgb = [self.kernels.nv12_to_rgb(f, matrix=self.matrix, full_range=self.full_range, layout="chw",
                                        stream=self.cupy_stream) for f in frames]
        planar = [torch.as_tensor(x, device=self.device).reshape(3, *x.shape[-2:]) for x in rgb]
        if self.stream is not None:
            self.stream.synchronize()
        encoded = self.encode_jpeg(planar, quality=JPEG_QUALITY)
        return [bytes(e.cpu().numpy().tobytes()) for e in encoded]
