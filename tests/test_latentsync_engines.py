"""LatentSync's compiled engines: specs, the build (CLI, manifest, build-time parity), compiled-vs-eager
denoising, stale-build refusal, the pipeline with ``--backend compiled``; GPU parity when CUDA exists.

CPU tests compile once per module (one thread, as tests/test_engines.py): ``latentsync16-tiny``
narrowed further by ``SMALL`` (two UNet levels of one layer, one temporal attention per motion
module, a three-level VAE: the same kinds of layers, fewer of them), because Dynamo traces every
layer and Inductor compiles its kernels in C++: the stock tiny UNet alone takes ~4.5 min cold on 2
cores, the narrowed build (UNet, DeepCache step, VAE decoder and encoder) about a minute.

Tolerances on the CPU (float32, same weights, same inputs): compiled vs eager differs only by
Inductor's reassociation of sums and fused kernels, ~1e-6 of an output's range (the build logs
1.6e-6 for the UNet); 1e-4 of the range leaves room for 2 chained denoising steps and the VAE, and
is ~1e4 below what a wrong function (rows mixed up, deep features misplaced) gives.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil

import pytest
import torch

from talkrt.build_engines import cli
from talkrt.cli import main as run_pipeline
from talkrt.engines.compiled import MANIFEST_FILE, compiled_dir
from talkrt.engines.specs import engine_models, export_specs
from talkrt.errors import EngineError
from talkrt.families import load_family_config
from talkrt.families.latentsync_engines import CompiledUNetSteps, EngineCall, generator_networks
from talkrt.media.probe import probe_output
from talkrt.models.latentsync.generator import LatentSyncGenerator
from talkrt.models.latentsync.weights import build_synthetic
from test_latentsync_generator import audio_tokens, faces
from test_latentsync_pipeline import DATA, write_speech_excerpt

CPU = torch.device("cpu")
SMALL = ("model.unet.layers_per_block=1", "model.unet.block_out_channels=[32,64]",
         "model.unet.down_block_types=[CrossAttnDownBlock3D,DownBlock3D]",
         "model.unet.up_block_types=[UpBlock3D,CrossAttnUpBlock3D]", "model.unet.motion_module_resolutions=[1,2]",
         "model.unet.motion_attention_blocks=1", "model.vae.block_out_channels=[16,32,32]",
         "model.denoise.steps=2")          # steps do not change an engine; 2 keep the pipeline run short
REL_TOL = 1e-4


def rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max |got - want| / max |want|``."""
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


@pytest.fixture(scope="module", autouse=True)
def _one_cpu_thread(one_cpu_thread):
    """Every test of this module on one intra-op thread (conftest's ``one_cpu_thread``)."""


@pytest.fixture(scope="module")
def cfg():
    return load_family_config("latentsync16-tiny", list(SMALL))


@pytest.fixture(scope="module")
def models(cfg):
    return build_synthetic(cfg).to(CPU, torch.float32)


@pytest.fixture(scope="module")
def build_args(tmp_path_factory, _one_cpu_thread):
    """``talkrt-build-engines --config latentsync16-tiny --backends compiled --device cpu`` run once."""
    root = tmp_path_factory.mktemp("ls_engines")
    args = ["--config", "latentsync16-tiny", "--backends", "compiled", "--device", "cpu", "--engines-dir", str(root)]
    for item in SMALL:
        args += ["--set", item]
    assert cli.main(args) == 0
    return root, args


@pytest.fixture(scope="module")
def networks(cfg, models, build_args):
    return generator_networks(cfg, models, backend="compiled", device=CPU, dtype=torch.float32,
                              engines_dir=build_args[0], cuda_graphs=True, warmup="max")   # no graphs on the CPU


def generators(cfg, models, networks):
    eager = LatentSyncGenerator(models.unet, models.vae_encoder, models.vae_decoder, cfg.model, CPU, torch.float32)
    compiled = LatentSyncGenerator(networks.unet, networks.vae_encoder, networks.vae_decoder, cfg.model, CPU,
                                   torch.float32)
    return eager, compiled


# --------------------------------------------------------------------------------------- specs (no compiling)


def test_specs_follow_guidance_deepcache_and_chunk(cfg):
    specs = export_specs(cfg, 999)                   # LatentSync's sizes come from its config, not --max-batch
    assert engine_models(cfg) == ("unet", "unet_shallow", "vae_decoder", "vae_encoder")
    assert {n: s.buckets for n, s in specs.items()} == {"unet": (2,), "unet_shallow": (2,), "vae_decoder": (16,),
                                                        "vae_encoder": (32,)}
    assert specs["unet"].output_names == ("noise_pred", "deep")
    assert specs["unet_shallow"].input_names == ("sample", "timestep", "audio", "deep")
    h = cfg.model.latent_size
    feeds = specs["unet_shallow"].sample_inputs(2)
    assert feeds["sample"].shape == (2, 13, 16, h, h) and feeds["deep"].shape == (2, 16, 32, h, h)
    assert feeds["timestep"].shape == (2,) and feeds["timestep"].eq(feeds["timestep"].round()).all()
    plain = load_family_config("latentsync16-tiny", [*SMALL, "model.denoise.guidance_scale=1",
                                                     "model.denoise.deepcache=false"])
    assert engine_models(plain) == ("unet", "vae_decoder", "vae_encoder")
    assert export_specs(plain)["unet"].buckets == (1,)


