"""Engines: ONNX export parity, manifests, backend selection, batch buckets and warm-up policies,
the compiled backend's build / fresh-process load; GPU parity when CUDA exists.

CPU tests use the tiny config (seconds), except one compiled build of the tiny VAE decoder at
buckets 1 and 2 shared by the module (about a minute on 2 cores).  GPU tests (``-m gpu``) use the
full-size musetalk config in fp16 and share one compiled build (buckets 1 and 4) across the session.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
import torch

from talkrt.build_engines import cli
from talkrt.build_engines.onnx_export import check_onnx, onnx_digest, onnx_path
from talkrt.config import load_config
from talkrt.engines.base import EagerEngine, TensorSpec
from talkrt.engines.compiled import (
    MANIFEST_FILE, CompiledEngine, CompileSettings, compiled_dir, expected_manifest, open_compiled_build,
    usable_buckets,
)
from talkrt.engines.graphs import BucketedEngine, EagerGraphEngine, bucket_for, warmup_buckets
from talkrt.engines.manifest import ENGINES_DIR_ENV, config_dir, engines_root, write_manifest
from talkrt.engines.select import create_engines, startup_seconds
from talkrt.engines.specs import (
    ENGINE_MODELS, MODEL_NAMES, batch_buckets, default_max_batch, export_specs,
)
from talkrt.engines.tensorrt import check_plan_manifest, expected_plan_manifest
from talkrt.errors import EngineError
from talkrt.hashing import sha256_files
from talkrt.models.weights import build_synthetic

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture(scope="module", autouse=True)
def _one_cpu_thread(one_cpu_thread):
    """Every test of this module on one intra-op thread (conftest's ``one_cpu_thread``)."""


def _ort_session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def tiny_cfg():
    return load_config("tiny")


@pytest.fixture(scope="module")
def tiny_models(tiny_cfg):
    return build_synthetic(tiny_cfg).to(torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def onnx_root(tmp_path_factory):
    """``talkrt-build-engines --config tiny --backends onnx`` run once (fp32 + fp16 for all four models)."""
    root = tmp_path_factory.mktemp("engines")
    assert cli.main(["--config", "tiny", "--backends", "onnx", "--engines-dir", str(root)]) == 0
    return root


# --------------------------------------------------------------------------------------- specs


def test_specs_names_and_profiles(tiny_cfg):
    specs = export_specs(tiny_cfg)
    assert tuple(specs) == MODEL_NAMES
    assert specs["unet"].input_names == ("latent_input", "audio_features")
    assert specs["unet"].output_names == ("pred_latents",)
    assert (specs["vae_decoder"].input_names, specs["vae_decoder"].output_names) == (("latents",), ("faces",))
    assert (specs["vae_encoder"].input_names, specs["vae_encoder"].output_names) == (("images",), ("latents",))
    assert (specs["whisper"].input_names, specs["whisper"].output_names) == (("mel",), ("hidden_states",))
    assert specs["unet"].profile.max == 32 and specs["unet"].profile.opt == tiny_cfg.pipeline.batch_size
    assert specs["whisper"].profile.max == 8
    a, b = specs["unet"].sample_inputs(2), specs["unet"].sample_inputs(2)
    assert all(torch.equal(a[k], b[k]) for k in a)              # fixed seed


def test_batch_buckets_and_default_max_batch():
    assert batch_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert batch_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    assert batch_buckets(1) == (1,)
    assert default_max_batch(load_config("musetalk")) == 32
    assert default_max_batch(load_config("musetalk", ["pipeline.batch_size=48"])) == 48
    assert default_max_batch(load_config("musetalk", ["pipeline.batch_size=1000"])) == 128


@pytest.mark.parametrize("batch,buckets,bucket", [(1, (1, 4), 1), (2, (1, 4), 4), (3, (1, 4), 4), (4, (1, 4), 4),
                                                  (5, (1, 2, 4, 8), 8), (17, (1, 2, 4, 8, 16, 32), 32)])
def test_bucket_for(batch, buckets, bucket):
    assert bucket_for(batch, buckets) == bucket


def test_bucket_for_rejects_out_of_range():
    with pytest.raises(ValueError):
        bucket_for(0, (1, 4))
    with pytest.raises(ValueError):
        bucket_for(5, (1, 4))


# --------------------------------------------------------------------------------------- ONNX


def test_cli_exports_checked_onnx(onnx_root, tiny_cfg):
    for name in MODEL_NAMES:
        for dtype in (torch.float32, torch.float16):
            path = onnx_path(tiny_cfg, name, dtype, onnx_root)
            manifest = json.loads(path.with_suffix(".json").read_text())
            assert manifest["sha256"] == onnx_digest(path) and manifest["opset"] >= 17
            check_onnx(path)


# Tolerances: both sides compute in fp32; ORT's MLAS and PyTorch's oneDNN kernels differ only in
# summation order (observed max |diff| ~2e-6 on O(1) latents, ~4e-3 on the 0..255 face scale).
# A real export bug (wrong constant, baked batch, broken attention) gives errors of O(signal).
PARITY_ATOL = {"unet": 1e-4, "vae_encoder": 1e-4, "whisper": 1e-4, "vae_decoder": 5e-2}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_onnx_matches_pytorch(onnx_root, tiny_cfg, tiny_models, name):
    spec = export_specs(tiny_cfg)[name]
    session = _ort_session(onnx_path(tiny_cfg, name, torch.float32, onnx_root))
    module = spec.make_module(tiny_models)
    for batch in (1, 3):                                      # neither is the traced batch (2)
        feeds = spec.sample_inputs(batch, seed=batch)
        with torch.no_grad():
            expected = module(*feeds.values()).numpy()
        (got,) = session.run(None, {k: v.numpy() for k, v in feeds.items()})
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=0, atol=PARITY_ATOL[name])


def test_fp16_onnx_runs_close_to_fp32(onnx_root, tiny_cfg, tiny_models):
    # fp16 has a 2^-11 relative step; through the tiny UNet ~1e-3 abs error on O(1) outputs was observed.
    spec = export_specs(tiny_cfg)["unet"]
    session = _ort_session(onnx_path(tiny_cfg, "unet", torch.float16, onnx_root))
    feeds = spec.sample_inputs(3)
    with torch.no_grad():
        expected = spec.make_module(tiny_models)(*feeds.values()).numpy()
    (got,) = session.run(None, {k: v.half().numpy() for k, v in feeds.items()})
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), expected, rtol=0, atol=2e-2)


