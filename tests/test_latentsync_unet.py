"""LatentSync 1.6 UNet: architecture and key names, upstream norm placement, the DeepCache split."""
import copy

import pytest
import torch
import torch.nn.functional as F
from talkrt.models.latentsync.config import load_latentsync_config
from talkrt.models.latentsync.unet import LatentSyncUNet


@pytest.fixture(scope="module")
def full_meta():
    cfg = load_latentsync_config("latentsync16")
    with torch.device("meta"):
        return LatentSyncUNet(cfg.model)


@pytest.fixture(scope="module")
def tiny():
    cfg = load_latentsync_config("latentsync16-tiny")
    torch.manual_seed(0)
    return cfg, LatentSyncUNet(cfg.model).eval()


def test_full_size_has_about_1_27_billion_parameters(full_meta):
    n = sum(p.numel() for p in full_meta.parameters())
    assert 1.26e9 < n < 1.28e9, n


def test_full_size_key_names_and_shapes_follow_upstream(full_meta):
    sd = full_meta.state_dict()
    mm = "motion_modules.{}.temporal_transformer.transformer_blocks.0.attention_blocks.{}.pos_encoder.pe"
    expected = {
        "conv_in.weight": (320, 13, 3, 3),
        "time_embedding.linear_1.weight": (1280, 320),
        "down_blocks.0.resnets.0.norm1.weight": (320,),
        "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight": (320, 384),
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "down_blocks.0.downsamplers.0.conv.weight": (320, 320, 3, 3),
        "down_blocks.1.resnets.0.conv_shortcut.weight": (640, 320, 1, 1),
        "down_blocks.0." + mm.format(1, 1): (1, 24, 320),
        "down_blocks.3." + mm.format(0, 0): (1, 24, 1280),
        "down_blocks.3.motion_modules.1.temporal_transformer.proj_in.weight": (1280, 1280),
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight": (1280, 1280),
        "mid_block.resnets.1.conv2.weight": (1280, 1280, 3, 3),
        "up_blocks.0.resnets.2.conv_shortcut.weight": (1280, 2560, 1, 1),
        "up_blocks.0.upsamplers.0.conv.weight": (1280, 1280, 3, 3),
        "up_blocks.0." + mm.format(2, 1): (1, 24, 1280),
        "up_blocks.3.resnets.0.conv1.weight": (320, 960, 3, 3),
        "up_blocks.3.resnets.2.conv1.weight": (320, 640, 3, 3),
        "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v.weight": (320, 384),
        "up_blocks.3." + mm.format(2, 0): (1, 24, 320),
        "conv_norm_out.weight": (320,),
        "conv_out.weight": (4, 320, 3, 3),
    }
    for key, shape in expected.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    # the plain blocks have no attention, the mid block no temporal layer, the last up block no upsampler
    assert not any(k.startswith(("down_blocks.3.attentions", "up_blocks.0.attentions", "mid_block.motion_modules",
                                 "up_blocks.3.upsamplers", "down_blocks.3.downsamplers")) for k in sd)
    assert sum(k.endswith("pos_encoder.pe") for k in sd) == 2 * (4 * 2 + 4 * 3)     # 20 motion modules


def test_tiny_has_the_same_key_names(full_meta, tiny):
    assert set(tiny[1].state_dict()) == set(full_meta.state_dict())


# ---------------------------------------------------------------- upstream reference (plain torch)
def per_frame(fn, x5):
    b, c, f, h, w = x5.shape
    y = fn(x5.transpose(1, 2).reshape(b * f, c, h, w))
    return y.reshape(b, f, *y.shape[1:]).transpose(1, 2)


def ref_attention(attn, q_in, kv_in):
    heads = attn.heads
    q, k, v = attn.to_q(q_in), attn.to_k(kv_in), attn.to_v(kv_in)
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)
    q, k, v = split(q), split(k), split(v)
    w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    o = (w @ v).transpose(1, 2).reshape(q_in.shape[0], q_in.shape[1], -1)
    return attn.to_out[0](o)


