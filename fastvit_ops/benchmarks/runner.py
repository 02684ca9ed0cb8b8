"""What ``python -m fastvit_ops check`` and ``bench`` run: op checks, op timings, model throughput."""
from __future__ import annotations

import os
import platform
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import _availability as avail
from .. import numerics
from ..numerics import RuleResult, error_rule
from ..ops.dispatch import backend, backend_available, backend_names, get_backend
from . import Case, load, op_names
from . import allocator
from .implementation import compiled_graphs, fresh_compile, fused_implementation, inductor_vec_isa
from .models import peak_memory_mib
from .timing import forward_backward_fn, forward_fn, interleaved_median_ms, max_error

def isa_label(env: Dict[str, str]) -> str:
    """The SIMD level of a CPU result for titles: ours and ATen's, e.g. ``"avx2 / ATen AVX2"``."""
    if "cpu_capability" not in env:
        return ""
    return f"{env['cpu_capability']} / ATen {env['aten_cpu_capability']}"


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
        "backend": get_backend(),  # what the "fused" column ran (FASTVIT_OPS_BACKEND / backend())
    }
    if dev.type == "cpu":
        # Which SIMD build runs on each side: ours (FASTVIT_OPS_CPU_CAPABILITY), ATen's
        # (ATEN_CPU_CAPABILITY) and oneDNN's ceiling (ONEDNN_MAX_CPU_ISA, unset = the CPU's best).
        cap = avail.cpu_capability()
        info["cpu_capability"] = cap["in_use"] if cap else "no extension"
        info["cpu_isa"] = cap["cpu"] if cap else "unknown"
        info["aten_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["onednn_max_cpu_isa"] = os.environ.get("ONEDNN_MAX_CPU_ISA", "") or "default"
        info["inductor_vec_isa"] = inductor_vec_isa()  # what the torch.compile column generates
        info["malloc"] = allocator.state()  # large buffers from the heap or fresh mmaps (allocator.py)
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        info["device"] = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
    return info


def backends_here(device, fused_only: bool = False) -> List[str]:
    """Backends that can run on ``device`` now (``reference`` first, left out with ``fused_only``)."""
    names = sorted(backend_names(), key=lambda n: n != "reference")
    if fused_only:
        names = [n for n in names if n != "reference"]
    return [b for b in names if backend_available(b, torch.device(device))[0]]


def check_cases(op: str, device, real_shapes: Optional[Tuple[int, torch.dtype]] = None) -> List[Case]:
    """``op``'s small check cases, or with ``real_shapes=(batch, dtype)`` its bench (layer) shapes."""
    if real_shapes is None:
        return load(op).check_cases(device)
    batch, dtype = real_shapes
    return load(op).bench_cases(batch, device, dtype)


def _grads(f, inputs):
    out = f(*inputs)
    leaves = [t for t in inputs if t.requires_grad]
    g = torch.randn_like(out)
    return out, torch.autograd.grad(out, leaves, g) if leaves else (), g


def _exact_inputs(inputs):
    return [t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t
            for t in inputs]


def _judge(fused, eager, exact, factor: float = numerics.FACTOR) -> RuleResult:
    """The error rule (``eager``: one or several evaluations; ``factor``: the case's); for float64,
    where eager *is* the float64 result, agreement to 1e-10 of the tensor's scale."""
    if fused.dtype != torch.float64:
        return error_rule(fused, eager, exact, factor)
    if fused.numel() == 0:
        return RuleResult(True, 0.0, 0.0, 0)
    err = (fused.detach() - exact.detach()).abs()
    allowed = 1e-10 * max(1.0, exact.detach().abs().max().item())
    bad = int((~(err <= allowed)).sum())
    return RuleResult(bad == 0, err.max().item(), 0.0, bad)


#: check_case pools MIN_INSTANCES instances, more until its smallest tensor has POOL_ELEMENTS
#: elements (at most MAX_INSTANCES).
POOL_ELEMENTS = 128
MIN_INSTANCES = 4
MAX_INSTANCES = 16


def _channels_last(inputs):
    return [t.detach().contiguous(memory_format=torch.channels_last).requires_grad_(t.requires_grad)
            if t.dim() == 4 else t for t in inputs]


def _instance(case: Case, name: str):
    """One random instance: ([fused output, gradients...], [[eager ...], ...], [float64 ...]). Eager
    also runs on channels_last copies of 4-D inputs (another summation order inside PyTorch's
    kernels) and as the case's ``eager_variants`` (equally valid rewritings, e.g. attention's scale
    folded elsewhere): equally valid yardsticks, the largest error counts."""
    inputs = case.make_inputs()
    leaves = [t for t in inputs if t.requires_grad]
    out_ref = case.eager(*inputs)
    gout = torch.randn_like(out_ref)
    evaluations = []
    runs = [(case.eager, inputs)] + [(case.eager, _channels_last(inputs))] * any(t.dim() == 4 for t in inputs)
    runs += [(fn, inputs) for fn in getattr(case, "eager_variants", ())]
    for i, (fn, ins) in enumerate(runs):
        ref = out_ref if i == 0 else fn(*ins)
        wrt = [t for t in ins if t.requires_grad]
        evaluations.append([ref.detach(), *(torch.autograd.grad(ref, wrt, gout) if case.backward and wrt else ())])
    exact_in = _exact_inputs(inputs)
    exact_leaves = [t for t in exact_in if t.requires_grad]
    exact = case.eager(*exact_in)
    grads_exact = torch.autograd.grad(exact, exact_leaves, gout.double()) if case.backward and leaves else ()
    with backend(name):
        out = case.fused(*inputs)
        grads = torch.autograd.grad(out, leaves, gout) if case.backward and leaves else ()
    if out.shape != out_ref.shape:
        raise ValueError(f"fused output shape {tuple(out.shape)}, eager {tuple(out_ref.shape)}")
    return [out.detach(), *grads], evaluations, [exact.detach(), *grads_exact]


def check_case(case: Case, name: str) -> Dict:
    """Run ``case`` on backend ``name`` and apply the error rule of docs/numerics.md to the output and
    every gradient: the fused error vs the float64 result is at most 2× eager's in the same dtype
    (``case.factor``: 4× for a whole block such as the FCViT token mixer, docs/numerics.md),
    in its largest and its RMS error, with a few ulp of the tensor's scale as the floor
    (:func:`fastvit_ops.numerics.error_rule`). The check shapes are tiny, and over a handful of
    elements (a bias gradient of 8 channels) the largest error of two equally good roundings is a
    toss-up, and one outlier element decides it on larger ones; so ``MIN_INSTANCES`` instances
    (new random inputs) are pooled, more until the smallest tensor has ``POOL_ELEMENTS``
    elements, and each tensor is judged over all of them. Reported errors are
    fused vs eager (first instance)."""
    runs = [_instance(case, name)]
    smallest = min((t.numel() for t in runs[0][0] if t.numel()), default=POOL_ELEMENTS)
    n = min(MAX_INSTANCES, max(MIN_INSTANCES, -(-POOL_ELEMENTS // smallest)))
    runs += [_instance(case, name) for _ in range(n - 1)]
    rules = []
    for i in range(len(runs[0][0])):
        fused, exact = (torch.cat([r[j][i].reshape(-1) for r in runs]) for j in (0, 2))
        eager = [torch.cat([r[1][k][i].reshape(-1) for r in runs]) for k in range(len(runs[0][1]))]
        rules.append(_judge(fused, eager, exact, case.factor))
    ok = all(r.ok for r in rules)
    # The worst result (largest fused error over the allowed one), for the JSON: fused and eager
    # errors vs float64 of the output (index 0) or of the i-th gradient.
    worst = max(range(len(rules)), key=lambda i: rules[i].fused_error / max(rules[i].eager_error, 1e-30),
                default=None)
    first_fused, first_eager = runs[0][0], runs[0][1][0]
    return {
        "op": case.op, "shape": case.shape, "backend": name, "instances": len(runs),
        "forward_max_error": max_error(first_fused[0], first_eager[0]),
        "backward_max_error": max((max_error(a, b) for a, b in zip(first_fused[1:], first_eager[1:])), default=0.0),
        "ok": bool(ok),
        "failed_tensors": [i for i, r in enumerate(rules) if not r.ok],
        "worst_tensor": worst,
        "worst_fused_vs_float64": rules[worst].fused_error if worst is not None else None,
        "worst_eager_vs_float64": rules[worst].eager_error if worst is not None else None,
    }


def run_checks(device, ops: Optional[Sequence[str]] = None, progress=None,
               real_shapes: Optional[Tuple[int, torch.dtype]] = None, log=None) -> List[Dict]:
    """:func:`check_case` for every case of ``ops`` on every backend here. An exception inside a
    case (a kernel that fails to compile or launch) is a failed row with its message, not the end
    of the run. ``real_shapes=(batch, dtype)``: the layer shapes, fused backends only."""
    rows = []
    names = backends_here(device, fused_only=real_shapes is not None)
    for op in ops or op_names():
        for case in check_cases(op, device, real_shapes):
            for name in names:
                try:
                    row = check_case(case, name)
                except Exception as e:  # noqa: BLE001  (reported, and the run goes on)
                    row = {"op": case.op, "shape": case.shape, "backend": name, "forward_max_error": float("nan"),
                           "backward_max_error": float("nan"), "ok": False,
                           "error": f"{type(e).__name__}: {e}"[:500]}
                rows.append(row)
                if log:
                    log(f"{row['op']} {row['shape']} {name}: {'ok' if row['ok'] else 'FAIL'} "
                        f"{row.get('error', '')}")
                if progress:
                    progress()
    return rows


def bench_case(case: Case, device, compile_: bool = True, reps: int = 20, max_seconds: float = 2.0) -> List[Dict]:
    """Time eager / torch.compile(eager) / fused for the forward and, if any, forward+backward
    (whose row also holds ``eager_peak_mib`` / ``fused_peak_mib``: the step's peak memory)."""
    inputs = case.make_inputs()
    eager_out = case.eager(*inputs)
    fused_out = case.fused(*inputs)
    err = max_error(fused_out, eager_out)
    compiled = fresh_compile(case.eager) if compile_ else None  # empty dynamo caches, per-ISA disk cache
    rows = []
    passes = [("fwd", forward_fn)] + ([("fwd+bwd", forward_backward_fn)] if case.backward else [])
    for label, make in passes:
        fns = {"eager": make(case.eager, inputs), "fused": make(case.fused, inputs)}
        if compiled is not None:
            fns["compile"] = make(compiled, inputs)
        sdpa = getattr(case, "sdpa", None)  # the attention cases: F.scaled_dot_product_attention
        if sdpa is not None:
            fns["sdpa"] = make(sdpa, inputs)
        # What the columns run: our ops' choices (backend, C++ fast path, oneDNN's forward, plain
        # eager PyTorch) and whether torch.compile captured graphs (none: it timed eager code).
        fused_impl = fused_implementation(fns["fused"])
        graphs = compiled_graphs(fns["compile"]) if "compile" in fns else None
        t = interleaved_median_ms(fns, device, reps=reps, max_seconds=3 * max_seconds)
        row = {"op": case.op, "shape": case.shape, "pass": label, "eager_ms": t["eager"],
               "compile_ms": t.get("compile"), "fused_ms": t["fused"],
               "speedup_vs_eager": t["eager"] / t["fused"],
               "speedup_vs_compile": (t["compile"] / t["fused"]) if "compile" in t else None,
               "max_error": err, "sdpa_ms": t.get("sdpa"),
               "speedup_vs_sdpa": (t["sdpa"] / t["fused"]) if "sdpa" in t else None,
               "fused_impl": fused_impl, "compiled_graphs": graphs}
        if label == "fwd+bwd":  # peak memory of one step, above what was live before it
            row["eager_peak_mib"] = peak_memory_mib(make(case.eager, inputs), device)
            row["fused_peak_mib"] = peak_memory_mib(make(case.fused, inputs), device)
        if label == "fwd" and case.bytes:
            row["fused_GBps"] = case.bytes / (t["fused"] * 1e-3) / 1e9
        if label == "fwd" and case.flops:
            row["fused_TFLOPs"] = case.flops / (t["fused"] * 1e-3) / 1e12
        rows.append(row)
    return rows