# --------------------------------------------------------------------------------------- engines on the CPU


def test_eager_engine_validates_names_and_batch(tiny_cfg, tiny_models):
    spec = export_specs(tiny_cfg, max_batch=4)["unet"]
    engine = EagerEngine("unet", spec.make_module(tiny_models), spec.inputs, spec.outputs, max_batch=4)
    feeds = spec.sample_inputs(2)
    assert engine.run(feeds)["pred_latents"].shape == (2, 4, 32, 32)
    with pytest.raises(ValueError, match="takes inputs"):
        engine.run({"latent_input": feeds["latent_input"]})
    with pytest.raises(ValueError, match="outside 1..4"):
        engine.run(spec.sample_inputs(5))
    with pytest.raises(ValueError, match="disagree"):
        engine.run({"latent_input": feeds["latent_input"], "audio_features": feeds["audio_features"][:1]})


def test_bucketed_engine_pads_to_bucket_and_matches_eager(tiny_cfg, tiny_models):
    spec = export_specs(tiny_cfg, max_batch=4)["vae_encoder"]
    module = spec.make_module(tiny_models)
    engine = EagerGraphEngine("vae_encoder", module, spec.inputs, spec.outputs, (1, 4), device="cpu",
                              dtype=torch.float32, cuda_graphs=False)
    engine.run(spec.sample_inputs(4, seed=7))               # leaves stale rows in the padding slots
    feeds = spec.sample_inputs(3, seed=8)
    out = engine.run(feeds)["latents"]
    with torch.no_grad():
        expected = module(*feeds.values())
    assert out.shape == expected.shape == (3, 4, 32, 32)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)   # batch 4 vs 3: kernel blocking only
    with pytest.raises(ValueError, match="shape"):
        engine.run({"images": torch.zeros(2, 3, 64, 64)})


class _RowsEngine(BucketedEngine):
    """The smallest backend: doubles its input and records the rows of every launch."""

    backend = "rows"

    def __init__(self, fixed_shapes: bool = True, warmup: str = "all"):
        self.fixed_shapes = fixed_shapes
        self.launches: list[int] = []
        spec_in, spec_out = TensorSpec("x", ("batch", 3)), TensorSpec("y", ("batch", 3))
        super().__init__("rows", (spec_in,), (spec_out,), (1, 4, 8), device="cpu",
                         input_dtypes={"x": torch.float64})
        self.warm_up(warmup)

    def _launch(self, rows):
        self.launches.append(rows)
        return (self._buffers["x"][:rows] * 2,)


@pytest.mark.parametrize("fixed_shapes, rows", [(True, [4, 8, 1]), (False, [3, 5, 1])])
def test_bucketed_engine_pads_only_fixed_shape_backends(fixed_shapes, rows):
    engine = _RowsEngine(fixed_shapes)
    assert engine.launches == [1, 4, 8] and sorted(engine.warmup_seconds) == [1, 4, 8]
    assert engine.max_batch == 8 and engine._buffers["x"].dtype == torch.float64
    engine.launches.clear()
    for batch in (3, 5, 1):
        x = torch.arange(3 * batch, dtype=torch.float32).reshape(batch, 3)
        y = engine.run({"x": x})["y"]
        assert y.shape == (batch, 3) and y.dtype == torch.float64
        torch.testing.assert_close(y, 2 * x.double())
    assert engine.launches == rows