def test_tensorrt_and_onnx_are_refused_for_the_family(cfg, models, tmp_path, caplog):
    with pytest.raises(EngineError, match="--backend tensorrt: .* no tensorrt engines .*builds compiled"):
        generator_networks(cfg, models, backend="tensorrt", device=CPU, dtype=torch.float32, engines_dir=tmp_path,
                           cuda_graphs=False, warmup="max")
    with caplog.at_level(logging.WARNING, logger="talkrt.build_engines"):
        assert cli.main(["--config", "latentsync16-tiny", "--backends", "onnx", "--engines-dir", str(tmp_path)]) == 1
    assert "builds compiled engines only" in caplog.text


# --------------------------------------------------------------------------------------- build and parity


@pytest.mark.slow
def test_build_writes_a_checked_manifest_and_resumes(cfg, build_args, caplog):
    root, args = build_args
    folder = compiled_dir(cfg, "cpu", torch.float32, root)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest["config_hash"] == cfg.model_hash() and manifest["config_name"] == "latentsync-1.6-tiny"
    entries = manifest["entries"]
    assert {n: sorted(e) for n, e in entries.items()} == {"unet": ["2"], "unet_shallow": ["2"],
                                                          "vae_decoder": ["16"], "vae_encoder": ["32"]}
    h, a = cfg.model.latent_size, cfg.model.audio
    assert [i["shape"] for i in entries["unet"]["2"]["inputs"]] == [[2, 13, 16, h, h], [2],
                                                                    [2, 16, a.tokens_per_frame, a.d_model]]
    assert all(0 <= e["parity"] <= 1e-3 for per in entries.values() for e in per.values())
    with caplog.at_level(logging.INFO, logger="talkrt.build_engines.compiled_build"):
        assert cli.main(args) == 0                                  # up to date: nothing recompiled
    assert "up to date" in caplog.text


@pytest.mark.slow
def test_one_denoise_call_matches_eager(cfg, models, networks):
    assert networks.backend == "compiled" and isinstance(networks.unet, CompiledUNetSteps)
    assert isinstance(networks.vae_decoder, EngineCall) and not networks.engines["unet"].cuda_graphs
    eager, compiled = generators(cfg, models, networks)
    chunk = eager.prepare(faces(16, 64), models.mask.keep, audio_tokens(16, cfg))
    latents = eager.noise.expand(-1, -1, 16, -1, -1).clone()
    want, want_deep = eager.unet_step(latents, 0, chunk, None)
    got, got_deep = compiled.unet_step(latents, 0, chunk, None)
    assert got_deep.shape == (2, 16, 32, *got.shape[-2:]) and want_deep.shape == (32, 32, *got.shape[-2:])
    assert rel_diff(got, want) < REL_TOL and rel_diff(got_deep.flatten(0, 1), want_deep) < REL_TOL
    want, _ = eager.unet_step(want, 1, chunk, want_deep)            # step 1 is a DeepCache step
    got, _ = compiled.unet_step(got, 1, chunk, got_deep.clone())
    assert rel_diff(got, want) < REL_TOL


@pytest.mark.slow
def test_short_denoise_and_vae_match_eager(cfg, models, networks):
    eager, compiled = generators(cfg, models, networks)
    assert len(eager.timesteps) == 2 and eager.cached_step(1)      # a full step, then a DeepCache step
    for frames in (16, 5):                           # a full chunk (engines), a short last one (eager UNet)
        pixels, audio = faces(frames, 64), audio_tokens(frames, cfg, seed=frames)
        want_cond = eager.encode_condition(pixels, models.mask.keep)
        got_cond = compiled.encode_condition(pixels, models.mask.keep)          # encoder engine, padded to 32
        assert rel_diff(got_cond, want_cond) < REL_TOL
        chunk = eager.chunk(want_cond, audio)
        want, got = eager.denoise(chunk), compiled.denoise(chunk)
        assert got.shape == (1, 4, frames, *want.shape[-2:]) and rel_diff(got, want) < REL_TOL
        faces_want, faces_got = eager.decode(want), compiled.decode(want)       # decoder engine, padded to 16
        assert faces_got.shape == (frames, 64, 64, 3)
        assert (faces_got.int() - faces_want.int()).abs().max() <= 1             # uint8 rounding at most


# --------------------------------------------------------------------------------------- stale builds


