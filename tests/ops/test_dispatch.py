"""The dispatch registry (fastvit_ops/ops/dispatch.py): one function picks the implementation of
every call, explain() says why, and a backend is one module plus one registration line."""
import importlib
import sys

import pytest
import torch

import fastvit_ops
from fastvit_ops.explain import explain
from fastvit_ops.ops import cross_modulation as cm
from fastvit_ops.ops import dispatch
from fastvit_ops.ops import dwconv as dw

HAVE_CPU = dispatch.backend_available("cpu", torch.device("cpu"))[0]


@pytest.fixture
def registry_snapshot(monkeypatch):
    """Whatever a test registers is gone afterwards."""
    monkeypatch.setattr(dispatch, "_BACKENDS", dict(dispatch._BACKENDS))
    monkeypatch.setattr(dispatch, "BACKENDS", dispatch.BACKENDS)
    monkeypatch.setattr(dispatch, "_PROBED", dict(dispatch._PROBED))
    monkeypatch.setattr(dispatch, "_TABLE", {op: {st: list(l) for st, l in stages.items()}
                                             for op, stages in dispatch._TABLE.items()})
    monkeypatch.setattr(dispatch, "_KERNEL_BACKENDS", dict(dispatch._KERNEL_BACKENDS))
    monkeypatch.setattr(dispatch, "_RESOLVED", {})
    yield
    sys.modules.pop("toy_backend", None)


def test_a_backend_is_one_module(registry_snapshot):
    toy = importlib.import_module("toy_backend")   # what a name in ops.EXTRA_BACKENDS does
    toy.CALLS.clear()
    a, b = torch.randn(2, 3, 4, requires_grad=True), torch.randn(2, 3, 4, requires_grad=True)
    with fastvit_ops.backend("toy"):
        y = fastvit_ops.sigmoid_cross_modulation(a, b)
    y.sum().backward()
    assert toy.CALLS == ["forward", "backward"], "the backward runs on the forward's backend"
    torch.testing.assert_close(y, cm.reference(a, b))
    # auto never picks it (it is not in AUTO_ORDER); an op it has no kernel for uses its auto choice
    toy.CALLS.clear()
    fastvit_ops.sigmoid_cross_modulation(a, b)
    with fastvit_ops.backend("toy"):
        fastvit_ops.dwconv2d(torch.randn(1, 2, 5, 5), torch.randn(2, 1, 3, 3))
    assert toy.CALLS == []
    with pytest.raises(RuntimeError, match="backend 'toy' is not available: the toy backend runs CPU"):
        with fastvit_ops.backend("toy"):
            fastvit_ops.sigmoid_cross_modulation(a.to("meta"), b.to("meta"))
    with pytest.raises(ValueError, match="backend: expected one of"):
        with fastvit_ops.backend("toy2"):
            pass


def test_explain_gives_every_candidate_a_reason():
    log = explain("dwconv2d", (2, 16, 9, 9), kernel=5, residual=True)
    stages = [(c.op, c.stage) for c in log]
    assert ("dwconv2d", "call") in stages
    for c in log:
        assert [impl for impl, _, _ in c.reasons] == dispatch.implementations(c.op, c.stage)
        assert [impl for impl, chosen, _ in c.reasons if chosen] == [c.impl]
        assert all(why for _, _, why in c.reasons)
    call = next(c for c in log if c.stage == "call")
    assert call.impl.name == ("cpu_autograd" if HAVE_CPU else "eager")


@pytest.mark.skipif(not HAVE_CPU, reason="needs the C++ extension")
def test_choices_follow_the_call():
    """The same op takes different implementations for different calls, each for a stated reason."""
    # a non-dense input: the custom op, whose forward kernel is the C++ one
    log = explain("dwconv2d", (1, 4, 9, 16), kernel=3)
    assert {c.stage: c.impl.name for c in log}["call"] == "cpu_autograd"
    x, w = torch.randn(1, 4, 9, 16)[..., ::2], torch.randn(4, 1, 3, 3)
    with dispatch.recording() as rec:
        fastvit_ops.dwconv2d(x, w)
    assert [(c.stage, c.impl.name) for c in rec] == [("call", "custom_op"), ("forward", dw_forward_name(x, w))]
    why = dict((impl.name, r) for impl, _, r in rec[0].reasons)["cpu_autograd"]
    assert "contiguous" in why
    # an explicit backend: the custom op on that backend's kernels, never oneDNN
    with fastvit_ops.backend("reference"), dispatch.recording() as rec:
        fastvit_ops.dwconv2d(x.contiguous(), w)
    assert [(c.stage, c.impl.name) for c in rec] == [("call", "custom_op"), ("forward", "reference")]
    # the attention with nothing to differentiate: the C++ forward directly
    log = explain("downsampled_attention", (1, 2, 10, 16), keys=3, inference=True)
    assert [(c.stage, c.impl.name) for c in log] == [("call", "cpu_forward"), ("forward", "cpu")]
    # CvT's projection in fp16: the C++ kernel declines, the reference runs
    log = explain("conv_projection_qkv", (1, 4, 3, 3), dtype=torch.float16, inference=True)
    fwd = next(c for c in log if c.stage == "forward")
    assert fwd.impl.name == "reference" and "fp32/fp64" in dict((i.name, r) for i, _, r in fwd.reasons)["cpu"]


def dw_forward_name(x, w):
    return "onednn" if dw.onednn_forward("auto", x, w, None, 1, 1, 0, False) else "cpu"


def test_unavailable_backend_says_why():
    if dispatch.backend_available("cuda", torch.device("cpu"))[0]:
        pytest.skip("cuda available for CPU tensors?")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: the cuda backend runs CUDA"):
        dispatch.resolve_backend("dwconv2d", "cuda", torch.device("cpu"))
    # an op without a cuda kernel at all: its auto choice
    assert dispatch.resolve_backend("downsampled_attention", "cuda", torch.device("cpu")) == \
        dispatch.resolve_backend("downsampled_attention", "auto", torch.device("cpu"))


def test_every_op_has_a_reference_kernel_and_a_call_stage():
    for op, stages in dispatch.ops().items():
        for stage in stages:
            impls = dispatch.implementations(op, stage)
            assert len({i.name for i in impls}) == len(impls), f"{op} {stage}: duplicate names"
            if stage in ("forward", "backward"):
                assert any(i.backend == "reference" for i in impls), f"{op} {stage}: no reference kernel"
        if "forward" in stages:
            assert "call" in stages, op
            assert dispatch.implementations(op, "call")[-1].name == "custom_op", op


def test_kernel_tables_are_read_only_views_of_the_registry():
    assert dw.FORWARD["reference"] is dw._reference_fwd and "onednn" in dw.FORWARD
    assert list(cm.BACKWARD) == [i.name for i in dispatch.implementations(cm.OP, "backward")]
    with pytest.raises(TypeError):
        dw.FORWARD["cpu"] = dw._reference_fwd  # what runs changes through dispatch.register only
    with pytest.raises(KeyError):
        dw.FORWARD["nope"]
