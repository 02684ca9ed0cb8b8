"""fat_b0 and cvt_13 built from the fused attention layers match the reference models (docs/fat.md, docs/cvt.md)."""
import pytest
import torch

import fastvit_ops
from conftest import randomize_
from fastvit_ops.nn.cvt import ConvProjectionAttention
from fastvit_ops.nn.fat import FASA
from fastvit_ops.reference import cvt as ref_cvt
from fastvit_ops.reference import fat as ref_fat

CPU_BACKENDS = [b for b in ("reference", "cpu") if fastvit_ops.backend_available(b, torch.device("cpu"))[0]]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def pair(build_ref, build_fused, scale):
    ref = randomize_(build_ref(), scale)
    fused = build_fused()
    assert list(fused.state_dict()) == list(ref.state_dict())
    fused.load_state_dict(ref.state_dict(), strict=True)
    return ref, fused


def compare(ref, fused, x, train: bool):
    ref.train(train), fused.train(train)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yf = ref(xr), fused(xf)
    assert rel(yf, yr) <= 1e-4, f"logits rel error {rel(yf, yr):.3g}"
    dy = torch.randn_like(yr)
    pr = [p for p in ref.parameters()]
    pf = [p for p in fused.parameters()]
    gr = torch.autograd.grad(yr, pr + [xr], dy, allow_unused=True)
    gf = torch.autograd.grad(yf, pf + [xf], dy, allow_unused=True)
    names = [n for n, _ in ref.named_parameters()] + ["input"]
    # Analytically zero gradients hold only fp32 rounding noise on both sides (a conv bias right
    # before a train-mode BN; CvT's proj_k.bias, which shifts every logit of a query equally):
    # those (reference norm < 1% of the median) must stay at noise level in the fused model too.
    norms = sorted(b.double().norm().item() for b in gr if b is not None)
    noise = 1e-2 * norms[len(norms) // 2]
    worst = []
    for name, a, b in zip(names, gf, gr):
        if b is None:
            assert a is None or not a.abs().any(), name
            continue
        if b.double().norm().item() < noise:
            assert a.double().norm().item() < noise, f"{name}: gradient should be ~0"
            continue
        worst.append((rel(a, b), name))
    worst.sort(reverse=True)
    bad = [(e, n) for e, n in worst if e > 1e-4]
    if bad:
        # Badly conditioned gradients (sums that mostly cancel, e.g. biases feeding a train-mode
        # BN): held to the DESIGN rule instead, error ≤ 2× the fp32 reference's vs float64.
        exact = {n: g for n, g in zip(names, _float64_grads(ref, x, dy, train))}
        gf_by, gr_by = dict(zip(names, gf)), dict(zip(names, gr))
        still = []
        for e, n in bad:
            err_f = (gf_by[n].double() - exact[n]).norm().item()
            err_r = (gr_by[n].double() - exact[n]).norm().item()
            if err_f > 2 * err_r:
                still.append((e, n, err_f, err_r))
        assert not still, f"gradient errors above 1e-4 and above 2x the reference's: {still[:5]}"


def _float64_grads(ref, x, dy, train):
    import copy
    r64 = copy.deepcopy(ref).double().train(train)
    x64 = x.double().requires_grad_()
    y = r64(x64)
    return torch.autograd.grad(y, list(r64.parameters()) + [x64], dy.double(), allow_unused=True)


# ---- FAT-B0 ------------------------------------------------------------------------------------------
def fat_b0(layers=None):
    return ref_fat.FAT(**ref_fat.CONFIGS["fat_b0"], num_classes=1000, layers=layers)


# Whole models run on the default backend only (the float64 layer tests cover every backend):
# eval mode (BN folded into the pool) at both sizes, training mode (batch statistics) at 160².
@pytest.mark.parametrize("size,train", [(224, False), (160, False), (160, True)])
def test_fat_b0_matches_reference(size, train):
    torch.manual_seed(0)
    ref, fused = pair(fat_b0, lambda: fat_b0({"FASA": FASA}), 0.05)
    compare(ref, fused, torch.randn(2, 3, size, size), train)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cfg", [(32, 3, 2, 8), (80, 5, 5, 4), (40, 7, 2, 2), (64, 9, 4, 1)])
def test_fasa_odd_size_float64(backend, cfg):
    """FASA at 27×25 (odd, pooled to 4×4 / 7×7 / 14×13): forward and all gradients, both modes."""
    torch.manual_seed(1)
    dim, k, heads, ws = cfg
    ref, fused = pair(lambda: ref_fat.FASA(dim, k, heads, ws), lambda: FASA(dim, k, heads, ws), 0.3)
    ref.double(), fused.double()
    x = torch.randn(2, dim, 27, 25, dtype=torch.float64)
    for train in (False, True):
        ref.train(train), fused.train(train)
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        with fastvit_ops.backend(backend):
            yf = fused(xf)
            dy = torch.randn_like(yf)
            gf = torch.autograd.grad(yf, [xf] + list(fused.parameters()), dy)
        yr = ref(xr)
        gr = torch.autograd.grad(yr, [xr] + list(ref.parameters()), dy)
        torch.testing.assert_close(yf, yr, rtol=1e-10, atol=1e-10)
        for a, b in zip(gf, gr):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_fasa_state_dict_and_constructor_identical():
    r, f = ref_fat.FASA(80, 5, 5, 4), FASA(80, 5, 5, 4)
    assert [(k, v.shape) for k, v in r.state_dict().items()] == [(k, v.shape) for k, v in f.state_dict().items()]
    assert isinstance(f, ref_fat.FASA)


# ---- CvT-13 ------------------------------------------------------------------------------------------
def cvt_13(layers=None):
    return ref_cvt.ConvolutionalVisionTransformer(num_classes=1000, spec=ref_cvt.CONFIGS["cvt_13"], layers=layers)


@pytest.mark.parametrize("size,train", [(224, False), (160, False), (160, True)])
def test_cvt_13_matches_reference(size, train):
    torch.manual_seed(0)
    ref, fused = pair(cvt_13, lambda: cvt_13({"Attention": ConvProjectionAttention}), 0.05)
    compare(ref, fused, torch.randn(2, 3, size, size), train)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cls", [False, True])
def test_conv_projection_attention_float64(backend, cls):
    torch.manual_seed(2)
    kw = dict(qkv_bias=True, stride_kv=2, with_cls_token=cls)
    ref, fused = pair(lambda: ref_cvt.Attention(24, 24, 3, **kw), lambda: ConvProjectionAttention(24, 24, 3, **kw), 0.3)
    ref.double(), fused.double()
    h, w = 9, 7
    x = torch.randn(2, int(cls) + h * w, 24, dtype=torch.float64)
    for train in (False, True):
        ref.train(train), fused.train(train)
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        with fastvit_ops.backend(backend):
            yf = fused(xf, h, w)
            dy = torch.randn_like(yf)
            gf = torch.autograd.grad(yf, [xf] + list(fused.parameters()), dy)
        yr = ref(xr, h, w)
        gr = torch.autograd.grad(yr, [xr] + list(ref.parameters()), dy)
        torch.testing.assert_close(yf, yr, rtol=1e-10, atol=1e-10)
        for a, b in zip(gf, gr):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_conv_projection_attention_batch1_gradcheck():
    """Batch 1 with a cls token, eval: the fused layer's gradients pass gradcheck (finite differences).

    The reference can't be the oracle here: torch 2.14's CPU eval-mode BatchNorm backward is wrong at
    batch 1 when its input or grad is a channels_last-strided view, which is what the cls split gives.
    """
    torch.manual_seed(3)
    fused = randomize_(ConvProjectionAttention(24, 24, 3, qkv_bias=True, stride_kv=2, with_cls_token=True), 0.3)
    fused.double().eval()
    x = torch.randn(1, 1 + 4 * 4, 24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fused(t, 4, 4), (x,), fast_mode=True)
    p = fused.conv_proj_q.bn.weight
    assert torch.autograd.gradcheck(lambda w: torch.func.functional_call(fused, {"conv_proj_q.bn.weight": w},
                                                                         (x.detach(), 4, 4)), (p.detach().clone().requires_grad_(),),
                                    fast_mode=True)


# ---- Visual Transformer blocks -------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("scale", [False, True])
def test_vt_modules_float64(backend, scale):
    """Tokenizers (softmax over HW), token transformer and projector (softmax over L = 16) match
    the reference, forward and every gradient, at an odd map size."""
    from fastvit_ops.nn import vt as fused_vt
    from fastvit_ops.reference import vt as ref_vt

    torch.manual_seed(3)
    C, L, H, W = 24, 16, 9, 7
    x = torch.randn(2, C, H, W, dtype=torch.float64)
    t_in = torch.randn(2, L, C, dtype=torch.float64)
    builds = [
        ("FilterTokenizer", lambda m: (lambda xx, tt: m(xx)), dict(in_channels=C, num_tokens=L, scale=scale)),
        ("RecurrentTokenizer", lambda m: m, dict(in_channels=C, scale=scale)),
        ("TokenTransformer", lambda m: (lambda xx, tt: m(tt)), dict(channels=C, scale=scale)),
        ("Projector", lambda m: m, dict(in_channels=C, scale=scale)),
    ]
    for name, call, kw in builds:
        ref, fused = pair(lambda: getattr(ref_vt, name)(**kw), lambda: getattr(fused_vt, name)(**kw), 0.3)
        ref.double(), fused.double()
        assert isinstance(fused, getattr(ref_vt, name))
        xr, tr, xf, tf = (t.clone().requires_grad_() for t in (x, t_in, x, t_in))
        with fastvit_ops.backend(backend):
            yf = call(fused)(xf, tf)
            dy = torch.randn_like(yf)
            gf = torch.autograd.grad(yf, [xf, tf] + list(fused.parameters()), dy, allow_unused=True)
        yr = call(ref)(xr, tr)
        gr = torch.autograd.grad(yr, [xr, tr] + list(ref.parameters()), dy, allow_unused=True)
        torch.testing.assert_close(yf, yr, rtol=1e-10, atol=1e-10, msg=name)
        for a, b in zip(gf, gr):
            if b is None:
                assert a is None, name
            else:
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)


