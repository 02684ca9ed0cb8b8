"""FCViT reference: released state_dict layout, forward sanity, and the global context
(docs/global_context.md) against an independent, loop-based recomputation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import checkpoint_spec

from fastvit_ops.reference.fcvit import (CONFIGS, REFERENCE_LAYERS, FCViT, FCViTBlock,
                                         GlobalContext, TokenMixer)

VARIANTS = ["fcvit_tiny", "fcvit_b12", "fcvit_b24", "fcvit_b48"]


def _randomize(module: torch.nn.Module) -> None:
    """Every parameter random (incl. biases, rescale α/β, layer scale) so no term can hide."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.ndim > 1 else 1.0))


def gc_naive(x: torch.Tensor, gc: GlobalContext, groups: int = 8, eps: float = 1e-5):
    """docs/global_context.md written out per sample and per group, from the module's weights only.

    Returns (GC(x) (B,C,H,W), S' (B,G,H,W), c (B,C)).
    """
    B, C, H, W = x.shape
    N, G = H * W, groups
    d = C // G
    r = C // 8
    w1, b1 = gc.fc1.weight, gc.fc1.bias
    w2, b2 = gc.fc2.weight, gc.fc2.bias
    alpha, beta = gc.rescale_weight, gc.rescale_bias
    out = torch.empty_like(x)
    s_all = torch.empty(B, G, H, W, dtype=x.dtype)
    c_all = torch.empty(B, C, dtype=x.dtype)
    for b in range(B):
        z = x[b].reshape(C, N)
        g = z.sum(dim=1) / N
        S = torch.empty(G, N, dtype=x.dtype)
        for k in range(G):
            S[k] = (z[k * d:(k + 1) * d] * g[k * d:(k + 1) * d, None]).sum(dim=0) / math.sqrt(d)
        flat = S.reshape(-1)
        mu = flat.sum() / flat.numel()
        sigma = torch.sqrt(((flat - mu) ** 2).sum() / (flat.numel() - 1))
        Sp = alpha[:, None] * ((S - mu) / (sigma + eps)) + beta[:, None]
        u = w1 @ g + b1
        m = torch.where(u[:r] > u[r:], u[:r], u[r:])
        c = w2 @ m + b2
        for k in range(G):
            out[b, k * d:(k + 1) * d] = Sp[k].reshape(1, H, W) * c[k * d:(k + 1) * d, None, None]
        s_all[b] = Sp.reshape(G, H, W)
        c_all[b] = c
    return out, s_all, c_all


# ---------------------------------------------------------------- state_dict layout

@pytest.mark.parametrize("name", VARIANTS)
def test_state_dict_matches_released_checkpoint(name):
    spec, n_params = checkpoint_spec(name)
    model = FCViT(**CONFIGS[name])
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == spec
    assert sum(p.numel() for p in model.parameters()) == n_params


@pytest.mark.parametrize("name", VARIANTS)
def test_model_factory_reference_layout(name):
    from fastvit_ops.models import fcvit as factories
    model = getattr(factories, name)(reference=True)
    spec, n_params = checkpoint_spec(name)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == spec
    assert sum(p.numel() for p in model.parameters()) == n_params
    # reference=True builds only reference classes
    kinds = {type(m) for m in model.modules()}
    assert GlobalContext in kinds and TokenMixer in kinds
    assert all(type(m) is REFERENCE_LAYERS[type(m).__name__]
               for m in model.modules() if type(m).__name__ in REFERENCE_LAYERS)


def test_initial_values_follow_released_code():
    model = FCViT(**CONFIGS["fcvit_tiny"])
    blk = model.network[0][0]
    assert torch.all(blk.layer_scale_1 == 1e-5) and torch.all(blk.layer_scale_2 == 1e-5)
    gc = blk.token_mixer.gc1
    assert torch.all(gc.rescale_weight == 1) and torch.all(gc.rescale_bias == 0)
    assert torch.all(gc.fc1.bias == 0) and gc.fc1.weight.std() < 0.05


# ---------------------------------------------------------------- forward

@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_model_forward_finite(name):
    model = FCViT(**CONFIGS[name]).eval()
    with torch.no_grad():
        for size in (224, 160):
            # keep the file fast on a small CPU: the big variants run 160² at batch 1
            batch = 1 if size == 160 and name in ("fcvit_b24", "fcvit_b48") else 2
            x = torch.randn(batch, 3, size, size)
            y = model(x)
            assert y.shape == (batch, 1000)
            assert torch.isfinite(y).all()
            if batch == 2:
                assert not torch.allclose(y[0], y[1])  # depends on the input


def test_model_forward_is_stem_network_gn_mean_linear():
    model = FCViT(**CONFIGS["fcvit_tiny"], num_classes=10).double().eval()
    _randomize(model.norm)
    _randomize(model.head)
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    with torch.no_grad():
        h = model.patch_embed(x)
        assert h.shape == (2, 32, 8, 12)
        for m in model.network:
            h = m(h)
        assert h.shape == (2, 320, 1, 2)
        ref = F.linear(F.group_norm(h, 1, model.norm.weight, model.norm.bias, 1e-5).mean((2, 3)),
                       model.head.weight, model.head.bias)
        torch.testing.assert_close(model(x), ref, rtol=1e-12, atol=1e-12)
    assert [type(m).__name__ for m in model.network] == [
        "Sequential", "PatchEmbed", "Sequential", "PatchEmbed", "Sequential", "PatchEmbed",
        "Sequential"]
    assert model.network[1].proj.stride == (2, 2) and model.patch_embed.proj.stride == (4, 4)


