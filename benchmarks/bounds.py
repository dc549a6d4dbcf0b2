"""The two throughput bounds of an end-to-end run, measured alone on the same machine and inputs.

* **encoder alone**: the run's own MP4 writer (``talkrt.pipeline.open_writer``: NVENC, one
  libx264, or the segment encoders, as configured) fed the clip's frames, already in host
  memory as NV12 (GPU path) or RGB (CPU path), for as many frames as the run writes.
* **engines alone**: the UNet and the VAE decoder at the run's batch size on its stream, on
  random inputs of the engines' shapes, for as many frames as the run makes.

End-to-end frames/s over ``min(encoder alone, engines alone)`` is the share of the slower
bound the pipeline reaches: 100% means decode, compose, downloads and encoding hide entirely
behind the slower of the two.
"""

from __future__ import annotations

import time
from pathlib import Path

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter

from benchmarks.common import HostCores
from talkrt.media.frames import iter_video_frames
from talkrt.media.probe import probe_video
from talkrt.pipeline import PipelineParts, open_writer
from talkrt.streams import on_stream


def _host_frames(video: Path, nv12: bool, limit: int = 50) -> list[np.ndarray]:
    """Up to ``limit`` frames of ``video`` as BT.709 limited-range NV12 [H*3//2, W] or RGB [H, W, 3]."""
    reformatter = VideoReformatter()
    frames = []
    for rgb in iter_video_frames(video):
        if nv12:
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            rgb = reformatter.reformat(frame, format="nv12", dst_colorspace="ITU709",
                                       dst_color_range="MPEG").to_ndarray()
        frames.append(np.ascontiguousarray(rgb))
        if len(frames) == limit:
            break
    return frames


def encoder_alone(parts: PipelineParts, video: Path, audio: Path, frames: int, out: Path) -> dict:
    """Frames/s of the run's writer alone over ``frames`` frames of ``video`` (cycled), audio muxed."""
    info = probe_video(video)
    nv12 = parts.compose == "gpu"
    pool = _host_frames(video, nv12)
    start = time.perf_counter()
    with HostCores() as cpu:
        with open_writer(parts, out, info, audio, {}, nv12) as writer:
            write = writer.write_nv12 if nv12 else writer.write_rgb
            for i in range(frames):
                write(pool[i % len(pool)])
    seconds = time.perf_counter() - start
    return {"frames": frames, "seconds": seconds, "fps": frames / seconds, "writer": type(writer).__name__,
            "host_cores": cpu.cores}


def engines_alone(parts: PipelineParts, frames: int, warmup: int = 3) -> dict:
    """Frames/s of UNet + VAE decode alone at the run's batch size (random inputs, one stream)."""
    batch = parts.cfg.pipeline.batch_size
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.inference_mode(), on_stream(parts.stream):
        feeds = {s.name: torch.randn(s.concrete_shape(batch), generator=gen).to(parts.device, parts.dtype)
                 for s in parts.unet.inputs}

        def step() -> None:
            latents = parts.unet.run(feeds, parts.stream)["pred_latents"]
            parts.vae_decoder.run({"latents": latents}, parts.stream)

        for _ in range(warmup):
            step()
        _sync(parts)
        calls = max(1, -(-frames // batch))
        start = time.perf_counter()
        for _ in range(calls):
            step()
        _sync(parts)
    seconds = time.perf_counter() - start
    return {"frames": calls * batch, "seconds": seconds, "fps": calls * batch / seconds, "batch": batch}


def _sync(parts: PipelineParts) -> None:
    if parts.stream is not None:
        parts.stream.synchronize()
