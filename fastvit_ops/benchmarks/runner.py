"""What ``python -m fastvit_ops check`` and ``bench`` run: op checks, op timings, model throughput."""
from __future__ import annotations

import platform
from typing import Dict, List, Optional, Sequence

import torch

from .. import _availability as avail
from ..numerics import error_rule
from ..ops.dispatch import backend, backend_available
from . import Case, load, op_names
from .models import peak_memory_mib
from .timing import forward_backward_fn, forward_fn, interleaved_median_ms, max_error

def environment(device) -> Dict[str, str]:
    """Versions and device, recorded with every result."""
    dev = torch.device(device)
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "triton": avail.triton()[1] if avail.triton()[0] else "not installed",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine()),
        "cpu_threads": str(torch.get_num_threads()),
        "extension": "ok" if avail.extension()[0] is not None else "missing",
    }
    if dev.type == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        info["device"] = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
    return info


def backends_here(device) -> List[str]:
    """Backends that can run on ``device`` now (``reference`` first)."""
    return [b for b in ("reference", "cpu", "cuda", "triton") if backend_available(b, torch.device(device))[0]]


def _grads(f, inputs):
    out = f(*inputs)
    leaves = [t for t in inputs if t.requires_grad]
    g = torch.randn_like(out)
    return out, torch.autograd.grad(out, leaves, g) if leaves else (), g


def _exact_inputs(inputs):
    return [t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t
            for t in inputs]


def check_case(case: Case, name: str) -> Dict:
    """Run ``case`` on backend ``name`` and apply the DESIGN.md numerics rule to the output and
    every gradient: the fused error vs the float64 result is at most 2× eager's in the same dtype,
    with torch.testing's tolerances at the tensor's scale as the floor (``error_rule(...,
    floor="tensor")``: the check shapes are tiny, so a bias gradient has a dozen elements). Reported
    errors are fused vs eager."""
    inputs = case.make_inputs()
    leaves = [t for t in inputs if t.requires_grad]
    out_ref = case.eager(*inputs)
    gout = torch.randn_like(out_ref)
    grads_ref = torch.autograd.grad(out_ref, leaves, gout) if case.backward and leaves else ()
    exact_in = _exact_inputs(inputs)
    exact_leaves = [t for t in exact_in if t.requires_grad]
    exact = case.eager(*exact_in)
    grads_exact = torch.autograd.grad(exact, exact_leaves, gout.double()) if case.backward and leaves else ()
    with backend(name):
        out = case.fused(*inputs)
        grads = torch.autograd.grad(out, leaves, gout) if case.backward and leaves else ()
    ok = out.shape == out_ref.shape and error_rule(out, out_ref, exact, floor="tensor").ok
    for a, b, e in zip(grads, grads_ref, grads_exact):
        ok = ok and error_rule(a, b, e, floor="tensor").ok
    return {
        "op": case.op, "shape": case.shape, "backend": name,
        "forward_max_error": max_error(out, out_ref),
        "backward_max_error": max((max_error(a, b) for a, b in zip(grads, grads_ref)), default=0.0),
        "ok": bool(ok),
    }


def run_checks(device, ops: Optional[Sequence[str]] = None, progress=None) -> List[Dict]:
    rows = []
    names = backends_here(device)
    for op in ops or op_names():
        for case in load(op).check_cases(device):
            for name in names:
                rows.append(check_case(case, name))
                if progress:
                    progress()
    return rows


def bench_case(case: Case, device, compile_: bool = True, reps: int = 20, max_seconds: float = 2.0) -> List[Dict]:
    """Time eager / torch.compile(eager) / fused for the forward and, if any, forward+backward
    (whose row also holds ``eager_peak_mib`` / ``fused_peak_mib``: the step's peak memory)."""
    # Fresh dynamo caches per case: cases of one op share their eager functions' code objects, and
    # past the recompile limit torch.compile silently falls back to eager.
    torch._dynamo.reset()
    inputs = case.make_inputs()
    eager_out = case.eager(*inputs)
    fused_out = case.fused(*inputs)
    err = max_error(fused_out, eager_out)
    compiled = torch.compile(case.eager) if compile_ else None
    rows = []
    passes = [("fwd", forward_fn)] + ([("fwd+bwd", forward_backward_fn)] if case.backward else [])
    for label, make in passes:
        fns = {"eager": make(case.eager, inputs), "fused": make(case.fused, inputs)}
        if compiled is not None:
            fns["compile"] = make(compiled, inputs)
        t = interleaved_median_ms(fns, device, reps=reps, max_seconds=3 * max_seconds)
        row = {"op": case.op, "shape": case.shape, "pass": label, "eager_ms": t["eager"],
               "compile_ms": t.get("compile"), "fused_ms": t["fused"],
               "speedup_vs_eager": t["eager"] / t["fused"],
               "speedup_vs_compile": (t["compile"] / t["fused"]) if "compile" in t else None,
               "max_error": err}
        if label == "fwd+bwd":  # peak memory of one step, above what was live before it
            row["eager_peak_mib"] = peak_memory_mib(make(case.eager, inputs), device)
            row["fused_peak_mib"] = peak_memory_mib(make(case.fused, inputs), device)
        if label == "fwd" and case.bytes:
            row["fused_GBps"] = case.bytes / (t["fused"] * 1e-3) / 1e9
        if label == "fwd" and case.flops:
            row["fused_TFLOPs"] = case.flops / (t["fused"] * 1e-3) / 1e12
        rows.append(row)
    return rows
