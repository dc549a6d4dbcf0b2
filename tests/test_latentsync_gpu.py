"""LatentSync 1.6 on a CUDA GPU (skipped elsewhere): the full-size chunk in fp16, fp16 vs fp32 parity."""
import time
from fractions import Fraction

import numpy as np
import pytest
import torch
from talkrt.models.latentsync.audio import LatentSyncAudio
from talkrt.models.latentsync.blocks import group_norm_frames
from talkrt.models.latentsync.config import load_latentsync_config
from talkrt.models.latentsync.generator import LatentSyncGenerator
from talkrt.models.latentsync.weights import build_synthetic

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def full():
    cfg = load_latentsync_config("latentsync16")
    return cfg, build_synthetic(cfg).to(CUDA, torch.float16)


def faces(n: int, size: int) -> torch.Tensor:
    y, x = np.mgrid[0:size, 0:size]
    return torch.from_numpy(np.stack([np.stack([(x + i * 3) % 256, y % 256, ((x + y) // 2 + i * 7) % 256])
                                      for i in range(n)]).astype(np.uint8))


def test_full_size_chunk_fp16(full, record_property):
    """16 frames at 512, 20 steps, guidance 1.5, DeepCache: finite latents, uint8 faces, and the time
    and peak memory of a chunk recorded (upstream needs 18 GB on a 4090)."""
    cfg, m = full
    s = cfg.model.crop_size
    audio = torch.randn(16, 50, 384, generator=torch.Generator().manual_seed(0)).to(CUDA, torch.float16)
    gen = LatentSyncGenerator(m.unet, m.vae_encoder, m.vae_decoder, cfg.model, CUDA, torch.float16)
    x = faces(16, s).to(CUDA)
    gen(x, m.mask.keep, audio)                                        # warm-up (cuDNN autotune, allocator)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    chunk = gen.prepare(x, m.mask.keep, audio)
    latents = gen.denoise(chunk)
    out = gen.decode(latents, chunk)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    record_property("chunk_seconds", round(seconds, 3))
    record_property("frames_per_second", round(16 / seconds, 2))
    record_property("peak_gib", round(torch.cuda.max_memory_allocated() / 2 ** 30, 2))
    assert torch.isfinite(latents).all()
    assert out.shape == (16, s, s, 3) and out.dtype == torch.uint8
    assert torch.cuda.max_memory_allocated() < 24 * 2 ** 30


def test_full_size_unet_fp16_matches_fp32(full):
    cfg, m = full
    h = cfg.model.latent_size
    gen = torch.Generator(device=CUDA).manual_seed(1)
    x = torch.randn(2, 13, 16, h, h, device=CUDA, generator=gen)
    ctx = torch.randn(32, 50, 384, device=CUDA, generator=gen)
    with torch.inference_mode():
        half = m.unet(x.half(), 501, ctx.half()).float()
        m.unet.float()
        try:
            ref = m.unet(x, 501, ctx)
        finally:
            m.unet.half()
    rel = float((half - ref).norm() / ref.norm())
    assert rel < 2e-2, rel


def test_group_norm_over_frames_in_half_precision():
    norm = torch.nn.GroupNorm(32, 320, eps=1e-5).to(CUDA)
    with torch.no_grad():
        norm.weight.normal_(1, 0.1)
        norm.bias.normal_(0, 0.1)
    x = torch.randn(2 * 16, 320, 64, 64, device=CUDA) * 3 + 5
    five = x.reshape(2, 16, 320, 64, 64).transpose(1, 2)
    ref = norm(five).transpose(1, 2).reshape_as(x)                 # nn.GroupNorm on [b, c, f, h, w]
    with torch.no_grad():
        half = group_norm_frames(x.half(), 16, norm.half()).float()
    assert (half - ref).abs().max() < 2e-2


def test_audio_states_fp16_on_cuda_match_fp32_on_cpu(full):
    cfg, m = full
    t = np.arange(35 * 16000) / 16000
    speech = (0.3 * np.sin(2 * np.pi * (150 + 50 * np.sin(t)) * t) * np.sin(2 * np.pi * 3 * t) ** 2).astype(np.float32)
    gpu = LatentSyncAudio(m.whisper, cfg.model.audio, CUDA, torch.float16)
    cpu_whisper = m.whisper
    frames = np.arange(0, 30 * 25)
    win_gpu = gpu.clip(speech).windows(frames, Fraction(25)).float().cpu()
    cpu_whisper.float().cpu()
    try:
        cpu = LatentSyncAudio(cpu_whisper, cfg.model.audio, torch.device("cpu"), torch.float32)
        win_cpu = cpu.clip(speech).windows(frames, Fraction(25))
    finally:
        cpu_whisper.to(CUDA, torch.float16)
    rel = float((win_gpu - win_cpu).norm() / win_cpu.norm())
    assert rel < 1e-2, rel
