"""The error rule of docs/numerics.md, shared by ``python -m fastvit_ops check`` and the test suite.

A fused op's result in a dtype may be off the float64 result by at most twice the eager PyTorch
layer's own error in that dtype (flash-attention's rule), both in the largest error and in the
root-mean-square error over the tensor. The floor below which any error passes is a few ulp of
the tensor's scale, ``ULPS · eps(dtype) · max|exact|``: an exact eager layer (a single rounding)
does not demand bit-exactness, and everywhere eager's own error is larger than that, the 2× term
is what binds. (torch.testing's default tolerances, the floor before, are ~80 ulp in fp32 and let
a kernel 10× worse than eager pass.)
"""
from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import torch

#: The floor, in units of the dtype's machine epsilon at the tensor's largest exact magnitude.
ULPS = 4.0
#: How much larger than eager's error the fused error may be.
FACTOR = 2.0
#: The factor for results compounded through a whole block or model (every parameter gradient of
#: a block, a network's logits), where each element carries the rounding of every layer after it
#: and a few ill-conditioned elements dominate: there two equally accurate evaluations differ by
#: more than 2x in their largest error (and their RMS error) in a few runs in a hundred, measured
#: on FCViT blocks (over 300 runs the worst of 38 gradients: max-error ratio p99 2.9, worst 3.0;
#: RMS ratio worst 2.2). The single-op rule stays FACTOR; a wrong kernel is off by far more.
COMPOUNDED_FACTOR = 4.0


class RuleResult(NamedTuple):
    ok: bool
    fused_error: float   # max |fused − exact|
    eager_error: float   # max |eager − exact|
    bad: int             # elements over the allowed (largest) error
    fused_rms: float = 0.0   # root-mean-square of fused − exact
    eager_rms: float = 0.0   # root-mean-square of eager − exact (the largest over the evaluations)


def floor(dtype: torch.dtype, exact: torch.Tensor) -> float:
    """The error any result may have: ``ULPS · eps(dtype) · max|exact|``, and at least ``ULPS``
    times the dtype's subnormal spacing (``eps · tiny``: fp16 cannot hold 3e-9, so a correctly
    rounded 0 is off by that much)."""
    info = torch.finfo(dtype)
    scale = exact.detach().abs().max().item() if exact.numel() else 0.0
    return ULPS * info.eps * max(scale, info.tiny)


def error_rule(fused: torch.Tensor, eager: Union[torch.Tensor, Sequence[torch.Tensor]],
               exact: torch.Tensor, factor: float = FACTOR) -> RuleResult:
    """Check ``fused`` against ``exact`` with eager's error as the yardstick:

    * ``max|fused − exact| ≤ max(factor·max|eager − exact|, f)`` and
    * ``rms(fused − exact) ≤ max(factor·rms(eager − exact), f)``,

    ``f = ULPS·eps(dtype)·max|exact|`` (:func:`floor`). The RMS condition catches a result that is
    worse nearly everywhere while eager's largest error sits at one outlier element.

    ``fused`` and ``eager``: the same shape and dtype (fp16/bf16/fp32/fp64); ``exact``: the float64
    result of the same (already rounded) inputs. ``factor``: :data:`FACTOR` for one op,
    :data:`COMPOUNDED_FACTOR` for results of a whole block or model. ``eager`` may be several
    equally valid eager evaluations (the same layer on differently laid-out inputs, so a different summation order):
    eager's errors are then the largest of theirs, a steadier yardstick where one rounding (of
    large attention logits, say) dominates. Eager's errors are taken where eager's result is
    finite. Non-finite fused values always fail. Raises
    ``ValueError`` when the shapes or dtypes differ or ``eager`` is empty.
    """
    eagers = [eager] if isinstance(eager, torch.Tensor) else list(eager)
    if not eagers:
        raise ValueError("eager: expected a tensor or a non-empty sequence of tensors")
    for e in eagers:
        if fused.shape != exact.shape or e.shape != exact.shape:
            raise ValueError(f"shapes differ: fused {tuple(fused.shape)}, eager {tuple(e.shape)}, "
                             f"exact {tuple(exact.shape)}")
        if fused.dtype != e.dtype:
            raise ValueError(f"dtypes differ: fused {fused.dtype}, eager {e.dtype}")
    if fused.numel() == 0:
        return RuleResult(True, 0.0, 0.0, 0)
    exact = exact.detach().double()
    err_f = (fused.detach().double() - exact).abs()
    # Eager's error where eager's result is finite: an eager layer that overflows (fp16 statistics
    # of a large-mean input, say) gives no yardstick there, and a fused op that stays finite is
    # held to eager's error elsewhere and to the floor.
    errs_e = [(e.detach().double() - exact).abs() for e in eagers]
    errs_e = [err[torch.isfinite(err)] for err in errs_e]
    max_e = max((err.max().item() if err.numel() else 0.0) for err in errs_e)
    rms_e = max((err.square().mean().sqrt().item() if err.numel() else 0.0) for err in errs_e)
    rms_f = err_f.square().mean().sqrt().item()
    f = floor(fused.dtype, exact)
    allowed = max(factor * max_e, f)
    bad = int((~(err_f <= allowed)).sum())  # NaN fails
    ok = bad == 0 and rms_f <= max(factor * rms_e, f) and bool(torch.isfinite(fused).all())
    return RuleResult(ok, err_f.max().item(), max_e, bad, rms_f, rms_e)
