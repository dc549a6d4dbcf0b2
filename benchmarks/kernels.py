"""Benchmark of the talkrt kernels: ``python -m benchmarks.kernels [--json PATH]``.

For every op, at 720p / 1080p / 4K and batch 1 / 32, it reports microseconds per frame of

* the CuPy kernels alone: their recorded launches captured :data:`KERNEL_REPLAYS` times into a
  CUDA graph, the graph timed between two CUDA events after warm-up and divided by the replays
  (GPU time only: the host's launch cost is not counted; median of the repeats), and the whole
  wrapper call (plus host validation, tables, uploads and launch; one call between the events,
  so at batch 1 this is mostly host time),
* the CPU path (talkrt.kernels.reference: numpy / OpenCV / PIL; timed on a few frames),
* CV-CUDA where ``import cvcuda`` works and has an equivalent op (else "-"; the whole call
  between CUDA events on the same stream, like the talkrt call column), and CV-CUDA's call
  time over talkrt's (above 1: talkrt's call is faster),
* the op's bandwidth floor: bytes it must read + write / measured device-to-device copy
  bandwidth (a copy of N bytes counted as 2N bytes moved), and kernel time / floor.

Face boxes are realistic for each resolution (1080p: 400x450). Prints a Markdown table and
writes the same numbers as JSON with ``--json``. Targets: fused compose within 2x of its floor
and >= 100x faster than the CPU path per 1080p frame; color conversion within 2x of its floor.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from talkrt.kernels import (SharpenParams, _cuda, gpu_available, pack_masks, reference,
                            unavailable_reason)

logger = logging.getLogger("benchmarks.kernels")

RESOLUTIONS = {"720p": (720, 1280), "1080p": (1080, 1920), "4k": (2160, 3840)}
FACE_BOX = {"720p": (267, 300), "1080p": (400, 450), "4k": (800, 900)}   # (w, h)
FACE = 256
KERNEL_REPLAYS = 10   #: back-to-back replays of an op's launches per kernel-only timing


@dataclass
class OpBench:
    """One op at one (resolution, batch): callables and the bytes it must move per batch."""

    name: str
    gpu: Callable[[], Any] | None
    cpu: Callable[[], Any] | None
    cpu_frames: int
    cvcuda: Callable[[], Any] | None
    bytes_moved: int


def _pattern(xp: Any, shape: tuple[int, ...], seed: int) -> Any:
    """Deterministic pseudo-random uint8 frames, generated on the target device (one frame's
    pattern, shifted per frame, so 4K batches need no multi-GB temporaries)."""
    n = int(np.prod(shape[1:]))
    out = xp.empty(shape, dtype=xp.uint8)
    for i in range(shape[0]):
        idx = xp.arange(n, dtype=xp.uint64) + (seed * 7919 + i) * 0x9E3779B9
        out[i] = ((idx * 2654435761) >> 13).astype(xp.uint8).reshape(shape[1:])
    return out


def _boxes(batch: int, height: int, width: int, box_w: int, box_h: int) -> np.ndarray:
    x1 = (width - box_w) // 2 + (np.arange(batch) % 7) * 3
    y1 = (height - box_h) // 3 + (np.arange(batch) % 5) * 2
    return np.stack([x1, y1, x1 + box_w, y1 + box_h], axis=1).astype(np.int64)


def _masks(batch: int, box_w: int, box_h: int) -> list[np.ndarray]:
    """Feathered lower-face mask like MuseTalk's: zero on top, ramp, 255 below."""
    ramp = np.clip((np.arange(box_h) - box_h * 0.45) / (box_h * 0.1) * 255, 0, 255).astype(np.uint8)
    return [np.repeat(ramp[:, None], box_w, axis=1) for _ in range(batch)]


