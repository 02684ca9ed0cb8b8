"""``python -m fastvit_ops aot-check``: the Triton kernels compile for sm_80 and sm_90 without a
GPU, with no spills, shared memory within limits and grids within CUDA's limits.

CI runs a subset of the plans (the full run, every FAT-B0 / FCViT-tiny / CvT-13 shape in fp32,
bf16 and fp16 on both architectures, takes ~10 minutes on 2 cores; its table is in the README):
the shapes below cover every kernel, every head_dim the models use (16, 64), the stride-2
depthwise dgrad, the 7×7 planes and k = 31, in fp32 and bf16. It runs in a subprocess: the
test session's ``TRITON_INTERPRET=1`` would make the launchers pick the interpreter's blocks.
"""
import json
import os
import subprocess
import sys

import pytest

from fastvit_ops import _availability as avail

CI_SHAPES = "FAT-B0 s1,FAT-B0 s4,FCViT-tiny s1,FCViT-tiny s4,CvT-13 s1,CvT-13 s3,sweep (64, 384, 32, 32) k31"


@pytest.mark.slow
@pytest.mark.skipif(not avail.triton()[0], reason="needs Triton")
def test_aot_check_subset_passes(tmp_path):
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastvit_ops", "aot-check", "--arch", "80,90", "--dtypes", "fp32,bf16",
                           "--shapes", CI_SHAPES, "--json", str(out)], capture_output=True, text=True, env=env,
                          timeout=3000)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert not result["failures"]
    kernels = {r["kernel"] for r in result["kernels"]}
    for name in ("_dw_fwd_kernel", "_dw_dgrad_kernel", "_dw_wgrad_kernel", "_attn_fwd_kernel",
                 "_attn_bwd_single_kernel", "_attn_bwd_q_kernel", "_attn_bwd_kv_kernel", "_cross_mod_fwd_kernel",
                 "_cross_mod_bwd_kernel", "_fwd_sim_kernel", "_fwd_apply_kernel", "_bwd_reduce_kernel",
                 "_bwd_apply_kernel"):
        assert name in kernels, f"{name} was never compiled"
    assert {r["arch"] for r in result["kernels"]} == {80, 90}
    assert all(r["verdict"] == "ok" and r["spill"] == 0 for r in result["kernels"])
    assert all(p["bytes"] > 0 and p["min_bytes"] > 0 for p in result["plans"])


def test_verdicts_flag_spills_errors_shared_memory_and_grids():
    """The rules the exit code follows, on made-up rows (a negative control for the test above)."""
    from fastvit_ops import aot

    base = {"arch": 90, "dtype": "fp32", "kernel": "k", "config": "", "num_warps": 4, "error": None,
            "registers": 64, "stack": 0, "spill": 0, "shared": 1024}
    assert aot._verdict(dict(base), 90) == "ok"
    assert aot._verdict(dict(base, stack=8), 90) == "ok"  # a call frame, not a spill
    assert aot._verdict(dict(base, stack=8, spill=4), 90) == "spill"
    assert aot._verdict(dict(base, stack=8, spill=4, dtype="fp64"), 90).startswith("spill (fp64")
    assert aot._verdict(dict(base, shared=200 * 1024), 80) == "smem"
    assert aot._verdict(dict(base, shared=200 * 1024), 90) == "ok"
    assert aot._verdict(dict(base, error="CompilationError"), 90) == "error"
    rows = [dict(base, spill=8, verdict="spill"), dict(base, verdict="ok")]
    plans = [{"arch": 90, "dtype": "fp32", "op": "o", "plan": "p", "error": None, "bad_grids": ["k(1, 70000)"]}]
    bad = aot.failures({"kernels": rows, "plans": plans})
    assert len(bad) == 2 and "spill" in bad[0] and "grid" in bad[1]