def _rows_run(engine: _RowsEngine, batch: int) -> None:
    x = torch.arange(3 * batch, dtype=torch.float32).reshape(batch, 3)
    torch.testing.assert_close(engine.run({"x": x})["y"], 2 * x.double())


def test_warmup_policies_choose_buckets():
    assert warmup_buckets("all", (8, 1, 4)) == (1, 4, 8)
    assert warmup_buckets("max", (1, 4, 8)) == (8,)
    assert warmup_buckets("none", (1, 4, 8)) == ()
    with pytest.raises(EngineError, match="warm-up policy 'some'"):
        warmup_buckets("some", (1, 4))


def test_max_warmup_pads_small_batches_to_the_prepared_bucket():
    """A file run must never stall mid-run preparing a small bucket: batch 3 runs at the prepared 8, not at 4."""
    engine = _RowsEngine(warmup="max")
    assert engine.launches == [8] and engine.prepared_buckets == (8,) and list(engine.warmup_seconds) == [8]
    engine.launches.clear()
    for batch in (3, 1, 8):
        _rows_run(engine, batch)
    assert engine.launches == [8, 8, 8] and engine.prepared_buckets == (8,)
    engine.prepare(4)                                       # prepared on request, then used for what fits it
    _rows_run(engine, 3)
    assert engine.launches[-2:] == [4, 4] and engine.prepared_buckets == (4, 8)
    with pytest.raises(EngineError, match="no batch bucket 3"):
        engine.prepare(3)


def test_no_warmup_prepares_the_smallest_fitting_bucket_on_first_use():
    engine = _RowsEngine(warmup="none")
    assert engine.launches == [] and engine.prepared_buckets == () and engine.load_seconds == 0.0
    _rows_run(engine, 3)
    assert engine.launches == [4, 4] and engine.prepared_buckets == (4,)      # prepare, then the call itself
    _rows_run(engine, 2)
    assert engine.launches[-1] == 4 and engine.prepared_buckets == (4,)


def test_tensor_spec_concrete_shape():
    spec = TensorSpec("latents", ("batch", 4, 32, 32))
    assert spec.concrete_shape(5) == (5, 4, 32, 32)
    with pytest.raises(ValueError):
        TensorSpec("bad", ("batch", "height")).concrete_shape(1)


def test_engines_dir_resolution(monkeypatch, tiny_cfg, tmp_path):
    monkeypatch.delenv(ENGINES_DIR_ENV, raising=False)
    assert str(engines_root()) == "engines"
    monkeypatch.setenv(ENGINES_DIR_ENV, str(tmp_path))
    assert engines_root() == tmp_path
    assert config_dir(tiny_cfg) == tmp_path / f"tiny-{tiny_cfg.model_hash()}"
    assert engines_root("/x") == engines_root("/x")


# --------------------------------------------------------------------------------------- manifests

H200 = {"device_type": "cuda", "gpu_name": "NVIDIA H200", "compute_capability": "9.0"}


@pytest.mark.parametrize("field,other", [("gpu_name", "NVIDIA A100-SXM4-80GB"), ("compute_capability", "8.0"),
                                         ("tensorrt_version", "10.0.1"), ("config_hash", "0123456789abcdef"),
                                         ("weights_identity", "official-deadbeef"), ("precision", "float32")])
def test_tensorrt_manifest_mismatch_is_refused(tiny_cfg, tmp_path, field, other):
    expected = expected_plan_manifest(tiny_cfg, "unet", torch.float16, "synthetic-x", trt_version="10.9.0",
                                      machine=H200)
    found = {"manifest_version": 1, **expected, "profiles": {"latent_input": {"max": [32, 8, 32, 32]}}}
    check_plan_manifest(found, expected, path=tmp_path / "unet.plan", max_batch=32)       # matches: no error
    with pytest.raises(EngineError, match="make engines") as info:
        check_plan_manifest({**found, field: other}, expected, path=tmp_path / "unet.plan", max_batch=32)
    assert field in str(info.value)
    with pytest.raises(EngineError, match="make engines"):
        check_plan_manifest(found, expected, path=tmp_path / "unet.plan", max_batch=64)


def _fake_entry(cfg, name, bucket, folder, content=b"not a compiled function"):
    """A manifest entry for a file that is not torch's, with the inputs a CPU fp32 engine records."""
    file = f"{name}-b{bucket}.bin"
    (folder / file).write_bytes(content)
    inputs = [{"shape": list(s.concrete_shape(bucket)), "dtype": "float32", "device": "cpu"}
              for s in export_specs(cfg)[name].inputs]
    return {"file": file, "sha256": sha256_files([folder / file]), "bytes": len(content), "inputs": inputs}


def _write_compiled(cfg, root, buckets=batch_buckets(32), **changes):
    folder = compiled_dir(cfg, "cpu", torch.float32, root)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {**expected_manifest(cfg, "cpu", torch.float32), **CompileSettings().manifest_fields(),
                "entries": {n: {str(b): _fake_entry(cfg, n, b, folder) for b in buckets} for n in ENGINE_MODELS},
                **changes}
    write_manifest(folder / MANIFEST_FILE, manifest)
    return folder


