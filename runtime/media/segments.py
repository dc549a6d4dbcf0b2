"""libx264 on several threads at once: the output is cut into segments encoded in parallel and
joined without re-encoding.

One libx264 instance stops scaling well past a handful of cores, and on GPUs without NVENC the
CPU encoder is what limits throughput. :class:`SegmentedMp4Writer` cuts the frame sequence into
segments of ``segment_frames`` (each starts with an IDR frame, like a streaming GOP); segment
``k`` is encoded by worker ``k % workers`` into its own hidden MP4, so several encoders run at
once. :meth:`close` copies every segment's packets, in order and with their timestamps offset
by the segment's first frame, into the final MP4 together with the audio, and renames it into
place; on failure nothing is left behind.

It has :class:`~talkrt.media.writer.Mp4Writer`'s interface (``write_nv12``, ``write_rgb``,
``close``, ``abort``, context manager), so the pipeline uses either.
"""

from __future__ import annotations

import logging
import os
import queue
import tempfile
import threading
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np

from talkrt.errors import TalkrtError
from talkrt.media.writer import Mp4Writer, validate_output

log = logging.getLogger(__name__)


class _Worker:
    """One encoder thread; encodes the segments it is given, one at a time, in order."""

    def __init__(self, owner: SegmentedMp4Writer, index: int, queue_frames: int):
        self.owner = owner
        self.jobs: queue.Queue = queue.Queue(maxsize=queue_frames)   # bounded: constant memory
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"talkrt-x264-{index}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        writer: Mp4Writer | None = None
        while True:
            item = self.jobs.get()
            if item is None:
                break
            kind, segment, payload = item
            if self.error is not None:
                continue
            try:
                if kind == "open":
                    writer = self.owner.open_segment(segment)
                elif kind == "close":
                    writer.close()
                    writer = None
                else:
                    (writer.write_nv12 if kind == "nv12" else writer.write_rgb)(payload)
            except BaseException as exc:  # noqa: BLE001 - reported to the producer
                self.error = exc
        if writer is not None:
            writer.abort()


class SegmentedMp4Writer:
    """Drop-in for :class:`Mp4Writer` that encodes segments of the output on ``workers`` threads."""

    def __init__(self, out_path: str | os.PathLike, width: int, height: int, fps: Fraction, *,
                 audio_path: str | os.PathLike | None = None, video_codec: str = "libx264", preset: str = "veryfast",
                 crf: int = 20, metadata: dict[str, str] | None = None, pix_fmt: str = "yuv420p",
                 workers: int = 4, segment_frames: int = 50, threads_per_worker: int | None = None,
                 queue_frames: int = 8):
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
        self.tmp_dir = Path(tempfile.mkdtemp(prefix=f".{self.out_path.stem}.segments-", dir=self.out_path.parent))
        self.segments: list[Path] = []
        self.frames_written = 0
        self._closed = False
        self.workers = [_Worker(self, i, queue_frames) for i in range(workers)]

    # ------------------------------------------------------------------ worker side
    def segment_path(self, segment: int) -> Path:
        return self.tmp_dir / f"segment{segment:06d}.mp4"

    def open_segment(self, segment: int) -> Mp4Writer:
        return Mp4Writer(self.segment_path(segment), self.width, self.height, self.fps, video_codec=self.codec,
                         preset=self.preset, crf=self.crf, pix_fmt=self.pix_fmt, encoder_options=self.options)

    # ------------------------------------------------------------------ producer side
    def _put(self, kind: str, frame: np.ndarray) -> None:
        if self._closed:
            raise TalkrtError(f"{self.out_path}: writer is already closed")
        segment, offset = divmod(self.frames_written, self.segment_frames)
        worker = self.workers[segment % len(self.workers)]
        self._raise_if_failed()
        if offset == 0:
            self.segments.append(self.segment_path(segment))
            worker.jobs.put(("open", segment, None))
        worker.jobs.put((kind, segment, np.array(frame, copy=True)))   # caller may reuse its buffer
        self.frames_written += 1
        if offset == self.segment_frames - 1:
            worker.jobs.put(("close", segment, None))

    def write_nv12(self, nv12: np.ndarray) -> None:
        self._put("nv12", nv12)

    def write_rgb(self, frame: np.ndarray) -> None:
        self._put("rgb", frame)

    def _raise_if_failed(self) -> None:
        for w in self.workers:
            if w.error is not None:
                raise TalkrtError(f"{self.out_path}: segment encoder failed: {w.error}") from w.error

    def _stop_workers(self) -> None:
        if self.frames_written % self.segment_frames:
            last = (self.frames_written - 1) // self.segment_frames
            self.workers[last % len(self.workers)].jobs.put(("close", last, None))
        for w in self.workers:
            w.jobs.put(None)
        for w in self.workers:
            w.thread.join()

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
        if not self._closed:
            self._closed = True
            for w in self.workers:
                w.error = w.error or TalkrtError("aborted")
            self._stop_workers()
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
