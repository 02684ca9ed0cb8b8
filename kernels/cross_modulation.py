"""Sigmoid cross-modulation (the bidirectional interaction of FASA: FAT, "Lightweight Vision Transformer with Bidirectional Interaction", NeurIPS 2023), elementwise forward and backward.

mode "silu": out = SiLU(l)·SiLU(g);  mode "full": out = SiLU(SiLU(l))·SiLU(g)
(= SiLU(l)·SiLU(g)·σ(SiLU(l)), the paper's extra sigmoid). Math in fp32 (fp64 for fp64 inputs).
"""
import torch
import triton
import triton.language as tl

from .activations import sigmoid_c


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _load(ptr, offs, mask, F64: tl.constexpr):
    x = tl.load(ptr + offs, mask=mask, other=0.0)
    # One return statement: the compiler rejects two returns of different types even when a
    # constexpr condition leaves only one reachable (the interpreter accepted it).
    if F64:
        x = x.to(tl.float64)
    else:
        x = x.to(tl.float32)
    return x


@triton.jit
def _cross_mod_fwd_kernel(l_ptr, g_ptr, out_ptr, n, FULL: tl.constexpr, F64: tl.constexpr,
                          BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    l = _load(l_ptr, offs, mask, F64)
    g = _load(g_ptr, offs, mask, F64)
    a = l * _sigmoid(l)
    if FULL:
        a = a * _sigmoid(a)
    out = a * (g * _sigmoid(g))
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cross_mod_bwd_kernel(grad_ptr, l_ptr, g_ptr, dl_ptr, dg_ptr, n, FULL: tl.constexpr,
                          F64: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = _load(grad_ptr, offs, mask, F64)
    l = _load(l_ptr, offs, mask, F64)
    g = _load(g_ptr, offs, mask, F64)
    sl, cl = sigmoid_c(l)  # σ and 1 − σ (activations.py)
    a = l * sl
    da = sl * (1.0 + l * cl)  # d SiLU(l) / dl
    if FULL:
        sa, ca = sigmoid_c(a)
        da = da * sa * (1.0 + a * ca)
        a = a * sa
    sg, cg = sigmoid_c(g)
    b = g * sg
    db = sg * (1.0 + g * cg)
    tl.store(dl_ptr + offs, (dy * b * da).to(dl_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + offs, (dy * a * db).to(dg_ptr.dtype.element_ty), mask=mask)


def _grid(n, block):
    return (triton.cdiv(n, block),)


def _block():
    # One config under the interpreter (each launch costs ms there); 1024 keeps 4 warps busy on GPU.
    return 1024


def cross_modulation_forward(local: torch.Tensor, global_: torch.Tensor, out: torch.Tensor, full: bool) -> None:
    """Write the forward into ``out``; all three share one dense layout."""
    n = local.numel()
    if n == 0:
        return
    block = _block()
    _cross_mod_fwd_kernel[_grid(n, block)](local, global_, out, n, FULL=full,
                                           F64=local.dtype == torch.float64, BLOCK=block)


def cross_modulation_backward(grad, local, global_, dlocal, dglobal, full: bool) -> None:
    """Write dL/dlocal and dL/dglobal; all five share one dense layout."""
    n = local.numel()
    if n == 0:
        return
    block = _block()
    _cross_mod_bwd_kernel[_grid(n, block)](grad, local, global_, dlocal, dglobal, n, FULL=full,
                                           F64=local.dtype == torch.float64, BLOCK=block)


__all__ = ["cross_modulation_forward", "cross_modulation_backward"]
