"""What a benchmark column really ran: the implementations the fused ops chose, and whether the
torch.compile column compiled.

``auto`` resolves per device and per call (the C++ kernels, PyTorch's oneDNN forward where it timed
faster, plain eager PyTorch on CUDA), and ``torch.compile`` silently runs eager code past its
recompile limit; a table that says "fused" or "compile" should say which. Used by the
pytest-benchmark suites (``extra_info``), the sweep scripts and ``python -m fastvit_ops bench``.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
from typing import Callable, Counter, Iterator

import torch

from ..ops import dispatch


@contextlib.contextmanager
def recording() -> Iterator[Counter[str]]:
    """Count, while the block runs, each implementation the dispatch registry chooses
    (:func:`fastvit_ops.ops.dispatch.recording`): ``"<op> <stage>: <implementation>"``, e.g.
    ``"dwconv2d call: cpu_autograd"`` (the C++ autograd fast path), ``"dwconv2d forward: onednn"``
    (oneDNN's forward, where ``auto`` timed it faster) or ``"... call: eager"`` (``auto`` ran the
    reference composition as plain eager PyTorch)."""
    seen: Counter[str] = collections.Counter()
    with dispatch.recording() as choices:
        try:
            yield seen
        finally:
            for c in choices:
                seen[f"{c.op} {c.stage}: {c.impl.name}"] += 1


def describe(seen: Counter[str]) -> str:
    """One line: the choices seen, most frequent first (or that no op of ours ran)."""
    if not seen:
        return "no fastvit_ops op (plain PyTorch)"
    return "; ".join(f"{k} ×{n}" for k, n in seen.most_common())


def fused_implementation(fn: Callable[[], object]) -> str:
    """Run ``fn`` once and describe what the fused ops in it ran."""
    with recording() as seen:
        fn()
    return describe(seen)


def compiled_graphs(fn: Callable[[], object]) -> int:
    """Run ``fn`` once; the number of graphs torch.compile captured meanwhile (0: it ran eagerly)."""
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    fn()
    return counters["stats"]["unique_graphs"] - before


def inductor_vec_isa() -> str:
    """The SIMD level torch.compile's C++ kernels are generated for on this CPU, e.g. ``"avx2"`` or
    ``"avx512"`` (it follows ``ATEN_CPU_CAPABILITY``); ``"none"`` for scalar code."""
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa
    except ImportError:  # pragma: no cover - older torch
        return "unknown"
    # The probe imports torch.utils.cpp_extension, which warns "No CUDA runtime is found" at import
    # wherever a CUDA toolkit is installed without a GPU: not the bench's business, so not printed.
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return str(pick_vec_isa()) or "none"
    finally:
        log.setLevel(level)


def isolate_inductor_cache() -> str:
    """Point torch.compile's on-disk caches at a folder of their own per SIMD level, and return it.

    Inductor's FX graph cache key does not include the vector ISA it generated for: a run with
    ``ATEN_CPU_CAPABILITY=avx2`` on an AVX-512 machine gets the AVX-512 kernels cached by an earlier
    run (and the other way round), so a "forced AVX2" compile column would time AVX-512 code
    (measured: the gate at FAT-B0 s1 forward, 0.32 ms from the shared cache, 0.66 ms compiled for
    AVX2). Call before the first compile; a user-set ``TORCHINDUCTOR_CACHE_DIR`` is the parent."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # pragma: no cover - older torch
        return os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")
    base = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()
    tag = "vec_" + inductor_vec_isa().replace(" ", "_")  # may itself create the default cache dir
    if os.path.basename(os.path.normpath(base)) != tag:
        base = os.path.join(base, tag)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = base
    return base


def fresh_compile(fn: Callable, **compile_kwargs) -> Callable:
    """``torch.compile(fn, **compile_kwargs)`` after ``torch._dynamo.reset()``: benchmark cases
    share their eager functions' code objects, and past the recompile limit torch.compile falls
    back to eager silently, so every case compiles from empty caches (the on-disk ones kept per
    SIMD level, :func:`isolate_inductor_cache`)."""
    isolate_inductor_cache()
    torch._dynamo.reset()
    return torch.compile(fn, **compile_kwargs)


__all__ = ["recording", "describe", "fused_implementation", "compiled_graphs", "fresh_compile",
           "inductor_vec_isa", "isolate_inductor_cache"]
