"""``python -m fastvit_ops {info,explain,check,bench}`` — what is available, what runs, is it right,
how fast is it.

* ``info``  versions, device, backends available and why not; ``--verbose``: every op's ordered
  implementations (the dispatch registry).
* ``explain <op> --shape ...`` which implementation runs that call (forward, backward, kernels)
  and why each other one does not.
* ``check`` every fused op vs the eager reference at small random shapes, on every backend that
  runs here; exits 1 on any failure.
* ``bench`` every fused op at the real layer shapes (FAT-B0 stages at 224², batch 64 on a GPU,
  8 on a CPU): eager vs torch.compile(eager) vs fused, forward and forward+backward; then
  end to end, images/s and peak memory of fat_b0, fcvit_tiny, cvt_13 (``--models``): reference
  eager, reference torch.compile, converted (fused), converted + torch.compile, for inference and,
  with ``--train``, a training step (forward, backward, SGD update).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import _availability as avail
from .benchmarks import allocator, load, op_names, runner
from .benchmarks import models as model_bench
from .benchmarks.shapes import default_batch
from .benchmarks.kernel_resources import launched_kernels
from .ops.dispatch import BACKENDS, backend_available

# Wide enough for the bench table when the output is a file or a CI log (rich assumes 80 there).
console = Console(width=None if sys.stdout.isatty() else 200)


def _device(arg: Optional[str]) -> torch.device:
    if arg:
        dev = torch.device(arg)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _ops(arg: Optional[str]) -> List[str]:
    if not arg:
        return op_names()
    ops = [o.strip() for o in arg.split(",") if o.strip()]
    unknown = [o for o in ops if o not in op_names()]
    if unknown:
        raise SystemExit(f"--ops: unknown op(s) {unknown}; expected some of {op_names()}")
    return ops


def _progress() -> Progress:
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True)


def cmd_info(args) -> int:
    dev = _device(args.device)
    env = runner.environment(dev)
    table = Table(title="fastvit_ops info")
    table.add_column("item")
    table.add_column("value")
    from . import __version__
    table.add_row("fastvit_ops", __version__)
    isa_keys = ("cpu_capability", "cpu_isa", "aten_cpu_capability", "onednn_max_cpu_isa", "inductor_vec_isa")
    for k, v in env.items():
        if k not in isa_keys:
            table.add_row(k, v)
    table.add_row("TRITON_INTERPRET", "1" if avail.interpreting() else "0")
    cap = avail.cpu_capability()
    if cap is not None:  # the C++ CPU kernels: one build per SIMD level, chosen when the extension loads
        table.add_row("CPU SIMD (best this CPU has)", cap["cpu"])
        table.add_row("CPU kernels in use", f"{cap['in_use']}: {cap['reason']}")
        table.add_row("CPU kernels built", ", ".join(cap["built"]))
    table.add_row("ATen CPU capability", torch.backends.cpu.get_cpu_capability())
    table.add_row("ONEDNN_MAX_CPU_ISA", os.environ.get("ONEDNN_MAX_CPU_ISA", "") or "(unset: the CPU's best)")
    if "inductor_vec_isa" in env:
        table.add_row("torch.compile C++ SIMD (follows ATEN_CPU_CAPABILITY)", env["inductor_vec_isa"])
    console.print(table)
    bt = Table(title=f"backends on {dev}")
    bt.add_column("backend")
    bt.add_column("available")
    bt.add_column("why")
    for name in BACKENDS:
        ok, why = backend_available(name, dev)
        bt.add_row(name, "yes" if ok else "no", why)
    console.print(bt)
    if args.verbose:
        from .explain import registry

        rt = Table(title="implementations, in the order dispatch.choose tries them (fastvit_ops/ops/dispatch.py)")
        for col in ("op", "stage", "#", "implementation", "backend", "what"):
            rt.add_column(col)
        for op, stage, impls in registry():
            for i, impl in enumerate(impls):
                rt.add_row(op if i == 0 else "", stage if i == 0 else "", str(i + 1), impl.name,
                           impl.backend or "any", impl.doc)
        console.print(rt)
    return 0


def cmd_explain(args) -> int:
    from .explain import explain

    try:
        shape = tuple(int(s) for s in args.shape.split(","))
    except ValueError:
        raise SystemExit(f"--shape: expected comma-separated ints, got {args.shape!r}")
    opts = {k: getattr(args, k) for k in ("kernel", "stride", "activation", "residual", "keys", "heads", "groups")}
    try:
        log = explain(args.op, shape, {**_DTYPES, "fp64": torch.float64}[args.dtype], str(_device(args.device)), args.backend,
                      args.inference, args.channels_last, **opts)
    except (ValueError, TypeError, RuntimeError) as e:
        raise SystemExit(f"explain {args.op}: {e}")
    seen = set()
    for choice in log:
        key = (choice.op, choice.stage, choice.impl.name)
        if key in seen:
            continue
        seen.add(key)
        t = Table(title=f"{choice.op} · {choice.stage} · requested {choice.call.backend!r}, "
                        f"runs on {choice.call.resolved()!r} → [bold]{choice.impl.name}[/]")
        for col in ("#", "implementation", "backend", "runs", "why"):
            t.add_column(col)
        for i, (impl, chosen, why) in enumerate(choice.reasons):
            t.add_row(str(i + 1), impl.name, impl.backend or "any", "[green]yes[/]" if chosen else "no", why)
        console.print(t)
        if choice.impl.doc:
            console.print(f"  {choice.impl.name}: {choice.impl.doc}")
    if not log:
        console.print("no implementation was chosen (the op ran nothing of ours)")
    return 0


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cmd_check(args) -> int:
    dev = _device(args.device)
    ops = _ops(args.ops)
    real = None
    if args.real_shapes:
        real = (args.batch or default_batch(dev), _DTYPES[args.dtype])
    names = runner.backends_here(dev, fused_only=real is not None)
    total = sum(len(runner.check_cases(op, dev, real)) for op in ops) * len(names)
    with _progress() as p:
        task = p.add_task("checking", total=total)
        rows = runner.run_checks(dev, ops, progress=lambda: p.advance(task), real_shapes=real,
                                 log=console.print if args.verbose else None)
    title = (f"fused ops vs float64 at the layer shapes, batch {real[0]}, {args.dtype}, on {dev}" if real
             else f"fused ops vs eager reference on {dev}")
    table = Table(title=title)
    for col in ("op", "shape", "backend", "fwd max err", "bwd max err", "ok"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["op"], r["shape"], r["backend"], f"{r['forward_max_error']:.2e}",
                      f"{r['backward_max_error']:.2e}", "[green]ok[/]" if r["ok"] else "[red]FAIL[/]")
    console.print(table)
    failed = [r for r in rows if not r["ok"]]
    if args.json:
        _write_json(args.json, {"env": runner.environment(dev), "checks": rows,
                                "triton_kernels": launched_kernels() if dev.type == "cuda" else []})
    if failed:
        console.print(f"[red]{len(failed)} check(s) failed[/]")
        return 1
    console.print(f"[green]all {len(rows)} checks passed[/]")
    return 0


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def cmd_bench(args) -> int:
    dev = _device(args.device)
    batch = args.batch or default_batch(dev)
    ops = [] if args.no_ops else _ops(args.ops)
    cases = []
    shape_prefixes = None if args.all_shapes else [m.strip() for m in args.shapes.split(",") if m.strip()]
    dtype = _DTYPES[args.dtype]
    for op in ops:
        cs = load(op).bench_cases(batch, dev, dtype)
        if shape_prefixes:
            cs = [c for c in cs if any(c.shape.startswith(m) for m in shape_prefixes)]
        cases += cs[:1] if args.quick else cs
    models = [] if args.no_models else _models(args.models)
    if args.quick:
        models = models[:1]
    modes = ("inference", "train") if args.train else ("inference",)
    variants = model_bench.VARIANTS if not args.no_compile else ("reference", "fused")
    reps, max_s = (5, 0.5) if args.quick else (20, 2.0)
    rounds, model_s = (3, 5.0) if args.quick else (7, 30.0)
    if args.reps:  # e.g. --reps 1: only compile and warm up (fills torch.compile's on-disk caches)
        reps, rounds = args.reps, args.reps
    started = time.time()
    op_rows, model_rows = [], []
    if args.malloc == "steady":
        allocator.steady_heap()
    env = runner.environment(dev)
    autocast = _DTYPES[args.autocast] if args.autocast else None

    def save():  # after every case, so a run that is cut short still leaves its results
        if args.json:
            _write_json(args.json, _bench_result(env, batch, args, op_rows, model_rows, dev), quiet=True)

    with _progress() as p:
        task = p.add_task("benchmarking", total=len(cases) + len(models) * len(modes))
        for case in cases:
            p.update(task, description=f"{case.op} {case.shape}")
            rows = runner.bench_case(case, dev, compile_=not args.no_compile, reps=reps, max_seconds=max_s)
            op_rows += rows
            if args.verbose:
                for r in rows:
                    console.print(f"[{time.time() - started:5.0f} s] {r['op']} {r['shape']} {r['pass']}: eager "
                                  f"{_fmt(r['eager_ms'])} compile {_fmt(r['compile_ms'])} fused {_fmt(r['fused_ms'])} "
                                  f"ms{'' if r.get('sdpa_ms') is None else ' sdpa ' + _fmt(r['sdpa_ms'])}")
            save()
            p.advance(task)
        for name in models:
            for mode in modes:
                p.update(task, description=f"model {name} {mode}")
                row = model_bench.throughput(name, batch, dev, mode, variants=variants,
                                             rounds=rounds, max_seconds=model_s, autocast=autocast)
                model_rows.append(row)
                if args.verbose:
                    console.print(f"[{time.time() - started:5.0f} s] {name} {mode}: " + ", ".join(
                        f"{v} {row[v + '_img_s']:.1f} img/s" if v + "_img_s" in row else f"{v} failed"
                        for v in variants))
                save()
                p.advance(task)
    gpu = dev.type == "cuda"
    table = Table(title=f"fused ops, batch {batch}, {args.dtype}, {env['device']} ({env['cpu_threads']} threads, "
                        f"{runner.isa_label(env)}; heap {args.malloc})" if not gpu else f"fused ops, batch {batch}, {args.dtype}, {env['device']}")
    cols = ["op", "shape", "pass", "eager ms", "compile ms", "fused ms", "× eager", "× compile", "max err"]
    with_sdpa = any(r.get("sdpa_ms") is not None for r in op_rows)
    if with_sdpa:
        cols += ["× sdpa"]
    if gpu:
        cols += ["GB/s", "TFLOP/s"]
    for c in cols:
        table.add_column(c, justify="right" if c not in ("op", "shape", "pass") else "left")
    for r in op_rows:
        row = [r["op"], r["shape"], r["pass"], _fmt(r["eager_ms"]), _fmt(r["compile_ms"]), _fmt(r["fused_ms"]),
               _fmt(r["speedup_vs_eager"], ".2f"), _fmt(r["speedup_vs_compile"], ".2f"), f"{r['max_error']:.1e}"]
        if with_sdpa:
            row += [_fmt(r.get("speedup_vs_sdpa"), ".2f")]
        if gpu:
            row += [_fmt(r.get("fused_GBps"), ".0f"), _fmt(r.get("fused_TFLOPs"), ".2f")]
        table.add_row(*row)
    if op_rows:
        console.print(table)
    if model_rows:
        _model_table(model_rows, batch, variants)
    console.print(f"done in {time.time() - started:.0f} s")
    if args.json:
        _write_json(args.json, _bench_result(env, batch, args, op_rows, model_rows, dev))
    if args.plot:
        if op_rows:
            _plot(args.plot, op_rows, env)
        if model_rows:
            _plot_models(args.plot if not op_rows else _suffixed(args.plot, "_models"), model_rows, env)
    return 0


def _bench_result(env, batch, args, op_rows, model_rows, dev) -> dict:
    return {"env": env, "batch": batch, "dtype": args.dtype, "autocast": args.autocast, "ops": op_rows,
            "models": model_rows, "triton_kernels": launched_kernels() if dev.type == "cuda" else []}


def cmd_aot_check(args) -> int:
    import os

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("aot-check compiles for a GPU: unset TRITON_INTERPRET")
    if not avail.triton()[0]:
        raise SystemExit(f"aot-check needs Triton: {avail.triton()[1]}")
    from . import aot

    archs = [int(a) for a in args.arch.split(",")]
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    ops = _ops(args.ops) if args.ops else None
    shapes = [s.strip() for s in args.shapes.split(",")] if args.shapes else None
    started = time.time()

    def progress(arch, plan, n):
        if args.verbose:
            console.print(f"[{time.time() - started:5.0f} s] sm_{arch} {plan.dtype} {plan.op} {plan.label}: {n} launches")

    result = aot.run(archs, args.batch, dtypes, ops, progress=progress, shapes=shapes)
    kt = Table(title=f"Triton kernels compiled ahead of time (batch {args.batch} layer shapes)")
    for c in ("arch", "dtype", "kernel", "config", "warps", "regs", "spill B", "smem KiB", "plans", "verdict"):
        kt.add_column(c, justify="right" if c in ("warps", "regs", "spill B", "smem KiB", "plans") else "left")
    for r in sorted(result["kernels"], key=lambda r: (r["arch"], r["dtype"], r["kernel"], r["config"])):
        kt.add_row(f"sm_{r['arch']}", r["dtype"], r["kernel"], r["config"], str(r["num_warps"]),
                   _fmt(r.get("registers"), "d"), _fmt(r.get("spill"), "d"),
                   _fmt(r["shared"] / 1024 if r.get("shared") is not None else None, ".1f"), str(r["plans"]),
                   r["verdict"] if r["verdict"] == "ok" else f"[red]{r['verdict']}[/]")
    console.print(kt)
    pt = Table(title="estimated traffic and work per op call (forward + backward) against the op's floor")
    for c in ("op", "plan", "dtype", "MB moved", "× floor", "GFLOP", "× floor"):
        pt.add_column(c, justify="left" if c in ("op", "plan", "dtype") else "right")
    for p in result["plans"]:
        if p["arch"] != archs[-1]:
            continue  # the same launches on every arch
        pt.add_row(p["op"], p["plan"], p["dtype"], f"{p['bytes'] / 1e6:.1f}",
                   _fmt(p["bytes"] / p["min_bytes"] if p["min_bytes"] else None, ".2f"),
                   f"{p['flops'] / 1e9:.2f}", _fmt(p["flops"] / p["min_flops"] if p["min_flops"] else None, ".2f"))
    console.print(pt)
    bad = aot.failures(result)
    if args.json:
        _write_json(args.json, dict(result, failures=bad, env=runner.environment("cpu"), archs=archs,
                                    batch=args.batch, dtypes=dtypes))
    console.print(f"{len(result['kernels'])} compiled variants, {len(result['plans'])} plans in "
                  f"{time.time() - started:.0f} s")
    if bad:
        for b in bad:
            console.print(f"[red]{b}[/]")
        console.print(f"[red]{len(bad)} failure(s)[/]")
        return 1
    console.print("[green]no compile errors, no spills, shared memory and grids within limits[/]")
    return 0


def _models(arg: Optional[str]) -> List[str]:
    if not arg:
        return list(model_bench.DEFAULT_MODELS)
    if arg == "all":
        return list(model_bench.MODELS)
    names = [m.strip() for m in arg.split(",") if m.strip()]
    unknown = [m for m in names if m not in model_bench.MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown model(s) {unknown}; expected 'all' or some of {model_bench.MODELS}")
    return names


_VARIANT_LABEL = {"reference": "reference", "reference_compile": "ref+compile", "fused": "fused",
                  "fused_compile": "fused+compile"}


def _model_table(rows, batch, variants) -> None:
    mt = Table(title=f"end to end at 224², batch {batch}: images/s (× reference eager), peak MiB")
    for c in ["model", "mode"] + [_VARIANT_LABEL[v] for v in variants] + ["peak MiB ref / fused", "max logit err"]:
        mt.add_column(c, justify="left" if c in ("model", "mode") else "right")
    for r in rows:
        cells = [f"{r[v + '_img_s']:.1f}" + (f" ({r[v + '_speedup']:.2f}×)" if v + "_speedup" in r else "")
                 if v + "_img_s" in r else "failed" for v in variants]
        peak = " / ".join(f"{r[k]:.0f}" if k in r else "–" for k in ("reference_peak_mib", "fused_peak_mib"))
        mt.add_row(r["model"], r["mode"], *cells, peak, f"{r['max_logit_error']:.1e}")
    console.print(mt)
    for r in rows:
        for v in variants:
            if v + "_error" in r:
                console.print(f"{r['model']} {r['mode']} {_VARIANT_LABEL[v]} failed: {r[v + '_error']}")


def _suffixed(path: str, suffix: str) -> str:
    root, ext = os.path.splitext(path)
    return f"{root}{suffix}{ext or '.png'}"


def _write_json(path, obj, quiet: bool = False) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
    if not quiet:
        console.print(f"wrote {path}")


def _plot(path, rows, env) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Horizontal bars: one row per (op, shape, pass) stays readable at ~100 rows.
    labels = [f"{r['op']} {r['shape']} {r['pass']}" for r in rows]
    y = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(11, 1.5 + 0.22 * len(rows)))
    ax.barh([i - 0.2 for i in y], [r["speedup_vs_eager"] for r in rows], height=0.4, label="vs eager")
    ax.barh([i + 0.2 for i in y], [r["speedup_vs_compile"] or 0 for r in rows], height=0.4, label="vs torch.compile")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of fused (×, log scale)")
    isa = f", {runner.isa_label(env)}" if runner.isa_label(env) else ""
    ax.set_title(f"fastvit_ops fused ops — {env['device']}{isa}, torch {env['torch']}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    console.print(f"wrote {path}")


def _plot_models(path, rows, env) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in model_bench.MODES if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        mrows = [r for r in rows if r["mode"] == mode]
        variants = [v for v in model_bench.VARIANTS if f"{v}_img_s" in mrows[0]]
        width = 0.8 / len(variants)
        for i, v in enumerate(variants):
            ax.bar([j + (i - (len(variants) - 1) / 2) * width for j in range(len(mrows))],
                   [r.get(f"{v}_img_s", 0.0) for r in mrows], width=width, label=_VARIANT_LABEL[v])
        ax.set_xticks(range(len(mrows)))
        ax.set_xticklabels([r["model"] for r in mrows])
        ax.set_ylabel("images/s")
        ax.set_title(f"{mode}, batch {mrows[0]['batch']}, {mrows[0]['size']}²")
        ax.legend(fontsize=8)
    isa = f", {runner.isa_label(env)}" if runner.isa_label(env) else ""
    fig.suptitle(f"fastvit_ops end to end — {env['device']} ({env['cpu_threads']} threads{isa}), torch {env['torch']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    console.print(f"wrote {path}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastvit_ops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, device, available backends")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--verbose", action="store_true", help="also every op's ordered implementations")
    p.set_defaults(fn=cmd_info)
    from .explain import OPS as explain_ops

    p = sub.add_parser("explain", help="which implementation runs a call, and why the others do not",
                       description="Calls OP once on random inputs of --shape (forward and backward, or "
                                   "--inference) and prints each choice of implementation with the reasons. "
                                   "--shape per op: " + "; ".join(f"{k}: {v[1]}" for k, v in explain_ops.items()))
    p.add_argument("op", choices=sorted(explain_ops))
    p.add_argument("--shape", required=True, help="comma-separated, e.g. 8,128,56,56")
    p.add_argument("--dtype", choices=sorted(_DTYPES) + ["fp64"], default="fp32")
    p.add_argument("--device")
    p.add_argument("--backend", help="auto (default), triton, cuda, cpu or reference")
    p.add_argument("--inference", action="store_true", help="forward only, under torch.no_grad")
    p.add_argument("--channels-last", action="store_true", help="the first input channels_last")
    p.add_argument("--kernel", type=int, help="depthwise kernel size (default 3)")
    p.add_argument("--stride", type=int, help="depthwise stride (default 1)")
    p.add_argument("--activation", choices=("silu", "gelu"), help="dwconv2d's fused activation")
    p.add_argument("--residual", action="store_true", help="dwconv2d's fused + x")
    p.add_argument("--keys", type=int, help="attention: key count M (default 49)")
    p.add_argument("--heads", type=int, help="downsampled_attention_nchw: heads (default 1)")
    p.add_argument("--groups", type=int, help="global context: groups G (default 8 where it divides C)")
    p.set_defaults(fn=cmd_explain)
    p = sub.add_parser("check", help="fused ops vs reference at small random shapes; exit 1 on failure")
    p.add_argument("--device")
    p.add_argument("--ops", help=f"comma-separated subset of {op_names()}")
    p.add_argument("--real-shapes", action="store_true",
                   help="check at the bench's layer shapes (--batch, --dtype) instead of small ones; fused backends only")
    p.add_argument("--batch", type=int, help="batch of --real-shapes (default 64 on GPU, 8 on CPU)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32", help="dtype of --real-shapes (default fp32)")
    p.add_argument("--verbose", action="store_true", help="print each check as it finishes")
    p.add_argument("--json", metavar="PATH")
    p.set_defaults(fn=cmd_check)
    p = sub.add_parser("bench", help="eager vs torch.compile vs fused at the real layer shapes")
    p.add_argument("--device")
    p.add_argument("--batch", type=int, help="batch size (default 64 on GPU, 8 on CPU)")
    p.add_argument("--ops", help=f"comma-separated subset of {op_names()}")
    p.add_argument("--quick", action="store_true", help="first shape per op, one model, fewer repetitions")
    p.add_argument("--shapes", default="FAT-B0,FCViT-tiny",
                   help="comma-separated model prefixes of the layer shapes to run (default FAT-B0,FCViT-tiny; "
                        "also FAT-B1, FAT-B2/B3, FCViT-B12, CvT-13)")
    p.add_argument("--all-shapes", action="store_true", help="every layer shape the ops define")
    p.add_argument("--models", help=f"comma-separated models for the end-to-end rows, or 'all' "
                                    f"(default {','.join(model_bench.DEFAULT_MODELS)}; all: {','.join(model_bench.MODELS)})")
    p.add_argument("--train", action="store_true", help="also time a training step (forward, backward, SGD update)")
    p.add_argument("--no-models", action="store_true", help="skip the end-to-end rows")
    p.add_argument("--no-ops", action="store_true", help="skip the per-op rows (end-to-end rows only)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    p.add_argument("--malloc", choices=("steady", "glibc"), default="steady",
                   help="steady (default): pin glibc's heap to a long-running process's state first, so "
                        "every column and run is timed alike (fastvit_ops.benchmarks.allocator); glibc: "
                        "leave its defaults, whose state depends on what ran before")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32", help="dtype of the per-op inputs (default fp32)")
    p.add_argument("--autocast", choices=("bf16", "fp16"),
                   help="run the end-to-end rows under torch.autocast in this dtype (default: fp32, no autocast)")
    p.add_argument("--verbose", action="store_true", help="print each row as it is measured")
    p.add_argument("--reps", type=int, help="timed rounds per case / model (default 20 / 7; 5 / 3 with --quick)")
    p.add_argument("--json", metavar="PATH", help="write all results as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of the speedups")
    p.set_defaults(fn=cmd_bench)
    p = sub.add_parser("aot-check", help="compile every Triton kernel for sm_80/sm_90 without a GPU; report registers, "
                                         "spills, shared memory, traffic; exit 1 on errors or spills")
    p.add_argument("--arch", default="80,90", help="comma-separated compute capabilities (default 80,90)")
    p.add_argument("--batch", type=int, default=64, help="batch of the layer shapes (default 64)")
    p.add_argument("--dtypes", default="fp32,bf16,fp16", help="comma-separated, of fp32,bf16,fp16,fp64 (default fp32,bf16,fp16)")
    p.add_argument("--ops", help=f"comma-separated subset of {op_names()}")
    p.add_argument("--shapes", help="comma-separated prefixes of the plan labels (e.g. 'FAT-B0 s1,CvT-13')")
    p.add_argument("--verbose", action="store_true", help="print each plan as it compiles")
    p.add_argument("--json", metavar="PATH")
    p.set_defaults(fn=cmd_aot_check)
    args = parser.parse_args(argv)
    if getattr(args, "batch", None) is not None and args.batch < 1:
        parser.error("--batch must be >= 1")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
