"""pytest-benchmark: the whole FASA module (``fastvit_ops.nn.FASA`` vs the reference ``FASA`` eager
and torch.compile), FAT-B0 stages at 224², eval forward and train forward / forward+backward.

    pytest bench/test_bench_fasa.py --benchmark-group-by=group      # measure
    pytest bench/test_bench_fasa.py --benchmark-disable             # quick check

Batch 64 on a GPU and 8 on a CPU (``FASTVIT_BENCH_BATCH`` / ``FASTVIT_BENCH_DEVICE``). The peak
memory of one forward+backward step is attached to ``extra_info``. With ``--benchmark-disable``
every test runs once on a small shape and checks fused == eager instead of timing.
"""
import pytest
import torch

from conftest import bench_batch, bench_device, compiled, synchronized, warm_up
from fastvit_ops.benchmarks import fasa
from fastvit_ops.benchmarks.models import peak_memory_mib
from fastvit_ops.benchmarks.timing import forward_backward_fn, forward_fn

DEVICE = bench_device()
CASES = fasa.bench_cases(bench_batch(), DEVICE)
SMALL = {c.backward: c for c in fasa.check_cases(DEVICE)}  # an eval and a train case
def _impl(case, name):
    if name != "compile":
        return case.fused if name == "fused" else case.eager
    return compiled(case.eager)


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["fused", "eager", "compile"])
@pytest.mark.parametrize("case", CASES, ids=[c.shape for c in CASES])
def test_fasa_module(benchmark, case, impl, pass_):
    if pass_ == "fwd+bwd" and not case.backward:
        pytest.skip("eval cases time the forward only")
    if benchmark.disabled:
        case = SMALL[case.backward]
    inputs = case.make_inputs()
    make = forward_fn if pass_ == "fwd" else forward_backward_fn
    run = synchronized(make(_impl(case, impl), inputs), DEVICE)
    warm_up(benchmark, impl, run)  # past torch.compile / Triton JIT; records what the column runs
    run()  # and the allocator
    benchmark.group = f"fasa_module {case.shape} {pass_}"
    benchmark.extra_info.update(shape=case.shape, impl=impl, pass_=pass_, torch=torch.__version__,
                                threads=torch.get_num_threads())
    if pass_ == "fwd+bwd":
        benchmark.extra_info["peak_MiB"] = peak_memory_mib(run, DEVICE)
    benchmark(run)
    if benchmark.disabled:
        torch.testing.assert_close(case.fused(*inputs), case.eager(*inputs), rtol=1e-4, atol=1e-5)