def _open(cfg, root, max_batch=2, models=ENGINE_MODELS):
    return open_compiled_build(cfg, device="cpu", dtype=torch.float32, models=models, max_batch=max_batch,
                               engines_dir=root)


def _decoder_engine(cfg, models, build, warmup="max", buckets=None):
    spec = export_specs(cfg, 2)["vae_decoder"]
    return CompiledEngine("vae_decoder", spec.make_module(models), spec.inputs, spec.outputs,
                          buckets or build.buckets["vae_decoder"], device="cpu", dtype=torch.float32, build=build,
                          warmup=warmup)


@pytest.mark.parametrize("field,other", [("torch_version", "2.0.0"), ("gpu_name", "NVIDIA H100 80GB HBM3"),
                                         ("config_hash", "0123456789abcdef"), ("dtype", "float16"),
                                         ("format", None), ("cpu_threads", "64")])
def test_compiled_manifest_mismatch_is_refused(tiny_cfg, tmp_path, field, other):
    """``format`` None: a manifest without the field, as the Inductor-cache builds wrote."""
    folder = _write_compiled(tiny_cfg, tmp_path)
    _open(tiny_cfg, tmp_path)                                                      # matches: no error
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest[field] = other
    write_manifest(folder / MANIFEST_FILE, {k: v for k, v in manifest.items() if v is not None})
    with pytest.raises(EngineError, match="make engines") as info:
        _open(tiny_cfg, tmp_path)
    assert field in str(info.value) and "does not match this machine/config" in str(info.value)


def test_compiled_build_refuses_missing_buckets_and_files(tiny_cfg, tmp_path):
    folder = _write_compiled(tiny_cfg, tmp_path, buckets=(1, 2))
    with pytest.raises(EngineError, match="'unet' has no build for batch 4 .*built: \\[1, 2\\].*--max-batch 4"):
        _open(tiny_cfg, tmp_path, max_batch=4)
    (folder / "vae_encoder-b1.bin").unlink()
    with pytest.raises(EngineError, match="vae_encoder-b1.bin .*is missing.*make engines"):
        _open(tiny_cfg, tmp_path)
    _write_compiled(tiny_cfg, tmp_path, buckets=(1, 2))
    (folder / "unet-b2.bin").write_bytes(b"short")
    with pytest.raises(EngineError, match="unet-b2.bin has 5 bytes.*partly written"):
        _open(tiny_cfg, tmp_path)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    del manifest["rewrites"]
    write_manifest(folder / MANIFEST_FILE, manifest)
    with pytest.raises(EngineError, match="lacks compile settings"):
        _open(tiny_cfg, tmp_path)


def test_compiled_engine_refuses_corrupt_and_foreign_files(tiny_cfg, tiny_models, tmp_path):
    folder = _write_compiled(tiny_cfg, tmp_path, buckets=(1, 2))
    build = _open(tiny_cfg, tmp_path, models=("vae_decoder",))
    with pytest.raises(EngineError, match="torch could not load .*vae_decoder-b2.bin.*make engines"):
        _decoder_engine(tiny_cfg, tiny_models, build)              # right sha256, but not a compiled function
    path = folder / "vae_decoder-b2.bin"
    path.write_bytes(path.read_bytes().upper())                     # same size, other bytes
    with pytest.raises(EngineError, match="vae_decoder-b2.bin does not match its manifest's sha256"):
        _decoder_engine(tiny_cfg, tiny_models, build)
    engine = _decoder_engine(tiny_cfg, tiny_models, build, warmup="none")   # lazy: nothing read yet
    assert engine.prepared_buckets == () and engine.functions == {}


@pytest.mark.parametrize("key,other", [("dtype", "float16"), ("device", "cuda:0"), ("shape", [2, 4, 32, 33])])
def test_compiled_engine_refuses_other_input_specs(tiny_cfg, tiny_models, tmp_path, key, other):
    """Guards are off in the saved functions, so the engine must refuse buffers they were not compiled for."""
    folder = _write_compiled(tiny_cfg, tmp_path, buckets=(1, 2))
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["entries"]["vae_decoder"]["2"]["inputs"][0][key] = other
    write_manifest(folder / MANIFEST_FILE, manifest)
    build = _open(tiny_cfg, tmp_path, models=("vae_decoder",))
    with pytest.raises(EngineError, match="'vae_decoder' batch 2 was compiled for inputs .*make engines"):
        _decoder_engine(tiny_cfg, tiny_models, build, warmup="none")


def test_usable_buckets():
    assert usable_buckets([16, 1, 4], 3) == (1, 4)
    assert usable_buckets([1, 4, 16], 16) == (1, 4, 16)
    assert usable_buckets([1, 4, 16], 5) == (1, 4, 16)
    assert usable_buckets([1, 4, 16], 17) is None
    assert usable_buckets([1, 4, 16], None) == (1, 4, 16)


