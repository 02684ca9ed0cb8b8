"""sigmoid_cross_modulation at the FAT-B0 stage shapes: fused vs eager vs torch.compile(eager).

Baselines come from ``fastvit_ops.benchmarks.cross_modulation`` (the same ones the CLI times).
"""
import pytest

from conftest import bench_batch, bench_device, compiled, synchronized, warm_up
from fastvit_ops.benchmarks import cross_modulation as cases
from fastvit_ops.benchmarks.timing import forward_backward_fn, forward_fn

CASES = cases.bench_cases(bench_batch(), bench_device())


def impl(name):
    if name == "eager":
        return cases.eager
    if name == "fused":
        return cases.fused
    return compiled(cases.eager)


@pytest.mark.parametrize("which", ["eager", "compile", "fused"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case", CASES, ids=[c.shape for c in CASES])
def test_cross_modulation(benchmark, case, pass_, which, device):
    benchmark.group = f"sigmoid_cross_modulation {case.shape} {pass_}"
    inputs = case.make_inputs()
    make = forward_fn if pass_ == "fwd" else forward_backward_fn
    fn = synchronized(make(impl(which), inputs), device)
    warm_up(benchmark, which, fn)  # past compiles; records what the column runs
    out = benchmark(fn)
    assert out is not None
