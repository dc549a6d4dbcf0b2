"""LatentSync generator on the tiny config, CPU: end to end, determinism, guidance, DeepCache."""
import dataclasses
from fractions import Fraction

import numpy as np
import pytest
import torch
from talkrt.models.latentsync.audio import LatentSyncAudio
from talkrt.models.latentsync.config import load_latentsync_config
from talkrt.models.latentsync.generator import LatentSyncGenerator, make_scheduler
from talkrt.models.latentsync.weights import build_synthetic

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup():
    cfg = load_latentsync_config("latentsync16-tiny")
    return cfg, build_synthetic(cfg).to(CPU, torch.float32)


def generator(setup, **denoise):
    cfg, m = setup
    d = dataclasses.replace(cfg.model.denoise, **denoise)
    return LatentSyncGenerator(m.unet, m.vae_encoder, m.vae_decoder, cfg.model, CPU, torch.float32, d)


def faces(n: int, size: int) -> torch.Tensor:
    """Moving colour ramps, ``[n, 3, size, size]`` uint8."""
    y, x = np.mgrid[0:size, 0:size]
    return torch.from_numpy(np.stack([np.stack([(x * 4 + i * 3) % 256, (y * 4) % 256, ((x + y) * 2 + i * 7) % 256])
                                      for i in range(n)]).astype(np.uint8))


def audio_tokens(n: int, cfg, seed: int = 0) -> torch.Tensor:
    a = cfg.model.audio
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, a.tokens_per_frame, a.d_model))
                            .astype(np.float32))


def test_scheduler_is_upstreams_ddim():
    s = make_scheduler(20)
    assert [int(t) for t in s.timesteps] == list(range(951, 0, -50))
    c = s.config
    assert (c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule, c.steps_offset) == \
        (1000, 0.00085, 0.012, "scaled_linear", 1)
    assert c.clip_sample is False and c.set_alpha_to_one is False


def test_end_to_end_chunk_from_audio(setup):
    """16 frames: Whisper windows at 25 fps -> prepare -> 20 DDIM steps with guidance and DeepCache
    -> decode: uint8 faces whose kept pixels are the input's and whose mouth region is generated."""
    cfg, m = setup
    s = cfg.model.crop_size
    t = np.arange(16000) / 16000
    speech = (0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t) ** 2).astype(np.float32)
    feats = LatentSyncAudio(m.whisper, cfg.model.audio, CPU, torch.float32)
    audio = feats.clip(speech).windows(np.arange(16), Fraction(25))
    x = faces(16, s)
    out = generator(setup)(x, m.mask.keep, audio)
    assert out.shape == (16, s, s, 3) and out.dtype == torch.uint8
    keep = torch.from_numpy(np.array(m.mask.keep)) == 1.0
    generated = torch.from_numpy(np.array(m.mask.keep)) == 0.0
    assert keep.any() and generated.any()
    hwc = x.permute(0, 2, 3, 1)
    assert torch.equal(out[:, keep], hwc[:, keep])
    assert (out[:, generated].float() - hwc[:, generated].float()).abs().mean() > 5


def test_same_seed_same_bytes(setup):
    cfg, m = setup
    x, audio = faces(2, cfg.model.crop_size), audio_tokens(2, cfg)
    out = generator(setup, steps=2)(x, m.mask.keep, audio)
    assert torch.equal(out, generator(setup, steps=2)(x, m.mask.keep, audio))
    assert not torch.equal(out, generator(setup, steps=2, noise_seed=7)(x, m.mask.keep, audio))


def test_float_faces_and_a_per_frame_mask_give_the_same_result(setup):
    cfg, m = setup
    s = cfg.model.crop_size
    x, audio = faces(2, s), audio_tokens(2, cfg)
    g = generator(setup, steps=1)
    a = g(x, m.mask.keep, audio)
    b = g(x.float(), torch.from_numpy(np.array(m.mask.keep)).expand(2, 1, s, s), audio)
    assert torch.equal(a, b)


