"""The C++ CPU kernels at every capability this CPU runs (default, avx2, avx512): chosen once at
load, forced lower with FASTVIT_OPS_CPU_CAPABILITY (a warning when the request cannot be met), and
the same answers within the error rule at each. A capability is fixed when the extension loads, so
each one runs in its own process."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastvit_ops import _availability as avail
from fastvit_ops.ops import cpu_rules, dispatch

ROOT = Path(__file__).resolve().parents[2]
ORDER = ("default", "avx2", "avx512")
info = avail.cpu_capability()
pytestmark = pytest.mark.skipif(info is None, reason="needs the C++ CPU extension")


def runnable():
    """The capabilities both built and supported by this CPU."""
    return [c for c in info["built"] if ORDER.index(c) <= ORDER.index(info["cpu"])]


def run_python(code: str, capability=None, **extra_env):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **extra_env}
    env.pop("FASTVIT_OPS_CPU_CAPABILITY", None)
    if capability is not None:
        env["FASTVIT_OPS_CPU_CAPABILITY"] = capability
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)


def test_choice_is_reported_and_consistent():
    assert info["cpu"] in ORDER and info["in_use"] in info["built"] and "default" in info["built"]
    forced = os.environ.get("FASTVIT_OPS_CPU_CAPABILITY")
    if not forced:  # the best this CPU supports among the builds
        assert info["in_use"] == max(runnable(), key=ORDER.index)
        assert info["warning"] == ""
    assert cpu_rules.capability() == info["in_use"]


@pytest.mark.parametrize("capability", ORDER)
def test_forcing_a_capability(capability):
    r = run_python("""
        import json, warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as w:
            import fastvit_ops
            from fastvit_ops import _availability as avail
            print(json.dumps([avail.cpu_capability(), [str(x.message) for x in w]]))
        """, capability)
    assert r.returncode == 0, r.stderr[-2000:]
    got, warned = json.loads(r.stdout.strip().splitlines()[-1])
    if capability in runnable():
        assert got["in_use"] == capability and f"FASTVIT_OPS_CPU_CAPABILITY={capability}" in got["reason"]
        assert not any("FASTVIT_OPS_CPU_CAPABILITY" in m for m in warned)
    else:  # more than the CPU (or the build) has: the best available, with a warning saying why
        assert got["in_use"] == max(runnable(), key=ORDER.index)
        assert any("FASTVIT_OPS_CPU_CAPABILITY" in m for m in warned), warned


def test_unknown_capability_warns_and_is_ignored():
    r = run_python("""
        import warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as w:
            import fastvit_ops
            from fastvit_ops import _availability as avail
            print(avail.cpu_capability()["in_use"], "|", " ".join(str(x.message) for x in w))
        """, "sse9")
    assert r.returncode == 0, r.stderr[-2000:]
    in_use, warned = r.stdout.strip().splitlines()[-1].split("|", 1)
    assert in_use.strip() == max(runnable(), key=ORDER.index)
    assert "sse9 is not one of default, avx2, avx512" in warned


# Every op's C++ forward and backward at odd shapes, fp32, run with backend("cpu") (our kernels,
# not the eager rule) in a child process per capability; outputs and gradients saved for the parent.
_OPS_SCRIPT = """
import sys, torch, fastvit_ops
from fastvit_ops import backend, dwconv2d, sigmoid_cross_modulation, downsampled_attention, token_global_similarity
torch.manual_seed(int(sys.argv[1]))
def case():
    cl = torch.randn(3, 13, 9, 11, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    return {
        "cross_modulation": (lambda l, g: sigmoid_cross_modulation(l, g, "full"),
                             [torch.randn(2, 7, 5, 13, dtype=torch.float64), torch.randn(2, 7, 5, 13, dtype=torch.float64)]),
        "dwconv_silu_k7": (lambda x, w, b: dwconv2d(x, w, b, 1, None, "silu", True),
                           [cl, torch.randn(13, 1, 7, 7, dtype=torch.float64), torch.randn(13, dtype=torch.float64)]),
        "dwconv_gelu_k3_s2": (lambda x, w, b: dwconv2d(x, w, b, 2, None, "gelu"),
                              [torch.randn(2, 21, 15, 10, dtype=torch.float64), torch.randn(21, 1, 3, 3, dtype=torch.float64),
                               torch.randn(21, dtype=torch.float64)]),
        "attention": (lambda q, k, v: downsampled_attention(q, k, v),
                      [torch.randn(2, 3, 37, 16, dtype=torch.float64), torch.randn(2, 3, 9, 16, dtype=torch.float64),
                       torch.randn(2, 3, 9, 16, dtype=torch.float64)]),
        "global_similarity": (lambda x, a, b: token_global_similarity(x, a, b, groups=4),
                           [torch.randn(2, 16, 9, 7, dtype=torch.float64), torch.randn(4, dtype=torch.float64),
                            torch.randn(4, dtype=torch.float64)]),
    }
out = {}
for name, (fn, inputs) in case().items():
    res = {}
    for dt in (torch.float32, torch.float64):
        xs = [t.to(dt).detach().requires_grad_() for t in inputs]
        with backend("cpu"):
            y = fn(*xs)
            dy = torch.ones_like(y).mul_(0.5).add_(torch.linspace(-1, 1, y.numel(), dtype=dt).view_as(y))
            grads = torch.autograd.grad(y, xs, dy)
        res[str(dt)] = [y.detach()] + [g.detach() for g in grads]
        if dt == torch.float32:  # eager PyTorch's own fp32 results, for the error rule
            with backend("reference"):
                y = fn(*xs)
                grads = torch.autograd.grad(y, xs, dy)
            res["eager32"] = [y.detach()] + [g.detach() for g in grads]
    out[name] = res
torch.save(out, sys.argv[2])
"""


def test_every_capability_gives_the_same_answers(tmp_path):
    """At each capability: fp64 agrees with every other capability's fp64 to rounding, and the fp32
    error against fp64 is at most 2x eager PyTorch's fp32 error (the project's error rule)."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    results = {}
    for cap in runnable():
        path = tmp_path / f"{cap}.pt"
        r = run_python(_OPS_SCRIPT.replace("sys.argv[1]", repr(str(seed))).replace("sys.argv[2]", repr(str(path))), cap)
        assert r.returncode == 0, f"{cap}: {r.stderr[-3000:]}"
        results[cap] = torch.load(path)
    assert set(results) >= {"default"}
    first = results[runnable()[0]]
    for cap, res in results.items():
        for name, by in res.items():
            for got64, want64 in zip(by["torch.float64"], first[name]["torch.float64"]):
                torch.testing.assert_close(got64, want64, rtol=1e-10, atol=1e-10, msg=f"{cap} {name} fp64")
            for i, (got, eager, exact) in enumerate(zip(by["torch.float32"], by["eager32"], by["torch.float64"])):
                ours = (got.double() - exact).abs().max().item()
                theirs = (eager.double() - exact).abs().max().item()
                scale = exact.abs().max().item()
                assert ours <= 2 * theirs + 1e-6 * scale, f"seed {seed}, {cap} {name} output {i}: {ours} vs eager {theirs}"


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_op_tests_pass_at_capability(capability):
    """A fast subset of the op tests (gradcheck, error rule, layouts, bad input) in a process forced
    to ``capability``; the whole suite runs at the best capability."""
    if capability not in runnable():
        pytest.skip(f"this CPU or build has no {capability} kernels")
    if capability == max(runnable(), key=ORDER.index) and not os.environ.get("FASTVIT_OPS_CPU_CAPABILITY"):
        pytest.skip("the best capability is the one the rest of the suite runs at")
    # test_dwconv.py, test_attention.py: each capability has its own register blocks and kernel
    # choices (e.g. AVX2's two-row dwconv blocks, its rows/flat forward rule, its 6 x 2 attention
    # cols_dot blocks), which run only here on a machine with a higher capability.
    # Not the attention's fp32 error-rule test: it fails now and then on one outlier element on
    # every capability (2-4% of runs here, the known defect of test_known_defects.py); the main
    # suite runs it once, at the best capability, and the float64 tests and gradchecks here cover
    # these kernels' correctness.
    files = ["tests/ops/test_cross_modulation.py", "tests/ops/test_global_context.py", "tests/ops/test_dwconv.py",
             "tests/ops/test_attention.py"]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files,
                        "-k", "not triton and not cuda and not compile and not "
                              "(test_attention and test_low_precision_error_rule)"],
                       capture_output=True, text=True, cwd=ROOT, timeout=1200,
                       env={**os.environ, "FASTVIT_OPS_CPU_CAPABILITY": capability,
                            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


def test_eager_rule_routes_only_auto_plain_calls(monkeypatch):
    """Where cpu_rules.EAGER names a call's class, auto runs eager PyTorch (the 'eager_by_rule'
    entry); backend('cpu') keeps ours; the choice is the same for the same class."""
    from fastvit_ops import sigmoid_cross_modulation

    l, g = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    key = ("sigmoid_cross_modulation", cpu_rules.CLASSIFY["sigmoid_cross_modulation"]((l,)), "inference")
    monkeypatch.setitem(cpu_rules.EAGER, cpu_rules.capability(), frozenset({key}))
    with torch.no_grad(), dispatch.recording() as rec:
        y = sigmoid_cross_modulation(l, g)
    assert [c.impl.name for c in rec if c.stage == "call"] == ["eager_by_rule"]
    with torch.no_grad(), dispatch.recording() as rec, dispatch.backend("cpu"):
        y2 = sigmoid_cross_modulation(l, g)
    assert "eager_by_rule" not in [c.impl.name for c in rec]
    torch.testing.assert_close(y, y2)
    monkeypatch.setitem(cpu_rules.EAGER, cpu_rules.capability(), frozenset())
    with torch.no_grad(), dispatch.recording() as rec:
        sigmoid_cross_modulation(l, g)
    assert "eager_by_rule" not in [c.impl.name for c in rec]
