"""End-to-end model throughput: reference vs converted (fused) models, eager and torch.compile.

For each model and mode (``inference``: eval, no grad; ``train``: forward + cross-entropy backward +
SGD step) the four variants run interleaved round by round, so a slow phase of a shared machine
hits them alike; each gets the median of its rounds as images/s and its peak memory:

* ``reference``          the reference model (the layers of docs/, as the authors wrote them), eager;
* ``reference_compile``  ``torch.compile(reference)``;
* ``fused``              ``fastvit_ops.convert(reference)`` (same weights), eager;
* ``fused_compile``      ``torch.compile(fastvit_ops.convert(reference))``.

Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU and, on a CPU, the high-water mark of
the tensor allocations the profiler records during one step (MiB, weights excluded).
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys
import time
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F

from .implementation import isolate_inductor_cache
from .timing import _sync, interleaved_median_ms, max_error

MODELS = ("fat_b0", "fat_b1", "fat_b2", "fat_b3", "fcvit_tiny", "fcvit_b12", "cvt_13", "vt_resnet18", "vt_resnet34")
DEFAULT_MODELS = ("fat_b0", "fcvit_tiny", "cvt_13")
MODES = ("inference", "train")
VARIANTS = ("reference", "reference_compile", "fused", "fused_compile")


def build(name: str, device, seed: int = 0):
    """(reference, converted) copies of model ``name`` with the same random weights."""
    from .. import convert, models

    torch.manual_seed(seed)
    ref = models.create(name, reference=True).to(device)
    return ref, convert(copy.deepcopy(ref))


def make_step(model: torch.nn.Module, mode: str, x: torch.Tensor, target: torch.Tensor,
              forward: Callable = None) -> Callable[[], torch.Tensor]:
    """One inference call or one training step (forward, cross-entropy backward, SGD update) of
    ``model``; ``forward`` (default ``model``) is what is called, e.g. ``torch.compile(model)``."""
    forward = model if forward is None else forward
    if mode == "inference":
        model.eval()

        def infer():
            with torch.no_grad():
                return forward(x)
        return infer
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def train():
        loss = F.cross_entropy(forward(x), target)
        loss.backward()
        opt.step()
        # Freed here, not at the next step's start, so a step's peak memory covers its own grads.
        opt.zero_grad(set_to_none=True)
        return loss
    return train


@contextlib.contextmanager
def _native_output_silenced():
    """Send the process's stdout/stderr file descriptors to /dev/null for the block: the profiler's
    native library prints its own start/stop trace lines and, without a GPU, a device-count error
    there, which Python's streams cannot intercept."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [null]:
            os.close(fd)


def peak_memory_mib(step: Callable[[], object], device) -> float:
    """Peak bytes allocated by tensors during one ``step()``, above what was live before it (MiB)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        step()
        torch.cuda.synchronize(dev)
        return (torch.cuda.max_memory_allocated(dev) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with _native_output_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:  # +bytes on allocation, -bytes on free
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def throughput(name: str, batch: int, device, mode: str = "inference", size: int = 224,
               variants: Sequence[str] = VARIANTS, rounds: int = 5, max_seconds: float = 20.0,
               autocast: torch.dtype = None) -> Dict:
    """Images/s, peak memory and compile time of each variant of ``name`` in ``mode`` (one row);
    ``autocast`` (bf16/fp16): every variant's step runs under ``torch.autocast`` in that dtype."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"variants: unknown {unknown}; expected some of {VARIANTS}")
    ref, fused = build(name, device)
    x = torch.randn(batch, 3, size, size, device=device)
    target = torch.randint(0, 1000, (batch,), device=device)
    with torch.no_grad():
        err = max_error(fused.eval()(x), ref.eval()(x))
    steps = {}
    row = {"model": name, "mode": mode, "batch": batch, "size": size, "max_logit_error": err,
           "autocast": str(autocast).replace("torch.", "") if autocast is not None else None}
    if any(v.endswith("compile") for v in variants):
        isolate_inductor_cache()
    for v in variants:
        base = ref if v.startswith("reference") else fused
        model = copy.deepcopy(base)  # each variant trains its own weights
        step = make_step(model, mode, x, target, torch.compile(model) if v.endswith("compile") else None)
        if autocast is not None:
            step = _autocast_step(step, x.device.type, autocast)
        t0 = time.perf_counter()
        try:
            step()  # compiles (when compiled), allocator warm-up
            step()
            _sync(device)
        except Exception as e:  # noqa: BLE001 — one variant's compiler failure must not lose the others
            # (torch 2.14.1's Inductor crashed compiling vt_resnet18's training step with ATen forced
            # to AVX2). The row records why; its images/s stay absent.
            row[f"{v}_error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            continue
        row[f"{v}_warmup_s"] = time.perf_counter() - t0
        row[f"{v}_peak_mib"] = peak_memory_mib(step, device)
        steps[v] = step
    times = interleaved_median_ms(steps, device, warmup=0, reps=rounds, max_seconds=max_seconds)
    for v, ms in times.items():
        row[f"{v}_img_s"] = batch / (ms * 1e-3)
    if "reference" in times:
        for v in times:
            row[f"{v}_speedup"] = row[f"{v}_img_s"] / row["reference_img_s"]
    return row


def _autocast_step(step, device_type: str, dtype: torch.dtype):
    def run():
        with torch.autocast(device_type, dtype=dtype):
            return step()
    return run


def run(names: Sequence[str], batch: int, device, modes: Sequence[str] = ("inference",),
        variants: Sequence[str] = VARIANTS, rounds: int = 5, max_seconds: float = 20.0,
        progress=None) -> List[Dict]:
    rows = []
    for name in names:
        for mode in modes:
            rows.append(throughput(name, batch, device, mode, variants=variants, rounds=rounds,
                                   max_seconds=max_seconds))
            if progress:
                progress()
    return rows
