"""pytest-benchmark: FCViT global context (``x + GC(x)``) and the FCViT token mixer, fused vs eager
vs torch.compile(eager), forward and forward+backward, grouped by op, shape and pass.

    pytest bench/test_bench_global_context.py --benchmark-group-by=group      # measure
    pytest bench/test_bench_global_context.py --benchmark-disable             # quick check

Shapes: FCViT-tiny and FCViT-B12 stages at 224² (``fastvit_ops.benchmarks.shapes``), batch 64 on
a GPU and 8 on a CPU (``FASTVIT_BENCH_BATCH`` / ``FASTVIT_BENCH_DEVICE`` override). With
``--benchmark-disable`` every test runs once on a small shape of the same op and checks
fused == eager instead of timing.
"""
import pytest
import torch

from conftest import bench_batch, bench_device, compiled, warm_up
from fastvit_ops.benchmarks import global_context as bgc

DEVICE = bench_device()
CASES = bgc.bench_cases(bench_batch(), DEVICE)
SMALL = {c.op: c for c in reversed(bgc.check_cases(DEVICE))}  # first check case of each op


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _impl(case, name):
    if name == "fused":
        return case.fused
    if name == "eager":
        return case.eager
    return compiled(case.eager)


def _runner(fn, inputs, mode, dy=None):
    if mode == "forward":
        def run():
            with torch.no_grad():
                out = fn(*inputs)
            _sync()
            return out
        return run
    leaves = [t for t in inputs if t.requires_grad]
    if dy is None:
        with torch.no_grad():
            dy = torch.randn_like(fn(*inputs))

    def run():
        grads = torch.autograd.grad(fn(*inputs), leaves, dy)
        _sync()
        return grads
    return run


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("impl", ["fused", "eager", "compile"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.shape}" for c in CASES])
def test_bench(benchmark, case, impl, mode):
    if benchmark.disabled:
        case = SMALL[case.op]
    inputs = case.make_inputs()
    with torch.no_grad():
        dy = torch.randn_like(case.eager(*inputs))
    run = _runner(_impl(case, impl), inputs, mode, dy)
    warm_up(benchmark, impl, run)  # past torch.compile / Triton JIT; records what the column runs
    run()  # and the allocator
    benchmark.group = f"{case.op} {case.shape} {mode}"
    benchmark.extra_info.update(op=case.op, shape=case.shape, impl=impl, mode=mode,
                                device=torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu",
                                threads=torch.get_num_threads(), torch=torch.__version__)
    got = benchmark(run)
    if benchmark.disabled:
        want = _runner(case.eager, inputs, mode, dy)()
        for a, b in zip(got if isinstance(got, tuple) else (got,),
                        want if isinstance(want, tuple) else (want,)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
