"""downsampled_attention (docs/attention.md) and its channels-first gated entry, on every backend here."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import fastvit_ops
from conftest import assert_error_rule, backends_for, requires_cuda, spy_kernels
from fastvit_ops.ops import attention as att
from fastvit_ops.ops import dispatch
from fastvit_ops.ops.attention import downsampled_attention, downsampled_attention_nchw

CPU_BACKENDS = backends_for("cpu")
GRID = list(itertools.product([16, 20, 32, 64], [1, 7, 49, 50], [1, 49, 63]))  # (d, M, N)
# Interpreted Triton costs ~ms per op: a representative subset of the grid (every d, M and N).
TRITON_GRID = [(16, 49, 63), (20, 7, 1), (32, 50, 49), (64, 1, 63), (20, 50, 63), (16, 1, 49)]


def eager(q, k, v, scale=None, gate=None):
    """The layers as eager PyTorch writes them (FASA / CvT): softmax(q kᵀ·scale) v [, SiLU·gate]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v
    return F.silu(out) * gate if gate is not None else out


def rand(*shape, dtype=torch.float64, scale=1.0, grad=True):
    return (torch.randn(shape, dtype=dtype) * scale).requires_grad_(grad)


def grid_for(backend):
    return TRITON_GRID if backend == "triton" else GRID


def to_heads(m, h):
    b, c, hh, ww = m.shape
    return m.reshape(b, h, c // h, hh * ww).transpose(2, 3)


def from_heads(t, hh, ww):
    b, h, n, d = t.shape
    return t.transpose(2, 3).reshape(b, h * d, hh, ww)


# ---- float64 gradcheck over the grid ---------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_grid_bhnd(backend):
    for d, m, n in grid_for(backend):
        q, k, v = rand(1, 2, n, d), rand(1, 2, m, d), rand(1, 2, m, d)
        with fastvit_ops.backend(backend):
            # fast_mode: one random projection per input (the grid is large); full mode below.
            assert torch.autograd.gradcheck(downsampled_attention, (q, k, v), fast_mode=True), (d, m, n)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_grid_nchw_gate(backend):
    for d, m, n in grid_for(backend):
        h = 2
        hh, ww = (1, 1) if n == 1 else (7, n // 7)
        q, gate = rand(1, h * d, hh, ww), rand(1, h * d, hh, ww)
        k, v = rand(1, h, m, d), rand(1, h, m, d)
        fn = lambda a, b, c, g: downsampled_attention_nchw(a, b, c, h, scale=0.3, gate=g)  # noqa: E731
        with fastvit_ops.backend(backend):
            assert torch.autograd.gradcheck(fn, (q, k, v, gate), fast_mode=True), (d, m, n)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 2, 9, 7, 20), (2, 1, 5, 3, 16)])  # (B, h, N, M, d)
def test_gradcheck_full(backend, shape):
    if backend == "triton":
        if shape[-1] != 20:
            pytest.skip("interpreted Triton: one tiny full gradcheck (the fast-mode grid covers the rest)")
        shape = (1, 1, 3, 2, 20)
    b, h, n, m, d = shape
    q, k, v = rand(b, h, n, d), rand(b, h, m, d), rand(b, h, m, d)
    gate = rand(b, h * d, n, 1)
    with fastvit_ops.backend(backend):
        assert torch.autograd.gradcheck(downsampled_attention, (q, k, v))
        assert torch.autograd.gradcheck(
            lambda a, bb, c, g: downsampled_attention_nchw(a, bb, c, h, gate=g),
            (from_heads(q.detach(), n, 1).requires_grad_(), k, v, gate))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_eager_float64_and_long_kv(backend):
    """Forward and backward equal the eager layer; M well past one KV tile (and ≥ 1024)."""
    # (1, 1, 300, ...): one head, several query tiles → the C++ backward splits dK/dV into chunks.
    cases = ([(2, 3, 70, 49, 24), (1, 2, 17, 1100, 40), (1, 1, 300, 49, 16)] if backend != "triton"
             else [(1, 1, 17, 1030, 20), (1, 1, 70, 20, 16)])
    for b, h, n, m, d in cases:
        q, k, v = rand(b, h, n, d), rand(b, h, m, d), rand(b, h, m, d)
        dy = torch.randn(b, h, n, d, dtype=torch.float64)
        with fastvit_ops.backend(backend):
            out = downsampled_attention(q, k, v, scale=0.7)
            grads = torch.autograd.grad(out, (q, k, v), dy)
        ref = eager(q, k, v, 0.7)
        rgrads = torch.autograd.grad(ref, (q, k, v), dy)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        for name, a, r in zip("qkv", grads, rgrads):
            torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10, msg=f"d{name} {(b, h, n, m, d)}")


