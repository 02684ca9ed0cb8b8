"""downsampled_attention at FAT-B0..B3 and CvT-13 shapes: fused vs eager vs torch.compile vs SDPA.

Baselines come from ``fastvit_ops.benchmarks.attention`` (the same ones the CLI times). SDPA runs
with every backend PyTorch picks for the shape (on CUDA each of flash / efficient / math that
accepts it is timed separately; one that refuses the shape is skipped with its reason). On CUDA
the peak allocated memory of each call is attached to the benchmark's ``extra_info``.
"""
import contextlib

import pytest
import torch

from conftest import bench_batch, bench_device, compiled, synchronized, warm_up
from fastvit_ops.benchmarks import attention as cases
from fastvit_ops.benchmarks.timing import forward_backward_fn, forward_fn

CASES = cases.bench_cases(bench_batch(), bench_device())

if bench_device().type == "cuda":
    from torch.nn.attention import SDPBackend, sdpa_kernel
    SDPA_BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
                     "sdpa-math": SDPBackend.MATH}
else:
    SDPA_BACKENDS = {"sdpa": None}


def impl(case, which):
    if which == "eager":
        return case.eager, contextlib.nullcontext
    if which == "fused":
        return case.fused, contextlib.nullcontext
    if which == "compile":
        return compiled(case.eager), contextlib.nullcontext
    backend = SDPA_BACKENDS[which]
    return case.sdpa, (contextlib.nullcontext if backend is None else (lambda: sdpa_kernel([backend])))


@pytest.mark.parametrize("which", ["eager", "compile", "fused"] + list(SDPA_BACKENDS))
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case", CASES, ids=[c.shape for c in CASES])
def test_downsampled_attention(benchmark, case, pass_, which, device):
    benchmark.group = f"downsampled_attention {case.shape} {pass_}"
    inputs = case.make_inputs()
    fn_, ctx = impl(case, which)
    make = forward_fn if pass_ == "fwd" else forward_backward_fn
    fn = synchronized(make(fn_, inputs), device)
    with ctx():
        try:
            warm_up(benchmark, which, fn)  # past compiles; records what the column runs
        except RuntimeError as e:  # an SDPA backend that refuses this shape / dtype
            if which.startswith("sdpa"):
                pytest.skip(f"{which} does not accept this shape: {str(e).splitlines()[0]}")
            raise
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            fn()
            benchmark.extra_info["peak_allocated_MiB"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        if case.flops:
            benchmark.extra_info["flops"] = case.flops
            benchmark.extra_info["bytes"] = case.bytes
        out = benchmark(fn)
    assert out is not None
