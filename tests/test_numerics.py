"""fastvit_ops.numerics.error_rule: the rule of docs/numerics.md that the tests and ``check`` apply,
with negative controls: results 4× worse than eager fail, where the old floor (torch.testing's
tolerances, ~80 ulp in fp32) let them pass."""
import pytest
import torch
import torch.nn.functional as F

from fastvit_ops import numerics
from fastvit_ops.numerics import error_rule

OLD_TOL = {torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5), torch.float32: (1.3e-6, 1e-5)}


def _worse(eager, exact, factor):
    """A result whose error is ``factor`` times eager's, element by element (then rounded)."""
    return (exact + factor * (eager.double() - exact)).to(eager.dtype)


def _old_rule_ok(fused, eager, exact):
    """The rule before: elementwise ``max(atol + rtol·|exact|, 2·max|eager − exact|)``."""
    rtol, atol = OLD_TOL[fused.dtype]
    err_e = (eager.double() - exact).abs().max()
    return bool(((fused.double() - exact).abs() <= torch.clamp(atol + rtol * exact.abs(), min=2 * err_e)).all())


def _conv_case(dtype):
    """An eager depthwise conv (k = 7) in ``dtype`` and its float64 result on the same inputs."""
    x = torch.randn(2, 16, 24, 24, dtype=torch.float64).to(dtype)
    w = (torch.randn(16, 1, 7, 7, dtype=torch.float64) * 0.2).to(dtype)
    eager = F.conv2d(x.float(), w.float(), padding=3, groups=16).to(dtype) if dtype != torch.float32 \
        else F.conv2d(x, w, padding=3, groups=16)
    exact = F.conv2d(x.double(), w.double(), padding=3, groups=16)
    return eager, exact


def _sum_case(n=4000, channels=16, dtype=torch.float32):
    """Long fp32 sums with cancellation: what a bias gradient is."""
    terms = torch.randn(channels, n, dtype=torch.float64)
    terms[:, -1] -= terms.sum(1) - 1e-3 * torch.randn(channels, dtype=torch.float64)  # near-zero sums
    exact = terms.sum(1)
    eager = terms.to(dtype).sum(1)
    return exact, eager


@pytest.mark.parametrize("dtype", [torch.float32])
def test_accepts_eager_itself_and_a_small_extra_error(dtype):
    eager, exact = _conv_case(dtype)
    assert error_rule(eager, eager, exact).ok
    assert error_rule(_worse(eager, exact, 1.8), eager, exact).ok


def test_a_conv_4x_worse_than_eager_fails_and_passed_the_old_rule():
    """Negative control at fp32, where eager's error is a few ulp: the old floor was ~80 ulp."""
    eager, exact = _conv_case(torch.float32)
    worse = _worse(eager, exact, 4.0)
    r = error_rule(worse, eager, exact)
    assert not r.ok and r.fused_error > 2 * r.eager_error
    assert _old_rule_ok(worse, eager, exact), "the old rule should have let this through"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulation_fails(dtype):
    """In fp16/bf16 eager's error is its final rounding (half an ulp), so the floor of a few ulp
    binds; a kernel that accumulates in the half dtype instead of fp32 is far over it."""
    terms = torch.randn(16, 8192, dtype=torch.float64).to(dtype)
    exact = terms.double().sum(1)
    eager = terms.float().sum(1).to(dtype)
    acc = torch.zeros(16, dtype=dtype)
    for i in range(terms.shape[1]):
        acc = acc + terms[:, i]
    assert error_rule(eager, eager, exact).ok
    assert not error_rule(acc, eager, exact).ok


def test_a_sum_4x_worse_than_eager_fails():
    exact, eager = _sum_case()
    assert error_rule(eager, eager, exact).ok
    assert not error_rule(_worse(eager, exact, 4.0), eager, exact).ok


def test_worse_almost_everywhere_fails_on_rms():
    """Eager's largest error sits at one outlier; a result with that error at every element has the
    same largest error but fails the RMS condition."""
    exact = torch.randn(4096, dtype=torch.float64) * 10
    eager = exact.float()
    eager[7] += 1e-3
    err = (eager.double() - exact).abs().max()
    spread = (exact + err * 0.9 * torch.sign(torch.randn_like(exact))).float()
    r = error_rule(spread, eager, exact)
    assert r.bad == 0 and not r.ok and r.fused_rms > 2 * r.eager_rms


def test_floor_is_a_few_ulp_of_the_tensor_scale():
    exact = torch.tensor([100.0, 1e-3], dtype=torch.float64)
    eager = exact.float()  # exact to half an ulp: the floor binds
    f = numerics.floor(torch.float32, exact)
    assert f == pytest.approx(4 * torch.finfo(torch.float32).eps * 100)
    fused = eager.clone()
    fused[1] += 0.5 * f  # far over the element's own ulp, inside the tensor's floor
    assert error_rule(fused, eager, exact).ok
    fused[1] = exact[1] + 2 * f
    assert not error_rule(fused, eager, exact).ok


def test_nan_fails_and_bad_arguments_raise():
    exact = torch.randn(8, dtype=torch.float64)
    eager = exact.float()
    fused = eager.clone()
    fused[3] = float("nan")
    assert not error_rule(fused, eager, exact).ok
    with pytest.raises(ValueError, match="shapes"):
        error_rule(eager[:4], eager, exact)
    with pytest.raises(ValueError, match="dtypes"):
        error_rule(eager.half(), eager, exact)
    with pytest.raises(ValueError, match="eager"):
        error_rule(eager, [], exact)
    assert error_rule(eager[:0], eager[:0], exact[:0]).ok


def test_an_overflowing_eager_gives_no_yardstick_where_it_overflowed():
    exact = torch.tensor([1.0, 2.0, 70000.0, 3.0], dtype=torch.float64)
    eager = torch.tensor([1.0, 2.0, float("inf"), 3.0], dtype=torch.float16)
    fused = eager.clone()
    fused[2] = 65504.0  # fp16's largest finite value: off by 4496, far over eager's error elsewhere
    assert not error_rule(fused, eager, exact).ok
    fused[2] = float("inf")
    assert not error_rule(fused, eager, exact).ok  # non-finite fused values always fail
    ok = torch.tensor([1.0, 2.0, 3.0, 3.0], dtype=torch.float16)  # eager all NaN: the floor binds
    assert error_rule(ok, torch.full_like(ok, float("nan")), ok.double()).ok


def test_floor_is_at_least_the_subnormal_spacing():
    exact = torch.tensor([3e-9, -3e-9], dtype=torch.float64)  # below fp16's smallest subnormal
    zero = torch.zeros(2, dtype=torch.float16)  # the correctly rounded fp16 result
    assert error_rule(zero, zero, exact).ok
    assert not error_rule(torch.full((2,), 1e-6, dtype=torch.float16), zero, exact).ok


def test_compounded_factor_allows_3x_and_fails_8x():
    """``factor``: whole-block results may be COMPOUNDED_FACTOR (4x) off eager's error, not more;
    the one-op default still fails at 3x."""
    eager, exact = _conv_case(torch.float32)
    three, eight = _worse(eager, exact, 3.0), _worse(eager, exact, 8.0)
    assert not error_rule(three, eager, exact).ok
    assert error_rule(three, eager, exact, numerics.COMPOUNDED_FACTOR).ok
    assert not error_rule(eight, eager, exact, numerics.COMPOUNDED_FACTOR).ok
