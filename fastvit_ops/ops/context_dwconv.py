"""FCViT's global-context apply fused into the next depthwise conv's input load (docs/global_context.md step 6 +
§1.1): ``y = act(DW(x + S'·c) + bias)`` without writing ``x + S'·c`` to memory (custom op, fake,
autograd, dispatch).

In the token mixer (docs/fcvit.md) each ``Z + GC(Z)`` feeds an 11×11 depthwise conv. Here the conv
forms ``z = x + S'[γ]·c`` one plane at a time in cache as it packs its input (C++ CPU), so the
fused token mixer never stores ``z``; ``S'`` (B, G, H, W) comes from
:func:`fastvit_ops.token_global_similarity` and ``c`` (B, C) from GC's MLP, and autograd carries
their gradients back through those ops. The backward recomputes ``z`` (cheap) and runs the
depthwise conv's dgrad/wgrad kernels, then ``dS'[γ] = Σ_{e∈γ} dz·c`` and ``dc = Σ_{H,W} dz·S'``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch
from .dwconv import _ACT_ID, _act, _op_backward as _dw_backward, check_args
from .validate import check_tensor

OP = "context_dwconv2d"


def _z(x: Tensor, sp: Tensor, c: Tensor) -> Tensor:
    B, C, H, W = x.shape
    G = sp.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = x.to(acc).reshape(B, G, C // G, H, W) + sp.to(acc).unsqueeze(2) * c.to(acc).reshape(B, G, C // G, 1, 1)
    return z.reshape(B, C, H, W)


def _reference(x, sp, c, weight, bias, stride, padding, activation):
    z = _z(x, sp, c)
    acc = z.dtype
    y = F.conv2d(z, weight.to(acc), None if bias is None else bias.to(acc), stride, padding, groups=x.shape[1])
    return _act(y, activation).to(x.dtype)


def _ext(x, sp, c, weight, bias, stride, padding, activation):
    return torch.ops.fastvit_ops._dwconv2d_gc_forward(x, sp, c, weight, bias, stride, padding, activation)


dispatch.register_kernels(OP, "forward", cpu=_ext, reference=_reference)
FORWARD = dispatch.KernelTable(OP, "forward")  # a read-only view: kernel by name


@torch.library.custom_op("fastvit_ops::context_dwconv2d", mutates_args=())
def _op(x: Tensor, sp: Tensor, c: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, padding: int,
        activation: int, backend: str) -> Tensor:
    return dispatch.run_kernel(OP, "forward", backend, x, sp, c, weight, bias, stride, padding, activation).contiguous()


@_op.register_fake
def _(x, sp, c, weight, bias, stride, padding, activation, backend):
    B, C, H, W = x.shape
    k = weight.shape[-1]
    return x.new_empty((B, C, (H + 2 * padding - k) // stride + 1, (W + 2 * padding - k) // stride + 1))


def _setup_context(ctx, inputs, output):
    x, sp, c, weight, bias, stride, padding, activation, backend = inputs
    ctx.save_for_backward(x, sp, c, weight, bias)
    ctx.args = (stride, padding, activation, backend)


def _backward(ctx, grad):
    x, sp, c, weight, bias = ctx.saved_tensors
    stride, padding, activation, backend = ctx.args
    need = ctx.needs_input_grad
    z = _z(x, sp, c).to(x.dtype)  # recomputed, not stored by the forward
    need_z = need[0] or need[1] or need[2]
    dz, dw, db = _dw_backward(grad.contiguous(), z, weight, bias, stride, padding, activation, False, need_z,
                              need[3] or need[4], backend)
    B, C, H, W = x.shape
    G = sp.shape[1]
    dzg = dz.reshape(B, G, C // G, H, W)
    dsp = torch.einsum("bgdhw,bgd->bghw", dzg, c.to(dz.dtype).reshape(B, G, C // G)) if need[1] else None
    # dc as eager's autograd forms it (product, then a reduction over H·W): the einsum's GEMM summed
    # the H·W products in one long fp32 dot, 1.5x eager's RMS error and past 2x at the tail.
    dc = (dzg * sp.to(dz.dtype).unsqueeze(2)).sum((-2, -1)).reshape(B, C) if need[2] else None
    return (dz if need[0] else None, None if dsp is None else dsp.to(sp.dtype),
            None if dc is None else dc.to(c.dtype), dw if need[3] else None,
            db if bias is not None and need[4] else None, None, None, None, None)


torch.library.register_autograd("fastvit_ops::context_dwconv2d", _backward, setup_context=_setup_context)
dispatch.register(OP, "call", dispatch.eager_impl(_reference), dispatch.custom_op_impl(_op))


def context_dwconv2d(x: Tensor, sp: Tensor, c: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                     stride: int = 1, padding: Optional[int] = None,
                     activation: Optional[str] = None) -> Tensor:
    """``dwconv2d(x + S'·c, weight, bias, stride, padding, activation)`` without forming ``x + S'·c``
    in memory: FCViT's global-context apply (docs/global_context.md step 6, released ``GlobalContext.forward``'s
    ``x * sim`` broadcast added to x in ``TokenMixer``) fused into the depthwise conv's input load.

    Args:
        x: (B, C, H, W), fp16/bf16/fp32/fp64, NCHW or channels_last.
        sp: S' (B, G, H, W), G dividing C (channel ``γ·C/G + e`` uses group γ), as
            :func:`fastvit_ops.token_global_similarity` returns it; any floating dtype.
        c: (B, C), GC's MLP output (fp32 for half x is fine: the op accumulates in fp32).
        weight, bias, stride, padding, activation: as :func:`fastvit_ops.dwconv2d` (no ``residual``).

    Returns:
        (B, C, H_out, W_out) contiguous, x's dtype. Differentiable in x, sp, c, weight and bias.

    Raises:
        TypeError / ValueError: as :func:`fastvit_ops.dwconv2d`; ``sp`` not (B, G, H, W) with G
        dividing C, ``c`` not (B, C), or either on another device.
    """
    stride, padding = check_args(x, weight, bias, stride, padding, activation, False)
    check_tensor("sp", sp, 4)
    check_tensor("c", c, 2)
    B, C, H, W = x.shape
    for name, t in (("sp", sp), ("c", c)):
        if t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (the device of x), got {t.device}")
    G = sp.shape[1]
    if sp.shape[0] != B or sp.shape[2:] != x.shape[2:] or G < 1 or C % G != 0:
        raise ValueError(f"sp: expected (B, G, H, W) = ({B}, G, {H}, {W}) with G dividing {C}, got {tuple(sp.shape)}")
    if tuple(c.shape) != (B, C):
        raise ValueError(f"c: expected shape ({B}, {C}), got {tuple(c.shape)}")
    call = dispatch.Call(OP, dispatch.get_backend(), (x, sp, c, weight, bias, stride, padding, _ACT_ID[activation]))
    return dispatch.run(OP, call)


__all__ = ["context_dwconv2d"]
