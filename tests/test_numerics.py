"""fastvit_ops.numerics.error_rule: the rule of docs/numerics.md that the tests and ``check`` apply."""
import pytest
import torch

from fastvit_ops.numerics import error_rule


def _sum_case(n=4000, channels=16, dtype=torch.float32):
    """Long fp32 sums with cancellation: what a bias gradient is."""
    terms = torch.randn(channels, n, dtype=torch.float64)
    terms[:, -1] -= terms.sum(1) - 1e-3 * torch.randn(channels, dtype=torch.float64)  # near-zero sums
    exact = terms.sum(1)
    eager = terms.to(dtype).sum(1)
    return terms, exact, eager


def test_accepts_eager_itself_and_a_tiny_extra_error():
    _, exact, eager = _sum_case()
    assert error_rule(eager, eager, exact).ok
    worse = (eager.double() + 0.8 * (eager.double() - exact)).to(eager.dtype)  # 1.8× eager's error
    assert error_rule(worse, eager, exact).ok


@pytest.mark.parametrize("floor", ["element", "tensor"])
def test_rejects_an_error_well_over_twice_eager(floor):
    x = torch.randn(64, 64, dtype=torch.float64) * 3
    eager = x.float()
    wrong = eager * (1 + 1e-4)
    r = error_rule(wrong, eager, x, floor=floor)
    assert not r.ok and r.bad > 0 and r.fused_error > 2 * r.eager_error


def test_tensor_floor_is_the_scale_of_the_tensor():
    exact = torch.tensor([100.0, 1e-3], dtype=torch.float64)
    eager = exact.float()
    fused = eager.clone()
    fused[1] += 5e-5  # far over the element's own floor, tiny next to the tensor's scale (1.4e-4)
    assert not error_rule(fused, eager, exact).ok
    assert error_rule(fused, eager, exact, floor="tensor").ok


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
    with pytest.raises(ValueError, match="floor"):
        error_rule(eager, eager, exact, floor="row")