# ---- low precision, large logits ---------------------------------------------------------------------
@pytest.mark.parametrize("logit_scale", [1.0, 30.0], ids=["normal", "large_logits"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_low_precision_error_rule(backend, dtype, logit_scale):
    if backend == "triton" and dtype != torch.float32:
        pytest.skip("the Triton interpreter computes half-precision math wrongly; GPU tests cover it")
    # Enough queries (15·13) that the max error is not one near-tied row's luck of rounding.
    b, h, m, d = 2, 2, 49, 20
    h_, w_ = 15, 13
    # Large logits: |q·k·scale| reaches ~1e3, past where exp overflows fp16/fp32 without max subtraction.
    q = (torch.randn(b, h * d, h_, w_, dtype=torch.float64) * logit_scale).to(dtype)
    k, v = (torch.randn(b, h, m, d, dtype=torch.float64).to(dtype) for _ in range(2))
    gate = torch.randn(b, h * d, h_, w_, dtype=torch.float64).to(dtype)
    dy = torch.randn(b, h * d, h_, w_, dtype=torch.float64).to(dtype)
    for use_gate in (False, True):
        g = gate if use_gate else None
        ins = [t.double().requires_grad_() for t in (q, k, v, gate)]
        exact = from_heads(eager(to_heads(ins[0], h), ins[1], ins[2], None, to_heads(ins[3], h) if use_gate else None), h_, w_)
        egrads = torch.autograd.grad(exact, ins[:3] + ([ins[3]] if use_gate else []), dy.double())
        fi = [t.clone().requires_grad_() for t in (q, k, v, gate)]
        with fastvit_ops.backend(backend):
            out = downsampled_attention_nchw(fi[0], fi[1], fi[2], h, gate=fi[3] if use_gate else None)
            fgrads = torch.autograd.grad(out, fi[:3] + ([fi[3]] if use_gate else []), dy)
        # Eager as the authors write it, and with the scale folded into q or k first (flash-
        # attention's tests' "reorder_ops" reference): equally valid roundings of the logits. At
        # large logits that rounding dominates every implementation's error, so one eager sample is
        # a noisy yardstick (a kernel's own order lands past 2× of it now and then); the worst counts.
        refs, rgrads = [], []
        for fold in ("none", "q", "k"):
            ri = [t.clone().requires_grad_() for t in (q, k, v, gate)]
            qh, kh, gh = to_heads(ri[0], h), ri[1], to_heads(ri[3], h)
            scale = None
            if fold != "none":
                scale = 1.0
                qh, kh = (qh * d ** -0.5, kh) if fold == "q" else (qh, kh * d ** -0.5)
            refs.append(from_heads(eager(qh, kh, ri[2], scale, gh if use_gate else None), h_, w_))
            rgrads.append(torch.autograd.grad(refs[-1], ri[:3] + ([ri[3]] if use_gate else []), dy))
        assert out.dtype == dtype
        assert_error_rule(f"forward gate={use_gate}", out, refs, exact)
        for i, (name, a, e) in enumerate(zip(["dq", "dk", "dv", "dgate"], fgrads, egrads)):
            assert a.dtype == dtype
            assert_error_rule(f"{name} gate={use_gate}", a, [r[i] for r in rgrads], e)


@pytest.mark.skipif(dispatch.backend_available("cpu", torch.device("cpu"))[0] is False, reason="needs the C++ extension")
def test_float32_backward_every_accumulation_path():
    """The C++ fp32 backward's dK/dV accumulation takes three paths by head dim (full vector width
    with AVX-512 at d % 16 == 0, 8 lanes at d % 8 == 0, a horizontal-sum path otherwise), row
    tails (M not a multiple of 8 or 4), one or several query tiles per head, and one chunk per head
    (each item writes dK/dV) or several (shared partials summed after): every gradient against
    float64, to fp32 accuracy relative to its scale."""
    cases = [(2, 4, 49, 49, 16, True), (1, 2, 197, 50, 64, False), (1, 1, 300, 7, 24, True), (3, 3, 65, 9, 8, False),
             (1, 1, 130, 1, 32, True), (2, 2, 40, 13, 20, True), (1, 1, 70, 49, 16, False)]  # (B, h, N, M, d, gate)
    for b, h, n, m, d, use_gate in cases:
        q, k, v, g = (torch.randn(b, h, s, d, dtype=torch.float64) for s in (n, m, m, n))
        dy = torch.randn(b, h, n, d, dtype=torch.float64)
        ins64 = [t.clone().requires_grad_() for t in (q, k, v, g)]
        exact = eager(*ins64[:3], None, ins64[3] if use_gate else None)
        want = torch.autograd.grad(exact, ins64 if use_gate else ins64[:3], dy)
        ins = [t.float().requires_grad_() for t in (q, k, v, g)]
        with fastvit_ops.backend("cpu"):
            out = att.attention_core(*ins[:3], d ** -0.5, ins[3] if use_gate else None, att.BHND)
        got = torch.autograd.grad(out, ins if use_gate else ins[:3], dy.float())
        for name, a, r in zip(("dq", "dk", "dv", "dgate"), got, want):
            torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4 * r.abs().max().item(),
                                       msg=f"{name} {(b, h, n, m, d)} gate={use_gate}")


# ---- layouts --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_layouts(backend):
    """channels_last maps, strided k/v (FASA's kv split), transposed q: same result as contiguous."""
    b, h, d, m, hh, ww = 2, 2, 20, 7, 5, 6
    qm = torch.randn(b, h * d, hh, ww, dtype=torch.float64)
    gm = torch.randn(b, h * d, hh, ww, dtype=torch.float64)
    kv = torch.randn(b, 2 * h * d, 1, m, dtype=torch.float64)
    k, v = kv.reshape(b, 2, h, d, m).transpose(-1, -2).unbind(1)  # non-contiguous, as FASA builds them
    dy = torch.randn(b, h * d, hh, ww, dtype=torch.float64)

    def run(qm_, gm_, k_, v_):
        ins = [t.detach().requires_grad_() for t in (qm_, k_, v_, gm_)]
        with fastvit_ops.backend(backend):
            out = downsampled_attention_nchw(ins[0], ins[1], ins[2], h, gate=ins[3])
            grads = torch.autograd.grad(out, ins, dy)
        return out, grads, ins

    base, bgrads, _ = run(qm, gm, k.contiguous(), v.contiguous())
    cl = torch.channels_last
    out, grads, ins = run(qm.to(memory_format=cl), gm.to(memory_format=cl), k, v)
    torch.testing.assert_close(out, base)
    for a, r in zip(grads, bgrads):
        torch.testing.assert_close(a, r)
    assert grads[0].is_contiguous(memory_format=cl), "dq comes back in q's layout"
    kd = k.transpose(-1, -2).contiguous().transpose(-1, -2)  # dense, keys fastest
    out, grads, ins = run(qm, gm, kd, v)
    torch.testing.assert_close(out, base)
    for a, r in zip(grads, bgrads):
        torch.testing.assert_close(a, r)
    assert grads[1].stride() == kd.stride(), "dk comes back in k's layout"
    # (B, h, N, d) entry with a transposed (non-contiguous) q.
    q = torch.randn(b, h, d, 11, dtype=torch.float64).transpose(2, 3)
    with fastvit_ops.backend(backend):
        y = downsampled_attention(q, k, v)
    torch.testing.assert_close(y, eager(q, k, v))
    assert y.is_contiguous()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_queries(backend):
    q, k, v = rand(2, 2, 0, 16), rand(2, 2, 5, 16), rand(2, 2, 5, 16)
    with fastvit_ops.backend(backend):
        out = downsampled_attention(q, k, v)
        assert out.shape == (2, 2, 0, 16)
        dk = torch.autograd.grad(out.sum() + (k * 0).sum(), k)[0]
    assert (dk == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    q, k, v = rand(2, 2, 9, 20), rand(2, 2, 5, 20), rand(2, 2, 5, 20)
    gate = rand(2, 2, 9, 20)
    qcf = torch.randn(2, 40, 9, dtype=torch.float64).reshape(2, 2, 20, 9).transpose(2, 3).requires_grad_()
    op = torch.ops.fastvit_ops.downsampled_attention.default
    torch.library.opcheck(op, (q, k, v, None, 0.3, att.BHND, backend))
    torch.library.opcheck(op, (qcf, k, v, gate, 0.3, att.CHANNELS_FIRST, backend))
    torch.library.opcheck(op, (q, k, v, gate, 0.3, att.TOKENS, backend))
    with fastvit_ops.backend(backend):
        _, lse = att._op(q.detach(), k.detach(), v.detach(), None, 0.3, 0, backend)
    dy = torch.randn(2, 2, 9, 20, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastvit_ops.downsampled_attention_backward.default,
                          (dy, q.detach(), k.detach(), v.detach(), gate.detach(), lse, 0.3, backend))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    h = 2

    def block(x, k, v, g):
        y = downsampled_attention_nchw(x * 2, k, v, h, gate=F.silu(g))
        return y.sum(dim=1) + downsampled_attention(to_heads(x, h), k, v).sum()

    compiled = torch.compile(block, fullgraph=True)
    # float64: inductor's own SiLU and reduction orders differ from eager's by fp32 roundings that
    # the softmax and the 2240-term sum amplify past the fp32 tolerance now and then.
    shapes = [(2, 32, 5, 7), (2, h, 9, 16), (2, h, 9, 16), (2, 32, 5, 7)]
    ins = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    out = compiled(*ins)
    ref = block(*ins)
    torch.testing.assert_close(out, ref)
    for a, r in zip(torch.autograd.grad(out.sum(), ins), torch.autograd.grad(ref.sum(), ins)):
        torch.testing.assert_close(a, r)


def test_triton_launchers_write_every_element():
    """Poisoned (NaN) outputs: every element of q-tiles and KV tiles that straddle the blocks is written."""
    if not fastvit_ops.backend_available("triton", torch.device("cpu"))[0]:
        pytest.skip("triton not available here")
    from fastvit_ops.kernels import attention as kern

    b, h, n, m, d = 1, 2, 37, 35, 20
    q, k, v, g, dy = (torch.randn(s) for s in [(b, h, n, d), (b, h, m, d), (b, h, m, d), (b, h, n, d), (b, h, n, d)])
    out = torch.full((b, h, n, d), float("nan"))
    lse = torch.full((b, h, n, 2), float("nan"))
    kern.attention_forward(q, k, v, g, out, lse, 0.25)
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out, eager(q, k, v, 0.25, g))
    grads = [torch.full_like(t, float("nan")) for t in (q, k, v, g)]
    kern.attention_backward(dy, q, k, v, g, lse, *grads, 0.25)
    assert not any(t.isnan().any() for t in grads)


# ---- bad input ------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    q, k = torch.randn(2, 2, 9, 16), torch.randn(2, 2, 5, 16)
    op = downsampled_attention
    with pytest.raises(ValueError, match="k: 3 heads, but q has 2 heads"):
        op(q, torch.randn(2, 3, 5, 16), torch.randn(2, 3, 5, 16))
    with pytest.raises(ValueError, match="k: head dim 20 differs"):
        op(q, torch.randn(2, 2, 5, 20), torch.randn(2, 2, 5, 20))
    with pytest.raises(ValueError, match="exceeds the supported maximum 128"):
        op(torch.randn(1, 1, 3, 136), torch.randn(1, 1, 2, 136), torch.randn(1, 1, 2, 136))
    with pytest.raises(TypeError, match="q: expected dtype"):
        op(q.to(torch.int64), k, k)
    with pytest.raises(TypeError, match="v: expected dtype"):
        op(q, k, k.double())
    with pytest.raises(ValueError, match="v: expected shape"):
        op(q, k, torch.randn(2, 2, 6, 16))
    with pytest.raises(ValueError, match="q: expected a 4-D tensor"):
        op(q[0], k, k)
    with pytest.raises(ValueError, match="k: batch 1 differs"):
        op(q, k[:1], k[:1])
    with pytest.raises(ValueError, match="k: needs at least one key"):
        op(q, k[:, :, :0], k[:, :, :0])
    with pytest.raises(TypeError, match="scale: expected a positive float"):
        op(q, k, k, scale="big")
    with pytest.raises(ValueError, match="scale: expected a positive finite float"):
        op(q, k, k, scale=-0.5)
    with pytest.raises(TypeError, match="k: expected a torch.Tensor"):
        op(q, [1.0], k)
    qm = torch.randn(2, 32, 3, 3)
    with pytest.raises(ValueError, match="num_heads: 3 does not divide the 32 channels"):
        downsampled_attention_nchw(qm, k, k, 3)
    with pytest.raises(ValueError, match="gate: expected shape"):
        downsampled_attention_nchw(qm, k, k, 2, gate=torch.randn(2, 32, 3, 4))
    with pytest.raises(TypeError, match="gate: expected dtype"):
        downsampled_attention_nchw(qm, k, k, 2, gate=qm.double())
    with pytest.raises(ValueError, match="num_heads: expected a positive int"):
        downsampled_attention_nchw(qm, k, k, 0)


def test_dispatch_runs_the_requested_backend(monkeypatch, without_cpu_rules):
    calls = spy_kernels(monkeypatch, "downsampled_attention")
    q, k, v = rand(1, 1, 5, 16, dtype=torch.float32), rand(1, 1, 3, 16, dtype=torch.float32), rand(1, 1, 3, 16, dtype=torch.float32)
    have_cpu = fastvit_ops.backend_available("cpu", torch.device("cpu"))[0]
    with fastvit_ops.backend("reference"):
        downsampled_attention(q, k, v).sum().backward()
    assert calls == [("fwd", "reference"), ("bwd", "reference")]
    if have_cpu:
        # the custom op on backend "cpu" (what torch.compile, opcheck and tensor subclasses get)
        calls.clear()
        att._custom_op(q, k, v, None, 0.25, att.BHND, "cpu").sum().backward()
        assert calls == [("fwd", "cpu"), ("bwd", "cpu")]
        calls.clear()
        with dispatch.recording() as log:
            y = downsampled_attention(q, k, v)
        y.sum().backward()
        # auto on CPU: the C++ autograd node (our kernels, no Python table involved)
        assert [c.impl.name for c in log if c.stage == "call"] == ["cpu_autograd"] and calls == []
        assert type(y.grad_fn).__name__ == "CppFunction"


@pytest.mark.skipif(not fastvit_ops.backend_available("cpu", torch.device("cpu"))[0], reason="needs the C++ extension")
@pytest.mark.parametrize("d", [16, 32, 20])
def test_no_grad_cpu_path_equals_custom_op_every_layout(d, monkeypatch, without_cpu_rules):
    """With no graph to record, attention_core runs the C++ forward directly (no custom op); the
    result equals the custom op's for every query/output layout, token-major fp32 included (d a
    multiple of 16 gathers with AVX-512 transposes, d = 20 the scalar way; N = 99 leaves a
    partial tile)."""
    B, h, N, M = 2, 3, 99, 7
    c = h * d
    q_map, g_map = torch.randn(B, c, 9, 11), torch.randn(B, c, 9, 11)
    k, v = torch.randn(B, h, M, d), torch.randn(B, h, M, d)
    q_cl, g_cl = (t.contiguous(memory_format=torch.channels_last) for t in (q_map, g_map))
    cases = [
        (att.BHND, torch.randn(B, h, N, d), torch.randn(B, h, N, d)),
        (att.CHANNELS_FIRST, q_map.reshape(B, h, d, N).transpose(2, 3), g_map.reshape(B, h, d, N).transpose(2, 3)),
        (att.TOKENS, q_cl.permute(0, 2, 3, 1).reshape(B, N, h, d).transpose(1, 2),
         g_cl.permute(0, 2, 3, 1).reshape(B, N, h, d).transpose(1, 2)),
    ]
    for layout, q, g in cases:
        want, _ = att._op(q, k, v, g, 0.3, layout, "auto")
        with torch.no_grad(), dispatch.recording() as log:
            got = att.attention_core(q, k, v, 0.3, g, layout)
        assert [c.impl.name for c in log] == ["cpu_forward", "cpu"], \
            "no-grad CPU calls run the C++ forward kernel directly, not the custom op"
        assert got.stride() == want.stride()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        exact = att.reference(q.double(), k.double(), v.double(), 0.3, g.double())
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
    # a graph to record: the C++ autograd node (differentiable)
    q = cases[2][1].clone().requires_grad_()
    with dispatch.recording() as log:
        att.attention_core(q, k, v, 0.3, cases[2][2], att.TOKENS).sum().backward()
    assert [c.impl.name for c in log if c.stage == "call"] == ["cpu_autograd"] and q.grad is not None


@pytest.mark.skipif(not fastvit_ops.backend_available("cpu", torch.device("cpu"))[0], reason="needs the C++ extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_autograd_node_equals_custom_op(dtype, without_cpu_rules):
    """Plain eager CPU calls that record a graph take the C++ autograd node
    (_downsampled_attention_autograd): output (values and strides) and every gradient equal the
    custom op's, for each output layout, with and without the gate, partial gradients and an
    incoming gradient of other strides; empty query sets and inference mode included."""
    B, h, d, M = 2, 3, 16, 7
    c = h * d
    q_map, g_map = torch.randn(B, c, 9, 11, dtype=dtype), torch.randn(B, c, 9, 11, dtype=dtype)
    k, v = torch.randn(B, h, M, d, dtype=dtype), torch.randn(B, h, M, d, dtype=dtype)
    N = 99
    views = {
        att.BHND: lambda t: t,
        att.CHANNELS_FIRST: lambda t: t.reshape(B, h, d, N).transpose(2, 3),
        att.TOKENS: lambda t: t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
                              .reshape(B, N, h, d).transpose(1, 2),
    }
    for layout, view in views.items():
        qs = torch.randn(B, h, N, d, dtype=dtype) if layout == att.BHND else view(q_map)
        gs = torch.randn(B, h, N, d, dtype=dtype) if layout == att.BHND else view(g_map)
        for use_gate, need_k in [(True, True), (False, True), (True, False)]:
            ins = [qs.clone().requires_grad_(), k.clone().requires_grad_(need_k), v.clone().requires_grad_(),
                   gs.clone().requires_grad_() if use_gate else None]
            y = att.attention_core(*ins[:3], 0.25, ins[3], layout)
            assert type(y.grad_fn).__name__ == "CppFunction"
            dy = torch.randn(B, h, d, N, dtype=dtype).transpose(2, 3)  # strides unlike the output's
            leaves = [t for t in ins if t is not None and t.requires_grad]
            got = torch.autograd.grad(y, leaves, dy)
            ins2 = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in ins]
            want_y = att._custom_op(*ins2[:3], ins2[3], 0.25, layout, "cpu")
            want = torch.autograd.grad(want_y, [t for t in ins2 if t is not None and t.requires_grad], dy)
            assert y.stride() == want_y.stride()
            torch.testing.assert_close(y, want_y, rtol=0, atol=0)
            for a, b in zip(got, want):
                assert a.stride() == b.stride()
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    q0 = torch.randn(B, h, 0, d, dtype=dtype, requires_grad=True)
    k0 = k.clone().requires_grad_()
    y0 = att.attention_core(q0, k0, v, 0.25, None, att.BHND)
    assert y0.shape == (B, h, 0, d)
    (gk,) = torch.autograd.grad(y0.sum(), [k0], allow_unused=True)
    assert gk is None or not gk.any()
    with torch.inference_mode():  # below autograd: the forward alone
        torch.testing.assert_close(torch.ops.fastvit_ops._downsampled_attention_autograd(qs, k, v, gs, 0.25, att.TOKENS),
                                   att._custom_op(qs, k, v, gs, 0.25, att.TOKENS, "cpu"), rtol=0, atol=0)


@pytest.mark.skipif(not fastvit_ops.backend_available("cpu", torch.device("cpu"))[0], reason="needs the C++ extension")
def test_cpu_autograd_node_refuses_double_backward(without_cpu_rules):
    q, k, v = (torch.randn(1, 2, n, 8, requires_grad=True) for n in (5, 3, 3))
    y = downsampled_attention(q, k, v)
    assert type(y.grad_fn).__name__ == "CppFunction"
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.sum(), q, create_graph=True)


