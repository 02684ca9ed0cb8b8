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
from ..ops import dwconv as _dwconv


@contextlib.contextmanager
def recording() -> Iterator[Counter[str]]:
    """Count, while the block runs, each implementation choice the ops make: ``"<op>: <backend>"``
    for a custom op's forward or backward, ``"eager PyTorch"`` where ``auto`` runs the reference
    composition as plain PyTorch, ``"C++ autograd fast path"`` / ``"C++ inference fast path"`` for
    the eager CPU shortcuts, and ``"dwconv2d cpu forward: onednn"`` (or ``cpu``) for the timed
    choice of the depthwise conv's CPU forward. Not thread-safe (it wraps module functions)."""
    seen: Counter[str] = collections.Counter()
    saved = []

    def wrap(module, name: str, label: Callable):
        real = getattr(module, name)

        def spy(*args, **kwargs):
            result = real(*args, **kwargs)
            text = label(result, *args)
            if text:
                seen[text] += 1
            return result
        saved.append((module, name, real))
        setattr(module, name, spy)

    wrap(dispatch, "resolve", lambda r, op, *a: f"{op}: {r[0]}")
    wrap(dispatch, "eager_reference", lambda r, *a: "eager PyTorch" if r else "")
    wrap(dispatch, "eager_cpu", lambda r, *a: "C++ autograd fast path" if r else "")
    wrap(dispatch, "no_grad_cpu", lambda r, *a: "C++ inference fast path" if r else "")
    wrap(_dwconv, "cpu_forward_choice", lambda r, *a: f"dwconv2d cpu forward: {r}")
    try:
        yield seen
    finally:
        for module, name, real in reversed(saved):
            setattr(module, name, real)


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