def test_cached_conditions_and_raw_decode(setup):
    """Per-frame conditions encoded once (as an avatar cache would hold them) give the same chunk as
    prepare; decode without the faces returns the decoded pixels everywhere."""
    cfg, m = setup
    x, audio = faces(2, cfg.model.crop_size), audio_tokens(2, cfg)
    g = generator(setup, steps=1)
    cached = torch.cat([g.encode_condition(x[i:i + 1], m.mask.keep) for i in range(2)])
    a, b = g.prepare(x, m.mask.keep, audio), g.chunk(cached, audio)
    assert torch.allclose(a.condition, b.condition, atol=1e-5) and torch.equal(a.context, b.context)
    assert b.pixels is None
    latents = g.denoise(b)
    raw, pasted = g.decode(latents), g.decode(latents, a)
    keep = torch.from_numpy(np.array(m.mask.keep)) == 1.0
    generated = torch.from_numpy(np.array(m.mask.keep)) == 0.0
    assert torch.equal(raw[:, generated], pasted[:, generated])
    assert not torch.equal(raw[:, keep], pasted[:, keep])
    assert torch.equal(pasted[:, keep], x.permute(0, 2, 3, 1)[:, keep])


def test_guidance_batches_zero_audio_with_the_audio(setup):
    cfg, m = setup
    s, h = cfg.model.crop_size, cfg.model.latent_size
    x, audio = faces(4, s), audio_tokens(4, cfg)
    chunk = generator(setup).prepare(x, m.mask.keep, audio)
    assert chunk.condition.shape == (2, 9, 4, h, h) and torch.equal(chunk.condition[0], chunk.condition[1])
    assert torch.equal(chunk.context[:4], torch.zeros_like(audio)) and torch.equal(chunk.context[4:], audio)
    assert torch.equal(chunk.condition[0, 0], torch.from_numpy(m.mask.latent(h)).expand(4, h, h))
    plain = generator(setup, guidance_scale=1.0).prepare(x, m.mask.keep, audio)
    assert plain.condition.shape == (1, 9, 4, h, h) and torch.equal(plain.context, audio)


def count_calls(g):
    calls = {"full": 0, "shallow": 0}
    full, shallow = g.full, g.shallow

    def counted_full(*args):
        calls["full"] += 1
        return full(*args)

    def counted_shallow(*args):
        calls["shallow"] += 1
        return shallow(*args)
    g.full, g.shallow = counted_full, counted_shallow
    return calls


def test_deepcache_on_vs_off(setup):
    """DeepCache (interval 3) runs 7 full UNet calls of 20 and stays close to the uncached loop: final
    latents within 5 % (relative L2), decoded faces within 3 grey levels on average in the generated
    region (measured: about 2 % and 1 on these synthetic weights)."""
    cfg, m = setup
    x, audio = faces(4, cfg.model.crop_size), audio_tokens(4, cfg)
    on, off = generator(setup), generator(setup, deepcache=False)
    calls = count_calls(on)
    chunk = on.prepare(x, m.mask.keep, audio)
    lat_on, lat_off = on.denoise(chunk), off.denoise(chunk)
    assert calls == {"full": 7, "shallow": 13}
    rel = float((lat_on - lat_off).norm() / lat_off.norm())
    assert 0 < rel < 0.05, rel
    generated = torch.from_numpy(np.array(m.mask.keep)) == 0.0
    out_on, out_off = on.decode(lat_on, chunk), off.decode(lat_off, chunk)
    assert float((out_on.float() - out_off.float())[:, generated].abs().mean()) < 3.0


def test_deepcache_every_step_is_the_uncached_loop(setup):
    cfg, m = setup
    x, audio = faces(2, cfg.model.crop_size), audio_tokens(2, cfg)
    chunk = generator(setup).prepare(x, m.mask.keep, audio)
    every = generator(setup, steps=4, deepcache_interval=1)
    calls = count_calls(every)
    assert torch.equal(every.denoise(chunk), generator(setup, steps=4, deepcache=False).denoise(chunk))
    assert calls == {"full": 4, "shallow": 0}


def test_bad_inputs_are_refused(setup):
    cfg, m = setup
    s = cfg.model.crop_size
    g = generator(setup, steps=1)
    with pytest.raises(ValueError, match="faces must be"):
        g(faces(4, s).permute(0, 2, 3, 1), m.mask.keep, audio_tokens(4, cfg))
    with pytest.raises(ValueError, match="audio must be"):
        g(faces(4, s), m.mask.keep, audio_tokens(5, cfg))
    with pytest.raises(ValueError, match="masks must be"):
        g(faces(4, s), torch.ones(3, 1, s, s), audio_tokens(4, cfg))
