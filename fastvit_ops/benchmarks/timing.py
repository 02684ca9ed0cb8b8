"""Timing helpers: medians of wall time, CUDA-synchronized, after warm-up past JIT compiles."""
from __future__ import annotations

import itertools
import random
import statistics
import time
from typing import Callable, Dict, Sequence

import torch


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device, warmup: int = 3, reps: int = 20,
              max_seconds: float = 2.0) -> float:
    """Median wall time of ``fn()`` in milliseconds.

    Runs ``warmup`` calls first (compiles, autotuning, allocator), then up to ``reps`` timed
    calls, stopping early once ``max_seconds`` of timed calls have passed (at least 3 calls).
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start = time.perf_counter()
    for i in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        if i >= 2 and time.perf_counter() - start > max_seconds:
            break
    return statistics.median(times)


def round_orders(fns: Dict[str, Callable[[], object]]) -> list:
    """The order of ``fns``' items in each timing round: every permutation once, in a fixed
    shuffle, so no function always follows the same one (see :func:`interleaved_median_ms`)."""
    orders = list(itertools.permutations(fns.items()))
    random.Random(0).shuffle(orders)
    return orders


def interleaved_median_ms(fns: Dict[str, Callable[[], object]], device, warmup: int = 3, reps: int = 20,
                          max_seconds: float = 6.0) -> Dict[str, float]:
    """Median wall time (ms) of each ``fns[name]()``, timed in interleaved rounds.

    Every round times one call of each function in turn, so a slow spell of a shared or
    frequency-scaling machine lands on all of them alike instead of on whichever was being
    timed (one after the other, ratios on the 2-core CI VM moved by ±40% between runs). The rounds
    go through the orders of the functions (a fixed shuffle of all permutations): a function that sweeps the caches
    (eager PyTorch's temporaries) would otherwise always hand a cold L2/L3 to the same
    successor, which is then timed on inputs fetched from DRAM in every round (at FAT-B0 s1 the
    fused gate's fwd+bwd measured 1.42 ms right after eager's, 1.09 ms otherwise, on AVX2).
    Runs ``warmup`` calls of each first, then up to ``reps`` rounds, stopping once
    ``max_seconds`` have passed (at least 3 rounds).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: Dict[str, list] = {name: [] for name in fns}
    orders = round_orders(fns)
    start = time.perf_counter()
    for i in range(reps):
        for name, fn in orders[i % len(orders)]:
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
        if i >= 2 and time.perf_counter() - start > max_seconds:
            break
    return {name: statistics.median(ts) for name, ts in times.items()}


def forward_fn(f: Callable, inputs: Sequence[torch.Tensor]) -> Callable[[], object]:
    """``f(*inputs)`` without building a graph."""
    def run():
        with torch.no_grad():
            return f(*inputs)
    return run


def forward_backward_fn(f: Callable, inputs: Sequence[torch.Tensor]) -> Callable[[], object]:
    """``f(*inputs)`` then the gradients w.r.t. every input that requires grad (no accumulation)."""
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grad_out = {}

    def run():
        out = f(*inputs)
        if "g" not in grad_out:
            grad_out["g"] = torch.randn_like(out)
        return torch.autograd.grad(out, leaves, grad_out["g"])
    return run


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
