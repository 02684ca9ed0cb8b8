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
    env.pop("FASTVIT_OPS_DWCONV_TUNE", None)  # deterministic mode itself must turn the timing off
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


def _count_timings(monkeypatch):
    monkeypatch.setenv("FASTVIT_OPS_DWCONV_TUNE", "1")
    monkeypatch.setattr(dw, "_cpu_choice", {})
    timed = []
    monkeypatch.setattr(dw, "_time_ms", lambda *a, **k: timed.append(a) or 1.0)
    return timed


@pytest.mark.skipif(not fastvit_ops.backend_available("cpu", torch.device("cpu"))[0], reason="needs the C++ extension")
def test_timing_choice_is_off_in_deterministic_mode(monkeypatch):
    """Under torch.use_deterministic_algorithms(True), auto takes no timing-based choice: dwconv2d's
    CPU forward is our kernel, untimed (the same call outside the mode is timed: the control)."""
    timed = _count_timings(monkeypatch)
    x, w = torch.randn(1, 4, 9, 9), torch.randn(4, 1, 3, 3)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch.no_grad():
            fastvit_ops.dwconv2d(x, w)
        assert dw.cpu_forward_choice(x, w, None, 1, 1, 0, False) == "cpu"
    finally:
        torch.use_deterministic_algorithms(prev)
    assert not timed, "a kernel was chosen by timing in deterministic mode"
    assert not dw.cpu_forward_choices()
    with torch.no_grad():
        fastvit_ops.dwconv2d(x, w)
    assert timed, "negative control: outside deterministic mode the call is timed"


@pytest.mark.skipif(not fastvit_ops.backend_available("cpu", torch.device("cpu"))[0], reason="needs the C++ extension")
def test_timing_choices_are_bounded_and_stable(monkeypatch):
    """Outside deterministic mode the table of timed choices stays bounded (MAX_CHOICES); a
    signature past the bound takes our kernel untimed, every time."""
    timed = _count_timings(monkeypatch)
    monkeypatch.setattr(dw, "MAX_CHOICES", 3)
    w = torch.randn(2, 1, 3, 3)
    with torch.no_grad():
        for n in range(5, 10):
            fastvit_ops.dwconv2d(torch.randn(1, 2, n, n), w)
    assert len(dw.cpu_forward_choices()) == 3
    count = len(timed)
    x = torch.randn(1, 2, 11, 11)
    assert [dw.cpu_forward_choice(x, w, None, 1, 1, 0, False) for _ in range(3)] == ["cpu"] * 3
    assert len(timed) == count and len(dw.cpu_forward_choices()) == 3