def time_gpu(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    """Median seconds of ``fn`` between CUDA events on the current stream."""
    import cupy
    for _ in range(warmup):
        fn()
    times = []
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    for _ in range(repeats):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    return statistics.median(times)


@contextlib.contextmanager
def recorded_launches() -> Iterator[list]:
    """The (kernel, grid, block, args, shared_mem) of every launch the talkrt wrappers make
    inside the block (they are launched too)."""
    launches: list = []
    launch = _cuda.launch

    def recording(kernel: Any, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0):
        launch(kernel, grid, block, args, shared_mem)
        launches.append((kernel, grid, block, args, shared_mem))

    _cuda.launch = recording
    try:
        yield launches
    finally:
        _cuda.launch = launch


def time_kernels(launches: list, repeats: int, replays: int = KERNEL_REPLAYS) -> float:
    """Median GPU seconds of one replay of recorded ``launches``: they are captured ``replays``
    times into a CUDA graph, which is timed between CUDA events (no host launch cost)."""
    import cupy
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            for _ in range(replays):
                for launch in launches:
                    _cuda.launch(*launch)
        finally:
            graph = stream.end_capture()
        return time_gpu(lambda: graph.launch(stream), repeats) / replays


def time_cpu(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 1 << 29, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting read + write (2 * nbytes per copy)."""
    import cupy
    src = cupy.ones(nbytes, dtype=cupy.uint8)
    dst = cupy.empty_like(src)
    seconds = time_gpu(lambda: cupy.copyto(dst, src), repeats)
    return 2 * nbytes / seconds


def _cvcuda_ops(xp: Any) -> dict[str, Callable[..., Any]]:
    """CV-CUDA equivalents writing into preallocated outputs on the current CuPy stream, so
    they are timed between CUDA events like the talkrt calls (skipped cleanly when cvcuda is
    missing or an op fails). CV-CUDA's NV12 conversions use its own fixed matrix (BT.601);
    the cost does not depend on the coefficients."""
    try:
        import cvcuda
        stream = cvcuda.as_stream(xp.cuda.get_current_stream())
    except Exception as exc:  # noqa: BLE001 - not installed / no GPU
        logger.info("CV-CUDA unavailable: %s", exc)
        return {}

    def into(dst_shape: tuple[int, ...], src: Any, op: Callable[..., Any], *args: Any):
        src_t = cvcuda.as_tensor(src, "NHWC")
        dst_t = cvcuda.as_tensor(xp.empty(dst_shape, dtype=xp.uint8), "NHWC")
        return lambda: op(dst_t, src_t, *args, stream=stream)

    def nv12_to_rgb(nv12):
        n, h, w = nv12.shape
        return into((n, h * 2 // 3, w, 3), nv12[..., None], cvcuda.cvtcolor_into,
                    cvcuda.ColorConversion.YUV2RGB_NV12)

    def rgb_to_nv12(rgb):
        n, h, w, _ = rgb.shape
        return into((n, h * 3 // 2, w, 1), rgb, cvcuda.cvtcolor_into,
                    cvcuda.ColorConversion.RGB2YUV_NV12)

    def gaussian(rgb):
        return into(rgb.shape, rgb, cvcuda.gaussian_into, (7, 7), (1.0, 1.0),
                    cvcuda.Border.REFLECT101)

    def resize_face(faces, box_w, box_h):
        return into((faces.shape[0], box_h, box_w, 3), faces, cvcuda.resize_into,
                    cvcuda.Interp.LINEAR)

    return {"nv12_to_rgb": nv12_to_rgb, "rgb_to_nv12": rgb_to_nv12, "gaussian": gaussian,
            "resize_face": resize_face}


def build_ops(res: str, batch: int, cpu_frames: int, use_gpu: bool) -> list[OpBench]:
    """The ops to time at one resolution and batch size."""
    height, width = RESOLUTIONS[res]
    box_w, box_h = FACE_BOX[res]
    hw, box = height * width, box_w * box_h
    boxes = _boxes(batch, height, width, box_w, box_h)
    masks = _masks(batch, box_w, box_h)
    k = min(cpu_frames, batch)
    h_nv12 = _pattern(np, (k, height * 3 // 2, width), 1)
    h_rgb = _pattern(np, (k, height, width, 3), 2)
    h_faces = _pattern(np, (k, FACE, FACE, 3), 3)
    h_masks = pack_masks(masks[:k])
    h_resized = reference.resize_to_boxes(h_faces, boxes[:k])
    sharpen = SharpenParams()
    g: dict[str, Callable[[], Any] | None] = dict.fromkeys(
        ("nv12_to_rgb", "rgb_to_nv12", "crop_area", "crop_lanczos", "resize", "unsharp", "blend",
         "compose_nv12", "compose_nv12_sharp", "compose_rgb"))
    cv: dict[str, Callable[[], Any] | None] = {}
    if use_gpu:
        import cupy
        from talkrt.kernels import gpu
        nv12 = _pattern(cupy, (batch, height * 3 // 2, width), 1)
        rgb = _pattern(cupy, (batch, height, width, 3), 2)
        faces = _pattern(cupy, (batch, FACE, FACE, 3), 3)
        d_masks = pack_masks(masks, xp=cupy)
        resized = gpu.resize_to_boxes(faces, boxes)
        out_rgb, out_nv12 = cupy.empty_like(rgb), cupy.empty_like(nv12)
        out_crop = cupy.empty((batch, FACE, FACE, 3), cupy.uint8)
        calls = {   # op, positional and keyword arguments
            "nv12_to_rgb": (gpu.nv12_to_rgb, (nv12,), {"out": out_rgb}),
            "rgb_to_nv12": (gpu.rgb_to_nv12, (rgb,), {"out": out_nv12}),
            "crop_area": (gpu.crop_resize, (rgb, boxes), {"method": "area", "out": out_crop}),
            "crop_lanczos": (gpu.crop_resize, (rgb, boxes),
                             {"method": "lanczos4", "out": out_crop}),
            "resize": (gpu.resize_to_boxes, (faces, boxes), {"out": resized}),
            "unsharp": (gpu.unsharp_mask, (rgb,), {"out": out_rgb}),
            "blend": (gpu.blend, (rgb, resized, boxes, d_masks), {}),
            "compose_nv12": (gpu.compose_nv12, (nv12, faces, boxes, d_masks), {}),
            "compose_nv12_sharp": (gpu.compose_nv12, (nv12, faces, boxes, d_masks),
                                   {"sharpen": sharpen}),
            "compose_rgb": (gpu.compose_rgb, (rgb, faces, boxes, d_masks), {}),
        }
        for name, (fn, args, kwargs) in calls.items():
            g[name] = functools.partial(fn, *args, **kwargs)
        ops = _cvcuda_ops(cupy)
        for name, make, args in (("nv12_to_rgb", "nv12_to_rgb", (nv12,)),
                                 ("rgb_to_nv12", "rgb_to_nv12", (rgb,)),
                                 ("unsharp", "gaussian", (rgb,)),
                                 ("resize", "resize_face", (faces, box_w, box_h))):
            if make in ops:
                try:
                    fn = ops[make](*args)
                    fn()
                    cv[name] = fn
                except Exception as exc:  # noqa: BLE001 - an API mismatch skips one column
                    logger.info("CV-CUDA %s skipped: %s", make, exc)
    c = {
        "nv12_to_rgb": lambda: reference.nv12_to_rgb(h_nv12),
        "rgb_to_nv12": lambda: reference.rgb_to_nv12(h_rgb),
        "crop_area": lambda: reference.crop_resize(h_rgb, boxes[:k], method="area"),
        "crop_lanczos": lambda: reference.crop_resize(h_rgb, boxes[:k], method="lanczos4"),
        "resize": lambda: reference.resize_to_boxes(h_faces, boxes[:k]),
        "unsharp": lambda: reference.unsharp_mask(h_rgb),
        "blend": lambda: reference.blend(h_rgb, h_resized, boxes[:k], h_masks),
        "compose_nv12": lambda: reference.compose_nv12(h_nv12, h_faces, boxes[:k], h_masks),
        "compose_nv12_sharp": lambda: reference.compose_nv12(h_nv12, h_faces, boxes[:k], h_masks,
                                                             sharpen=sharpen),
        "compose_rgb": lambda: reference.compose_rgb(h_rgb, h_faces, boxes[:k], h_masks),
    }
    face_bytes = FACE * FACE * 3
    sizes = {  # bytes read + written per frame
        "nv12_to_rgb": hw * 3 // 2 + hw * 3, "rgb_to_nv12": hw * 3 + hw * 3 // 2,
        "crop_area": box * 3 + face_bytes, "crop_lanczos": box * 3 + face_bytes,
        "resize": face_bytes + box * 3, "unsharp": 2 * hw * 3, "blend": box * 3 * 3 + box,
        "compose_nv12": face_bytes + box + 2 * box * 3 // 2,
        "compose_nv12_sharp": face_bytes + box + 2 * box * 3 // 2,
        "compose_rgb": face_bytes + box + 2 * box * 3,
    }
    return [OpBench(name, g[name], c[name], k, cv.get(name),
                    sizes[name] * batch) for name in c]


def run(resolutions: list[str], batches: list[int], repeats: int, cpu_frames: int,
        cpu_repeats: int, skip_cpu: bool) -> dict:
    """Time every op; returns the JSON-ready result dict."""
    use_gpu = gpu_available()
    result: dict[str, Any] = {"gpu": None, "copy_bandwidth_gbps": None, "rows": []}
    try:  # the machine description every talkrt benchmark JSON carries
        from benchmarks.common import machine_info
        result["machine"] = machine_info()
    except Exception as exc:  # noqa: BLE001 - optional; never fail the benchmark on it
        logger.info("machine_info unavailable: %s", exc)
    if use_gpu:
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        result["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        bandwidth = copy_bandwidth()
        result["copy_bandwidth_gbps"] = bandwidth / 1e9
    else:
        logger.warning("GPU kernels unavailable (%s): timing the CPU path only", unavailable_reason())
        bandwidth = None
    for res in resolutions:
        for batch in batches:
            for op in build_ops(res, batch, cpu_frames, use_gpu):
                row: dict[str, Any] = {"op": op.name, "resolution": res, "batch": batch}
                if op.gpu is not None:
                    with recorded_launches() as launches:
                        op.gpu()
                    row["gpu_us"] = time_kernels(launches, repeats) / batch * 1e6
                    row["gpu_call_us"] = time_gpu(op.gpu, repeats) / batch * 1e6
                if op.cvcuda is not None:
                    row["cvcuda_us"] = time_gpu(op.cvcuda, repeats) / batch * 1e6
                if not skip_cpu:
                    row["cpu_us"] = time_cpu(op.cpu, cpu_repeats) / op.cpu_frames * 1e6
                if bandwidth:
                    row["floor_us"] = op.bytes_moved / bandwidth / batch * 1e6
                    if "gpu_us" in row:
                        row["x_floor"] = row["gpu_us"] / row["floor_us"]
                if "gpu_call_us" in row and "cpu_us" in row:
                    row["speedup_vs_cpu"] = row["cpu_us"] / row["gpu_call_us"]
                if "gpu_call_us" in row and "cvcuda_us" in row:
                    row["cvcuda_over_call"] = row["cvcuda_us"] / row["gpu_call_us"]
                result["rows"].append(row)
                logger.info("%s", row)
    return result


def markdown_table(result: dict) -> str:
    """The result as a Markdown table (microseconds per frame)."""
    def fmt(value: Any, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [f"GPU: {result['gpu'] or 'none'}; D2D copy bandwidth: "
             f"{fmt(result['copy_bandwidth_gbps'])} GB/s (read + write)", "",
             "| op | res | batch | kernel us/frame | call us/frame | floor us | kernel / floor "
             "| CPU us/frame | CPU / call | CV-CUDA us/frame | CV-CUDA / call |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['op']} | {r['resolution']} | {r['batch']} | {fmt(r.get('gpu_us'), 2)} "
                     f"| {fmt(r.get('gpu_call_us'), 2)} | {fmt(r.get('floor_us'), 2)} "
                     f"| {fmt(r.get('x_floor'), 2)} | {fmt(r.get('cpu_us'))} "
                     f"| {fmt(r.get('speedup_vs_cpu'), 0)} | {fmt(r.get('cvcuda_us'), 2)} "
                     f"| {fmt(r.get('cvcuda_over_call'), 2)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--resolutions", default="720p,1080p,4k")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--repeats", type=int, default=20, help="timed GPU calls per op")
    parser.add_argument("--cpu-frames", type=int, default=2, help="frames per CPU timing")
    parser.add_argument("--cpu-repeats", type=int, default=3)
    parser.add_argument("--skip-cpu", action="store_true", help="time the GPU only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    resolutions = [r.strip().lower() for r in args.resolutions.split(",") if r.strip()]
    unknown = [r for r in resolutions if r not in RESOLUTIONS]
    if unknown:
        parser.error(f"unknown resolutions {unknown}; choose from {sorted(RESOLUTIONS)}")
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    result = run(resolutions, batches, args.repeats, args.cpu_frames, args.cpu_repeats,
                 args.skip_cpu)
    sys.stdout.write(markdown_table(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
