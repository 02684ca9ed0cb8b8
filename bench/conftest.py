"""pytest-benchmark suites: fused vs eager vs torch.compile at the real layer shapes.

Run: ``python -m pytest bench --benchmark-group-by=group`` (add ``--benchmark-json out.json`` to
keep results). ``FASTVIT_BENCH_BATCH`` overrides the batch (default 64 on a GPU, 8 on a CPU);
``FASTVIT_BENCH_DEVICE`` the device. Each timed call synchronizes CUDA.
"""
import os

import pytest
import torch

from fastvit_ops.benchmarks.allocator import steady_heap
from fastvit_ops.benchmarks.implementation import compiled_graphs, describe, fresh_compile, recording
from fastvit_ops.benchmarks.shapes import default_batch

steady_heap()  # every benchmark timed with the same heap state (fastvit_ops.benchmarks.allocator)


def bench_device() -> torch.device:
    return torch.device(os.environ.get("FASTVIT_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


def bench_batch() -> int:
    return int(os.environ.get("FASTVIT_BENCH_BATCH") or default_batch(bench_device()))


def synchronized(fn, device):
    """``fn`` followed by a CUDA synchronize, so the timer sees the kernels finish."""
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out
    return run


def compiled(fn):
    """``torch.compile(fn)`` from empty dynamo caches, per benchmark (the cases share code objects;
    past the recompile limit torch.compile would run them eagerly, silently)."""
    return fresh_compile(fn)


def warm_up(benchmark, which: str, run):
    """Run ``run`` once before timing and record in ``extra_info`` what the column runs: for
    ``fused``, the implementations our ops chose (``fused_impl``: backend, C++ fast path, oneDNN
    or our depthwise forward, plain eager PyTorch); for ``compile``, the graphs torch.compile
    captured (``compiled_graphs``; none means it ran eagerly, which fails the benchmark)."""
    if which == "fused":
        with recording() as seen:
            out = run()
        benchmark.extra_info["fused_impl"] = describe(seen)
        return out
    if which == "compile":
        box = []
        graphs = compiled_graphs(lambda: box.append(run()))
        benchmark.extra_info["compiled_graphs"] = graphs
        assert graphs > 0, "torch.compile captured no graph: the compile column would time eager code"
        return box[0]
    return run()


@pytest.fixture
def device():
    return bench_device()
