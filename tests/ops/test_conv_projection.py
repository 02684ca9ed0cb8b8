"""conv_projection_qkv (CvT's q/k/v depthwise projections in one pass, docs/cvt.md) on the reference and
C++ CPU backends, against the released code's convs in float64."""
import pytest
import torch
import torch.nn.functional as F

import fastvit_ops
from conftest import assert_error_rule
from fastvit_ops.ops.conv_projection import conv_projection_qkv

BACKENDS = ["reference", "cpu"]


def eager(x, hw, cls, ws, bs, stride_q=1, stride_kv=2):
    """The released ``forward_conv``: split cls, tokens → image, three convs, image → tokens, cat."""
    h, w = hw
    if cls:
        cls_token, x = torch.split(x, [1, h * w], dim=1)
    B, _, C = x.shape
    img = x.transpose(1, 2).reshape(B, C, h, w)
    outs = []
    for wt, bt, s in zip(ws, bs, (stride_q, stride_kv, stride_kv)):
        t = F.conv2d(img, wt, bt, s, wt.shape[-1] // 2, groups=C).flatten(2).transpose(1, 2)
        outs.append(torch.cat((cls_token, t), dim=1) if cls else t)
    return outs


def make(B, h, w, C, k, cls, dtype=torch.float64):
    x = torch.randn(B, int(cls) + h * w, C, dtype=dtype)
    ws = [torch.randn(C, 1, k, k, dtype=dtype) * 0.3 for _ in range(3)]
    bs = [torch.randn(C, dtype=dtype) for _ in range(3)]
    return x, ws, bs


def call(backend, x, hw, cls, ws, bs, sq=1, skv=2):
    with fastvit_ops.backend(backend):
        return conv_projection_qkv(x, hw, cls, ws[0], bs[0], ws[1], bs[1], ws[2], bs[2], sq, skv)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,h,w,C,k,cls,sq,skv", [
    (2, 7, 9, 6, 3, True, 1, 2),    # CvT: cls, q stride 1, k/v stride 2, odd sizes
    (1, 5, 4, 4, 3, False, 1, 2),
    (1, 6, 5, 3, 5, True, 2, 1),
    (2, 3, 3, 5, 1, False, 1, 1),
    (1, 1, 1, 3, 3, True, 1, 2),    # a single pixel
])
def test_gradcheck_float64(backend, B, h, w, C, k, cls, sq, skv):
    x, ws, bs = make(B, h, w, C, k, cls)
    ins = [t.requires_grad_() for t in [x] + ws + bs]

    def f(x, wq, wk, wv, bq, bk, bv):
        return tuple(call(backend, x, (h, w), cls, [wq, wk, wv], [bq, bk, bv], sq, skv))
    assert torch.autograd.gradcheck(f, ins)
    want = eager(x, (h, w), cls, ws, bs, sq, skv)
    for a, b in zip(f(*ins), want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_error_rule(backend, dtype):
    h, w, C = 9, 7, 16
    x, ws, bs = make(2, h, w, C, 3, True)
    x, ws, bs = x.to(dtype), [t.to(dtype) for t in ws], [t.to(dtype) for t in bs]
    gs = [torch.randn(2, 1 + n, C, dtype=torch.float64).to(dtype) for n in (h * w, 5 * 4, 5 * 4)]

    def run(fn, ins):
        outs = fn(*ins)
        return outs, torch.autograd.grad(outs, ins, [g.to(ins[0].dtype) for g in gs])

    def fused(x, *p):
        return call(backend, x, (h, w), True, p[:3], p[3:])

    def ref(x, *p):
        return eager(x, (h, w), True, p[:3], p[3:])
    leaves = lambda d: [t.detach().to(d).requires_grad_() for t in [x] + ws + bs]  # noqa: E731
    exact, egrads = run(ref, leaves(torch.float64))
    got, fgrads = run(fused, leaves(dtype))
    want, rgrads = run(ref, leaves(dtype))
    for name, a, b, e in zip(["q", "k", "v"], got, want, exact):
        assert a.dtype == dtype
        assert_error_rule(name, a, b, e)
    for name, a, b, e in zip(["dx", "dwq", "dwk", "dwv", "dbq", "dbk", "dbv"], fgrads, rgrads, egrads):
        assert_error_rule(name, a, b, e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x, ws, bs = make(2, 5, 6, 4, 3, True)
    args = (x.requires_grad_(), ws[0], bs[0], ws[1], bs[1], ws[2], bs[2], 5, 6, 1, 1, 2, backend)
    torch.library.opcheck(torch.ops.fastvit_ops.conv_projection_qkv.default, args)


def test_strided_input_and_compile_fullgraph():
    h, w, C = 5, 7, 8
    x, ws, bs = make(2, h, w, C, 3, True)
    xs = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    assert not xs.is_contiguous()
    for a, b in zip(call("cpu", xs, (h, w), True, ws, bs), eager(x, (h, w), True, ws, bs)):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()
    f = torch.compile(lambda t: sum(o.sum() for o in conv_projection_qkv(t, (h, w), True, ws[0], bs[0], ws[1],
                                                                         bs[1], ws[2], bs[2])), fullgraph=True)
    xr = x.clone().requires_grad_()
    out = f(xr)
    (gx,) = torch.autograd.grad(out, xr)
    xe = x.clone().requires_grad_()
    ref = sum(o.sum() for o in eager(xe, (h, w), True, ws, bs))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, torch.autograd.grad(ref, xe)[0])


def test_bad_input():
    x, ws, bs = make(1, 4, 4, 4, 3, True)
    ok = dict(weight_q=ws[0], bias_q=bs[0], weight_k=ws[1], bias_k=bs[1], weight_v=ws[2], bias_v=bs[2])

    def run(x=x, hw=(4, 4), cls=True, **kw):
        args = dict(ok, **kw)
        return conv_projection_qkv(x, hw, cls, **args)
    with pytest.raises(ValueError, match="tokens"):
        run(hw=(4, 5))
    with pytest.raises(ValueError, match="tokens"):
        run(cls=False)
    with pytest.raises(ValueError, match="x"):
        run(x=x[0])
    with pytest.raises(TypeError, match="x"):
        run(x=x.long())
    with pytest.raises(TypeError, match="weight_k"):
        run(weight_k=ws[1].float())
    with pytest.raises(ValueError, match="weight_q"):
        run(weight_q=torch.randn(4, 1, 4, 4, dtype=torch.float64), weight_k=torch.randn(4, 1, 4, 4, dtype=torch.float64),
            weight_v=torch.randn(4, 1, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="weight_v"):
        run(weight_v=torch.randn(4, 1, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="weight_q"):
        run(weight_q=torch.randn(3, 1, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="bias_v"):
        run(bias_v=bs[2][:3])
    with pytest.raises(ValueError, match="stride_kv"):
        run(stride_kv=3)
    with pytest.raises(ValueError, match="device"):
        run(bias_q=bs[0].to("meta"))
