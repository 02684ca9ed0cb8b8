"""A call's backward runs on its forward's backend (README "Backends"): every implementation choice
made during the forward *and* the backward of a call under ``fastvit_ops.backend(name)`` is asked
for ``name``, never for ``auto``.

Before this test, ``context_dwconv2d`` and ``conv_projection_qkv`` ran the depthwise conv's backward
with a hard-coded ``"auto"`` (the C++ kernel on CPU) whatever the forward had been asked for.
"""
import pytest
import torch

import fastvit_ops
from conftest import backends_for
from fastvit_ops.ops import dispatch
from op_cases import CASES, outputs

# ``cpu`` is where ``auto`` resolves on CPU anyway, so a hard-coded ``auto`` is only visible under
# the other backends.
BACKENDS = [p for p in backends_for("cpu") if p.id in ("reference", "triton")]


@pytest.fixture
def resolve_log(monkeypatch):
    log = []
    real = dispatch.resolve_backend

    def spy(op, requested, device, dev=None):
        name = real(op, requested, device, dev)
        log.append((op, requested, name))
        return name

    monkeypatch.setattr(dispatch, "resolve_backend", spy)
    return log


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", sorted(CASES))
def test_backward_runs_on_the_forwards_backend(op, backend, resolve_log):
    gen = torch.Generator().manual_seed(0)
    fn, ins = CASES[op](gen, torch.float64, 1)
    with fastvit_ops.backend(backend):
        outs = outputs(fn(*ins))
    n_forward = len(resolve_log)
    assert n_forward >= 1, f"{op}: the forward under backend({backend!r}) chose no implementation"
    # The backward runs outside the context manager, where the requested backend is ``auto``.
    torch.autograd.grad([o.sum() for o in outs], ins)
    backward = resolve_log[n_forward:]
    assert backward, f"{op}: the backward chose no implementation"
    wrong = [entry for entry in resolve_log if entry[1] != backend]
    assert not wrong, f"{op}: calls not on backend {backend!r}: {wrong}"


def test_the_spy_sees_a_hard_coded_auto(resolve_log):
    """Negative control: a backward that asks for ``auto`` is caught by the log."""
    from fastvit_ops.ops import dwconv

    x, w = torch.randn(1, 2, 5, 5, dtype=torch.float64), torch.randn(2, 1, 3, 3, dtype=torch.float64)
    dwconv._op_backward(torch.randn(1, 2, 5, 5, dtype=torch.float64), x, w, None, 1, 1, 0, False, True, True,
                        "auto")
    assert resolve_log and resolve_log[-1][1] == "auto"
