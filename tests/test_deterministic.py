"""Deterministic mode (README "Deterministic mode"): under ``torch.use_deterministic_algorithms(True)``
every op and every converted model gives bitwise-identical outputs and gradients across processes
and runs. Two fresh processes (one with a churned allocator) hash the outputs and gradients of
every public op on each backend here and of converted fat_b0 / fcvit_tiny / cvt_13 (eval logits,
training-mode parameter gradients), each twice (tests/deterministic_run.py); every hash must agree.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastvit_ops
from fastvit_ops.ops import dwconv as dw
from op_cases import CASES

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _run(*args):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_INTERPRET", "1")
    return subprocess.Popen([sys.executable, str(HERE / "deterministic_run.py"), *args], cwd=str(ROOT), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc):
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_outputs_and_gradients_are_bitwise_equal_across_processes():
    a, b = _run(), _run("--churn")  # two processes at once
    first, second = _result(a), _result(b)
    assert set(first) == set(second)
    for op in CASES:
        assert any(k.startswith(op + "/") for k in first), f"{op} was not hashed"
    for name in ("fat_b0", "fcvit_tiny", "cvt_13"):
        assert f"model {name}" in first
    within = sorted(k for k, v in {**first, **second}.items() if v == "differs within the process")
    assert not within, f"not reproducible within a process: {within}"
    across = sorted(k for k in first if first[k] != second[k])
    assert not across, f"differ between two processes: {across}"


def test_hash_sees_one_ulp():
    """Negative control: the digest of the deterministic run changes when one output moves by one
    ulp (and not otherwise)."""
    from deterministic_run import digest

    t = torch.randn(3, 5)
    same = t.clone()
    moved = t.clone()
    moved[1, 2] = torch.nextafter(moved[1, 2], torch.tensor(float("inf")))
    assert digest([t]) == digest([same]) != digest([moved])
    assert digest([t]) != digest([t.double()])  # dtype is part of the digest
    assert hashlib.sha256(b"").hexdigest() != digest([t])


@pytest.mark.skipif(not fastvit_ops.backend_available("cpu", torch.device("cpu"))[0], reason="needs the C++ extension")
def test_dwconv_forward_is_ours_in_deterministic_mode(monkeypatch):
    """auto's CPU choice is a fixed rule (no timing); under torch.use_deterministic_algorithms(True)
    dwconv2d's forward is our kernel even where the rule names oneDNN (the control: outside the
    mode the same call takes oneDNN)."""
    from fastvit_ops.ops import cpu_rules

    x, w = torch.randn(8, 160, 14, 14), torch.randn(160, 1, 9, 9)
    table = dict(cpu_rules.DWCONV_ONEDNN)
    table[cpu_rules.capability()] = frozenset({(9, 1, "small")})
    monkeypatch.setattr(cpu_rules, "DWCONV_ONEDNN", table)
    assert dw.cpu_forward_choice(x, w, None, 1, 4, 0, False) == "onednn", "control: the rule names oneDNN"
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert dw.cpu_forward_choice(x, w, None, 1, 4, 0, False) == "cpu"
    finally:
        torch.use_deterministic_algorithms(prev)
