"""``auto`` on a device whose preference list is ``reference`` only (CUDA since the H200
measurement, see ``ops/dispatch.AUTO_ORDER``): every public op runs its reference composition as
plain eager PyTorch, never the custom op, with PyTorch's autograd. Simulated here on the CPU by
giving the CPU the CUDA rule."""
import pytest
import torch

import fastvit_ops
from conftest import replace_impls
from fastvit_ops.ops import attention, cross_modulation, dispatch, dwconv
from fastvit_ops.ops import global_context as gc


@pytest.fixture
def cpu_like_cuda(monkeypatch):
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", dispatch.AUTO_ORDER["cuda"])
    # Any custom-op, C++ fast-path or kernel call would now be a failure of the rule.
    def forbidden(*a, **k):
        raise AssertionError("auto ran a kernel of ours where the rule says eager PyTorch")
    for op, stages in dispatch.ops().items():
        for stage in stages:
            replace_impls(monkeypatch, op, stage,
                          lambda impl, _: impl if impl.name == "eager" else impl._replace(fn=forbidden))


def _leaf(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


def _fasa_eager(q_map, k, v, h, gate):
    """FASA's global branch as the released code orders it (q scaled, the output laid out as the
    map, then the gate): what the channels-first gated call runs as eager PyTorch."""
    b, c, hh, ww = q_map.shape
    q = q_map.reshape(b, h, c // h, hh * ww).transpose(2, 3) * (c // h) ** -0.5
    o = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
    return torch.nn.functional.silu(o.transpose(2, 3).reshape(b, c, hh, ww)) * gate


def _cases():
    x = _leaf(2, 8, 7, 9)
    w, b = _leaf(8, 1, 5, 5), _leaf(8)
    yield "dwconv2d", lambda: fastvit_ops.dwconv2d(x, w, b, 1, None, "gelu", False), \
        lambda: dwconv.reference(x, w, b, 1, None, "gelu", False), (x, w, b)
    l, g = _leaf(2, 4, 5, 3), _leaf(2, 4, 5, 3)
    yield "sigmoid_cross_modulation", lambda: fastvit_ops.sigmoid_cross_modulation(l, g, "full"), \
        lambda: cross_modulation.reference(l, g, "full"), (l, g)
    q, k, v = _leaf(2, 3, 10, 4), _leaf(2, 3, 5, 4), _leaf(2, 3, 5, 4)
    yield "downsampled_attention", lambda: fastvit_ops.downsampled_attention(q, k, v, 0.3), \
        lambda: attention.reference(q, k, v, 0.3), (q, k, v)
    qm, gate = _leaf(2, 12, 2, 5), _leaf(2, 12, 2, 5)
    yield "downsampled_attention_nchw", \
        lambda: fastvit_ops.downsampled_attention_nchw(qm, k, v, 3, None, gate), \
        lambda: _fasa_eager(qm, k, v, 3, gate), (qm, k, v, gate)
    al, be = _leaf(4), _leaf(4)
    w1, b1, w2, b2 = _leaf(4, 8), _leaf(4), _leaf(8, 2), _leaf(8)
    yield "global_context", lambda: fastvit_ops.global_context(x, w1, b1, w2, b2, al, be, groups=4), \
        lambda: gc.reference(x, al, be, 4, 1e-5, (w1, b1, w2, b2)), (x, w1, b1, w2, b2, al, be)
    yield "token_global_similarity", lambda: fastvit_ops.token_global_similarity(x, al, be, groups=4), \
        lambda: gc.reference(x, al, be, 4, 1e-5), (x, al, be)


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: c[0])
def test_auto_runs_the_eager_reference(cpu_like_cuda, case):
    _, fused, ref, leaves = case
    y, y_ref = fused(), ref()
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    dy = torch.randn_like(y)
    g = torch.autograd.grad(y, leaves, dy)
    g_ref = torch.autograd.grad(ref(), leaves, dy)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_explicit_backends_still_run_the_kernels(monkeypatch):
    """The rule is about ``auto`` only: backend("reference") (and triton/cuda/cpu) keep the custom op."""
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", ("reference",))
    l, g = _leaf(2, 4, 5, 3), _leaf(2, 4, 5, 3)
    with dispatch.recording() as log:
        with fastvit_ops.backend("reference"):
            fastvit_ops.sigmoid_cross_modulation(l, g)
        fastvit_ops.sigmoid_cross_modulation(l, g)  # auto: eager, no custom op
    assert [(c.call.backend, c.impl.name) for c in log if c.stage == "call"] == \
        [("reference", "custom_op"), ("auto", "eager")]


def _call_runs(device: str, backend: str) -> str:
    t = torch.empty(1, device=device)
    call = dispatch.Call(cross_modulation.OP, backend, (t, t, "silu"))
    return dispatch.choose(cross_modulation.OP, "call", call).name


def test_the_cuda_rule(without_cpu_rules):
    """On CUDA (and devices without kernels of ours), auto is eager PyTorch (the measured rule); on
    the CPU, the C++ kernels first."""
    assert dispatch.AUTO_ORDER["cuda"] == ("reference",)
    assert _call_runs("meta", "auto") == "eager"
    assert _call_runs("meta", "reference") == "custom_op"
    if dispatch.backend_available("cpu", torch.device("cpu"))[0]:
        assert dispatch.resolve_backend(cross_modulation.OP, "auto", torch.device("cpu")) == "cpu"
        assert _call_runs("cpu", "auto") == "cpu_autograd"  # the C++ node (its kernels are ours)
