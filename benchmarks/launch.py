"""Host and GPU time per batch of the pipeline's GPU stage calls:
``python -m benchmarks.launch [--json PATH]``.

The calls are the ones ``talkrt.gpu_stages`` makes for each batch, with its argument types
(torch CUDA tensors for the frames and faces, numpy boxes, packed device masks selected per
batch, a CuPy stream wrapping a torch stream):

* ``compose``: ``compose_nv12`` into BT.709 limited range (the default, no sharpening),
* ``compose_sharpen``: the same with ``SharpenParams()`` (one more launch),
* ``color``: ``nv12_to_rgb`` (BT.601) then ``rgb_to_nv12`` back into the frames (sources that
  are not BT.709 limited range).

Per stage, resolution (720p, 1080p: MuseTalk-like face boxes and masks of
``benchmarks.kernels``) and batch (1, 16) it reports

* ``host_us``: the median of ``time.perf_counter`` around the Python call, the stream not
  synchronised (it is synchronised between groups of calls, outside the timing, so the queue
  stays short); this is what the host thread pays per batch;
* ``gpu_us``: the GPU time of the same call: the call captured into a CUDA graph (on CuPy views
  of the same buffers), the graph replayed back to back between two CUDA events.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import statistics
import sys
import time
from types import ModuleType
from typing import Any, Callable

import numpy as np

from benchmarks.kernels import FACE, FACE_BOX, RESOLUTIONS, _boxes, _masks

logger = logging.getLogger("benchmarks.launch")

STAGES = ("compose", "compose_sharpen", "color")
AVATAR_FRAMES = 64   #: masks packed once, as the stage packs the avatar's; a batch selects some


def stage_calls(kernels: ModuleType, res: str, batch: int, on_torch: bool
                ) -> dict[str, Callable[[Any], None]]:
    """``{stage: call(stream)}`` at one resolution and batch for the kernel package ``kernels``
    (``talkrt.kernels`` or a package with its API). Frames and faces are torch tensors when
    ``on_torch``, else CuPy views of the same kind of buffers (for graph capture)."""
    import torch
    cp = kernels.cupy_module()
    height, width = RESOLUTIONS[res]
    box_w, box_h = FACE_BOX[res]
    avatar_boxes = _boxes(AVATAR_FRAMES, height, width, box_w, box_h)
    packed = kernels.pack_masks(_masks(AVATAR_FRAMES, box_w, box_h), xp=cp)
    src = np.arange(batch) % AVATAR_FRAMES
    gen = torch.Generator(device="cuda").manual_seed(batch)
    nv12 = torch.randint(0, 256, (batch, height * 3 // 2, width), dtype=torch.uint8,
                         device="cuda", generator=gen)
    faces = torch.randint(0, 256, (batch, FACE, FACE, 3), dtype=torch.uint8, device="cuda",
                          generator=gen)
    torch.cuda.synchronize()          # the calls run on another stream
    if not on_torch:
        nv12, faces = cp.from_dlpack(nv12), cp.from_dlpack(faces)
    sharpen = kernels.SharpenParams(1.2, 1.0, 5)

    def compose(stream: Any, sharpen: Any = None) -> None:
        boxes = np.ascontiguousarray(avatar_boxes[src])
        kernels.compose_nv12(nv12, faces, boxes, packed.select(src), matrix="bt709",
                             full_range=False, sharpen=sharpen, stream=stream)

    def color(stream: Any) -> None:
        rgb = kernels.nv12_to_rgb(nv12, matrix="bt601", full_range=False, stream=stream)
        kernels.rgb_to_nv12(rgb, matrix="bt709", full_range=False, out=nv12, stream=stream)

    return {"compose": compose, "compose_sharpen": lambda s: compose(s, sharpen), "color": color}


def host_us(call: Callable[[Any], None], stream: Any, calls: int, group: int = 8) -> float:
    """Median host microseconds of ``call(stream)``, the stream synchronised every ``group``
    calls outside the timing."""
    for _ in range(10):
        call(stream)
    stream.synchronize()
    times = []
    for i in range(calls):
        t0 = time.perf_counter()
        call(stream)
        times.append(time.perf_counter() - t0)
        if i % group == group - 1:
            stream.synchronize()
    stream.synchronize()
    return statistics.median(times) * 1e6


def gpu_us(call: Callable[[Any], None], replays: int = 20, repeats: int = 10) -> float:
    """Median GPU microseconds of ``call(stream)``: captured ``replays`` times into a CUDA
    graph, the graph timed between CUDA events."""
    import cupy
    stream = cupy.cuda.Stream(non_blocking=True)
    call(stream)                      # compiled, pools warm: nothing but launches is captured
    stream.synchronize()
    with stream:
        stream.begin_capture()
        try:
            for _ in range(replays):
                call(stream)
        finally:
            graph = stream.end_capture()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    graph.launch(stream)
    times = []
    for _ in range(repeats):
        start.record(stream)
        graph.launch(stream)
        stop.record(stream)
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) * 1e3 / replays)
    return statistics.median(times)


def run(kernels: ModuleType, resolutions: list[str], batches: list[int], calls: int) -> list[dict]:
    """One row per (stage, resolution, batch): host_us and gpu_us per batch."""
    import torch
    torch_stream = torch.cuda.Stream()
    stream = kernels.cupy_stream(torch_stream)
    rows = []
    for res in resolutions:
        for batch in batches:
            on_torch = stage_calls(kernels, res, batch, on_torch=True)
            on_cupy = stage_calls(kernels, res, batch, on_torch=False)
            for stage in STAGES:
                row = {"stage": stage, "resolution": res, "batch": batch,
                       "host_us": host_us(on_torch[stage], stream, calls),
                       "gpu_us": gpu_us(on_cupy[stage])}
                logger.info("%s", row)
                rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| stage | res | batch | host us/batch | GPU us/batch |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['stage']} | {r['resolution']} | {r['batch']} | {r['host_us']:.1f} "
              f"| {r['gpu_us']:.1f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--kernels", default="talkrt.kernels",
                        help="kernel package to time (its API: talkrt.kernels')")
    parser.add_argument("--resolutions", default="720p,1080p")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--calls", type=int, default=400, help="timed host calls per row")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    kernels = importlib.import_module(args.kernels)
    if not kernels.gpu_available():
        parser.error(f"GPU kernels unavailable: {kernels.unavailable_reason()}")
    resolutions = [r.strip() for r in args.resolutions.split(",") if r.strip()]
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    rows = run(kernels, resolutions, batches, args.calls)
    sys.stdout.write(markdown_table(rows))
    if args.json:
        from benchmarks.common import machine_info
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"machine": machine_info(), "kernels": args.kernels, "rows": rows}, handle,
                      indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
