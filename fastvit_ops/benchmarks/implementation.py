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


def fresh_compile(fn: Callable) -> Callable:
    """``torch.compile(fn)`` after ``torch._dynamo.reset()``: benchmark cases share their eager
    functions' code objects, and past the recompile limit torch.compile falls back to eager
    silently, so every case compiles from empty caches."""
    torch._dynamo.reset()
    return torch.compile(fn)


__all__ = ["recording", "describe", "fused_implementation", "compiled_graphs", "fresh_compile"]
