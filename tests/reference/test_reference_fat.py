"""Reference FAT / FASA (fastvit_ops.reference.fat) against docs/fat.md and the authors' keys."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import checkpoint_spec, randomize_
from fastvit_ops.models import fat as fat_models
from fastvit_ops.reference.common import DepthwiseConv2d, GroupNorm1, resolve_layers
from fastvit_ops.reference.fat import (CONFIGS, FASA, FAT, REFERENCE_LAYERS, ConvFFN, DropPath,
                                       FATBlock)

VARIANTS = ["fat_b0", "fat_b1", "fat_b2", "fat_b3"]
FACTORIES = {name: getattr(fat_models, name) for name in VARIANTS}

# docs/fat.md table, written out independently of CONFIGS.
SPEC_TABLE = {
    "fat_b0": dict(dims=(32, 80, 160, 256), depths=(2, 2, 6, 2), heads=(2, 5, 10, 16)),
    "fat_b1": dict(dims=(48, 96, 192, 384), depths=(2, 2, 6, 2), heads=(3, 6, 12, 24)),
    "fat_b2": dict(dims=(64, 128, 256, 512), depths=(2, 2, 6, 2), heads=(2, 4, 8, 16)),
    "fat_b3": dict(dims=(64, 128, 256, 512), depths=(4, 4, 16, 4), heads=(2, 4, 8, 16)),
}
KERNELS = (3, 5, 7, 9)
WINDOWS = (8, 4, 2, 1)

# (dim, kernel, heads, window) of the four FAT-B0 stages.
B0_STAGES = [(32, 3, 2, 8), (80, 5, 5, 4), (160, 7, 10, 2), (256, 9, 16, 1)]


def _key_shapes(model):
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


# ----------------------------------------------------------------------------- state_dict


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("reference", [True, False], ids=["reference", "default"])
def test_state_dict_matches_checkpoint_listing(name, reference):
    entries, n_params = checkpoint_spec(name)
    model = FACTORIES[name](reference=reference)
    assert _key_shapes(model) == entries
    assert sum(p.numel() for p in model.parameters()) == n_params


@pytest.mark.parametrize("name", VARIANTS)
def test_configs_match_spec_table(name):
    spec = SPEC_TABLE[name]
    model = FACTORIES[name](reference=True)
    assert len(model.layers) == 4
    for i, layer in enumerate(model.layers):
        assert len(layer.blocks) == spec["depths"][i]
        for j, blk in enumerate(layer.blocks):
            attn = blk.attn
            assert attn.num_heads == spec["heads"][i]
            assert attn.dim_head == spec["dims"][i] // spec["heads"][i]
            assert attn.window_size == WINDOWS[i]
            assert math.isclose(attn.scalor, attn.dim_head ** -0.5)
            assert attn.local_mixer.kernel_size == (KERNELS[i],) * 2
            assert blk.cpe.kernel_size == (KERNELS[i],) * 2
            assert blk.ffn.dwconv.kernel_size == (5, 5)
            assert blk.ffn.fc1.out_channels == 4 * spec["dims"][i]
            strided = i < 3 and j == len(layer.blocks) - 1
            assert blk.ffn.stride == (2 if strided else 1)
            assert isinstance(blk.downsample, nn.Sequential) == strided


# ----------------------------------------------------------------------------- forward


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_forward_finite_logits(name):
    model = FACTORIES[name](reference=True).eval()
    with torch.no_grad():
        for size in (224, 160):
            y = model(torch.randn(2, 3, size, size))
            assert y.shape == (2, 1000)
            assert y.dtype == torch.float32
            assert torch.isfinite(y).all()


def test_forward_odd_input_and_num_classes():
    model = fat_models.fat_b0(num_classes=10, reference=True).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 3, 97, 83))
        feats = model.forward_features(torch.randn(1, 3, 97, 83))
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    assert feats.shape == (1, 256)
    headless = fat_models.fat_b0(num_classes=0, reference=True)
    assert not any(k.startswith("head.") for k in headless.state_dict())


def test_backward_reaches_every_parameter():
    model = fat_models.fat_b0(num_classes=10, reference=True).train()
    model(torch.randn(2, 3, 64, 64)).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------- FASA


def _fasa_by_hand(m: FASA, x: torch.Tensor) -> torch.Tensor:
    """FASA from docs/fat.md, written with functional ops and the module's weights only."""
    B, C, H, W = x.shape
    h = m.num_heads
    d = C // h

    def conv1x1(mod, t):
        return torch.einsum("oc,bchw->bohw", mod.weight[:, :, 0, 0], t) + mod.bias.view(1, -1, 1, 1)

    def dw(mod, t, stride):
        k = mod.weight.shape[-1]
        return F.conv2d(t, mod.weight, mod.bias, stride=stride, padding=k // 2, groups=C)

    def bn_eval(mod, t):
        inv = (mod.running_var + mod.eps).rsqrt()
        return ((t - mod.running_mean.view(1, -1, 1, 1)) * inv.view(1, -1, 1, 1)
                * mod.weight.view(1, -1, 1, 1) + mod.bias.view(1, -1, 1, 1))

    q_hat = conv1x1(m.q, x)
    p = x  # the pool reads X
    n_units = int(round(math.log2(m.window_size)))
    for j in range(n_units):
        p = bn_eval(getattr(m.pool, f"bn{j}"), dw(getattr(m.pool, f"conv{j}"), p, 2))
        if j != n_units - 1:
            p = conv1x1(getattr(m.pool, f"linear{j}"), p)
    kv = conv1x1(m.kv, p)
    K, V = kv[:, :C], kv[:, C:]
    G = torch.empty_like(q_hat)
    for head in range(h):
        sl = slice(head * d, (head + 1) * d)
        qh = q_hat[:, sl].flatten(2)                         # (B, d, N)
        kh, vh = K[:, sl].flatten(2), V[:, sl].flatten(2)    # (B, d, M)
        logits = torch.einsum("bdn,bdm->bnm", qh, kh) / math.sqrt(d)
        prob = logits.softmax(-1)
        G[:, sl] = torch.einsum("bnm,bdm->bdn", prob, vh).reshape(B, d, H, W)
    L0 = dw(m.local_mixer, q_hat, 1)
    mod = L0 * torch.sigmoid(L0) * torch.sigmoid(G) * G
    return conv1x1(m.mixer, mod)


@pytest.mark.parametrize("dim,kernel,heads,window", B0_STAGES)
def test_fasa_odd_size_matches_hand_computation(dim, kernel, heads, window):
    m = randomize_(FASA(dim, kernel, heads, window)).double().eval()
    x = torch.randn(2, dim, 27, 25, dtype=torch.float64)
    with torch.no_grad():
        y = m(x)
        ref = _fasa_by_hand(m, x)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    n_units = int(round(math.log2(window)))
    expected_keys = {f"{kind}{j}" for j in range(n_units) for kind in ("conv", "bn")}
    expected_keys |= {f"linear{j}" for j in range(n_units - 1)}
    assert {name for name, _ in m.pool.named_children()} == expected_keys


@pytest.mark.parametrize("dim,kernel,heads,window", B0_STAGES)
def test_fasa_float32_train_mode_odd_size(dim, kernel, heads, window):
    m = FASA(dim, kernel, heads, window).train()
    x = torch.randn(2, dim, 27, 25, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_fasa_routes_through_attention_and_modulate():
    calls = {}

    class Spy(FASA):
        def attention(self, q, k, v):
            calls["qkv"] = (q.detach().clone(), k.shape, v.shape)
            return super().attention(q, k, v)

        def modulate(self, local, global_):
            calls["modulate"] = (local.shape, global_.shape)
            return torch.zeros_like(local)  # the override must be what forward uses

    dim, kernel, heads, window = B0_STAGES[0]
    m = Spy(dim, kernel, heads, window).eval()
    x = torch.randn(2, dim, 27, 25)
    with torch.no_grad():
        y = m(x)
    d = dim // heads
    q, k_shape, v_shape = calls["qkv"]
    assert q.shape == (2, heads, 27 * 25, d)
    assert k_shape == v_shape == (2, heads, 4 * 4, d)   # 27×25 → 14×13 → 7×7 → 4×4
    # q reaches attention() already scaled by d^-1/2, heads on contiguous channel blocks.
    q_expect = m.q(x).reshape(2, heads, d, 27 * 25).transpose(-1, -2) * d ** -0.5
    torch.testing.assert_close(q, q_expect)
    assert calls["modulate"] == ((2, dim, 27, 25), (2, dim, 27, 25))
    torch.testing.assert_close(y, m.mixer.bias.view(1, -1, 1, 1).expand_as(y))


def test_fasa_rejects_bad_window():
    with pytest.raises(ValueError):
        FASA(32, 3, 2, 3)


# ----------------------------------------------------------------------------- blocks


def test_convffn_strides():
    x = torch.randn(2, 16, 9, 7)
    f1 = randomize_(ConvFFN(16, 64, 5, 1, 16)).eval()
    f2 = randomize_(ConvFFN(16, 64, 5, 2, 24)).eval()
    with torch.no_grad():
        y1, y2 = f1(x), f2(x)
        u1 = F.gelu(f1.fc1(x))
        ref1 = f1.fc2(f1.bn(u1 + F.conv2d(u1, f1.dwconv.weight, f1.dwconv.bias, padding=2,
                                          groups=64)))
        u2 = F.gelu(f2.fc1(x))
        ref2 = f2.fc2(f2.bn(F.conv2d(u2, f2.dwconv.weight, f2.dwconv.bias, stride=2, padding=2,
                                     groups=64)))
    assert y2.shape == (2, 24, 5, 4)
    torch.testing.assert_close(y1, ref1)
    torch.testing.assert_close(y2, ref2)


def test_strided_block_shortcut():
    blk = randomize_(FATBlock(16, 24, 3, 2, 2, 5, 4, 2)).eval()
    x = torch.randn(2, 16, 9, 7)
    with torch.no_grad():
        y = blk(x)
        x1 = x + blk.cpe(x)
        x2 = x1 + blk.attn(blk.norm1(x1))
        ref = blk.downsample[2](blk.downsample[1](blk.downsample[0](x2))) + blk.ffn(blk.norm2(x2))
    assert y.shape == (2, 24, 5, 4)
    torch.testing.assert_close(y, ref)


def test_drop_path():
    dp = DropPath(0.5)
    x = torch.randn(64, 3, 2, 2)
    assert torch.equal(dp.eval()(x), x)
    y = dp.train()(x)
    kept = (y == 2 * x).flatten(1).all(1)
    dropped = (y == 0).flatten(1).all(1)
    assert bool((kept | dropped).all()) and kept.any() and dropped.any()
    model = FAT(**CONFIGS["fat_b0"], drop_path_rate=0.1)
    rates = [blk.drop_path.drop_prob for layer in model.layers for blk in layer.blocks]
    assert rates[0] == 0.0 and math.isclose(rates[-1], 0.1, rel_tol=1e-6)
    assert all(a < b for a, b in zip(rates, rates[1:]))


# ----------------------------------------------------------------------------- injection / loading


def test_load_reference_state_dict_into_default_model():
    ref = randomize_(fat_models.fat_b0(reference=True))
    model = fat_models.fat_b0()
    result = model.load_state_dict(ref.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    got = model.state_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(got[k], v), k


def test_layer_injection_reaches_every_layer():
    class MyFASA(FASA):
        pass

    class MyFFN(ConvFFN):
        pass

    class MyDW(DepthwiseConv2d):
        pass

    class MyGN(GroupNorm1):
        pass

    layers = {"FASA": MyFASA, "ConvFFN": MyFFN, "DepthwiseConv2d": MyDW, "GroupNorm1": MyGN}
    model = FAT(**CONFIGS["fat_b0"], layers=layers)
    assert _key_shapes(model) == checkpoint_spec("fat_b0")[0]
    mods = list(model.modules())
    assert sum(isinstance(m, MyFASA) for m in mods) == 12
    assert sum(isinstance(m, MyFFN) for m in mods) == 12
    for m in mods:
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            assert isinstance(m, MyDW), m
        if isinstance(m, nn.GroupNorm):
            assert isinstance(m, MyGN), m
        assert type(m) not in (FASA, ConvFFN, DepthwiseConv2d, GroupNorm1), m
    # cpe, local mixer, pool units (3, 2, 1, 0 per block: 2·3 + 2·2 + 6·1), ffn dwconv,
    # and the 3 downsample DWs
    assert sum(isinstance(m, MyDW) for m in mods) == 12 + 12 + (6 + 4 + 6) + 12 + 3


def test_resolve_layers_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown layer name"):
        resolve_layers(REFERENCE_LAYERS, {"Fasa": FASA})
    with pytest.raises(ValueError):
        FAT(**CONFIGS["fat_b0"], layers={"NotALayer": nn.Identity})
    with pytest.raises(ValueError):
        fat_models.fat_b0(reference=True, layers={"Attention": FASA})
    with pytest.raises(ValueError):
        FASA(32, 3, 2, 8, layers={"BatchNorm": nn.BatchNorm2d})