@pytest.mark.slow
def test_stale_builds_are_refused_with_the_reason(cfg, models, build_args, tmp_path, caplog):
    root, _ = build_args
    changed = load_family_config("latentsync16-tiny", [*SMALL, "model.denoise.guidance_scale=2.0"])
    with pytest.raises(EngineError, match=r"found builds of config 'latentsync-1\.6-tiny' for other model hashes: "
                                          rf"latentsync-1\.6-tiny-{cfg.model_hash()}.*a field of it changed"):
        generator_networks(changed, models, backend="compiled", device=CPU, dtype=torch.float32, engines_dir=root,
                           cuda_graphs=False, warmup="max")
    copy_root = tmp_path / "engines"
    shutil.copytree(root, copy_root)
    path = compiled_dir(cfg, "cpu", torch.float32, copy_root) / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "torch_version": "1.0.0", "compile_mode": "max-autotune"}))
    with pytest.raises(EngineError, match=r"torch_version: built for '1\.0\.0'.*make engines CONFIG="):
        generator_networks(cfg, models, backend="compiled", device=CPU, dtype=torch.float32, engines_dir=copy_root,
                           cuda_graphs=False, warmup="max")
    with caplog.at_level(logging.WARNING):
        nets = generator_networks(cfg, models, backend="auto", device=CPU, dtype=torch.float32,
                                  engines_dir=copy_root, cuda_graphs=False, warmup="max")
    assert nets.backend == "eager" and nets.unet is models.unet and "falling back to eager" in caplog.text


# --------------------------------------------------------------------------------------- the pipeline


@pytest.mark.slow
def test_pipeline_with_compiled_backend_matches_eager(build_args, tmp_path, capsys):
    root, _ = build_args
    audio = write_speech_excerpt(tmp_path / "speech.wav", 1.2)       # 30 frames: a 16-frame chunk and 14 more
    overrides = [arg for item in SMALL for arg in ("--set", item)]
    outputs = {}
    for backend in ("compiled", "eager"):
        out = tmp_path / f"{backend}.mp4"
        assert run_pipeline(["--config", "latentsync16-tiny", *overrides, "--device", "cpu", "--no-progress",
                             "--backend", backend, "--engines-dir", str(root), "--video",
                             str(DATA / "sample_avatar.mp4"), "--audio", str(audio), "--out", str(out),
                             "--cache-dir", str(tmp_path / "cache")]) == 0
        outputs[backend] = probe_output(out)
        assert f"backend={backend}" in capsys.readouterr().out
    assert outputs["compiled"].num_frames == outputs["eager"].num_frames == 30


# --------------------------------------------------------------------------------------- GPU (full size, fp16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_full_size_compiled_matches_eager_fp16_at_every_bucket(tmp_path):
    """Full-size latentsync16 in fp16 on CUDA: build every engine (UNet and DeepCache step at batch 2,
    VAE decoder at 16, encoder at 32), then each engine with CUDA graphs against eager fp16, both
    measured against an fp32 copy of the same (fp16-rounded) weights: the rule of tests/test_engines.py."""
    from talkrt.build_engines.compiled_build import build_compiled
    from talkrt.engines.compiled import CompiledEngine, open_compiled_build
    from test_engines import assert_fp16_close
    cfg = load_family_config("latentsync16")
    models = build_synthetic(cfg).to(torch.device("cuda"), torch.float16)
    build_compiled(cfg, models, device="cuda", dtype=torch.float16, engines_dir=tmp_path)
    specs = export_specs(cfg)
    for name in engine_models(cfg):
        spec = specs[name]
        build = open_compiled_build(cfg, device="cuda", dtype=torch.float16, models=(name,),
                                    max_batch=spec.profile.max, engines_dir=tmp_path)
        module = spec.make_module(models)
        engine = CompiledEngine(name, module, spec.inputs, spec.outputs, build.buckets[name], device="cuda",
                                dtype=torch.float16, build=build, cuda_graphs=True, warmup="all")
        ref = copy.deepcopy(module).float()
        for bucket in build.buckets[name]:
            feeds = spec.sample_inputs(bucket, device="cuda", dtype=torch.float16, seed=200 + bucket)
            with torch.inference_mode():
                got = {k: v.clone() for k, v in engine.run(feeds).items()}
                eager16 = module(*feeds.values())
                ref32 = ref(*(v.float() for v in feeds.values()))
            eager16 = eager16 if isinstance(eager16, tuple) else (eager16,)
            ref32 = ref32 if isinstance(ref32, tuple) else (ref32,)
            for out_name, e16, r32 in zip(spec.output_names, eager16, ref32):
                assert_fp16_close(got[out_name], e16, r32, f"compiled {name} batch {bucket} {out_name}")
        del engine, ref
        torch.cuda.empty_cache()
    nets = generator_networks(cfg, models, backend="auto", device=torch.device("cuda"), dtype=torch.float16,
                              engines_dir=tmp_path, cuda_graphs=True, warmup="max")
    assert nets.backend == "compiled"
    print("CUDA graphs per engine:", {n: e.cuda_graphs for n, e in nets.engines.items()})
