"""context_dwconv2d: FCViT's x + S'·c fused into the depthwise conv's input load, on the reference
and C++ CPU backends, against eager PyTorch (materialized z, then nn.Conv2d) in float64."""
import pytest
import torch
import torch.nn.functional as F

import fastvit_ops
from conftest import assert_error_rule, assert_pooled_rule
from fastvit_ops.ops.context_dwconv import context_dwconv2d

BACKENDS = ["reference", "cpu"]


def eager(x, sp, c, w, b, stride=1, padding=None, activation=None):
    B, C, H, W = x.shape
    G = sp.shape[1]
    z = x + (sp.unsqueeze(2) * c.reshape(B, G, C // G, 1, 1)).reshape(B, C, H, W)
    k = w.shape[-1]
    y = F.conv2d(z, w, b, stride, k // 2 if padding is None else padding, groups=C)
    return {None: y, "silu": F.silu(y) if activation == "silu" else None,
            "gelu": F.gelu(y) if activation == "gelu" else None}[activation]


def make(B, C, G, H, W, k, dtype=torch.float64):
    return (torch.randn(B, C, H, W, dtype=dtype), torch.randn(B, G, H, W, dtype=dtype),
            torch.randn(B, C, dtype=dtype), torch.randn(C, 1, k, k, dtype=dtype) * 0.3, torch.randn(C, dtype=dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k,stride,act", [(1, 1, None), (3, 2, "silu"), (5, 1, "gelu"), (11, 1, None)])
def test_gradcheck_float64(backend, k, stride, act):
    x, sp, c, w, b = (t.requires_grad_() for t in make(2, 6, 3, 7, 9, k))

    def f(*a):
        with fastvit_ops.backend(backend):
            return context_dwconv2d(*a, stride=stride, activation=act)
    assert torch.autograd.gradcheck(f, (x, sp, c, w, b))
    torch.testing.assert_close(f(x, sp, c, w, b), eager(x, sp, c, w, b, stride, None, act))
    with fastvit_ops.backend(backend):  # no bias
        torch.testing.assert_close(context_dwconv2d(x, sp, c, w, None, stride, None, act),
                                   eager(x, sp, c, w, None, stride, None, act))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_error_rule(backend, dtype):
    """Forward and every gradient by the 2x rule, judged over 6 random instances together, eager
    run on NCHW and channels_last inputs as the yardstick: dc (2×8) and db (8) are a handful of
    long sums each, where the largest error of one instance is a toss-up between two equally good
    roundings (as tests/properties.py pools its instances and evaluates eager several ways)."""
    pools = {name: [] for name in ["forward", "dx", "dsp", "dc", "dw", "db"]}
    for _ in range(6):
        ins64 = make(2, 8, 4, 13, 11, 11)
        dy = torch.randn(2, 8, 13, 11, dtype=torch.float64)
        low = [t.to(dtype) for t in ins64]
        exact_in = [t.double().requires_grad_() for t in low]
        exact = eager(*exact_in)
        egrads = torch.autograd.grad(exact, exact_in, dy)
        yard = []
        for fmt in (torch.contiguous_format, torch.channels_last):
            ri = [(t.contiguous(memory_format=fmt) if t.dim() == 4 else t.clone()).requires_grad_() for t in low]
            ref = eager(*ri)
            yard.append((ref.detach(), torch.autograd.grad(ref, ri, dy.to(dtype).contiguous(memory_format=fmt))))
        fi = [t.clone().requires_grad_() for t in low]
        with fastvit_ops.backend(backend):
            out = context_dwconv2d(*fi)
            fgrads = torch.autograd.grad(out, fi, dy.to(dtype))
        assert out.dtype == dtype and all(g.dtype == dtype for g in fgrads)
        pools["forward"].append((out.detach(), [y for y, _ in yard], exact.detach()))
        for i, (name, a, e) in enumerate(zip(["dx", "dsp", "dc", "dw", "db"], fgrads, egrads)):
            pools[name].append((a, [g[i] for _, g in yard], e))
    for name, items in pools.items():
        assert_pooled_rule(f"{name} ({dtype}, 6 instances)", items)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts(backend):
    x, sp, c, w, b = make(2, 8, 2, 6, 5, 3)
    want = eager(x, sp, c, w, b)
    with fastvit_ops.backend(backend):
        for xi in (x.to(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
            torch.testing.assert_close(context_dwconv2d(xi, sp, c, w, b), want)
        torch.testing.assert_close(context_dwconv2d(x, sp.transpose(2, 3).contiguous().transpose(2, 3), c.t().contiguous().t(), w, b), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x, sp, c, w, b = make(2, 4, 2, 5, 6, 3)
    for args in ((x.requires_grad_(), sp, c, w, b, 1, 1, 0, backend), (x, sp, c, w, None, 2, 1, 2, backend)):
        torch.library.opcheck(torch.ops.fastvit_ops.context_dwconv2d.default, args)


def test_compile_fullgraph():
    torch._dynamo.reset()
    x, sp, c, w, b = (t.requires_grad_() for t in make(1, 4, 2, 6, 6, 3))
    f = torch.compile(lambda *a: context_dwconv2d(*a, activation="gelu").sum(), fullgraph=True)
    out = f(x, sp, c, w, b)
    g = torch.autograd.grad(out, (x, sp, c, w, b))
    ref = eager(x, sp, c, w, b, 1, None, "gelu").sum()
    torch.testing.assert_close(out, ref)
    for a, r in zip(g, torch.autograd.grad(ref, (x, sp, c, w, b))):
        torch.testing.assert_close(a, r)


def test_bad_input():
    x, sp, c, w, b = make(2, 4, 2, 5, 6, 3)
    with pytest.raises(ValueError, match="sp"):
        context_dwconv2d(x, sp[:, :, :4], c, w, b)
    with pytest.raises(ValueError, match="sp"):
        context_dwconv2d(x, torch.randn(2, 3, 5, 6, dtype=torch.float64), c, w, b)  # 3 does not divide 4
    with pytest.raises(ValueError, match="c"):
        context_dwconv2d(x, sp, c[:, :3], w, b)
    with pytest.raises(ValueError, match="weight"):
        context_dwconv2d(x, sp, c, torch.randn(4, 1, 4, 4, dtype=torch.float64), b)
    with pytest.raises(TypeError, match="sp"):
        context_dwconv2d(x, sp.long(), c, w, b)
    with pytest.raises(ValueError, match="device"):
        context_dwconv2d(x, sp, c.to("meta"), w, b)
    with pytest.raises(ValueError, match="stride"):
        context_dwconv2d(x, sp, c, w, b, stride=3)


def test_token_mixer_inference_folds_the_context_into_the_convs(monkeypatch):
    """Fused TokenMixer on CPU: no-grad calls on ≥ 48×48 planes take context_dwconv2d (and match
    the reference); calls that need gradients keep the written x + GC(x)."""
    from conftest import randomize_
    from fastvit_ops.nn import fcvit as nf
    from fastvit_ops.reference import fcvit as ref

    calls = []
    real = nf.context_dwconv2d
    monkeypatch.setattr(nf, "context_dwconv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    reference = randomize_(ref.TokenMixer(16)).double()
    fused = nf.TokenMixer(16).double()
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(1, 16, 48, 49, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), reference(x))
    assert len(calls) == 2
    xr = x.clone().requires_grad_()
    y = fused(xr)
    assert len(calls) == 2
    yr = reference(x.clone().requires_grad_())
    torch.testing.assert_close(y, yr)
    with torch.no_grad():
        fused(x[:, :, :40, :40])  # small planes: the written path
    assert len(calls) == 2
