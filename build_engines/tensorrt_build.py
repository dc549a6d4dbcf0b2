"""Build TensorRT plans from the exported ONNX with the TensorRT 10+ Python API (no trtexec).

One optimisation profile per spec over the batch axis (min/opt/max from ``ModelSpec.profile``),
the precision's builder flag (FP16/BF16) on an fp32 ONNX with network inputs/outputs set to the
run-time dtype, a shared timing cache, and a JSON manifest beside each plan::

    tensorrt/<model>.<dtype>.plan
    tensorrt/<model>.<dtype>.json     TensorRT version, GPU, compute capability, precision,
                                      profiles, ONNX sha256, config hash, weights identity
    tensorrt/timing.cache
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from talkrt.build_engines.onnx_export import OnnxModel
from talkrt.config import TalkrtConfig
from talkrt.engines.manifest import manifest_mismatches, read_manifest, write_manifest
from talkrt.engines.specs import ModelSpec
from talkrt.engines.tensorrt import (
    TIMING_CACHE_FILE, expected_plan_manifest, import_tensorrt, plan_path, tensorrt_dir,
)
from talkrt.errors import EngineError
from talkrt.hashing import sha256_files

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE_GIB = 16


def _profile_shapes(spec: ModelSpec, tensor) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    p = spec.profile
    return tensor.concrete_shape(p.min), tensor.concrete_shape(p.opt), tensor.concrete_shape(p.max)


def _load_timing_cache(config, path: Path):
    data = b""
    if path.is_file():
        data = path.read_bytes()
    try:
        cache = config.create_timing_cache(data)
    except Exception as exc:  # noqa: BLE001 - a cache from another TensorRT version is just discarded
        log.warning("ignoring unusable timing cache %s (%s)", path, exc)
        cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _parse(trt, logger, network, onnx_file: Path) -> None:
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_file)):        # resolves external data beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {onnx_file}: {errors}")


def _set_io_dtype(trt, network, dtype: torch.dtype) -> None:
    """Make network inputs/outputs use the run-time dtype (weights stay fp32 in the ONNX)."""
    trt_dtype = {torch.float16: trt.DataType.HALF, torch.float32: trt.DataType.FLOAT,
                 torch.bfloat16: getattr(trt.DataType, "BF16", None)}[dtype]
    if trt_dtype is None:
        raise EngineError(f"this TensorRT ({trt.__version__}) has no bfloat16 support")
    for i in range(network.num_inputs):
        network.get_input(i).dtype = trt_dtype
    for i in range(network.num_outputs):
        network.get_output(i).dtype = trt_dtype


def build_plan(cfg: TalkrtConfig, spec: ModelSpec, onnx_model: OnnxModel, *, dtype: torch.dtype,
               weights_identity: str, engines_dir: str | Path | None = None,
               workspace_gib: float = DEFAULT_WORKSPACE_GIB, optimization_level: int | None = None,
               force: bool = False) -> Path:
    """Build (or reuse, when its manifest matches) the plan for ``spec``; return its path."""
    trt = import_tensorrt()
    if not torch.cuda.is_available():
        raise EngineError("building TensorRT plans needs a CUDA GPU")
    out = plan_path(cfg, spec.name, dtype, engines_dir)
    manifest_path = out.with_suffix(".json")
    expected = expected_plan_manifest(cfg, spec.name, dtype, weights_identity, trt_version=trt.__version__,
                                      device=torch.device("cuda"))
    expected["onnx_sha256"] = onnx_model.sha256
    expected["profiles"] = {t.name: {k: list(v) for k, v in zip(("min", "opt", "max"), _profile_shapes(spec, t))}
                            for t in spec.inputs}
    if not force and out.is_file():
        try:
            found = read_manifest(manifest_path, "tensorrt")
        except EngineError:
            found = None
        if found is not None and not manifest_mismatches(found, expected) \
                and found.get("plan_sha256") == sha256_files([out]):
            log.info("TensorRT plan %s is up to date", out)
            return out

    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)                     # explicit batch is the only mode in TRT 10
    _parse(trt, logger, network, onnx_model.path)
    if dtype != torch.float32:
        _set_io_dtype(trt, network, dtype)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if dtype == torch.float16:
        config.set_flag(trt.BuilderFlag.FP16)
    elif dtype == torch.bfloat16:
        config.set_flag(trt.BuilderFlag.BF16)
    if optimization_level is not None:
        config.builder_optimization_level = optimization_level
    profile = builder.create_optimization_profile()
    for tensor in spec.inputs:
        profile.set_shape(tensor.name, *_profile_shapes(spec, tensor))
    config.add_optimization_profile(profile)
    cache_file = tensorrt_dir(cfg, engines_dir) / TIMING_CACHE_FILE
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    _load_timing_cache(config, cache_file)

    log.info("building TensorRT plan for %s (%s, batch %d..%d, opt %d); this takes minutes", spec.name,
             expected["precision"], spec.profile.min, spec.profile.max, spec.profile.opt)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build {spec.name} from {onnx_model.path} (see the TensorRT log)")
    cache_file.write_bytes(bytes(config.get_timing_cache().serialize()))
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(out)
    write_manifest(manifest_path, {
        **expected, "config_name": cfg.name, "onnx_file": onnx_model.path.name,
        "plan_sha256": sha256_files([out]), "plan_bytes": out.stat().st_size,
        "build_seconds": round(time.perf_counter() - start, 1), "workspace_gib": workspace_gib,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    log.info("TensorRT plan %s built in %.0f s (%.0f MB)", out, time.perf_counter() - start,
             out.stat().st_size / 1e6)
    return out
