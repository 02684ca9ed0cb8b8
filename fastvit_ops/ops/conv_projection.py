"""CvT's convolutional projection (docs/cvt.md): the q, k and v depthwise convs of one token map in one
pass, tokens in and tokens out (custom op, fake, autograd, dispatch).

CvT's ``Attention.forward_conv`` turns (B, [1 +] h·w, C) tokens into an image, runs three
``DW_3 → BN`` projections (q at stride 1, k and v at stride 2), flattens each back to tokens and
concatenates the cls token to each: three convolution passes over the same input, six layout
copies and three concatenations. This op reads the tokens once and writes q, k and v as tokens
(the cls row copied through), with the BatchNorms already folded into (weight, bias).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch
from .validate import check_like, check_tensor

OP = "conv_projection_qkv"


def _to_image(tokens: Tensor, cls: int, h: int, w: int) -> Tensor:
    """(B, cls + h·w, C) → (B, C, h, w) view (channels_last strides)."""
    B, _, C = tokens.shape
    return tokens[:, cls:].reshape(B, h, w, C).permute(0, 3, 1, 2)


def _to_tokens(img: Tensor) -> Tensor:
    return img.flatten(2).transpose(1, 2)


def _out_hw(n: int, stride: int) -> int:
    return (n - 1) // stride + 1  # "same" padding k // 2, odd k


# ---- reference (any device and dtype): the released code's convs on an image view ------------------
def _reference(x, wq, bq, wk, bk, wv, bv, h, w, cls, stride_q, stride_kv):
    img = _to_image(x, cls, h, w)
    C, p = x.shape[-1], wq.shape[-1] // 2
    outs = []
    for wt, bt, s in ((wq, bq, stride_q), (wk, bk, stride_kv), (wv, bv, stride_kv)):
        t = _to_tokens(F.conv2d(img, wt, bt, s, p, groups=C))
        outs.append((torch.cat((x[:, :1], t), dim=1) if cls else t).contiguous())
    return tuple(outs)


def _ext(x, wq, bq, wk, bk, wv, bv, h, w, cls, stride_q, stride_kv):
    return tuple(torch.ops.fastvit_ops._conv_projection_qkv_forward(x, wq, bq, wk, bk, wv, bv, h, w, cls,
                                                                     stride_q, stride_kv))


def _fp32_or_fp64(call: dispatch.Call):
    if call.args[0].dtype in (torch.float32, torch.float64):
        return True, "ok"
    return False, f"the C++ kernel is fp32/fp64, got {call.args[0].dtype}: the reference convs"


dispatch.register(OP, "forward", dispatch.Impl("cpu", "cpu", _ext, _fp32_or_fp64, "the C++ kernel (fp32/fp64)"))
dispatch.register_kernels(OP, "forward", reference=_reference)
FORWARD = dispatch.KernelTable(OP, "forward")  # a read-only view: kernel by name


@torch.library.custom_op("fastvit_ops::conv_projection_qkv", mutates_args=())
def _op(x: Tensor, wq: Tensor, bq: Tensor, wk: Tensor, bk: Tensor, wv: Tensor, bv: Tensor, h: int, w: int,
        cls: int, stride_q: int, stride_kv: int, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    return dispatch.run_kernel(OP, "forward", backend, x, wq, bq, wk, bk, wv, bv, h, w, cls, stride_q, stride_kv)


@_op.register_fake
def _(x, wq, bq, wk, bk, wv, bv, h, w, cls, stride_q, stride_kv, backend):
    B, _, C = x.shape
    nq = cls + _out_hw(h, stride_q) * _out_hw(w, stride_q)
    nk = cls + _out_hw(h, stride_kv) * _out_hw(w, stride_kv)
    return x.new_empty((B, nq, C)), x.new_empty((B, nk, C)), x.new_empty((B, nk, C))


def _setup_context(ctx, inputs, output):
    x, wq, bq, wk, bk, wv, bv, h, w, cls, stride_q, stride_kv, backend = inputs
    ctx.save_for_backward(x, wq, wk, wv)
    ctx.args = (h, w, cls, stride_q, stride_kv, backend)


def _backward(ctx, gq, gk, gv):
    from .dwconv import _op_backward as dw_backward  # the depthwise conv's dgrad / wgrad kernels

    x, wq, wk, wv = ctx.saved_tensors
    h, w, cls, stride_q, stride_kv, backend = ctx.args
    img = _to_image(x, cls, h, w)
    p = wq.shape[-1] // 2
    need_x = ctx.needs_input_grad[0]
    need_w = any(ctx.needs_input_grad[1:7])
    grads, dimg = [], None
    for g, wt, s in ((gq, wq, stride_q), (gk, wk, stride_kv), (gv, wv, stride_kv)):
        g_img = _to_image(g, cls, _out_hw(h, s), _out_hw(w, s))
        dx, dw, db = dw_backward(g_img, img, wt, None, s, p, 0, False, need_x, need_w, backend)
        grads += [dw, db]
        dimg = dx if dimg is None else dimg + dx
    dx = None
    if need_x:
        dx = torch.empty_like(x)
        dx[:, cls:] = _to_tokens(dimg)
        if cls:
            dx[:, :1] = gq[:, :1] + gk[:, :1] + gv[:, :1]
    return (dx, *[t if ctx.needs_input_grad[i + 1] else None for i, t in enumerate(grads)],
            None, None, None, None, None, None)


torch.library.register_autograd("fastvit_ops::conv_projection_qkv", _backward, setup_context=_setup_context)
dispatch.register(OP, "call", dispatch.eager_impl(_reference), dispatch.custom_op_impl(_op))


def conv_projection_qkv(x: Tensor, hw: Tuple[int, int], cls_token: bool, weight_q: Tensor, bias_q: Tensor,
                        weight_k: Tensor, bias_k: Tensor, weight_v: Tensor, bias_v: Tensor,
                        stride_q: int = 1, stride_kv: int = 2) -> Tuple[Tensor, Tensor, Tensor]:
    """q, k, v of CvT's ``Attention.forward_conv`` (``method="dw_bn"``, docs/cvt.md) in one pass.

    Computes, for each of q (stride ``stride_q``), k and v (stride ``stride_kv``), the depthwise
    ``nn.Conv2d(C, C, k, stride, k // 2, groups=C)`` of the token map, with the eval-mode BN
    already folded into (weight, bias), flattened back to tokens, the cls token (if any) prepended
    unconvolved — the released code's ``forward_conv`` (github microsoft/CvT
    ``lib/models/cls_cvt.py``) in eval mode.

    Args:
        x: (B, [1 +] h·w, C) tokens (row-major pixels), fp16/bf16/fp32/fp64, any strides.
        hw: (h, w), the token map's height and width.
        cls_token: whether token 0 is the cls token.
        weight_q, weight_k, weight_v: (C, 1, k, k), one odd k ≤ 31, x's dtype and device.
        bias_q, bias_k, bias_v: (C,).
        stride_q, stride_kv: 1 or 2.

    Returns:
        q (B, [1 +] h_q·w_q, C), k and v (B, [1 +] h_kv·w_kv, C), contiguous, x's dtype, with
        ``h_s = (h − 1) // s + 1``. Differentiable in x and every weight and bias (the backward
        runs the depthwise conv's dgrad/wgrad kernels).

    Raises:
        TypeError: a non-floating tensor or a dtype differing from x's.
        ValueError: wrong ranks or shapes, h·w (+ cls) not the token count, an even or too large
            k, k differing between the three weights, a stride other than 1 or 2, a device mismatch.
    """
    check_tensor("x", x, 3)
    h, w = (int(v) for v in hw)
    cls = 1 if cls_token else 0
    if h < 1 or w < 1 or x.shape[1] != cls + h * w:
        raise ValueError(f"x: expected {cls + h * w} tokens ({'1 + ' if cls else ''}{h}·{w}), got {x.shape[1]}")
    C = x.shape[2]
    k = None
    for name, wt in (("weight_q", weight_q), ("weight_k", weight_k), ("weight_v", weight_v)):
        check_tensor(name, wt, 4)
        check_like(name, wt, "x", x, shape=False)
        if wt.shape[0] != C or wt.shape[1] != 1 or wt.shape[2] != wt.shape[3]:
            raise ValueError(f"{name}: expected shape ({C}, 1, k, k), got {tuple(wt.shape)}")
        if k is not None and wt.shape[-1] != k:
            raise ValueError(f"{name}: kernel size {wt.shape[-1]} differs from weight_q's {k}")
        k = wt.shape[-1]
    if k % 2 == 0 or k > 31:
        raise ValueError(f"weight_q: expected an odd kernel size ≤ 31, got {k}")
    for name, bt in (("bias_q", bias_q), ("bias_k", bias_k), ("bias_v", bias_v)):
        check_tensor(name, bt, 1)
        check_like(name, bt, "x", x, shape=False)
        if bt.shape[0] != C:
            raise ValueError(f"{name}: expected shape ({C},), got {tuple(bt.shape)}")
    for name, s in (("stride_q", stride_q), ("stride_kv", stride_kv)):
        if s not in (1, 2):
            raise ValueError(f"{name}: expected 1 or 2, got {s}")
    args = (x, weight_q, bias_q, weight_k, bias_k, weight_v, bias_v, h, w, cls, int(stride_q), int(stride_kv))
    return dispatch.run(OP, dispatch.Call(OP, dispatch.get_backend(), args))