def ref_ff(ff, x):
    a, gate = ff.net[0].proj(x).chunk(2, dim=-1)
    return ff.net[2](a * F.gelu(gate))


def ref_resnet(r, x5, temb, pooled=True):
    """Upstream ResnetBlock3D: nn.GroupNorm on the 5-D tensor (pooled over frames), convs per frame."""
    def norm(n, t):
        return F.group_norm(t, n.num_groups, n.weight, n.bias, n.eps) if pooled else per_frame(n, t)
    h = per_frame(r.conv1, F.silu(norm(r.norm1, x5)))
    h = h + r.time_emb_proj(F.silu(temb))[:, :, None, None, None]
    h = per_frame(r.conv2, F.silu(norm(r.norm2, h)))
    return (x5 if r.conv_shortcut is None else per_frame(r.conv_shortcut, x5)) + h


def ref_transformer(t, x5, ctx):
    """Upstream Transformer3DModel: everything per frame; cross-attention on the frame's audio."""
    b, c, f, h, w = x5.shape
    x = x5.transpose(1, 2).reshape(b * f, c, h, w)
    y = t.proj_in(t.norm(x)).permute(0, 2, 3, 1).reshape(b * f, h * w, c)
    blk = t.transformer_blocks[0]
    n = blk.norm1(y)
    y = ref_attention(blk.attn1, n, n) + y
    y = ref_attention(blk.attn2, blk.norm2(y), ctx) + y
    y = ref_ff(blk.ff, blk.norm3(y)) + y
    y = t.proj_out(y.reshape(b * f, h, w, c).permute(0, 3, 1, 2)) + x
    return y.reshape(b, f, c, h, w).transpose(1, 2)


def ref_motion(m, x5):
    """Upstream TemporalTransformer3DModel: per-frame GroupNorm, attention over frames per pixel."""
    tt = m.temporal_transformer
    b, c, f, h, w = x5.shape
    x = x5.transpose(1, 2).reshape(b * f, c, h, w)
    y = tt.proj_in(tt.norm(x).permute(0, 2, 3, 1).reshape(b * f, h * w, c))
    blk = tt.transformer_blocks[0]
    for attn, norm in zip(blk.attention_blocks, blk.norms):
        n = norm(y).reshape(b, f, h * w, c).transpose(1, 2).reshape(b * h * w, f, c) + attn.pos_encoder.pe[:, :f]
        o = ref_attention(attn, n, n).reshape(b, h * w, f, c).transpose(1, 2).reshape(b * f, h * w, c)
        y = o + y
    y = ref_ff(blk.ff, blk.ff_norm(y)) + y
    y = tt.proj_out(y).reshape(b * f, h, w, c).permute(0, 3, 1, 2) + x
    return y.reshape(b, f, c, h, w).transpose(1, 2)


def test_norm_placement_matches_upstream_layer(tiny):
    """resnet -> spatial transformer -> motion module of a cross-attention down block, against the
    upstream computation on [b, c, f, h, w]; the same layer with per-frame resnet norms (diffusers'
    UNetMotionModel placement) is far off, so the comparison would catch a swap."""
    cfg, _ = tiny
    torch.manual_seed(1)
    block = LatentSyncUNet(cfg.model).down_blocks[1].eval()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    b, f, cin, hw = 2, 5, 32, 6
    x5 = torch.randn(b, cin, f, hw, hw) + torch.arange(f).float()[None, None, :, None, None] * 0.7
    temb = torch.randn(b, block.resnets[0].time_emb_proj.in_features)
    ctx = torch.randn(b * f, 30, cfg.model.cross_attention_dim)
    with torch.no_grad():
        ours = block.run_layer(0, x5.transpose(1, 2).reshape(b * f, cin, hw, hw), temb, ctx, f)
        ours = ours.reshape(b, f, *ours.shape[1:]).transpose(1, 2)
        ref = ref_motion(block.motion_modules[0], ref_transformer(block.attentions[0], ref_resnet(
            block.resnets[0], x5, temb), ctx))
        swapped = ref_motion(block.motion_modules[0], ref_transformer(block.attentions[0], ref_resnet(
            block.resnets[0], x5, temb, pooled=False), ctx))
    err = (ours - ref).abs().max()
    assert err < 1e-5 * ref.abs().max(), err                       # float32 rounding
    assert (swapped - ref).abs().max() > 1000 * err


