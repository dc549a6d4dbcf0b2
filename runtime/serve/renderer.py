"""Speech frames of one scheduler step, whatever their sessions and avatars: one mixed
:class:`~talkrt.stages.FrameBatch` through Whisper windows, UNet, VAE decode, compose and JPEG.
Job rows of the step (:class:`~talkrt.serve.jobwork.JobRows`, Whisper windows already made by
their jobs) join the same UNet and VAE decode call; their faces go back to the jobs, which
compose and encode them themselves.

The model stages are the pipeline's own classes (:mod:`talkrt.stages`, :mod:`talkrt.gpu_stages`).
On the CPU frames are RGB arrays and PIL encodes JPEG. On CUDA frames are NV12 in device memory
(each avatar's frames uploaded once), composed by the CuPy kernel and JPEG-encoded by nvJPEG
through ``torchvision.io.encode_jpeg`` (:mod:`talkrt.serve.gpu_frames`).

A step that runs out of device memory raises :class:`RenderError` (code ``out_of_memory``)
after the cached device memory has been released, so the next step starts from a clean pool.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import torch

from talkrt.avatar import PreparedAvatar
from talkrt.errors import TalkrtError
from talkrt.models.audio import SAMPLE_RATE
from talkrt.pipeline import PipelineParts
from talkrt.serve.audio import StagedWindows, WindowEncoder
from talkrt.serve.avatars import LiveAvatar, encode_jpeg_cpu
from talkrt.serve.gpu_frames import GpuFrames
from talkrt.serve.jobwork import JobRows
from talkrt.serve.session import WorkItem
from talkrt.stages import CpuComposeStage, FrameBatch, UNetStage, VaeDecodeStage
from talkrt.streams import on_stream, to_device

log = logging.getLogger(__name__)


class RenderError(TalkrtError):
    """A batch could not be made; ``code`` is what its sessions are told (``out_of_memory``)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def out_of_memory(exc: BaseException) -> bool:
    """torch's or CuPy's device out-of-memory error (CuPy's matched by name: no import)."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or type(exc).__name__ == "OutOfMemoryError"


class PhaseClock:
    """Host seconds by phase: :meth:`mark` adds the time since the last mark (or restart)."""

    def __init__(self):
        self.phases: dict[str, float] = {}
        self.restart()

    def restart(self) -> None:
        self._since = time.perf_counter()

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._since
        self._since = now


class Prepared:
    """A batch's host work done (:meth:`FrameRenderer.prepare`): its live frames, their Whisper
    input staged; nothing queued on the device yet."""

    def __init__(self, items: Sequence[WorkItem], jobs: Sequence[JobRows], live: FrameBatch | None,
                 live_avatars: list[LiveAvatar], audio: tuple[StagedWindows, np.ndarray] | None, clock: PhaseClock):
        self.items, self.jobs, self.live, self.live_avatars, self.audio, self.clock = \
            items, jobs, live, live_avatars, audio, clock
        self.total = len(items) + sum(len(j) for j in jobs)


class Launched:
    """A batch whose device work is queued (:meth:`FrameRenderer.launch`); :meth:`finish` once."""

    def __init__(self, renderer: FrameRenderer, total: int, frames, job_faces: list,
                 ready: torch.cuda.Event | None, clock: PhaseClock):
        self.renderer, self.total, self.frames, self.job_faces = renderer, total, frames, job_faces
        self.ready, self.clock = ready, clock

    def finish(self) -> tuple[list[bytes], list]:
        """Wait for the batch and return (one JPEG per live item, one face array per job part).

        Raises:
            RenderError: out of device memory.
        """
        return self.renderer._guard(self.total, lambda: self.renderer._finish(self))


class FrameRenderer:
    """Makes the JPEGs of a list of speech work items, and the faces of job rows, in one batch.

    ``__call__(items, jobs)`` -> (one JPEG (bytes) per item in item order, one face array per
    job part); together they must number at most the engines' max batch. :meth:`launch` and
    :meth:`Launched.finish` split a call so that the host can prepare the next batch while the
    device runs this one. After a finish, ``last_seconds`` holds that batch's host time (Whisper
    to JPEG, the wait for the device included, the time between launch and finish not) and
    ``last_phases`` the same by phase (prepare, audio, model, compose, sync, jpeg; on CUDA the
    device's work shows in ``sync``, the others are host and launch time).

    Raises (``__call__``):
        RenderError: out of device memory (cached memory released first).
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
        self.last_phases: dict[str, float] = {}
        self._clock = PhaseClock()

    def warm_up(self) -> None:
        """One Whisper, UNet and VAE decode call at batch 1, so that the first live frame does not
        pay for lazy initialisation (seconds on the CPU); on CUDA also the live Whisper path at
        every batch size a step can hold (:meth:`WindowEncoder.warm_up`)."""
        f, m, stream = self.parts.audio_features, self.parts.cfg.model, self.parts.stream
        with torch.inference_mode(), on_stream(stream):
            states = f.stack(f.log_mel([np.zeros(SAMPLE_RATE, np.float32)]).to(f.dtype))   # [1, 1500, L+1, D]
            audio = states.new_zeros(1, m.audio.window_steps * states.shape[2], states.shape[3])
            latents = torch.zeros(1, 2 * m.vae.latent_channels, m.latent_size, m.latent_size,
                                  device=self.parts.device, dtype=self.parts.dtype)
            out = self.parts.unet.run({"latent_input": latents, "audio_features": audio}, stream)["pred_latents"]
            self.parts.vae_decoder.run({"latents": out}, stream)
            if self.parts.device.type == "cuda":
                self.windows.warm_up(self.max_batch)
            if stream is not None:
                stream.synchronize()
            if self.on_gpu:
                self.gpu.warm_up()

    def __call__(self, items: Sequence[WorkItem], jobs: Sequence[JobRows] = ()) -> tuple[list[bytes], list]:
        """(one JPEG per live item, one [k, S, S, 3] uint8 face array per job part, host or device
        as the compose path needs). ``items`` and ``jobs`` together hold 1..max_batch frames."""
        return self.launch(self.prepare(items, jobs)).finish()

    def prepare(self, items: Sequence[WorkItem], jobs: Sequence[JobRows] = ()) -> Prepared:
        """The batch's host work, none on the device: its live frames, and the Whisper input of
        its utterances copied into staging memory (see :meth:`WindowEncoder.stage`).

        Raises:
            ValueError: no frame, or more than the engines' max batch.
            RuntimeError: a frame needs audio its utterance no longer holds.
        """
        total = len(items) + sum(len(j) for j in jobs)
        if not 1 <= total <= self.max_batch:
            raise ValueError(f"batch of {total} frames, engines take 1..{self.max_batch}")
        clock = PhaseClock()
        self.batches += 1
        live, live_avatars = self._live_batch(items) if items else (None, [])
        clock.mark("prepare")
        audio = self._stage_audio([items[r] for r in live.face_rows]) if live is not None and live.found.any() else None
        clock.mark("audio")
        return Prepared(items, jobs, live, live_avatars, audio, clock)

    def launch(self, prepared: Prepared) -> Launched:
        """Queue the batch's device work (Whisper, UNet, VAE decode, compose, RGB for the JPEG
        encoder) and return without waiting for it; :meth:`Launched.finish` waits and returns
        what :meth:`__call__` does. The host may prepare the next batch before finishing this
        one, and launch it after: the stream keeps their device work in order.

        Raises:
            RenderError: out of device memory (cached memory released first).
        """
        return self._guard(prepared.total, lambda: self._launch(prepared))

    def _guard(self, total: int, work):
        """``work()``, with an out-of-memory error turned into :class:`RenderError`."""
        try:
            return work()
        except Exception as exc:
            if not out_of_memory(exc):
                raise
            log.error("out of device memory in a batch of %d frames: %s", total, exc)
        # here, outside the handler, the failed step's tensors are no longer referenced and can go
        self.release_memory()
        raise RenderError("out_of_memory", f"out of device memory in a batch of {total} frames")

    def release_memory(self) -> None:
        """Return cached device memory to the driver: torch's allocator, CuPy's pool and the
        avatars' device frames (uploaded again on next use); no-op on the CPU."""
        if self.on_gpu:
            self.gpu.release()
        elif self.parts.device.type == "cuda":
            torch.cuda.empty_cache()

    def _launch(self, p: Prepared) -> Launched:
        self._clock = clock = p.clock
        clock.restart()
        live, out = p.live, None
        with torch.inference_mode(), on_stream(self.parts.stream):
            if live is not None:
                if self.on_gpu:
                    live.nv12 = self.gpu.frames(p.live_avatars, live.avatar_index, live.src_index)
                else:
                    live.frames = [p.live_avatars[a].frames[s].copy() for a, s in zip(live.avatar_index, live.src_index)]
            clock.mark("prepare")
            job_faces = self._model(live, p.audio, p.jobs)
            if live is not None:
                if live.found.any():
                    (self.gpu.compose if self.on_gpu else self.compose)(live)
                out = self.gpu.rgb(live.nv12) if self.on_gpu else live.frames
            ready = None
            if self.parts.stream is not None:
                ready = torch.cuda.Event()
                ready.record(self.parts.stream)
            clock.mark("compose")
        return Launched(self, p.total, out, job_faces, ready, clock)

    def _finish(self, launched: Launched) -> tuple[list[bytes], list]:
        clock = launched.clock
        clock.restart()
        if launched.ready is not None:
            launched.ready.synchronize()
        clock.mark("sync")
        if launched.frames is None:
            jpegs = []
        elif self.on_gpu:
            jpegs = self.gpu.encode(launched.frames)
        else:
            jpegs = [encode_jpeg_cpu(frame) for frame in launched.frames]
        clock.mark("jpeg")
        self.last_seconds, self.last_phases = sum(clock.phases.values()), clock.phases
        return jpegs, launched.job_faces

    def _live_batch(self, items: Sequence[WorkItem]) -> tuple[FrameBatch, list[LiveAvatar]]:
        """The step's live frames as one batch, and the live avatars its ``avatar_index`` points at."""
        avatars: list[LiveAvatar] = []
        index_of: dict[str, int] = {}
        for it in items:
            if it.session.avatar.id not in index_of:
                index_of[it.session.avatar.id] = len(avatars)
                avatars.append(it.session.avatar)
        avatar_index = np.array([index_of[it.session.avatar.id] for it in items], np.int64)
        src = np.array([it.session.avatar.source_index(it.slot) for it in items], np.int64)
        found = np.array([avatars[a].prepared.found[s] for a, s in zip(avatar_index, src)], bool)
        batch = FrameBatch(index=self.batches, out_index=np.array([it.slot for it in items], np.int64), src_index=src,
                           avatars=tuple(a.prepared for a in avatars), avatar_index=avatar_index, found=found)
        return batch, avatars

    def _model(self, live: FrameBatch | None, audio_in: tuple[StagedWindows, np.ndarray] | None,
               jobs: Sequence[JobRows]) -> list:
        """UNet + VAE decode, in one call, on the live face rows followed by every job part;
        sets ``live.faces`` and returns each job part's faces."""
        avatars: list[PreparedAvatar] = []
        where: dict[int, int] = {}

        def slot(prepared: PreparedAvatar) -> int:
            if id(prepared) not in where:
                where[id(prepared)] = len(avatars)
                avatars.append(prepared)
            return where[id(prepared)]

        avatar_index, src_index, audio = [], [], []
        f_live = 0
        if live is not None and live.found.any():
            rows = live.face_rows
            f_live = len(rows)
            avatar_index.append(np.array([slot(live.avatars[a]) for a in live.avatar_index[rows]], np.int64))
            src_index.append(live.src_index[rows])
            staged, order = audio_in
            windows = self.windows.encode(staged)              # per utterance, back to row order below
            audio.append(torch.cat(windows)[to_device(order, windows[0].device)])
            self._clock.mark("audio")
        for part in jobs:
            avatar_index.append(np.array([slot(part.work.avatars[a]) for a in part.avatar_index], np.int64))
            src_index.append(part.src_index)
            audio.append(part.audio)
        if not audio:
            return []
        src = np.concatenate(src_index)
        model = FrameBatch(index=self.batches, out_index=np.arange(len(src), dtype=np.int64), src_index=src,
                           avatars=tuple(avatars), avatar_index=np.concatenate(avatar_index),
                           found=np.ones(len(src), bool))
        model.audio = torch.cat([a.to(self.parts.device, self.parts.dtype) for a in audio])
        self.unet(model)
        self.vae(model)
        self._clock.mark("model")
        if f_live:
            live.faces = model.faces[:f_live]
        out, first = [], f_live
        for part in jobs:
            out.append(model.faces[first:first + len(part)])
            first += len(part)
        return out

    def _stage_audio(self, rows: list[WorkItem]) -> tuple[StagedWindows, np.ndarray]:
        """The Whisper input of ``rows`` (one request per utterance) staged on the host, and the
        order that puts the per-utterance windows back in row order."""
        groups: dict[int, list[int]] = {}
        for i, it in enumerate(rows):
            groups.setdefault(id(it.utterance), []).append(i)
        requests = [(rows[g[0]].utterance, np.array([rows[i].frame for i in g], np.int64)) for g in groups.values()]
        return self.windows.stage(requests), np.argsort(np.concatenate(list(groups.values())), kind="stable")
