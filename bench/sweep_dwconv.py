"""Kernel-size sweep for dwconv2d: fused vs nn.Conv2d (cuDNN / oneDNN) vs torch.compile.

For k in --ks on (batch, channels, size, size) — the RepLKNet shape (64, 384, 32, 32) on a GPU,
(8, 384, 32, 32) on a CPU — and optionally the FAT-B0 / FCViT-tiny layer shapes (--shapes), times
the forward, dgrad (backward to x only), wgrad (backward to weight and bias only), the full backward
and forward+backward. Prints a table (rich), writes JSON (every row plus the environment) and a PNG
of the speedup against k. Every number of one row is measured side by side in the same process, in
interleaved rounds. On a CPU the forward row also times nn.Conv2d on a channels_last copy of x
(oneDNN's fast depthwise layout) and reports the speedup over the best of eager NCHW, channels_last
and torch.compile ("× best").

    python bench/sweep_dwconv.py --quick
    python bench/sweep_dwconv.py --device cuda --dtype bf16 --json bench/results/dwconv_h100_bf16.json \
        --plot bench/results/dwconv_h100_bf16.png

On a GPU it also reports achieved GB/s and TFLOP/s of the fused forward and the fraction of the
device's floor (max(bytes / bandwidth, flops / peak)) it reaches, for the devices listed in PEAKS.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

import torch

import fastvit_ops  # noqa: F401  (registers the ops)
from fastvit_ops.benchmarks import dwconv as cases_mod
from fastvit_ops.benchmarks.implementation import compiled_graphs, fresh_compile, fused_implementation
from fastvit_ops.benchmarks.allocator import steady_heap
from fastvit_ops.benchmarks.runner import environment
from fastvit_ops.benchmarks.timing import interleaved_median_ms

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_KS = (3, 5, 7, 9, 11, 13, 17, 21, 27, 31)
QUICK_KS = (3, 7, 11, 31)
PASSES = ("fwd", "dgrad", "wgrad", "bwd", "fwd+bwd")
# Depthwise conv runs on CUDA cores (no tensor cores): peak non-tensor FLOP/s per dtype, and HBM GB/s.
PEAKS = {
    "H100": {"GBps": 3350.0, "TFLOPs": {"fp32": 67.0, "bf16": 134.0, "fp16": 134.0}},
    "H200": {"GBps": 4800.0, "TFLOPs": {"fp32": 67.0, "bf16": 134.0, "fp16": 134.0}},
    "A100": {"GBps": 2039.0, "TFLOPs": {"fp32": 19.5, "bf16": 39.0, "fp16": 78.0}},
}


def _peak(device_name: str):
    for key, val in PEAKS.items():
        if key in device_name:
            return val
    return None


def _timer(args, device):
    """Interleaved medians of a dict of passes (every column of one row timed side by side)."""
    def t(fns, slow=False):
        return interleaved_median_ms(fns, device, warmup=1 if (slow or args.quick) else 3,
                                     reps=3 if args.quick else args.reps,
                                     max_seconds=0.5 if args.quick else 3 * args.max_seconds)
    return t


def _pass_fn(fn, inputs, which):
    """A callable timing one pass; the backward-only passes reuse one retained forward graph."""
    x, w = inputs[0], inputs[1]
    rest = inputs[2:]
    if which == "fwd":
        def run():
            with torch.no_grad():
                return fn(*inputs)
        return run
    if which == "fwd+bwd":
        g = torch.randn_like(fn(*inputs).detach())

        def run():
            return torch.autograd.grad(fn(*inputs), inputs, g)
        return run
    wrt = {"dgrad": [x], "wgrad": [w, *rest], "bwd": list(inputs)}[which]
    # Only the tensors a pass differentiates require grad, so autograd skips the other gradients.
    ins = [t.detach().requires_grad_(any(t is u for u in wrt)) for t in inputs]
    wrt = [i for i, t in zip(ins, inputs) if any(t is u for u in wrt)]
    out = fn(*ins)
    g = torch.randn_like(out.detach())

    def run():
        return torch.autograd.grad(out, wrt, g, retain_graph=True)
    return run


def bench_case(case, args, device, dtype_name, k) -> List[Dict]:
    timer = _timer(args, device)
    inputs = case.make_inputs()
    compiled = fresh_compile(case.eager, dynamic=False)  # empty dynamo caches, per-ISA disk cache
    with torch.no_grad():
        err = (case.fused(*inputs).double() - case.eager(*inputs).double()).abs().max().item()
    peak = _peak(environment(device)["device"]) if torch.device(device).type == "cuda" else None
    rows = []
    for which in args.passes:
        slow = torch.device(device).type == "cpu" and which != "fwd" and k >= 21  # PyTorch's CPU backward
        # What the columns run: the fused one's implementation (our kernel or, under auto on a CPU,
        # oneDNN's forward where it timed faster), and the graphs torch.compile captured.
        fused_impl = fused_implementation(_pass_fn(case.fused, inputs, which))
        graphs = None if args.no_compile else compiled_graphs(_pass_fn(compiled, inputs, which))
        fns = {"fused": _pass_fn(case.fused, inputs, which), "eager": _pass_fn(case.eager, inputs, which)}
        if not args.no_compile:
            fns["compile"] = _pass_fn(compiled, inputs, which)
        if which == "fwd" and torch.device(device).type == "cpu" and inputs[0].is_contiguous():
            # nn.Conv2d on a channels_last copy of x: oneDNN's fast depthwise layout (its NCHW path
            # is several times slower at k >= 7), the best PyTorch does on a CPU.
            cl = [inputs[0].contiguous(memory_format=torch.channels_last)] + list(inputs[1:])
            fns["eager_channels_last"] = _pass_fn(case.eager, cl, which)
        times = timer(fns, slow=slow)
        flops = case.flops * {"fwd": 1, "dgrad": 1, "wgrad": 1, "bwd": 2, "fwd+bwd": 3}[which]
        row = {"shape": case.shape, "k": k, "pass": which, "dtype": dtype_name,
               "fused_ms": times["fused"], "eager_ms": times["eager"], "compile_ms": times.get("compile"),
               "speedup_vs_eager": times["eager"] / times["fused"],
               "speedup_vs_compile": times["compile"] / times["fused"] if "compile" in times else None,
               "fused_GFLOPs": flops / (times["fused"] * 1e-3) / 1e9,
               "eager_GFLOPs": flops / (times["eager"] * 1e-3) / 1e9,
               "forward_max_error": err, "fused_impl": fused_impl, "compiled_graphs": graphs}
        if "eager_channels_last" in times:
            best = min(t for n, t in times.items() if n != "fused")
            row.update({"eager_channels_last_ms": times["eager_channels_last"],
                        "speedup_vs_best_pytorch": best / times["fused"]})
        if which == "fwd" and peak is not None:
            floor_ms = max(case.bytes / (peak["GBps"] * 1e9), case.flops / (peak["TFLOPs"][dtype_name] * 1e12)) * 1e3
            row.update({"fused_GBps": case.bytes / (times["fused"] * 1e-3) / 1e9,
                        "fused_TFLOPs": case.flops / (times["fused"] * 1e-3) / 1e12,
                        "floor_ms": floor_ms, "fraction_of_floor": floor_ms / times["fused"]})
        rows.append(row)
    return rows


def print_table(rows, env):
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"dwconv2d — {env['device']}, torch {env['torch']}, {env['cpu_threads']} CPU threads")
    for col in ("shape", "pass", "eager ms", "compile ms", "fused ms", "× eager", "× compile", "× best", "fused GFLOP/s"):
        table.add_column(col, justify="left" if col in ("shape", "pass") else "right")
    for r in rows:
        comp = f"{r['compile_ms']:.3f}" if r["compile_ms"] is not None else "—"
        vs_c = f"{r['speedup_vs_compile']:.2f}" if r["speedup_vs_compile"] is not None else "—"
        extra = f" ({r['fraction_of_floor']:.0%} of floor)" if "fraction_of_floor" in r else ""
        best = f"{r['speedup_vs_best_pytorch']:.2f}" if "speedup_vs_best_pytorch" in r else "—"
        table.add_row(r["shape"], r["pass"], f"{r['eager_ms']:.3f}", comp, f"{r['fused_ms']:.3f}",
                      f"{r['speedup_vs_eager']:.2f}", vs_c, best, f"{r['fused_GFLOPs']:.1f}{extra}")
    Console(width=max(140, Console().width)).print(table)


def plot(rows, path, env, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [r for r in rows if r["shape"].startswith("sweep")]
    passes = [p for p in PASSES if any(r["pass"] == p for r in sweep)]
    if not passes:
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for p in passes:
        pts = sorted((r["k"], r["speedup_vs_eager"], r["speedup_vs_compile"]) for r in sweep if r["pass"] == p)
        line, = ax.plot([a for a, _, _ in pts], [b for _, b, _ in pts], marker="o", label=f"{p} vs nn.Conv2d")
        if all(c is not None for _, _, c in pts):
            ax.plot([a for a, _, _ in pts], [c for _, _, c in pts], marker="x", linestyle="--",
                    color=line.get_color(), alpha=0.6, label=f"{p} vs torch.compile")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xlabel("kernel size k")
    ax.set_ylabel("speedup of fused dwconv2d (×)")
    ax.set_yscale("log")
    ax.set_title(f"{title}\n{env['device']} · torch {env['torch']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="default 64 on a GPU, 8 on a CPU")
    ap.add_argument("--channels", type=int, default=384)
    ap.add_argument("--size", type=int, default=32, help="H = W of the sweep shape")
    ap.add_argument("--ks", default=None, help=f"comma-separated odd kernel sizes (default {DEFAULT_KS})")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--activation", choices=("silu", "gelu"), default=None,
                    help="fused epilogue of the sweep rows; the baselines run the conv, then the activation")
    ap.add_argument("--shapes", choices=("sweep", "models", "all"), default="sweep",
                    help="the k sweep, the FAT-B0/FCViT-tiny layer shapes, or both")
    ap.add_argument("--passes", default=",".join(PASSES), help=f"subset of {PASSES}")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--max-seconds", type=float, default=2.0)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--json", default=None, help="write the rows and environment here")
    ap.add_argument("--plot", default=None, help="write a PNG of speedup vs k here")
    ap.add_argument("--quick", action="store_true", help=f"k in {QUICK_KS}, batch ≤ 2, few repetitions")
    args = ap.parse_args(argv)
    steady_heap()  # every column timed with the same heap state (fastvit_ops.benchmarks.allocator)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    ks = tuple(int(k) for k in args.ks.split(",")) if args.ks else (QUICK_KS if args.quick else DEFAULT_KS)
    batch = args.batch or (64 if device.type == "cuda" else 8)
    if args.quick:
        batch = min(batch, 2)
    args.passes = [p for p in args.passes.split(",") if p]
    bad = [p for p in args.passes if p not in PASSES]
    if bad:
        ap.error(f"--passes: unknown {bad}; expected a subset of {PASSES}")

    env = environment(device)
    env["dtype"] = args.dtype
    rows: List[Dict] = []
    todo = []
    if args.shapes in ("sweep", "all"):
        shape = (batch, args.channels, args.size, args.size)
        todo += [(cases_mod.case(shape, k, activation=args.activation, device=device, dtype=dtype,
                                 label=f"sweep {shape}"), k) for k in ks]
    if args.shapes in ("models", "all"):
        mb = 1 if args.quick else batch
        for c in cases_mod.fat_b0_cases(mb, device, dtype) + cases_mod.fcvit_tiny_cases(mb, device, dtype):
            todo.append((c, int(c.shape.split(" k")[1].split("/")[0])))
    for i, (case, k) in enumerate(todo):
        print(f"[{i + 1}/{len(todo)}] {case.shape}", file=sys.stderr, flush=True)
        rows += bench_case(case, args, device, args.dtype, k)
    print_table(rows, env)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"environment": env, "args": vars(args), "rows": rows}, f, indent=1)
    if args.plot:
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        plot(rows, args.plot, env, f"dwconv2d {args.dtype}, ({batch}, {args.channels}, {args.size}, {args.size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
