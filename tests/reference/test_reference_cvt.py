"""Reference CvT (docs/cvt.md): state_dict layout, forward sanity, fp32 LayerNorm, attention math."""
from __future__ import annotations

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import checkpoint_spec
from fastvit_ops.reference import cvt as ref
from fastvit_ops.reference.cvt import (CONFIGS, Attention, ConvolutionalVisionTransformer,
                                       LayerNorm)

MODELS = ["cvt_13", "cvt_21"]


@pytest.fixture(scope="module")
def models():
    # Built once per module (the big ones take seconds on a small CPU); eval mode.
    return {name: ConvolutionalVisionTransformer(spec=CONFIGS[name]).eval() for name in MODELS}


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_matches_checkpoint_listing(models, name):
    expected, n_params = checkpoint_spec(name)
    model = models[name]
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"line {i + 2}: got {g}, checkpoint lists {e}"
    assert sum(p.numel() for p in model.parameters()) == n_params


@pytest.mark.parametrize("name", MODELS)
def test_factory_builds_checkpoint_layout(name):
    from fastvit_ops.models import cvt as factories

    model = getattr(factories, name)(num_classes=10, reference=True)
    expected, _ = checkpoint_spec(name)
    want = [(k, (10,) + s[1:] if k.startswith("head.") else s) for k, s in expected]
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == want


def test_factory_uses_fused_layer_map(monkeypatch):
    import fastvit_ops.nn
    from fastvit_ops.models import cvt as factories

    class MarkedAttention(Attention):
        pass

    monkeypatch.setattr(fastvit_ops.nn, "CVT_LAYERS", {"Attention": MarkedAttention})
    fused = factories.cvt_13(num_classes=0)
    plain = factories.cvt_13(num_classes=0, reference=True)
    attns = [m for m in fused.modules() if isinstance(m, Attention)]
    assert len(attns) == 13 and all(type(m) is MarkedAttention for m in attns)
    assert not any(type(m) is MarkedAttention for m in plain.modules())
    assert list(fused.state_dict()) == list(plain.state_dict())


def test_unknown_layer_name_rejected():
    with pytest.raises(ValueError):
        ConvolutionalVisionTransformer(spec=CONFIGS["cvt_13"], layers={"Atention": Attention})


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("size", [224, 160])
def test_logits_finite(models, name, size):
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        y = models[name](x)
    assert y.shape == (2, 1000) and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert not torch.allclose(y[0], y[1])  # the two images give different logits


def test_batch_of_one_keeps_batch_dim(models):
    with torch.no_grad():
        y = models["cvt_13"](torch.randn(1, 3, 64, 96))
    assert y.shape == (1, 1000)