# --------------------------------------------------------------------------------------- compiled on the CPU

CPU_BUCKETS = (1, 2)


@pytest.fixture(scope="module")
def cpu_compiled_root(tmp_path_factory, _one_cpu_thread):
    """``talkrt-build-engines --backends compiled --device cpu`` for the tiny VAE decoder (it carries the
    subpixel rewrite) at buckets 1 and 2, run once; one CPU thread, as every test here runs."""
    root = tmp_path_factory.mktemp("cpu_compiled")
    args = ["--config", "tiny", "--backends", "compiled", "--device", "cpu", "--models", "vae_decoder",
            "--buckets", ",".join(map(str, CPU_BUCKETS)), "--engines-dir", str(root)]
    assert cli.main(args) == 0
    return root, args


def _eager_faces(models, spec, batch, seed):
    feeds = spec.sample_inputs(batch, seed=seed)
    with torch.inference_mode():
        return feeds, spec.make_module(models)(*feeds.values())


@pytest.mark.slow
def test_compiled_cpu_build_manifest_and_resume(tiny_cfg, cpu_compiled_root, caplog):
    root, args = cpu_compiled_root
    folder = compiled_dir(tiny_cfg, "cpu", torch.float32, root)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest["format"] == "aot_compile" and manifest["rewrites"] == ["subpixel_upsample"]
    assert manifest["torch_version"] == torch.__version__ and manifest["cpu_threads"] == "1"
    entries = manifest["entries"]["vae_decoder"]
    assert sorted(entries) == ["1", "2"] and set(manifest["entries"]) == {"vae_decoder"}
    for bucket, entry in entries.items():
        path = folder / entry["file"]
        assert sha256_files([path]) == entry["sha256"] and path.stat().st_size == entry["bytes"]
        assert entry["inputs"] == [{"shape": [int(bucket), 4, 32, 32], "dtype": "float32", "device": "cpu"}]
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    with caplog.at_level(logging.INFO, logger="talkrt.build_engines.compiled_build"):
        assert cli.main(args) == 0                                  # up to date: nothing recompiled
    assert "up to date" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes


@pytest.mark.slow
def test_compiled_cpu_lazy_warmup_loads_only_the_max_bucket(tiny_cfg, tiny_models, cpu_compiled_root):
    root, _ = cpu_compiled_root
    build = _open(tiny_cfg, root, models=("vae_decoder",))
    assert build.buckets["vae_decoder"] == CPU_BUCKETS and build.settings == CompileSettings()
    engine = _decoder_engine(tiny_cfg, tiny_models, build, warmup="max")
    assert engine.prepared_buckets == (2,) and set(engine.functions) == {2}       # bucket 1 never read
    assert set(engine.bucket_load_seconds) == {2} and engine.load_seconds > 0 and set(engine.warmup_seconds) == {2}
    spec = export_specs(tiny_cfg, 2)["vae_decoder"]
    for batch, seed in ((1, 11), (2, 12), (1, 13)):             # batch 1 runs padded to the prepared bucket 2
        feeds, expected = _eager_faces(tiny_models, spec, batch, seed)
        got = engine.run(feeds)["faces"]
        assert got.shape == expected.shape == (batch, 256, 256, 3)
        torch.testing.assert_close(got, expected, rtol=0, atol=PARITY_ATOL["vae_decoder"])
    assert engine.prepared_buckets == (2,) and set(engine.functions) == {2}
    timing = startup_seconds({"vae_decoder": engine})["vae_decoder"]
    assert timing["load_s"] > 0 and list(timing["warmup_s"]) == [2]


CPU_ROUND_TRIP = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from torch._dynamo.utils import counters
    from talkrt.config import load_config
    from talkrt.models.weights import build_synthetic
    from talkrt.engines.specs import export_specs
    from talkrt.engines.compiled import CompiledEngine, open_compiled_build
    cfg = load_config("tiny")
    models = build_synthetic(cfg).to(torch.device("cpu"), torch.float32)
    spec = export_specs(cfg, 2)["vae_decoder"]
    build = open_compiled_build(cfg, device="cpu", dtype=torch.float32, models=("vae_decoder",), max_batch=2,
                                engines_dir=sys.argv[1])
    engine = CompiledEngine("vae_decoder", spec.make_module(models), spec.inputs, spec.outputs,
                            build.buckets["vae_decoder"], device="cpu", dtype=torch.float32, build=build,
                            warmup="all")
    outputs = {b: engine.run(spec.sample_inputs(b, seed=20 + b))["faces"].clone() for b in (1, 2)}
    torch.save(outputs, sys.argv[2])
    print(json.dumps({"frames_traced": sum(counters["frames"].values()), "prepared": list(engine.prepared_buckets),
                      "load_s": engine.bucket_load_seconds, "warmup_s": engine.warmup_seconds}))
