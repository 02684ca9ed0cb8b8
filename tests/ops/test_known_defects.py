"""Defects the tightened error rule (4 ulp floor, 2× eager in largest and RMS error) found in
kernels owned by other work, each as a fixed-seed reproducer marked ``xfail(strict=True)`` with
the defect and its owner named. When a kernel is fixed its reproducer passes, the strict xfail
turns that into a failure, and the marker and the matching entry of
``properties.KNOWN_DEFECTS`` (which keeps the property tests and ``check``'s test off the
defect meanwhile) are removed together.

The reference backend runs the same calls within the rule (asserted here), so the inputs are
not what fails.
"""
import pytest
import torch

import fastvit_ops
from conftest import backends_for
from fastvit_ops.benchmarks import attention as att_cases
from fastvit_ops.benchmarks import runner
from properties import KNOWN_DEFECTS
import test_properties as tp

BACKENDS = backends_for("cpu")
OWNER = {"cpu": "the C++ attention kernels, csrc/cpu/attention.cpp (issue 12)",
         "triton": "the Triton attention kernels, kernels/attention.py (the lead)"}


def _defect(backend, request, what):
    if ("downsampled_attention", backend) in KNOWN_DEFECTS:
        # Strict for our C++ kernels. Not for Triton here: on CPU it runs in the interpreter, whose
        # fp32 math is NumPy's, so its error at one seed moves with the environment (the same
        # kernel failed the rule in earlier CI runs and passed it on a fresh machine with NumPy
        # 2.4.6 and triton 3.8.0, unchanged); the GPU tests judge the compiled kernel.
        strict = backend != "triton"
        request.applymarker(pytest.mark.xfail(strict=strict, reason=f"{what}: {OWNER[backend]}"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_forward_at_large_logits(backend, request):
    """fp32, d = 128, two keys, q and k ~ 3·N(0, 1) (logits ~±30): the C++ and Triton forwards
    measured 2.3-2.5× eager's error, largest and RMS (5 of 10 seeds); the reference stays within
    the rule. Fixed in the C++ kernels (2026-12-05): their 128-term score sums were one running
    register sum, now 32-term blocks (1.8× → 1.1× eager's RMS over 300 instances); a regression
    test for them now."""
    if backend == "triton":
        _defect(backend, request, "attention forward 2.5x eager's fp32 error at large logits")
    case = {"backend": backend, "dtype": torch.float32, "seed": 1519, "B": 2, "h": 1, "N": 40, "M": 2, "d": 128,
            "scale": None, "logit": 3.0, "layouts": ["contiguous"] * 3}
    tp.test_downsampled_attention.hypothesis.inner_test(case)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.id in ("reference", "cpu")])
def test_attention_at_large_logits_d40(backend, request):
    """What is left of the C++ kernels' large-logit defect. fp32, d = 40, 3 keys, scale 1 (logits
    ~±6σ, two keys often competing): the C++ forward and backward fail the rule on 39-41 of 200 seeds
    (this one: dq on 5 elements over, 3.6x eager's largest error; 2.1x on the baseline build). The
    cause is the rounding of the 40-term score sums (the softmax amplifies it by the logits' spread): an fp32 emulation of
    summation orders failed 36 of 400 draws with the kernels' 32-term blocks, 11 with 8-term blocks
    and 2 with two interleaved partial sums per 16-term block (eager's GEMM sums in vector-lane
    partials); the last, built, took 39 to 7 of 200 here but cost 8-14% of the attention's time on
    AVX2 (fewer rows per register block), so it was not kept (2026-12-05)."""
    if backend != "reference":
        _defect(backend, request, "attention fp32 outliers at large logits (39 of 200 seeds at d = 40, scale 1)")
    case = {"backend": backend, "dtype": torch.float32, "seed": 10, "B": 1, "h": 1, "N": 23, "M": 3, "d": 40,
            "scale": 1.0, "logit": 1.0, "layouts": ["contiguous"] * 3}
    tp.test_downsampled_attention.hypothesis.inner_test(case)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.id in ("reference", "cpu")])
@pytest.mark.parametrize("seed", [33, 34, 36])
def test_attention_at_fat_shape_pooled(backend, seed, request):
    """FAT-tiny stage 1 (2 heads, 81 queries, 49 keys, d = 4, gate), fp32, pooled over 4 random
    instances as ``python -m fastvit_ops check`` runs it: the C++ kernels measured 2.4-4.5× eager's
    largest error on one of output, dq, dv or dgate in 5 of 40 seeds (seed 33: 4.5×), and still
    10 of 40 by the 2× ratio alone (seeds 0-39; 33: dq 2.6×, 34: dq 2.2×, 36: d gate 3.0×; with the
    rule's 4-ulp floor seed 33 still fails, 34 and 36 pass) after the first accuracy fixes.
    Fixed (2026-12-05, later): the backward rebuilt P and the pre-gate O from the saved fp32 log2 Σ
    (~3 ulp of Σ), summed Σ_j P·dP in one fp32 running sum, and formed d gate = dout·O·σ(O) (two
    roundings); it now recomputes the forward's e, Σ (eight partial sums in both) and O bitwise,
    sums Σ_j P·dP in double, and rounds SiLU(O) once. By the ratio alone 2 of those 40 seeds fail
    now (3 of the next 60). A regression test."""
    case = next(c for c in att_cases.check_cases(torch.device("cpu")) if "N81" in c.shape)
    torch.manual_seed(seed)
    row = runner.check_case(case, backend)
    assert row["ok"], (f"tensors {row['failed_tensors']}: fused {row['worst_fused_vs_float64']:.3g} vs eager "
                       f"{row['worst_eager_vs_float64']:.3g}")


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.id in ("reference", "cpu")])
def test_attention_nchw_outlier_at_natural_logits(backend, request):
    """Found by the property tests at 500 examples: channels-first with a gate, d = 8, 4×5 queries,
    8 keys, q and k ~ N(0, 1), fp32: the C++ dq had one element at 3.4× eager's error (RMS 1.5×).
    Fixed (2026-12-05): the backward recomputed P from one exponent rounded at log2 Σ's magnitude;
    it now multiplies e^((q·k − max)·scale) by 1/Σ computed per query in double. A regression test."""
    case = {"backend": backend, "dtype": torch.float32, "seed": 192, "B": 2, "heads": 1, "d": 8, "H": 4, "W": 5,
            "M": 8, "gate": True, "scale": None, "layouts": ["contiguous", "expanded", "contiguous", "expanded"]}
    tp.test_downsampled_attention_nchw.hypothesis.inner_test(case)


def test_known_defects_name_backends_here():
    for op, backend in KNOWN_DEFECTS:
        assert op == "downsampled_attention" and backend in OWNER, (op, backend)
    assert fastvit_ops.BACKENDS  # (the table refers to real backend names)
