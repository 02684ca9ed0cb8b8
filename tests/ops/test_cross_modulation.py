"""sigmoid_cross_modulation (docs/cross_modulation.md) on every backend that runs here, against the float64 reference."""
import pytest
import torch
import torch.nn.functional as F

import fastvit_ops
from conftest import HAS_CUDA, assert_error_rule, backends_for, requires_cuda, spy_kernels
from fastvit_ops.ops import cross_modulation as cm

MODES = ["silu", "full"]
CPU_BACKENDS = backends_for("cpu")


def eager(local, global_, mode):
    """The layer as eager PyTorch writes it (FAT's released code; the paper's extra sigmoid for "full")."""
    out = F.silu(local) * F.silu(global_)
    return out * torch.sigmoid(F.silu(local)) if mode == "full" else out


def inputs(shape, dtype=torch.float64, device="cpu", scale=3.0):
    return [(torch.randn(shape, dtype=dtype, device=device) * scale).requires_grad_() for _ in range(2)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 4, 9, 9), (2, 3, 7, 5), (1,), (13,)])
def test_gradcheck_float64(backend, mode, shape):
    l, g = inputs(shape)
    with fastvit_ops.backend(backend):
        assert torch.autograd.gradcheck(lambda a, b: fastvit_ops.sigmoid_cross_modulation(a, b, mode), (l, g))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_forward_backward_equal_eager_float64(backend, mode):
    # Sizes around the vector width, the staging chunk (1024) and the parallel grain (16384).
    for n in (1, 7, 17, 1023, 1025, 16384 * 2 + 3):
        l, g = inputs((n,))
        dy = torch.randn(n, dtype=torch.float64)
        with fastvit_ops.backend(backend):
            out = fastvit_ops.sigmoid_cross_modulation(l, g, mode)
            dl, dg = torch.autograd.grad(out, (l, g), dy)
        ref = eager(l, g, mode)
        rl, rg = torch.autograd.grad(ref, (l, g), dy)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dl, rl, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dg, rg, rtol=1e-12, atol=1e-12)