# ---- GPU (run where a CUDA device is lent) ----------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [16, 20, 32, 64])
def test_cuda_error_rule(d, dtype):
    b, h, hh, ww, m = 4, 2, 56, 56, 49
    q = (torch.randn(b, h * d, hh, ww, device="cuda") * 4).to(dtype)
    k, v = (torch.randn(b, h, m, d, device="cuda").to(dtype) for _ in range(2))
    gate = torch.randn(b, h * d, hh, ww, device="cuda").to(dtype)
    dy = torch.randn(b, h * d, hh, ww, device="cuda").to(dtype)
    ins = [t.double().requires_grad_() for t in (q, k, v, gate)]
    exact = from_heads(eager(to_heads(ins[0], h), ins[1], ins[2], None, to_heads(ins[3], h)), hh, ww)
    egrads = torch.autograd.grad(exact, ins, dy.double())
    fi = [t.clone().requires_grad_() for t in (q, k, v, gate)]
    with fastvit_ops.backend("triton"):
        out = downsampled_attention_nchw(fi[0], fi[1], fi[2], h, gate=fi[3])
        fgrads = torch.autograd.grad(out, fi, dy)
    ri = [t.clone().requires_grad_() for t in (q, k, v, gate)]
    ref = from_heads(eager(to_heads(ri[0], h), ri[1], ri[2], None, to_heads(ri[3], h)), hh, ww)
    rgrads = torch.autograd.grad(ref, ri, dy)
    assert_error_rule("forward", out, ref, exact)
    for name, a, r, e in zip(["dq", "dk", "dv", "dgate"], fgrads, rgrads, egrads):
        assert_error_rule(name, a, r, e)


@requires_cuda
def test_cuda_gradcheck():
    q, k, v = (torch.randn(s, dtype=torch.float64, device="cuda", requires_grad=True)
               for s in [(1, 2, 63, 20), (1, 2, 50, 20), (1, 2, 50, 20)])
    with fastvit_ops.backend("triton"):
        assert torch.autograd.gradcheck(downsampled_attention, (q, k, v), fast_mode=True)
