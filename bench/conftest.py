"""pytest-benchmark suites: fused vs eager vs torch.compile at the real layer shapes.

Run: ``python -m pytest bench --benchmark-group-by=group`` (add ``--benchmark-json out.json`` to
keep results). ``FASTVIT_BENCH_BATCH`` overrides the batch (default 64 on a GPU, 8 on a CPU);
``FASTVIT_BENCH_DEVICE`` the device. Each timed call synchronizes CUDA.
"""
import os

import pytest
import torch

from fastvit_ops.benchmarks.shapes import default_batch


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


@pytest.fixture
def device():
    return bench_device()
