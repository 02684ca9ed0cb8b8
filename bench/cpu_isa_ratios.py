"""Our C++ CPU kernels vs eager PyTorch per layer shape, on the CPU capability this process runs.

What ``fastvit_ops/ops/cpu_rules.py``'s per-capability rule is written from. Each case of
``python -m fastvit_ops bench`` (FAT-B0, FCViT-tiny and CvT-13 shapes) is timed as eager PyTorch
and as our kernels forced with ``backend("cpu")`` (so the rule itself does not reroute them),
forward and forward+backward, in interleaved rounds; the JSON keeps the minimum and the median of
each side (the minimum is the steadier of the two on a shared machine). Run once per capability:

    FASTVIT_OPS_CPU_CAPABILITY=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \\
        python bench/cpu_isa_ratios.py --json bench/results/cpu_isa/ops_avx2.json
    python bench/cpu_isa_ratios.py --json bench/results/cpu_isa/ops_avx512.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import fastvit_ops
from fastvit_ops.benchmarks import load, op_names, runner
from fastvit_ops.benchmarks.timing import forward_backward_fn, forward_fn

PREFIXES = ("FAT-B0", "FCViT-tiny", "CvT-13")


def _ours(case):
    def run(*inputs):
        with fastvit_ops.backend("cpu"):
            return case.fused(*inputs)
    return run


def _time(fns, reps):
    for fn in fns.values():
        fn()
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
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
    dev = torch.device("cpu")
    rows = []
    for op in args.ops.split(","):
        for case in load(op).bench_cases(args.batch, dev):
            if not case.shape.startswith(PREFIXES):
                continue
            inputs = case.make_inputs()
            passes = [("fwd", forward_fn)] + ([("fwd+bwd", forward_backward_fn)] if case.backward else [])
            for label, make in passes:
                t = _time({"eager": make(case.eager, inputs), "ours": make(_ours(case), inputs)}, args.reps)
                row = {"op": op, "shape": case.shape, "pass": label,
                       "eager_min_ms": min(t["eager"]), "ours_min_ms": min(t["ours"]),
                       "eager_median_ms": statistics.median(t["eager"]), "ours_median_ms": statistics.median(t["ours"])}
                row["ratio_min"] = row["eager_min_ms"] / row["ours_min_ms"]
                row["ratio_median"] = row["eager_median_ms"] / row["ours_median_ms"]
                rows.append(row)
                print(f"{op:26s} {case.shape:42s} {label:8s} eager {row['eager_min_ms']:9.3f} ours "
                      f"{row['ours_min_ms']:9.3f} ms (min)  x{row['ratio_min']:.2f} (median x{row['ratio_median']:.2f})",
                      flush=True)
    env = runner.environment(dev)
    env["method"] = (f"batch {args.batch}, fp32, {torch.get_num_threads()} threads, {args.reps} interleaved rounds, "
                     "ours = backend('cpu'); the machine was shared with other jobs (2 cores)")
    with open(args.json, "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
