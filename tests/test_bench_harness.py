"""fastvit_ops.benchmarks.implementation: what a benchmark column really ran (the fused ops'
choices, the graphs torch.compile captured), and every case compiling from empty dynamo caches."""
import torch

import fastvit_ops
from fastvit_ops.benchmarks import implementation as impl


def _step(x, w):
    return fastvit_ops.dwconv2d(x, w).sum()


def test_fused_implementation_names_the_backend_that_ran():
    x, w = torch.randn(1, 4, 9, 9, requires_grad=True), torch.randn(4, 1, 3, 3, requires_grad=True)
    with fastvit_ops.backend("reference"):
        text = impl.fused_implementation(lambda: _step(x, w).backward())
    assert "dwconv2d forward: reference" in text and "dwconv2d backward: reference" in text, text
    assert impl.fused_implementation(lambda: (x * 2).sum()) == "no fastvit_ops op (plain PyTorch)"


def test_compiled_graphs_tells_compiled_from_eager():
    def f(x):
        return torch.sin(x) * 2

    x = torch.randn(8)
    assert impl.compiled_graphs(lambda: f(x)) == 0  # negative control: eager code
    torch._dynamo.reset()
    assert impl.compiled_graphs(lambda: torch.compile(f, backend="eager")(x)) > 0


def test_fresh_compile_resets_dynamo(monkeypatch):
    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    impl.fresh_compile(lambda x: x + 1)
    impl.fresh_compile(lambda x: x + 1)
    assert len(resets) == 2, "each benchmark case compiles from empty dynamo caches"