def test_unet_call_shapes_and_context_layouts(tiny):
    cfg, unet = tiny
    h = cfg.model.latent_size
    x = torch.randn(2, 13, 4, h, h)
    ctx = torch.randn(2 * 4, 50, cfg.model.cross_attention_dim)
    with torch.no_grad():
        out = unet(x, torch.tensor(951), ctx)
        again = unet(x, 951, ctx.reshape(2, 4, 50, -1))
    assert out.shape == (2, 4, 4, h, h)
    assert torch.allclose(out, again, atol=1e-5)
    with pytest.raises(ValueError, match="at most 24"):
        unet(torch.randn(1, 13, 25, h, h), 1, torch.randn(25, 50, cfg.model.cross_attention_dim))


def test_shallow_step_on_fresh_deep_features_equals_full_step(tiny):
    cfg, unet = tiny
    h = cfg.model.latent_size
    x, ctx = torch.randn(2, 13, 3, h, h), torch.randn(6, 50, cfg.model.cross_attention_dim)
    with torch.no_grad():
        full, deep = unet.forward_full(x, 501, ctx)
        shallow = unet.forward_shallow(x, 501, ctx, deep)
        stale = unet.forward_shallow(x, 501, ctx, deep * 0)
    assert torch.allclose(full, shallow, atol=1e-5)
    assert not torch.allclose(full, stale, atol=1e-2)      # the cached features matter


def _wrap_like_deepcache(unet, state, interval):
    """DeepCache's DeepCacheSDHelper (cache_branch_id 0) on talkrt's module tree: each wrapped
    block returns its cached output on skipped steps; skipped are all down blocks and their parts,
    the mid block, every up block but the last, and the last up block's layers but its final one."""
    cache = {}

    def wrap(module, key, skippable):
        original = module.forward

        def forward(*args, **kwargs):
            if skippable and state["step"] % interval != 0:
                return cache[key]
            cache[key] = original(*args, **kwargs)
            return cache[key]
        module.forward = forward

    n_up = len(unet.up_blocks)
    for i, block in enumerate(unet.down_blocks):
        for name in ("resnets", "attentions", "downsamplers"):
            for j, m in enumerate(getattr(block, name) or []):
                wrap(m, ("down", name, i, j), True)
        wrap(block, ("down", i), True)
    wrap(unet.mid_block, ("mid",), True)
    for i, block in enumerate(unet.up_blocks):
        deep_i, layers = n_up - 1 - i, len(block.resnets)
        for name in ("resnets", "attentions"):
            for j, m in enumerate(getattr(block, name) or []):
                wrap(m, ("up", name, i, j), deep_i > 0 or layers - 1 - j > 0)
        for m in block.upsamplers or []:
            wrap(m, ("up", "upsampler", i), deep_i > 0)
        wrap(block, ("up", i), deep_i > 0)


def test_deepcache_split_matches_upstream_helper_rule(tiny):
    cfg, unet = tiny
    helper_unet = copy.deepcopy(unet)
    state = {"step": 0}
    _wrap_like_deepcache(helper_unet, state, interval=3)
    h = cfg.model.latent_size
    ctx = torch.randn(4, 50, cfg.model.cross_attention_dim)
    deep = None
    torch.manual_seed(3)
    with torch.no_grad():
        for j, t in enumerate([951, 901, 851, 801, 751, 701, 651]):
            x = torch.randn(1, 13, 4, h, h)
            state["step"] = j
            expected = helper_unet(x, t, ctx)
            if j % 3 == 0:
                ours, deep = unet.forward_full(x, t, ctx)
            else:
                ours = unet.forward_shallow(x, t, ctx, deep)
            assert torch.allclose(ours, expected, atol=1e-5), (j, (ours - expected).abs().max())
