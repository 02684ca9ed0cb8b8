"""sigmoid_cross_modulation at the FAT-B0 stage shapes: fused vs eager vs torch.compile(eager).

Baselines come from ``fastvit_ops.benchmarks.cross_modulation`` (the same ones the CLI times).
"""
import pytest
import torch

from conftest import bench_batch, bench_device, synchronized
from fastvit_ops.benchmarks import cross_modulation as cases
from fastvit_ops.benchmarks.timing import forward_backward_fn, forward_fn

CASES = cases.bench_cases(bench_batch(), bench_device())
_compiled = {}


def impl(name):
    if name == "eager":
        return cases.eager
    if name == "fused":
        return cases.fused
    if "compile" not in _compiled:
        _compiled["compile"] = torch.compile(cases.eager)
    return _compiled["compile"]


@pytest.mark.parametrize("which", ["eager", "compile", "fused"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case", CASES, ids=[c.shape for c in CASES])
def test_cross_modulation(benchmark, case, pass_, which, device):
    benchmark.group = f"sigmoid_cross_modulation {case.shape} {pass_}"
    inputs = case.make_inputs()
    make = forward_fn if pass_ == "fwd" else forward_backward_fn
    fn = synchronized(make(impl(which), inputs), device)
    fn()  # warm up past compiles before timing
    out = benchmark(fn)
    assert out is not None