class _RecordLayerNorm(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.layer_norm:
            weight = args[2] if len(args) > 2 else kwargs.get("weight")
            self.dtypes.append((args[0].dtype, None if weight is None else weight.dtype))
        return func(*args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layernorm_runs_in_fp32(dtype):
    C = 37
    ln = LayerNorm(C, eps=1e-5)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    # A large common offset: normalizing in low precision would lose most of the signal.
    x = (torch.randn(3, 5, C) * 0.5 + 300.0).to(dtype)
    with _RecordLayerNorm() as rec:
        y = ln(x)
    assert rec.dtypes and all(d == (torch.float32, torch.float32) for d in rec.dtypes)
    assert y.dtype == dtype  # the authors' subclass casts the result back to the input dtype
    xf = x.double()
    mu = xf.mean(-1, keepdim=True)
    var = xf.var(-1, unbiased=False, keepdim=True)
    want = (xf - mu) / torch.sqrt(var + 1e-5) * ln.weight.double() + ln.bias.double()
    torch.testing.assert_close(y.double(), want.to(dtype).double(), atol=0.02, rtol=0.02)
    # The fp32 computation is exactly nn.LayerNorm on x.float(), cast back.
    exact = torch.nn.functional.layer_norm(x.float(), (C,), ln.weight, ln.bias, 1e-5).to(dtype)
    assert torch.equal(y, exact)
    # Also when the module itself was cast to the low-precision dtype.
    ln_low = LayerNorm(C).to(dtype)
    with torch.no_grad():
        ln_low.weight.copy_(ln.weight)
        ln_low.bias.copy_(ln.bias)
    with _RecordLayerNorm() as rec:
        y_low = ln_low(x)
    assert all(d == (torch.float32, torch.float32) for d in rec.dtypes) and y_low.dtype == dtype


def _dw_conv_bn(x, conv_w, bn, stride, pad):
    """Depthwise 3x3 conv (no bias) by explicit shifted sums, then eval-mode BN; float64."""
    B, C, H, W = x.shape
    k = conv_w.shape[-1]
    xp = torch.zeros(B, C, H + 2 * pad, W + 2 * pad, dtype=x.dtype)
    xp[:, :, pad:pad + H, pad:pad + W] = x
    Ho = (H + 2 * pad - k) // stride + 1
    Wo = (W + 2 * pad - k) // stride + 1
    y = torch.zeros(B, C, Ho, Wo, dtype=x.dtype)
    for u in range(k):
        for v in range(k):
            patch = xp[:, :, u:u + stride * (Ho - 1) + 1:stride, v:v + stride * (Wo - 1) + 1:stride]
            y += conv_w[:, 0, u, v].view(1, C, 1, 1) * patch
    rm, rv = bn.running_mean.view(1, C, 1, 1), bn.running_var.view(1, C, 1, 1)
    y = (y - rm) / torch.sqrt(rv + bn.eps) * bn.weight.view(1, C, 1, 1) + bn.bias.view(1, C, 1, 1)
    return y.flatten(2).transpose(1, 2)  # (B, Ho*Wo, C)


def _attention_by_hand(attn: Attention, x, h, w):
    """CvT attention from docs/cvt.md, written out per head with explicit softmax; float64."""
    B, T, C = x.shape
    cls, sp = x[:, :1], x[:, 1:]
    assert sp.shape[1] == h * w
    grid = sp.transpose(1, 2).reshape(B, C, h, w)
    proj = {}
    for name, stride in (("q", 1), ("k", 2), ("v", 2)):
        seq = attn.get_submodule(f"conv_proj_{name}")
        y = _dw_conv_bn(grid, seq.conv.weight, seq.bn, stride, 1)
        y = torch.cat([cls, y], dim=1)
        lin = attn.get_submodule(f"proj_{name}")
        proj[name] = y @ lin.weight.T + lin.bias
    q, k, v = proj["q"], proj["k"], proj["v"]
    assert k.shape[1] == 1 + math.ceil(h / 2) * math.ceil(w / 2)
    heads = attn.num_heads
    d = C // heads
    scale = C ** -0.5  # the full embedding width
    outs = []
    for m in range(heads):
        sl = slice(m * d, (m + 1) * d)
        s = torch.einsum("bnd,bmd->bnm", q[..., sl], k[..., sl]) * scale
        e = torch.exp(s - s.max(dim=-1, keepdim=True).values)
        p = e / e.sum(dim=-1, keepdim=True)
        outs.append(torch.einsum("bnm,bmd->bnd", p, v[..., sl]))
    o = torch.cat(outs, dim=-1)
    return o @ attn.proj.weight.T + attn.proj.bias


def _randomize(module):
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if name.endswith("weight") else 0.1))
        for mod in module.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0.0, 0.2)
                mod.running_var.uniform_(0.5, 2.0)


@pytest.mark.parametrize("source", ["standalone", "cvt_13.stage2.blocks.3"])
def test_attention_matches_hand_computation(models, source):
    if source == "standalone":
        attn = Attention(24, 24, 3, qkv_bias=True, stride_kv=2, stride_q=1, padding_kv=1,
                         padding_q=1, with_cls_token=True)
    else:
        import copy
        attn = copy.deepcopy(models["cvt_13"].stage2.blocks[3].attn)
        assert attn.num_heads == 6 and attn.dim == 384
    attn = attn.double().eval()
    _randomize(attn)
    h, w = 7, 9
    x = torch.randn(2, 1 + h * w, attn.dim, dtype=torch.float64)
    got = attn(x, h, w)
    want = _attention_by_hand(attn, x, h, w)
    assert got.shape == (2, 1 + h * w, attn.dim)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_attention_core_override_is_used():
    # A fused subclass overrides only `attention(q, k, v)`; check it receives (B, heads, N, d).
    seen = {}

    class Spy(Attention):
        def attention(self, q, k, v):
            seen["shapes"] = (q.shape, k.shape, v.shape)
            return super().attention(q, k, v)

    attn = Spy(12, 12, 2, qkv_bias=True, stride_kv=2, with_cls_token=False).eval()
    attn(torch.randn(3, 5 * 7, 12), 5, 7)
    assert seen["shapes"] == ((3, 2, 35, 6), (3, 2, 12, 6), (3, 2, 12, 6))


def test_block_is_prenorm_residual():
    blk = ref.Block(16, 16, 2, mlp_ratio=4.0, qkv_bias=True, stride_kv=2, with_cls_token=True)
    blk = blk.double().eval()
    _randomize(blk)
    h, w = 3, 5
    x = torch.randn(2, 1 + h * w, 16, dtype=torch.float64)

    def ln(t, mod):
        mu = t.mean(-1, keepdim=True)
        var = t.var(-1, unbiased=False, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-5) * mod.weight + mod.bias

    y = x + _attention_by_hand(blk.attn, ln(x, blk.norm1), h, w)
    z = ln(y, blk.norm2) @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias
    z = z * torch.sigmoid(1.702 * z)  # QuickGELU
    y = y + z @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
    torch.testing.assert_close(blk(x, h, w), y, rtol=1e-10, atol=1e-10)