""")


@pytest.mark.slow
def test_compiled_cpu_round_trip_in_fresh_process(tiny_cfg, tiny_models, cpu_compiled_root, tmp_path):
    root, _ = cpu_compiled_root
    out = tmp_path / "faces.pt"
    proc = subprocess.run([sys.executable, "-c", CPU_ROUND_TRIP, str(root), str(out)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["frames_traced"] == 0 and result["prepared"] == [1, 2], result     # loaded, never re-traced
    spec = export_specs(tiny_cfg, 2)["vae_decoder"]
    for batch, got in torch.load(out).items():
        _, expected = _eager_faces(tiny_models, spec, batch, 20 + batch)
        torch.testing.assert_close(got, expected, rtol=0, atol=PARITY_ATOL["vae_decoder"])


# --------------------------------------------------------------------------------------- selection


@pytest.mark.parametrize("backend", ["compiled", "tensorrt"])
def test_explicit_backend_without_engines_raises(tiny_cfg, tiny_models, tmp_path, backend):
    with pytest.raises(EngineError, match="make engines|TensorRT"):
        create_engines(tiny_cfg, tiny_models, backend=backend, engines_dir=tmp_path)


def test_compiled_missing_says_make_engines(tiny_cfg, tiny_models, tmp_path):
    with pytest.raises(EngineError, match="make engines"):
        create_engines(tiny_cfg, tiny_models, backend="compiled", engines_dir=tmp_path)


def test_auto_falls_back_to_eager_with_warning(tiny_cfg, tiny_models, tmp_path, caplog):
    _write_compiled(tiny_cfg, tmp_path, torch_version="1.0.0")          # stale compiled build present
    with caplog.at_level(logging.WARNING, logger="talkrt.engines.select"):
        engines, backend = create_engines(tiny_cfg, tiny_models, backend="auto", engines_dir=tmp_path, max_batch=4)
    assert backend == "eager"
    assert set(engines) == set(MODEL_NAMES)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "falling back to eager" in warning and "make engines" in warning and "torch_version" in warning
    spec = export_specs(tiny_cfg, 4)["unet"]
    feeds = spec.sample_inputs(2)
    with torch.no_grad():
        expected = tiny_models.unet(*feeds.values())
    torch.testing.assert_close(engines["unet"].run(feeds)["pred_latents"], expected)


def test_unknown_backend_or_warmup_is_refused(tiny_cfg, tiny_models):
    with pytest.raises(EngineError, match="unknown engine backend"):
        create_engines(tiny_cfg, tiny_models, backend="onnxruntime")
    with pytest.raises(EngineError, match="unknown engine warm-up policy 'lazy'"):
        create_engines(tiny_cfg, tiny_models, backend="eager", warmup="lazy")


def test_cli_reports_unbuildable_backends(tmp_path):
    if CUDA:
        pytest.skip("on a GPU machine the compiled backend is buildable")
    assert cli.main(["--config", "tiny", "--backends", "compiled", "--engines-dir", str(tmp_path)]) == 1
    with pytest.raises(SystemExit) as info:
        cli.main(["--config", "tiny", "--backends", "onnx,bogus"])
    assert info.value.code == 2


def test_cli_config_overrides_are_set_flags(capsys):
    parser = cli._parser()
    args = parser.parse_args(["--config", "tiny", "--backends", "onnx", "--set", "pipeline.batch_size=48",
                              "--set", "pipeline.precision=float32"])
    request = cli.resolve(args, parser)
    assert request.cfg.pipeline.batch_size == 48 and request.max_batch == 48   # default max batch follows it
    with pytest.raises(SystemExit):
        parser.parse_args(["--config", "tiny", "--override", "pipeline.batch_size=48"])
    assert "unrecognized arguments: --override" in capsys.readouterr().err


# ======================================================================================= GPU

GPU_BUCKETS = (1, 4)
GPU_BATCHES = (1, 3, 4)           # 3 runs padded to bucket 4
# fp16 tolerance rule: an engine's error against an fp32 reference (same fp16-rounded weights) may be at
# most 2x eager fp16's own error plus a floor of 1e-3 of the output range.  Inductor / TensorRT / CUDA-graph
# kernels accumulate in fp32 like cuBLAS/cuDNN, so their rounding error is of the same order as eager's;
# a bucketing bug (rows mixed up, padding leaking, stale buffers) gives errors of the order of the signal.
ERROR_FACTOR = 2.0


def assert_fp16_close(out: torch.Tensor, eager16: torch.Tensor, ref32: torch.Tensor, what: str) -> None:
    assert out.shape == ref32.shape and torch.isfinite(out).all(), what
    err = (out.float() - ref32).abs().max().item()
    base = (eager16.float() - ref32).abs().max().item()
    floor = 1e-3 * ref32.abs().max().item()
    assert err <= ERROR_FACTOR * base + floor, f"{what}: max error {err:.4g} vs eager fp16 {base:.4g}"


@pytest.fixture(scope="session")
def gpu_setup():
    if not CUDA:
        pytest.skip("needs a CUDA GPU")
    cfg = load_config("musetalk")
    models = build_synthetic(cfg).to(torch.device("cuda"), torch.float16)
    specs = export_specs(cfg, max(GPU_BUCKETS))
    refs = {n: copy.deepcopy(specs[n].make_module(models)).float() for n in ENGINE_MODELS}
    return cfg, models, specs, refs


@pytest.fixture(scope="session")
def compiled_root(gpu_setup, tmp_path_factory):
    """One compiled build shared by every GPU test (mode 'default' keeps it to a few minutes on an H200:
    UNet ~40 s per bucket; the parity and bucketing logic is the same for max-autotune; override with
    TALKRT_TEST_COMPILE_MODE)."""
    from talkrt.build_engines.compiled_build import build_compiled
    cfg, models, _, _ = gpu_setup
    root = tmp_path_factory.mktemp("gpu_engines")
    build_compiled(cfg, models, device="cuda", dtype=torch.float16, engines_dir=root, buckets=GPU_BUCKETS,
                   settings=CompileSettings(mode=os.environ.get("TALKRT_TEST_COMPILE_MODE", "default")))
    return root


def _expected(spec, module, ref, batch):
    feeds = spec.sample_inputs(batch, device="cuda", dtype=torch.float16, seed=100 + batch)
    with torch.inference_mode():
        eager16 = module(*feeds.values())
        ref32 = ref(*(v.float() for v in feeds.values()))
    return feeds, eager16, ref32


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("cuda_graphs,warmup", [(False, "all"), (True, "all"), (True, "max")])
@pytest.mark.parametrize("name", ENGINE_MODELS)
def test_compiled_matches_eager_at_every_bucket(gpu_setup, compiled_root, name, cuda_graphs, warmup):
    cfg, models, specs, refs = gpu_setup
    build = open_compiled_build(cfg, device="cuda", dtype=torch.float16, models=(name,),
                                max_batch=max(GPU_BUCKETS), engines_dir=compiled_root)
    assert build.buckets[name] == GPU_BUCKETS
    assert build.settings.rewrites == ("subpixel_upsample",)  # the default build rewrites the upsamplers
    spec, module = specs[name], specs[name].make_module(models)
    engine = CompiledEngine(name, module, spec.inputs, spec.outputs, GPU_BUCKETS, device="cuda",
                            dtype=torch.float16, build=build, cuda_graphs=cuda_graphs, warmup=warmup)
    prepared = GPU_BUCKETS if warmup == "all" else (max(GPU_BUCKETS),)
    assert engine.prepared_buckets == prepared and set(engine.functions) == set(prepared)
    assert engine.load_seconds > 0 and engine.cuda_graphs == cuda_graphs
    for batch in GPU_BATCHES + (1,):                         # back to 1 after 4: no stale-bucket effects
        feeds, eager16, ref32 = _expected(spec, module, refs[name], batch)
        out = engine.run(feeds)[spec.output_names[0]]
        assert_fp16_close(out, eager16, ref32, f"compiled {name} batch {batch} graphs={cuda_graphs} {warmup}")
    assert engine.prepared_buckets == prepared               # "max": batches 1 and 3 ran padded to 4


@pytest.mark.gpu
@needs_cuda
def test_create_engines_compiled_prepares_only_the_max_bucket(gpu_setup, compiled_root):
    cfg, models, specs, refs = gpu_setup
    engines, backend = create_engines(cfg, models, backend="compiled", engines_dir=compiled_root,
                                      max_batch=max(GPU_BUCKETS), warmup="max")
    assert backend == "compiled"
    timing = startup_seconds(engines)
    for name in ENGINE_MODELS:
        assert engines[name].cuda_graphs and engines[name].prepared_buckets == (max(GPU_BUCKETS),)
        assert timing[name]["load_s"] > 0 and list(timing[name]["warmup_s"]) == [max(GPU_BUCKETS)]
    print("start-up (s):", timing)
    spec = specs["unet"]
    feeds, eager16, ref32 = _expected(spec, spec.make_module(models), refs["unet"], 1)
    assert_fp16_close(engines["unet"].run(feeds)["pred_latents"], eager16, ref32, "create_engines unet batch 1")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", ENGINE_MODELS)
def test_cuda_graph_engine_matches_eager(gpu_setup, name):
    _, models, specs, refs = gpu_setup
    spec, module = specs[name], specs[name].make_module(models)
    engine = EagerGraphEngine(name, module, spec.inputs, spec.outputs, GPU_BUCKETS, device="cuda",
                              dtype=torch.float16, cuda_graphs=True)
    assert engine.cuda_graphs
    stream = torch.cuda.Stream()
    for batch in GPU_BATCHES:
        feeds, eager16, ref32 = _expected(spec, module, refs[name], batch)
        out = engine.run(feeds, stream)[spec.output_names[0]]
        stream.synchronize()
        assert_fp16_close(out, eager16, ref32, f"graphs {name} batch {batch}")


@pytest.mark.gpu
@needs_cuda
def test_auto_on_gpu_without_engines_uses_eager_graphs(gpu_setup, tmp_path, caplog):
    cfg, models, _, _ = gpu_setup
    with caplog.at_level(logging.WARNING):
        engines, backend = create_engines(cfg, models, backend="auto", engines_dir=tmp_path, max_batch=2)
    assert backend == "eager" and all(engines[n].cuda_graphs for n in ENGINE_MODELS)
    assert "falling back to eager" in caplog.text


ROUND_TRIP = textwrap.dedent("""
    import json, sys, time, torch
    from torch._dynamo.utils import counters
    from talkrt.config import load_config
    from talkrt.models.weights import build_synthetic
    from talkrt.engines.specs import export_specs
    from talkrt.engines.compiled import CompiledEngine, open_compiled_build
    cfg = load_config("musetalk")
    models = build_synthetic(cfg).to(torch.device("cuda"), torch.float16)
    specs = export_specs(cfg, 4)
    result = {}
    # vae_encoder opened for batch 1 only (one bucket); unet and vae_decoder at both buckets, with graphs
    for name, max_batch in (("vae_encoder", 1), ("unet", 4), ("vae_decoder", 4)):
        spec = specs[name]
        build = open_compiled_build(cfg, device="cuda", dtype=torch.float16, models=(name,),
                                    max_batch=max_batch, engines_dir=sys.argv[1])
        module = spec.make_module(models)
        start = time.perf_counter()
        engine = CompiledEngine(name, module, spec.inputs, spec.outputs, build.buckets[name],
                                device="cuda", dtype=torch.float16, build=build, cuda_graphs=True, warmup="all")
        ready_s = time.perf_counter() - start
        rel = []
        for batch in sorted({1, max_batch}):
            feeds = spec.sample_inputs(batch, device="cuda", dtype=torch.float16, seed=30 + batch)
            with torch.inference_mode():
                out = engine.run(feeds)[spec.output_names[0]].float()
                ref = module(*feeds.values()).float()
            rel.append((out - ref).abs().max().item() / ref.abs().max().item())
        result[name] = {"prepared": list(engine.prepared_buckets), "rel_diff": max(rel), "ready_s": ready_s,
                        "load_s": engine.bucket_load_seconds, "warmup_s": engine.warmup_seconds}
    result["frames_traced"] = sum(counters["frames"].values())
    print(json.dumps(result))