def check_error_rule(backend, dtype, mode, shape, device="cpu"):
    """Forward and both gradients of the fused op meet the error rule of docs/numerics.md in ``dtype``."""
    l, g, dy = (torch.randn(shape, dtype=torch.float64, device=device).mul(4).to(dtype) for _ in range(3))
    # Exact result of the *rounded* inputs, so only the op's own error is measured.
    le, ge = l.double().requires_grad_(), g.double().requires_grad_()
    exact = eager(le, ge, mode)
    exact_dl, exact_dg = torch.autograd.grad(exact, (le, ge), dy.double())
    lf, gf = l.clone().requires_grad_(), g.clone().requires_grad_()
    with fastvit_ops.backend(backend):
        out = fastvit_ops.sigmoid_cross_modulation(lf, gf, mode)
        dl, dg = torch.autograd.grad(out, (lf, gf), dy)
    lr, gr = l.clone().requires_grad_(), g.clone().requires_grad_()
    ref = eager(lr, gr, mode)
    rdl, rdg = torch.autograd.grad(ref, (lr, gr), dy)
    assert out.dtype == dtype and dl.dtype == dtype and dg.dtype == dtype
    assert_error_rule("forward", out, ref, exact)
    assert_error_rule("dlocal", dl, rdl, exact_dl)
    assert_error_rule("dglobal", dg, rdg, exact_dg)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_low_precision_error_rule(backend, dtype, mode):
    if backend == "triton" and dtype != torch.float32:
        pytest.skip("the Triton interpreter computes half-precision math wrongly; GPU tests cover it")
    check_error_rule(backend, dtype, mode, (2, 8, 11, 13))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_layouts(backend):
    """channels_last, sliced, transposed and mixed layouts give the contiguous result."""
    base = torch.randn(2, 6, 9, 10, dtype=torch.float64)
    other = torch.randn(2, 6, 9, 10, dtype=torch.float64)
    cases = {
        "channels_last": (base.to(memory_format=torch.channels_last), other.to(memory_format=torch.channels_last)),
        "mixed": (base.to(memory_format=torch.channels_last), other),
        "sliced": (torch.randn(2, 6, 9, 20, dtype=torch.float64)[..., ::2], other),
        "transposed": (base.transpose(2, 3), other.transpose(2, 3)),
        "expanded": (torch.randn(1, 6, 9, 10, dtype=torch.float64).expand(2, -1, -1, -1), other),
    }
    for name, (l, g) in cases.items():
        lc, gc = l.contiguous().requires_grad_(), g.contiguous().requires_grad_()
        lx, gx = l.detach().requires_grad_(), g.detach().requires_grad_()  # keep the odd strides
        dy = torch.randn(l.shape, dtype=torch.float64)
        with fastvit_ops.backend(backend):
            out = fastvit_ops.sigmoid_cross_modulation(lc, gc)
            dl, dg = torch.autograd.grad(out, (lc, gc), dy)
            out2 = fastvit_ops.sigmoid_cross_modulation(lx, gx)
            dl2, dg2 = torch.autograd.grad(out2, (lx, gx), dy)
        torch.testing.assert_close(out2, out, msg=name)
        torch.testing.assert_close(dl2, dl, msg=name)
        torch.testing.assert_close(dg2, dg, msg=name)
    cl = cases["channels_last"][0].detach()
    with fastvit_ops.backend(backend):
        y = fastvit_ops.sigmoid_cross_modulation(cl, cases["channels_last"][1].detach())
    assert y.is_contiguous(memory_format=torch.channels_last), "a channels_last input keeps its layout"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty(backend):
    l = torch.randn(0, 4, 3, 3)
    with fastvit_ops.backend(backend):
        assert fastvit_ops.sigmoid_cross_modulation(l, l.clone()).shape == l.shape


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend, mode):
    l, g = (torch.randn(2, 4, 5, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    torch.library.opcheck(torch.ops.fastvit_ops.sigmoid_cross_modulation.default, (l, g, mode, backend))
    dy = torch.randn(2, 4, 5, 3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastvit_ops.sigmoid_cross_modulation_backward.default,
                          (dy, l.detach(), g.detach(), mode, backend))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def block(a, b):
        return fastvit_ops.sigmoid_cross_modulation(a * 2, b, "full").sum(dim=1)

    compiled = torch.compile(block, fullgraph=True)
    l, g = (torch.randn(2, 4, 5, 7, requires_grad=True) for _ in range(2))
    out = compiled(l, g)
    ref = block(l, g)
    torch.testing.assert_close(out, ref)
    dl, dg = torch.autograd.grad(out.sum(), (l, g))
    rl, rg = torch.autograd.grad(ref.sum(), (l, g))
    torch.testing.assert_close(dl, rl)
    torch.testing.assert_close(dg, rg)


def test_triton_launcher_writes_every_element():
    """Poisoned outputs: every element of a non-multiple-of-block size is written."""
    if not backend_ok("triton"):
        pytest.skip("triton not available here")
    from fastvit_ops.kernels import cross_modulation as k

    n = 1024 + 37
    l, g, dy = (torch.randn(n) for _ in range(3))
    out = torch.full((n,), float("nan"))
    k.cross_modulation_forward(l, g, out, False)
    dl, dg = torch.full((n,), float("nan")), torch.full((n,), float("nan"))
    k.cross_modulation_backward(dy, l, g, dl, dg, True)
    assert not out.isnan().any() and not dl.isnan().any() and not dg.isnan().any()
    torch.testing.assert_close(out, eager(l, g, "silu"))


def backend_ok(name, device="cpu"):
    return fastvit_ops.backend_available(name, torch.device(device))[0]


# ---- bad input ------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    a = torch.randn(2, 3, 4, 4)
    op = fastvit_ops.sigmoid_cross_modulation
    with pytest.raises(ValueError, match="global_: expected shape"):
        op(a, torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="global_: expected device"):
        op(a, torch.randn(2, 3, 4, 4, device="meta"))
    with pytest.raises(TypeError, match="local: expected dtype"):
        op(torch.ones(2, 3, 4, 4, dtype=torch.int32), a)
    with pytest.raises(TypeError, match="global_: expected dtype"):
        op(a, a.double())
    with pytest.raises(TypeError, match="local: expected a torch.Tensor"):
        op([1.0], a)
    with pytest.raises(ValueError, match="mode: expected one of"):
        op(a, a, mode="gelu")


def test_backend_selection_errors_and_env(monkeypatch):
    a = torch.randn(3, 4)
    with pytest.raises(ValueError, match="backend: expected one of"):
        with fastvit_ops.backend("cudnn"):
            pass
    with fastvit_ops.backend("cuda"):
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
            fastvit_ops.sigmoid_cross_modulation(a, a)
    monkeypatch.setenv("FASTVIT_OPS_BACKEND", "reference")
    assert fastvit_ops.get_backend() == "reference"
    with fastvit_ops.backend("cpu"):
        assert fastvit_ops.get_backend() == "cpu"
    assert fastvit_ops.get_backend() == "reference"
    monkeypatch.setenv("FASTVIT_OPS_BACKEND", "nope")
    with pytest.raises(ValueError, match="FASTVIT_OPS_BACKEND"):
        fastvit_ops.sigmoid_cross_modulation(a, a)


def test_dispatch_runs_the_requested_backend(monkeypatch, without_cpu_rules):
    """The name given to backend() decides which implementation runs (forward and backward)."""
    calls = spy_kernels(monkeypatch, "sigmoid_cross_modulation")
    # Inputs of different strides keep the cpu backend on the custom op (the eager fast path takes
    # two tensors of one contiguous or channels_last layout)
    l = torch.randn(2, 3, 4, 5, requires_grad=True)
    g = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last).requires_grad_()
    for name in ("reference",) + (("cpu",) if backend_ok("cpu") else ()):
        calls.clear()
        with fastvit_ops.backend(name):
            fastvit_ops.sigmoid_cross_modulation(l, g).sum().backward()
        assert calls == [("fwd", name), ("bwd", name)]
    if backend_ok("cpu"):
        calls.clear()
        fastvit_ops.sigmoid_cross_modulation(l, g).sum().backward()
        assert calls == [("fwd", "cpu"), ("bwd", "cpu")], "auto picks the C++ kernel on CPU"
        # One layout on cpu/auto: the C++ autograd node, no Python table involved, same result
        # as the custom op
        l2 = l.detach().clone().requires_grad_()
        l.grad = None
        with fastvit_ops.backend("cpu"):
            want = fastvit_ops.sigmoid_cross_modulation(l, g.contiguous(), "full")
        want.sum().backward()
        for name in ("cpu", "auto"):
            calls.clear()
            l2.grad = None
            with fastvit_ops.backend(name):
                y = fastvit_ops.sigmoid_cross_modulation(l2, g.detach().contiguous(), "full")
                assert type(y.grad_fn).__name__ == "CppFunction"
                y.sum().backward()
            assert calls == []
            assert torch.equal(y, want) and torch.equal(l2.grad, l.grad)
        with fastvit_ops.backend("reference"):  # reference is never rerouted
            assert "CppFunction" not in type(fastvit_ops.sigmoid_cross_modulation(l, g).grad_fn).__name__


@pytest.mark.skipif(not backend_ok("cpu"), reason="needs the C++ CPU extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_eager_cpu_fast_path_matches_custom_op(dtype, mode, without_cpu_rules):
    """Plain eager CPU calls on one contiguous or channels_last layout take the C++ autograd node
    (_cross_modulation_autograd); its forward equals the custom op's bitwise and both gradients
    equal them (bitwise for half types; to rounding in fp32/fp64, whose node multiplies saved
    partials instead of recomputing), including partial gradients and an incoming gradient of
    another layout."""
    shape = (2, 5, 7, 3)
    for cl, dy_cl in [(False, False), (True, True), (False, True), (True, False)]:
        fmt = torch.channels_last if cl else torch.contiguous_format
        l, g = (t.to(dtype).contiguous(memory_format=fmt) for t in inputs(shape, scale=4.0))
        dy = torch.randn(shape, dtype=dtype).contiguous(
            memory_format=torch.channels_last if dy_cl else torch.contiguous_format)
        for grads in ((True, True), (True, False), (False, True)):
            ins = [t.detach().clone().requires_grad_(r) for t, r in zip((l, g), grads)]
            y = fastvit_ops.sigmoid_cross_modulation(*ins, mode)
            assert type(y.grad_fn).__name__ == "CppFunction"
            assert y.is_contiguous(memory_format=fmt)
            got = torch.autograd.grad(y, [t for t in ins if t.requires_grad], dy)
            ins2 = [t.detach().clone().requires_grad_(t.requires_grad) for t in ins]
            want_y = cm._op(*ins2, mode, "cpu")
            want = torch.autograd.grad(want_y, [t for t in ins2 if t.requires_grad], dy)
            torch.testing.assert_close(y, want_y, rtol=0, atol=0)
            exact = dtype == torch.bfloat16
            for a, c in zip(got, want):
                torch.testing.assert_close(a, c, rtol=0 if exact else None, atol=0 if exact else None)
    with torch.inference_mode():  # below autograd: the forward alone
        torch.testing.assert_close(fastvit_ops.sigmoid_cross_modulation(l, g, mode), cm._op(l, g, mode, "cpu"),
                                   rtol=0, atol=0)


@pytest.mark.skipif(not backend_ok("cpu"), reason="needs the C++ CPU extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", MODES)
def test_eager_cpu_fast_path_saves_partials(dtype, mode, without_cpu_rules):
    """In fp32/fp64 training the C++ node saves ∂out/∂local and ∂out/∂global (written by the
    forward) for the inputs that need a gradient, never the inputs themselves."""
    for grads in ((True, True), (True, False), (False, True)):
        l, g = (t.to(dtype).detach().requires_grad_(r) for t, r in zip(inputs((2, 3, 5, 4), scale=4.0), grads))
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = fastvit_ops.sigmoid_cross_modulation(l, g, mode)
        assert type(y.grad_fn).__name__ == "CppFunction"
        le, ge = l.detach().double().requires_grad_(), g.detach().double().requires_grad_()
        ye = eager(le, ge, mode)
        want = [torch.autograd.grad(ye, t, torch.ones_like(ye), retain_graph=True)[0].to(dtype)
                for t, r in zip((le, ge), grads) if r]
        assert len(saved) == len(want)
        for t, w in zip(saved, want):
            assert t.data_ptr() not in (l.data_ptr(), g.data_ptr())
            torch.testing.assert_close(t, w)
        dy = torch.randn_like(y)
        got = torch.autograd.grad(y, [t for t, r in zip((l, g), grads) if r], dy)
        for a, w in zip(got, want):
            torch.testing.assert_close(a, dy * w)


@pytest.mark.skipif(not backend_ok("cpu"), reason="needs the C++ CPU extension")
def test_eager_cpu_fast_path_refuses_double_backward(without_cpu_rules):
    l, g = inputs((1, 4, 5, 5), dtype=torch.float32)
    y = fastvit_ops.sigmoid_cross_modulation(l, g)
    assert type(y.grad_fn).__name__ == "CppFunction"
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.sum(), l, create_graph=True)


# ---- GPU (run where a CUDA device is lent) ---------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", backends_for("cuda") if HAS_CUDA else [])
def test_cuda_error_rule(backend, dtype, mode):
    check_error_rule(backend, dtype, mode, (4, 32, 56, 56), device="cuda")


@requires_cuda
@pytest.mark.parametrize("backend", backends_for("cuda") if HAS_CUDA else [])
def test_cuda_gradcheck(backend):
    l, g = inputs((2, 4, 9, 7), device="cuda")
    with fastvit_ops.backend(backend):
        assert torch.autograd.gradcheck(lambda a, b: fastvit_ops.sigmoid_cross_modulation(a, b, "full"), (l, g))
