"""``python -m fastvit_ops aot-check``: every Triton kernel compiled ahead of time for sm_80/sm_90,
without a GPU, at the specializations the ops launch for FAT-B0, FCViT-tiny and CvT-13.

For each architecture, each plan (op × layer shape × dtype; :mod:`.plans`) runs the op's Triton
forward and backward launchers under :func:`.compile.capture`, which compiles each launch (every
config of an autotuned kernel) instead of running it. Each distinct compiled variant is read with
``ptxas -v`` (registers, stack and spill bytes, shared memory; ``ptxas -v`` on its PTX) and judged:

* ``error``  — it does not compile;
* ``spill``  — ptxas spilled registers to local memory, in fp16/bf16/fp32 (fp64
  exists for gradcheck only; its spills are reported, not failed);
* ``smem``   — its shared memory exceeds the architecture's limit;
* ``grid``   — a launch grid exceeds CUDA's limits (x < 2³¹, y and z ≤ 65,535);
* ``ok``.

Per plan it also records the traffic estimate of :mod:`.traffic`: the bytes the kernels move
(DRAM, assuming each tile's reloads of data another tile also reads hit L2 only when stated) and
the FLOPs they execute, against the op's floor, so the distance to the roofline is known before a
GPU run.
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional, Sequence

from .compile import SHARED_MEMORY_LIMIT, capture, resources, stand_in_target
from .plans import plans as model_plans
from .traffic import estimate


def _variant_key(launch) -> tuple:
    return (launch.kernel, tuple(sorted((k, str(v)) for k, v in launch.constexprs.items())), launch.num_warps,
            launch.num_stages)


def run(archs: Sequence[int] = (80, 90), batch: int = 64, dtypes: Sequence[str] = ("fp32", "bf16", "fp16"),
        ops: Optional[Iterable[str]] = None, progress=None,
        shapes: Optional[Sequence[str]] = None) -> Dict[str, List[dict]]:
    """Compile every plan for every arch. Returns ``{"kernels": [...], "plans": [...]}``: one row
    per distinct compiled variant per arch (with its verdict), one row per plan per arch."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("aot-check compiles for a GPU: unset TRITON_INTERPRET (the launchers pick the "
                           "interpreter's block sizes under it)")
    ops = None if ops is None else set(ops)
    selected = [p for p in model_plans(batch, dtypes) if (ops is None or p.op in ops)
                and (shapes is None or any(p.label.startswith(s) for s in shapes))]
    kernels: Dict[tuple, dict] = {}
    plan_rows: List[dict] = []
    for arch in archs:
        with stand_in_target(arch):
            for plan in selected:
                with capture() as launches:
                    error = None
                    try:
                        plan.run()
                    except Exception as e:  # noqa: BLE001  (a launcher that raises is a failed plan)
                        error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                bad_grids = [f"{l.kernel}{l.grid}" for l in launches if not l.grid_ok()]
                est_bytes, est_flops = estimate(launches, plan)
                plan_rows.append({"arch": arch, "op": plan.op, "plan": plan.label, "dtype": plan.dtype,
                                  "launches": len(launches), "error": error, "bad_grids": bad_grids,
                                  "min_bytes": plan.min_bytes, "bytes": est_bytes,
                                  "min_flops": plan.min_flops, "flops": est_flops})
                for l in launches:
                    key = (arch, plan.dtype) + _variant_key(l)
                    row = kernels.get(key)
                    if row is None:
                        row = {"arch": arch, "dtype": plan.dtype, "kernel": l.kernel,
                               "config": ",".join(f"{k}={v}" for k, v in sorted(l.constexprs.items())),
                               "num_warps": l.num_warps, "num_stages": l.num_stages, "plans": 0,
                               "error": l.error}
                        if l.compiled is not None:
                            row.update(resources(l.compiled))
                        row["verdict"] = _verdict(row, arch)
                        kernels[key] = row
                    row["plans"] += 1
                if progress:
                    progress(arch, plan, len(launches))
    return {"kernels": list(kernels.values()), "plans": plan_rows}


def _verdict(row: dict, arch: int) -> str:
    if row.get("error"):
        return "error"
    if row["shared"] > SHARED_MEMORY_LIMIT.get(arch, 101376):
        return "smem"
    if row["spill"] > 0:
        return "spill (fp64: allowed)" if row["dtype"] == "fp64" else "spill"
    return "ok"


def failures(result: Dict[str, List[dict]]) -> List[str]:
    """Everything that makes ``aot-check`` exit 1."""
    out = []
    for r in result["kernels"]:
        if r["verdict"] in ("error", "smem", "spill"):
            out.append(f"sm_{r['arch']} {r['dtype']} {r['kernel']} [{r['config']}] w{r['num_warps']}: {r['verdict']}"
                       + (f" ({r['error']})" if r.get("error") else f" (regs {r['registers']}, spill {r['spill']} B)"))
    for p in result["plans"]:
        if p["error"]:
            out.append(f"sm_{p['arch']} {p['dtype']} {p['op']} {p['plan']}: launcher raised {p['error']}")
        for g in p["bad_grids"]:
            out.append(f"sm_{p['arch']} {p['dtype']} {p['op']} {p['plan']}: grid over CUDA's limits: {g}")
    return out


__all__ = ["run", "failures", "stand_in_target", "capture", "resources"]