""")


@pytest.mark.gpu
@needs_cuda
def test_compiled_functions_round_trip_in_fresh_process(compiled_root, tmp_path):
    """Empty Inductor / Triton caches: whatever the saved functions do not carry is rebuilt at load (slower,
    still correct); the printed load / warm-up seconds show which."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
           "TRITON_CACHE_DIR": str(tmp_path / "triton")}
    proc = subprocess.run([sys.executable, "-c", ROUND_TRIP, str(compiled_root)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print("round trip (seconds per bucket):", result)
    assert result.pop("frames_traced") == 0, "a loaded function was re-traced by Dynamo"
    assert result["vae_encoder"]["prepared"] == [1]
    for name, got in result.items():
        assert got["rel_diff"] < 0.05, (name, got)    # compiled vs eager fp16, same weights: fp16 rounding only


@pytest.mark.gpu
@needs_cuda
def test_tensorrt_plan_matches_eager(tmp_path):
    pytest.importorskip("tensorrt")
    from talkrt.build_engines.onnx_export import export_onnx
    from talkrt.build_engines.tensorrt_build import build_plan
    from talkrt.engines.tensorrt import TensorRTEngine
    cfg = load_config("tiny")
    models = build_synthetic(cfg).to(torch.device("cuda"), torch.float32)
    specs = export_specs(cfg, max(GPU_BUCKETS))
    for name in ENGINE_MODELS:
        spec = specs[name]
        exported = export_onnx(cfg, spec, spec.make_module(models), dtype=torch.float32, device="cuda",
                               weights_identity=models.identity, engines_dir=tmp_path)
        build_plan(cfg, spec, exported, dtype=torch.float16, weights_identity=models.identity, engines_dir=tmp_path)
        engine = TensorRTEngine(cfg, name, spec.inputs, spec.outputs, dtype=torch.float16,
                                weights_identity=models.identity, max_batch=max(GPU_BUCKETS), buckets=GPU_BUCKETS,
                                engines_dir=tmp_path, device="cuda", cuda_graphs=True)
        module16 = copy.deepcopy(spec.make_module(models)).half()
        for batch in GPU_BATCHES:
            feeds, eager16, ref32 = _expected(spec, module16, spec.make_module(models), batch)
            out = engine.run(feeds)[spec.output_names[0]]
            assert_fp16_close(out, eager16, ref32, f"tensorrt {name} batch {batch}")
