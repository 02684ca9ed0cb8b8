"""Our C++ CPU kernels vs eager PyTorch per layer shape, on the CPU capability this process runs.

What ``fastvit_ops/ops/cpu_rules.py``'s per-capability rule is written from. Each case of
``python -m fastvit_ops bench`` (FAT-B0, FCViT-tiny and CvT-13 shapes) is timed as eager PyTorch
and as our kernels forced with ``backend("cpu")`` (so the rule itself does not reroute them),
forward and forward+backward, in interleaved rounds, beside what ``auto`` runs (the rule included:
the column the "never slower than eager" target is about) and, for ``dwconv2d``'s forward, PyTorch's
oneDNN convolution with our epilogue (the rule's other choice); the JSON keeps the minimum and the
median of each side (the minimum is the steadier of the two on a shared machine). Run once per capability:

    FASTVIT_OPS_CPU_CAPABILITY=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \\
        python bench/cpu_isa_ratios.py --json bench/results/cpu_isa/ops_avx2.json
    python bench/cpu_isa_ratios.py --json bench/results/cpu_isa/ops_avx512.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from unittest import mock

import torch

import fastvit_ops
from fastvit_ops.ops import dwconv
from fastvit_ops.benchmarks import load, op_names, runner
from fastvit_ops.benchmarks.allocator import steady_heap
from fastvit_ops.benchmarks.timing import forward_backward_fn, forward_fn, round_orders

PREFIXES = ("FAT-B0", "FCViT-tiny", "CvT-13")


def _ours(case):
    def run(*inputs):
        with fastvit_ops.backend("cpu"):
            return case.fused(*inputs)
    return run


def _onednn(case):
    def run(*inputs):
        # oneDNN's forward runs under auto only; the patched rule names it for every call
        with mock.patch.object(dwconv, "cpu_forward_choice", lambda *a: "onednn"):
            return case.fused(*inputs)
    return run


def _time(fns, reps):
    for fn in fns.values():
        fn()
        fn()
    times = {name: [] for name in fns}
    orders = round_orders(fns)  # no column always runs right after eager's cache sweep
    for i in range(reps):
        for name, fn in orders[i % len(orders)]:
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", default=",".join(op_names()))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    steady_heap()  # every column timed with the same heap state (fastvit_ops.benchmarks.allocator)
    dev = torch.device("cpu")
    rows = []
    for op in args.ops.split(","):
        for case in load(op).bench_cases(args.batch, dev):
            if not case.shape.startswith(PREFIXES):
                continue
            inputs = case.make_inputs()
            passes = [("fwd", forward_fn)] + ([("fwd+bwd", forward_backward_fn)] if case.backward else [])
            for label, make in passes:
                fns = {"eager": make(case.eager, inputs), "ours": make(_ours(case), inputs),
                       "auto": make(case.fused, inputs)}
                if op == "dwconv2d" and label == "fwd":
                    fns["onednn"] = make(_onednn(case), inputs)
                t = _time(fns, args.reps)
                row = {"op": op, "shape": case.shape, "pass": label}
                for name, ts in t.items():
                    row[f"{name}_min_ms"], row[f"{name}_median_ms"] = min(ts), statistics.median(ts)
                row["ratio_min"] = row["eager_min_ms"] / row["ours_min_ms"]
                row["ratio_median"] = row["eager_median_ms"] / row["ours_median_ms"]
                row["auto_ratio_min"] = row["eager_min_ms"] / row["auto_min_ms"]
                rows.append(row)
                extra = f" onednn x{row['eager_min_ms'] / row['onednn_min_ms']:.2f}" if "onednn" in t else ""
                print(f"{op:24s} {case.shape:42s} {label:8s} eager {row['eager_min_ms']:8.3f} ms  ours "
                      f"x{row['ratio_min']:.2f} (median x{row['ratio_median']:.2f})  auto x{row['auto_ratio_min']:.2f}"
                      f"{extra}", flush=True)
    env = runner.environment(dev)
    env["method"] = (f"batch {args.batch}, fp32, {torch.get_num_threads()} threads, {args.reps} interleaved rounds, "
                     "ours = backend('cpu'), auto = the default dispatch, onednn = dwconv2d's oneDNN forward")
    with open(args.json, "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
