"""The error rule of docs/numerics.md, shared by ``python -m fastvit_ops check`` and the test suite.

A fused op's result in a dtype may be off the float64 result by at most twice the eager PyTorch
layer's own error in that dtype (flash-attention's rule), with ``torch.testing``'s default
tolerances as the floor (so an exact eager layer does not demand bit-exactness).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import torch

# torch.testing's default (rtol, atol) per dtype: the floor of the rule.
DEFAULT_TOL = {torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5), torch.float32: (1.3e-6, 1e-5),
               torch.float64: (1e-7, 1e-7)}


class RuleResult(NamedTuple):
    ok: bool
    fused_error: float   # max |fused − exact|
    eager_error: float   # max |eager − exact|
    bad: int             # elements over the allowed error


def error_rule(fused: torch.Tensor, eager: Union[torch.Tensor, Sequence[torch.Tensor]],
               exact: torch.Tensor, floor: str = "element") -> RuleResult:
    """Check ``|fused − exact| ≤ max(2·max|eager − exact|, atol + rtol·|exact|)`` elementwise.

    ``fused`` and ``eager``: the same shape and dtype (fp16/bf16/fp32/fp64); ``exact``: the float64
    result of the same (already rounded) inputs. ``eager`` may be several equally valid eager
    evaluations (the same layer on differently laid-out inputs, so a different BLAS summation
    order): eager's error is then the largest of theirs, a steadier yardstick where one rounding
    (of large attention logits, say) dominates. ``floor="tensor"`` takes the floor at the tensor's
    scale, ``atol + rtol·max|exact|``: for a small gradient that is a long sum with cancellation
    (a bias gradient of 16 channels), an element's own size says nothing about its rounding error,
    and eager's max error over so few elements is too noisy a yardstick on its own. Non-finite fused
    values always fail. Raises ``ValueError`` when the shapes or dtypes differ or ``floor`` is unknown.
    """
    if floor not in ("element", "tensor"):
        raise ValueError(f"floor must be 'element' or 'tensor', got {floor!r}")
    eagers = [eager] if isinstance(eager, torch.Tensor) else list(eager)
    if not eagers:
        raise ValueError("eager: expected a tensor or a non-empty sequence of tensors")
    for e in eagers:
        if fused.shape != exact.shape or e.shape != exact.shape:
            raise ValueError(f"shapes differ: fused {tuple(fused.shape)}, eager {tuple(e.shape)}, "
                             f"exact {tuple(exact.shape)}")
        if fused.dtype != e.dtype:
            raise ValueError(f"dtypes differ: fused {fused.dtype}, eager {e.dtype}")
    rtol, atol = DEFAULT_TOL[fused.dtype]
    exact = exact.double()
    if fused.numel() == 0:
        return RuleResult(True, 0.0, 0.0, 0)
    err_f = (fused.double() - exact).abs()
    err_e = max((e.double() - exact).abs().max().item() for e in eagers)
    scale = exact.abs() if floor == "element" else exact.abs().max()
    allowed = torch.clamp(atol + rtol * scale, min=2 * err_e)
    bad = ~(err_f <= allowed)  # NaN fails
    n_bad = int(bad.sum())
    return RuleResult(n_bad == 0 and bool(torch.isfinite(fused).all()), err_f.max().item(), err_e, n_bad)
