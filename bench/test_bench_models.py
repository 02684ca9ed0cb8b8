"""End to end: images/s of whole models, reference vs converted (fused), eager vs torch.compile.

Inference (eval, no grad) and a training step (forward, cross-entropy backward, SGD update) at
224². ``FASTVIT_BENCH_MODELS`` picks the models (comma-separated, or ``all``; default fat_b0,
fcvit_tiny, cvt_13). Images/s = batch / mean time; the step's peak memory is in ``extra_info``.
The same measurement, interleaved round by round, is ``python -m fastvit_ops bench --no-ops --train``.
"""
import copy
import os

import pytest
import torch

from conftest import bench_batch, bench_device, compiled, synchronized, warm_up
from fastvit_ops.benchmarks import models as mb


def _names():
    arg = os.environ.get("FASTVIT_BENCH_MODELS", "")
    if arg == "all":
        return list(mb.MODELS)
    return [m.strip() for m in arg.split(",") if m.strip()] or list(mb.DEFAULT_MODELS)


_built = {}


def _models(name, device):
    if name not in _built:
        _built.clear()  # one model's copies at a time
        _built[name] = mb.build(name, device)
    return _built[name]


@pytest.mark.parametrize("variant", mb.VARIANTS)
@pytest.mark.parametrize("mode", mb.MODES)
@pytest.mark.parametrize("name", _names())
def test_model(benchmark, name, mode, variant, device):
    benchmark.group = f"{name} {mode} batch {bench_batch()}"
    ref, fused = _models(name, device)
    model = copy.deepcopy(ref if variant.startswith("reference") else fused)
    x = torch.randn(bench_batch(), 3, 224, 224, device=device)
    target = torch.randint(0, 1000, (bench_batch(),), device=device)
    step = synchronized(mb.make_step(model, mode, x, target, compiled(model) if "compile" in variant else None),
                        device)
    which = "compile" if "compile" in variant else "fused" if variant.startswith("fused") else "eager"
    warm_up(benchmark, which, step)  # compile; records what the column runs
    benchmark.extra_info["peak_mib"] = mb.peak_memory_mib(step, device)
    out = benchmark(step)
    assert torch.isfinite(out).all()
