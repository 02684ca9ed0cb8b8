"""Elementwise activation math shared by the Triton kernels (fp32 or fp64, as given).

``sigmoid_c`` returns σ(x) with its complement 1 − σ(x): derivatives need the complement, and
``1 − σ`` rounded cancels (at x = 8 half an ulp of σ is 1e-4 of 1 − σ, which SiLU'(x) = σ(1 + x(1 − σ))
multiplies by x). The CPU kernels do the same (csrc/cpu/isa/vec.h ``sigmoid_c``).
"""
import triton
import triton.language as tl


@triton.jit
def sigmoid_c(x):
    """(σ(x), 1 − σ(x)) from one exp and one division. For x ≥ 0, 1 − σ = e·σ with e = exp(−x) ≤ 1;
    for x < 0, σ < ½ so 1 − σ does not cancel (and e·σ would be inf·0 past x = −88 in fp32)."""
    e = tl.exp(-x)
    s = 1.0 / (1.0 + e)
    return s, tl.where(x >= 0, e * s, 1.0 - s)


@triton.jit
def silu_grad(x):
    """SiLU'(x) = σ(x)(1 + x(1 − σ(x)))."""
    s, c = sigmoid_c(x)
    return s * (1.0 + x * c)
