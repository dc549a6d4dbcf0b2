"""The seam between a job's ``run_pipeline`` and the live server's shared model batches.

A job runs the normal pipeline in its own thread: decoding, Whisper windows, compose and encode
are its own. Its ``unet`` and ``vae_decode`` stages are replaced (``run_pipeline(overrides=...)``)
by :class:`SharedModelStage`, which hands the batch's face rows (avatar, source frame, audio
window) to the :class:`~talkrt.serve.scheduler.Scheduler` as one :class:`JobFrames` and waits
for the decoded faces, and :class:`FacesReady`. The scheduler puts those rows into whatever
capacity its live frames leave in a batch, possibly over several steps (:class:`JobRows`).

That is the server of a family that runs live (``ModelFamily.live``, MuseTalk). A family that
does not (LatentSync: a denoising loop per chunk) has no scheduler; its jobs run the family's
own stages 3 and 4 one chunk at a time under a lock (:class:`ExclusiveModelStages`). Either way
the job runner asks a :class:`JobModelStages` for the stages it hands to ``run_pipeline``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from talkrt.avatar import PreparedAvatar
from talkrt.stages import FrameBatch, Stage

if TYPE_CHECKING:
    from talkrt.pipeline import PipelineParts

WAIT_POLL_S = 0.2       # how often a waiting job looks at its cancel / stop check


class JobAbandoned(Exception):
    """The job stopped waiting (cancelled or server stopping): its rows not yet taken are dropped."""


@dataclass(eq=False)
class JobFrames:
    """Face rows of one job batch waiting for UNet + VAE decode (thread-safe).

    ``avatars``/``avatar_index``/``src_index`` name each row's avatar and source frame as in
    :class:`~talkrt.stages.FrameBatch`; ``audio`` is [f, tokens, D] Whisper windows on the
    model's device. The scheduler takes rows in order (:meth:`take`) and returns their faces
    (:meth:`put`); :meth:`wait` gives [f, S, S, 3] uint8 faces (a host array or a device tensor,
    as the VAE stage makes them) once every row is back.
    """

    owner: str
    avatars: tuple[PreparedAvatar, ...]
    avatar_index: np.ndarray
    src_index: np.ndarray
    audio: torch.Tensor
    taken: int = 0
    abandoned: bool = False
    error: BaseException | None = None
    _parts: list = field(default_factory=list)
    _done_rows: int = 0
    _event: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def size(self) -> int:
        return len(self.src_index)

    @property
    def remaining(self) -> int:
        """Rows not yet handed to a batch."""
        return self.size - self.taken

    def take(self, limit: int) -> JobRows:
        """The next ``min(limit, remaining)`` rows (scheduler thread)."""
        start = self.taken
        self.taken = min(self.size, start + limit)
        return JobRows(self, start, self.taken)

    def put(self, start: int, faces) -> None:
        """Faces of rows ``start..start+len(faces)``; the last part wakes :meth:`wait`."""
        with self._lock:
            self._parts.append((start, faces))
            self._done_rows += len(faces)
            complete = self._done_rows >= self.size
        if complete:
            self._event.set()

    def fail(self, exc: BaseException) -> None:
        """These rows could not be made; :meth:`wait` raises ``exc``."""
        self.error = exc
        self._event.set()

    def wait(self, check: Callable[[], None]) -> np.ndarray | torch.Tensor:
        """Block until every row is back; ``check()`` runs every :data:`WAIT_POLL_S` and may
        raise (cancel, server stopping), which abandons the rows not yet taken.

        Raises:
            Whatever :meth:`fail` was given, or what ``check`` raises.
        """
        while not self._event.wait(WAIT_POLL_S):
            try:
                check()
            except BaseException:
                self.abandoned = True
                raise
        if self.error is not None:
            raise self.error
        parts = [faces for _, faces in sorted(self._parts, key=lambda p: p[0])]
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts) if isinstance(parts[0], torch.Tensor) else np.concatenate(parts)


@dataclass(frozen=True)
class JobRows:
    """Rows ``start..stop`` of one :class:`JobFrames`, as one scheduler step takes them."""

    work: JobFrames
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def src_index(self) -> np.ndarray:
        return self.work.src_index[self.start:self.stop]

    @property
    def avatar_index(self) -> np.ndarray:
        return self.work.avatar_index[self.start:self.stop]

    @property
    def audio(self) -> torch.Tensor:
        return self.work.audio[self.start:self.stop]

    def put(self, faces) -> None:
        self.work.put(self.start, faces)


class JobQueue(Protocol):
    """Where :class:`SharedModelStage` hands its rows (the scheduler)."""

    def submit(self, work: JobFrames) -> None: ...


class SharedModelStage:
    """Stage 3 of a job (replaces ``unet``; with :class:`FacesReady` as stage 4): the batch's face
    rows go to the shared scheduler, which runs UNet and VAE decode on them together with live
    frames and other jobs' rows; ``batch.faces`` is set when all are back.

    Args:
        queue: the scheduler.
        owner: the job id (logs, stats).
        stream: the job's own CUDA stream (None on the CPU); synchronised before another
            thread's stream reads the audio windows, and recorded on the faces it gets back.
        check: called while waiting; raises to stop the job (cancel, server stopping).
    """

    def __init__(self, queue: JobQueue, owner: str, stream: torch.cuda.Stream | None, check: Callable[[], None]):
        self.queue, self.owner, self.stream, self.check = queue, owner, stream, check

    def __call__(self, batch: FrameBatch) -> None:
        rows = batch.face_rows
        if self.stream is not None:
            self.stream.synchronize()
        work = JobFrames(self.owner, batch.avatars, batch.avatar_index[rows], batch.src_index[rows], batch.audio)
        self.queue.submit(work)
        faces = work.wait(self.check)
        if isinstance(faces, torch.Tensor) and faces.is_cuda and self.stream is not None:
            faces.record_stream(self.stream)    # the allocator keeps it until the job's stream is done with it
        batch.latents = None
        batch.faces = faces


class FacesReady:
    """Stage 4 of a job: nothing left to do, stage 3 (:class:`SharedModelStage`, or
    :class:`ExclusiveModelStages`' generate-and-decode) brought the decoded faces."""

    def __call__(self, batch: FrameBatch) -> None:
        if batch.faces is None:
            raise RuntimeError("no faces: the job's stage 3 must decode them (SharedModelStage or "
                               "ExclusiveModelStages)")


class JobModelStages(Protocol):
    """What a job's ``run_pipeline`` gets as stage overrides (``run_pipeline(overrides=...)``)."""

    def __call__(self, parts: PipelineParts, owner: str, stream: torch.cuda.Stream | None,
                 check: Callable[[], None]) -> dict[str, Stage]:
        """Stages by :class:`~talkrt.stages.StageSet` field name for one job: ``parts`` are the job's
        (its config and stream), ``owner`` its id, ``check`` raises to stop it (cancel, stop)."""


class ScheduledModelStages:
    """Jobs of a live server: stages 3-4 are :class:`SharedModelStage` on ``queue`` (the scheduler)
    and :class:`FacesReady`, so job rows share the UNet batches of the live frames."""

    def __init__(self, queue: JobQueue):
        self.queue = queue

    def __call__(self, parts: PipelineParts, owner: str, stream: torch.cuda.Stream | None,
                 check: Callable[[], None]) -> dict[str, Stage]:
        return {"unet": SharedModelStage(self.queue, owner, stream, check), "vae_decode": FacesReady()}


class ExclusiveModelStages:
    """Jobs of a server without the live scheduler (a family with ``live = False``): each job runs
    its family's own stage 3 (the generator, e.g. LatentSync's 20-step DDIM loop over one
    16-frame chunk) and stage 4 (the VAE decode to faces) back to back while holding one lock
    shared by every job worker; stage 4 of the pipeline is then :class:`FacesReady`.

    Why a lock: one chunk of 16 frames through a diffusion UNet (doubled by guidance) and the
    VAE decoder at 512 x 512 takes GB of activations; two workers' chunks on the device at once
    can run the GPU out of memory, and a chunk's batch already keeps the GPU busy, so
    overlapping two would gain little (not measured). The lock is the simplest rule that bounds
    the device memory of jobs to one chunk, and it also keeps the one generator every job
    shares (with its noise scheduler object) to one chunk at a time. Everything else a job does,
    decoding, Whisper windows, the restore into the frames and the encoder, runs outside the
    lock, so with two or more workers one job's chunk is on the device while another job
    decodes, restores or encodes. The job's stream is synchronised before the lock is
    released, so the next chunk never overlaps this one's device work. Waiting for the lock
    polls ``check`` every :data:`WAIT_POLL_S` s, so a cancel or a stopping server does not
    wait for other jobs' chunks.

    A device out-of-memory error releases the cached device memory and fails the job with
    code ``out_of_memory`` (:class:`~talkrt.serve.renderer.RenderError`).
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.chunks = 0             # chunks run (all jobs), for tests and logs

    def __call__(self, parts: PipelineParts, owner: str, stream: torch.cuda.Stream | None,
                 check: Callable[[], None]) -> dict[str, Stage]:
        generate, decode, _ = parts.family.model_stages(parts)
        return {"unet": _ExclusiveStage(self, generate, decode, stream, check), "vae_decode": FacesReady()}


class _ExclusiveStage:
    """Stage 3 of a job under :class:`ExclusiveModelStages`: generate and decode under the lock."""

    def __init__(self, owner: ExclusiveModelStages, generate: Stage, decode: Stage,
                 stream: torch.cuda.Stream | None, check: Callable[[], None]):
        self.owner, self.generate, self.decode, self.stream, self.check = owner, generate, decode, stream, check

    def __call__(self, batch: FrameBatch) -> None:
        lock = self.owner.lock
        while not lock.acquire(timeout=WAIT_POLL_S):
            self.check()
        try:
            self.generate(batch)
            self.decode(batch)
            batch.latents = None
            if self.stream is not None:
                self.stream.synchronize()
            self.owner.chunks += 1
        except Exception as exc:
            # imported here: the renderer imports this module
            from talkrt.serve.renderer import RenderError, out_of_memory
            if not out_of_memory(exc):
                raise
            batch.latents = batch.faces = None
            torch.cuda.empty_cache()
            raise RenderError("out_of_memory", f"the device ran out of memory on a chunk of "
                                               f"{batch.face_rows.size} frames: {exc}") from exc
        finally:
            lock.release()
