"""libx264 on several threads at once: the output is cut into segments encoded in parallel and
joined without re-encoding.

One libx264 instance stops scaling well past a handful of cores, and on GPUs without NVENC the
CPU encoder is what limits throughput. :class:`SegmentedMp4Writer` cuts the frame sequence into
segments of ``segment_frames`` (each starts with an IDR frame, like a streaming GOP); segment
``k`` is encoded by worker process ``k % workers`` into its own hidden MP4, so several encoders
run at once. Workers are processes because PyAV holds the GIL while it encodes (threads would
take turns); they are plain subprocesses running :mod:`talkrt.media.segment_worker`, which
imports only PyAV and numpy and never touches CUDA. Frames reach them through a ring of
shared-memory slots per worker (one copy per frame, bounded: constant memory). :meth:`close` copies every segment's packets, in order and with their timestamps offset
by the segment's first frame, into the final MP4 together with the audio, and renames it into
place; on failure nothing is left behind.

It has :class:`~talkrt.media.writer.Mp4Writer`'s interface (``write_nv12``, ``write_rgb``,
``close``, ``abort``, context manager), so the pipeline uses either.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
from multiprocessing import shared_memory
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np

from talkrt.errors import InputError, TalkrtError
from talkrt.media.output import temp_name
from talkrt.media.writer import Mp4Writer, validate_output

log = logging.getLogger(__name__)


SLOT_BUDGET_BYTES = 128 * 2**20          # shared memory per worker


class _Worker:
    """One encoder process (:mod:`talkrt.media.segment_worker`) with its shared-memory slots."""

    def __init__(self, spec: dict, slot_bytes: int, slots: int):
        self.slot_bytes = slot_bytes
        self.shm = shared_memory.SharedMemory(create=True, size=slot_bytes * slots)
        self.free = list(range(slots))
        self.error: str | None = None
        self.process = subprocess.Popen(
            [sys.executable, "-m", "talkrt.media.segment_worker", self.shm.name, str(slot_bytes), json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def send(self, **command) -> None:
        try:
            self.process.stdin.write(json.dumps(command) + "\n")
        except (BrokenPipeError, OSError):
            self.check(wait=True)
            raise TalkrtError(f"segment encoder failed: {self.error or 'worker is gone'}") from None

    def _read_answer(self, timeout: float) -> bool:
        """Read one answer if one arrives within ``timeout``; False on timeout."""
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            return False
        line = self.process.stdout.readline()
        if line.startswith("free "):
            self.free.append(int(line.split()[1]))
        elif line.startswith("error "):
            self.error = line[6:].strip()
        elif not line:                                   # EOF: the worker exited
            self.check(wait=True)
            self.error = self.error or f"encoder process exited with code {self.process.returncode}"
        return True

    def check(self, wait: bool = False) -> None:
        code = self.process.wait() if wait else self.process.poll()
        if self.error is None and code not in (None, 0):
            self.error = f"encoder process exited with code {code}"

    def acquire_slot(self) -> int:
        self.process.stdin.flush()
        while not self.free:
            if not self._read_answer(timeout=0.5):
                self.check()
            if self.error is not None:
                raise TalkrtError(f"segment encoder failed: {self.error}")
        return self.free.pop()

    def send_frame(self, kind: str, frame: np.ndarray) -> None:
        slot = self.acquire_slot()
        view = np.ndarray(frame.shape, np.uint8, buffer=self.shm.buf, offset=slot * self.slot_bytes)
        np.copyto(view, frame)
        del view
        self.send(op="frame", kind=kind, slot=slot, shape=list(frame.shape))

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.process.kill()
        else:
            try:
                self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.process.stdin.flush()
            except (BrokenPipeError, OSError):
                pass
        try:
            self.process.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        for line in self.process.stdout:               # drain: the last answers may carry an error
            if line.startswith("error ") and self.error is None:
                self.error = line[6:].strip()
        self.process.stdout.close()
        if not kill:
            self.check(wait=True)
        else:
            self.process.wait()
        self.shm.close()
        self.shm.unlink()


class SegmentedMp4Writer:
    """Drop-in for :class:`Mp4Writer` that encodes segments of the output in ``workers`` processes."""

    def __init__(self, out_path: str | os.PathLike, width: int, height: int, fps: Fraction, *,
                 audio_path: str | os.PathLike | None = None, video_codec: str = "libx264", preset: str = "veryfast",
                 crf: int = 20, metadata: dict[str, str] | None = None, pix_fmt: str = "yuv420p",
                 workers: int = 4, segment_frames: int = 50, threads_per_worker: int | None = None):
        if workers < 1 or segment_frames < 1:
            raise ValueError("workers and segment_frames must be >= 1")
        self.out_path = Path(out_path)
        validate_output(self.out_path, width, height, metadata)
        self.width, self.height, self.fps = width, height, Fraction(fps)
        self.audio_path, self.metadata = audio_path, metadata
        self.codec, self.preset, self.crf, self.pix_fmt = video_codec, preset, crf, pix_fmt
        self.segment_frames = segment_frames
        threads = threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
        self.options = {"threads": str(threads)} if video_codec.startswith("libx26") else {}
        self.tmp_dir = self.out_path.parent / temp_name("segments")
        try:
            self.tmp_dir.mkdir()
        except OSError as exc:
            raise InputError(self.out_path.parent, f"cannot create a folder in the output folder ({exc.strerror})") from exc
        self.segments: list[Path] = []
        self.frames_written = 0
        self._closed = False
        spec = dict(width=width, height=height, fps=[self.fps.numerator, self.fps.denominator],
                    video_codec=video_codec, preset=preset, crf=crf, pix_fmt=pix_fmt, encoder_options=self.options)
        slot_bytes = width * height * 3
        slots = max(2, min(8, SLOT_BUDGET_BYTES // slot_bytes))
        self.workers: list[_Worker] = []
        try:
            for _ in range(workers):
                self.workers.append(_Worker(spec, slot_bytes, slots))
        except BaseException:
            self.abort()
            raise

    def segment_path(self, segment: int) -> Path:
        return self.tmp_dir / f"segment{segment:06d}.mp4"

    # ------------------------------------------------------------------ producer side
    def _put(self, kind: str, frame: np.ndarray) -> None:
        if self._closed:
            raise TalkrtError(f"{self.out_path}: writer is already closed")
        frame = np.asarray(frame)
        expected = (self.height * 3 // 2, self.width) if kind == "nv12" else (self.height, self.width, 3)
        if frame.dtype != np.uint8 or frame.shape != expected:
            raise ValueError(f"write_{kind} expects uint8 {list(expected)}, got {frame.dtype} {list(frame.shape)}")
        segment, offset = divmod(self.frames_written, self.segment_frames)
        worker = self.workers[segment % len(self.workers)]
        self._raise_if_failed()
        if offset == 0:
            self.segments.append(self.segment_path(segment))
            worker.send(op="open", path=str(self.segment_path(segment)))
        worker.send_frame(kind, frame)      # one copy into shared memory: the caller may reuse its buffer
        self.frames_written += 1
        if offset == self.segment_frames - 1:
            worker.send(op="close")

    def write_nv12(self, nv12: np.ndarray) -> None:
        self._put("nv12", nv12)

    def write_rgb(self, frame: np.ndarray) -> None:
        self._put("rgb", frame)

    def _raise_if_failed(self) -> None:
        for w in self.workers:
            if w.error is not None:
                raise TalkrtError(f"{self.out_path}: segment encoder failed: {w.error}")

    def _stop_workers(self, finish_last: bool = True) -> None:
        if finish_last and self.frames_written % self.segment_frames:
            last = (self.frames_written - 1) // self.segment_frames
            self.workers[last % len(self.workers)].send(op="close")
        for w in self.workers:
            w.stop(kill=not finish_last)

    def close(self) -> None:
        """Finish every segment, join them with the audio into ``out_path`` (atomic rename)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._stop_workers()
            self._raise_if_failed()
            if not self.segments:
                raise TalkrtError(f"{self.out_path}: no video frames were written; refusing to create an empty MP4")
            self._join()
        finally:
            self._cleanup()
        log.info("wrote %s (%d frames in %d segments on %d encoders)", self.out_path, self.frames_written,
                 len(self.segments), len(self.workers))

    def _join(self) -> None:
        with av.open(str(self.segments[0])) as first:
            template = first.streams.video[0]
            with Mp4Writer(self.out_path, self.width, self.height, self.fps, audio_path=self.audio_path,
                           metadata=self.metadata, video_template=template) as out:
                for k, path in enumerate(self.segments):
                    start = k * self.segment_frames
                    with av.open(str(path)) as seg:
                        stream = seg.streams.video[0]
                        tb = stream.time_base
                        for packet in seg.demux(stream):
                            if packet.size == 0 or packet.pts is None:
                                continue
                            pts = start + round(packet.pts * tb * self.fps)
                            dts = start + round((packet.dts if packet.dts is not None else packet.pts) * tb * self.fps)
                            out.write_encoded_packet(packet, pts=pts, dts=dts)

    def abort(self) -> None:
        """Stop the encoders without finishing any segment; leave no file behind (idempotent)."""
        if not self._closed:
            self._closed = True
            self._stop_workers(finish_last=False)
        self._cleanup()

    def _cleanup(self) -> None:
        for path in self.tmp_dir.glob("*"):
            path.unlink(missing_ok=True)
        try:
            self.tmp_dir.rmdir()
        except OSError as exc:
            log.warning("could not remove %s: %s", self.tmp_dir, exc)

    def __enter__(self) -> SegmentedMp4Writer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()