def test_vt_projector_uses_the_kernel(monkeypatch):
    """The fused Projector really routes through the attention op (a test that could not fail otherwise)."""
    from fastvit_ops.nn import vt as fused_vt
    from fastvit_ops.ops import attention as att

    calls = []
    orig = fused_vt.attention_core

    def spy(q, k, v, scale, gate, layout):
        calls.append(layout)
        return orig(q, k, v, scale, gate, layout)
    monkeypatch.setattr(fused_vt, "attention_core", spy)
    m = fused_vt.Projector(8)
    m(torch.randn(1, 8, 3, 5), torch.randn(1, 16, 8))
    assert calls == [att.CHANNELS_FIRST]


def test_fused_layers_compile_fullgraph():
    """The fused FASA and CvT attention trace without graph breaks and match eager (fwd + grads)."""
    torch._dynamo.reset()
    torch.manual_seed(4)
    for make, args in ((lambda: FASA(40, 5, 2, 4), lambda: (torch.randn(2, 40, 13, 11),)),
                       (lambda: ConvProjectionAttention(24, 24, 3, qkv_bias=True, stride_kv=2),
                        lambda: (torch.randn(2, 1 + 9 * 7, 24), 9, 7))):
        m = randomize_(make(), 0.3)
        for train in (False, True):
            m.train(train)
            a = args()
            x = a[0].requires_grad_()
            compiled = torch.compile(m, fullgraph=True)
            y = compiled(x, *a[1:])
            y_ref = m(x, *a[1:])
            torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
            g = torch.autograd.grad(y.sum(), x)[0]
            g_ref = torch.autograd.grad(y_ref.sum(), x)[0]
            torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
