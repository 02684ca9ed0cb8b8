"""pytest-benchmark suite for dwconv2d: fused vs nn.Conv2d eager vs torch.compile(eager).

Forward and forward+backward at the FAT-B0 / FCViT-tiny layer shapes and the (B, 384, 32, 32)
sweep shape, one benchmark group per (pass, shape) so the three implementations sit side by side:

    pytest bench/test_bench_dwconv.py --benchmark-group-by=group --benchmark-columns=min,median,mean
    FASTVIT_BENCH_BATCH=4 pytest bench/test_bench_dwconv.py -k "sweep"

With ``--benchmark-disable`` (a smoke test) it runs each function once on a few small shapes
(batch 1; torch.compile on one of them only). ``FASTVIT_BENCH_BATCH`` / ``FASTVIT_BENCH_DEVICE``
as in bench/conftest.py, which takes seconds on a CPU.
"""
from __future__ import annotations

import pytest
import torch

from conftest import bench_batch, bench_device, compiled, synchronized, warm_up
from fastvit_ops.benchmarks import dwconv as cases_mod
from fastvit_ops.benchmarks.timing import forward_backward_fn, forward_fn

DEVICE = bench_device()
IMPLS = ("fused", "eager", "compile")
PASSES = ("fwd", "fwd+bwd")


def _smoke_cases():
    return [
        cases_mod.case((1, 256, 7, 7), 9, residual=True, device=DEVICE, label="FAT-B0 s4 CPE (1,256,7,7)"),
        cases_mod.case((1, 128, 56, 56), 5, stride=2, device=DEVICE, label="FAT-B0 s1 ConvFFN-down (1,128,56,56)"),
        cases_mod.case((1, 1280, 7, 7), 3, activation="gelu", device=DEVICE, label="FCViT-tiny s4 channel (1,1280,7,7)"),
        cases_mod.case((1, 384, 32, 32), 31, device=DEVICE, label="sweep (1,384,32,32)"),
    ]


def _smoke(config) -> bool:
    return bool(config.getoption("benchmark_disable", False))


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    if _smoke(metafunc.config):
        cases = _smoke_cases()
    else:
        cases = cases_mod.bench_cases(bench_batch(), DEVICE)
    metafunc.parametrize("case", cases, ids=[c.shape for c in cases])


def _impl(case, impl):
    if impl == "fused":
        return case.fused
    if impl == "eager":
        return case.eager
    return compiled(case.eager)


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", IMPLS)
def test_dwconv2d(benchmark, request, case, impl, pass_):
    if impl == "compile" and _smoke(request.config) and "CPE" not in case.shape:
        pytest.skip("smoke run: torch.compile is exercised on one shape only (each compile takes seconds)")
    benchmark.group = f"dwconv2d {pass_} {case.shape}"
    benchmark.extra_info.update({"impl": impl, "pass": pass_, "flops": case.flops, "bytes": case.bytes})
    inputs = case.make_inputs()
    fn = _impl(case, impl)
    run = synchronized(forward_fn(fn, inputs) if pass_ == "fwd" else forward_backward_fn(fn, inputs), DEVICE)
    out = warm_up(benchmark, impl, run)  # past compilation; records what the column runs
    if pass_ == "fwd":
        ref = case.eager(*inputs).detach()
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    benchmark(run)