def test_token_mixer_and_block_wiring():
    C = 32
    tm = TokenMixer(C).double()
    _randomize(tm)
    x = torch.randn(2, C, 9, 7, dtype=torch.float64)

    def fc(seq, z):
        z = F.conv2d(z, seq[0].weight, seq[0].bias)
        return F.conv2d(F.gelu(z), seq[2].weight, seq[2].bias)

    z = x + gc_naive(x, tm.gc1)[0]
    z = F.gelu(fc(tm.fc1, F.conv2d(z, tm.dw1.weight, tm.dw1.bias, padding=5, groups=C)))
    z = z + gc_naive(z, tm.gc2)[0]
    z = F.gelu(fc(tm.fc2, F.conv2d(z, tm.dw2.weight, tm.dw2.bias, padding=5, groups=C)))
    assert tm.dw1.weight.shape == (C, 1, 11, 11)
    torch.testing.assert_close(tm(x), z, rtol=1e-10, atol=1e-10)

    blk = FCViTBlock(C, mlp_ratio=8).double()
    _randomize(blk)
    cm = blk.channel_mixer
    with torch.no_grad():
        t = x + blk.layer_scale_1.view(-1, 1, 1) * blk.token_mixer(
            F.group_norm(x, 1, blk.norm1.weight, blk.norm1.bias, 1e-5))
        u = F.group_norm(t, 1, blk.norm2.weight, blk.norm2.bias, 1e-5)
        u = F.conv2d(u, cm.fc1.weight, cm.fc1.bias)
        u = F.gelu(F.conv2d(u, cm.dwconv.weight, cm.dwconv.bias, padding=1, groups=8 * C))
        u = F.conv2d(u, cm.fc2.weight, cm.fc2.bias)
        ref = t + blk.layer_scale_2.view(-1, 1, 1) * u
        torch.testing.assert_close(blk(x), ref, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- global context (docs/global_context.md)

@pytest.mark.parametrize("C,H,W", [(32, 7, 9), (64, 5, 3), (16, 1, 11)])
def test_global_context_matches_naive_float64(C, H, W):
    gc = GlobalContext(C).double()
    _randomize(gc)
    x = torch.randn(3, C, H, W, dtype=torch.float64) * 2 + 0.3
    ref, s_ref, c_ref = gc_naive(x, gc)
    with torch.no_grad():
        out = gc(x)  # GC(x) only, as in the released module (the mixer adds x)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(gc.similarity(x), s_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(gc.context(x.mean((2, 3))), c_ref, rtol=1e-10, atol=1e-10)


def test_global_context_float32_close_to_float64():
    gc = GlobalContext(32)
    _randomize(gc)
    x = torch.randn(2, 32, 7, 9)
    ref = gc_naive(x.double(), gc.double())[0]
    gc.float()
    with torch.no_grad():
        out = gc(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_global_context_constant_input_sigma_zero():
    C = 32
    gc = GlobalContext(C).double()
    _randomize(gc)
    # σ = 0 exactly: constant 1 → S = d^(1/2) everywhere; (S − μ)/(0 + eps) = 0 → S' = β.
    x = torch.ones(2, C, 6, 5, dtype=torch.float64)
    with torch.no_grad():
        out = gc(x)
        assert torch.isfinite(out).all()
        c = gc.context(x.mean((2, 3)))
        expected = gc.rescale_bias.repeat_interleave(C // 8).view(1, C, 1, 1) * c.view(2, C, 1, 1)
        torch.testing.assert_close(out, expected.expand_as(out), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out, gc_naive(x, gc)[0], rtol=1e-12, atol=1e-12)
        # σ comparable to eps: eps is added to the std, not put inside a sqrt.
        x = 1 + 1e-5 * torch.randn(2, C, 6, 5, dtype=torch.float64)
        torch.testing.assert_close(gc(x), gc_naive(x, gc)[0], rtol=1e-8, atol=1e-8)
        wrong = gc_naive(x, gc, eps=0.0)[0]
        assert not torch.allclose(gc(x), wrong, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("C,groups", [(30, 8), (32, 0), (36, 8)])
def test_groups_not_dividing_channels_raises(C, groups):
    with pytest.raises(ValueError, match="groups"):
        GlobalContext(C, groups=groups)
    with pytest.raises(ValueError, match="groups"):
        TokenMixer(C, groups=groups)


# ---------------------------------------------------------------- layer injection

def test_layer_injection_keeps_state_dict():
    class MyGC(GlobalContext):
        pass

    class MyDW(REFERENCE_LAYERS["DepthwiseConv2d"]):
        pass

    ref = FCViT(**CONFIGS["fcvit_tiny"])
    model = FCViT(**CONFIGS["fcvit_tiny"], layers={"GlobalContext": MyGC, "DepthwiseConv2d": MyDW})
    assert sum(isinstance(m, MyGC) for m in model.modules()) == 2 * sum(CONFIGS["fcvit_tiny"]["depths"])
    assert sum(isinstance(m, MyDW) for m in model.modules()) == 3 * sum(CONFIGS["fcvit_tiny"]["depths"])
    assert [(k, v.shape) for k, v in model.state_dict().items()] == \
        [(k, v.shape) for k, v in ref.state_dict().items()]
    model.load_state_dict(ref.state_dict(), strict=True)
    with pytest.raises(ValueError, match="layers"):
        FCViT(**CONFIGS["fcvit_tiny"], layers={"GlobalContex": MyGC})
