"""Downsampled attention (docs/attention.md): full-resolution queries against a short key/value set.

``O = softmax_over_keys(scale · q kᵀ) v`` with q (B, h, N, d), k and v (B, h, M, d), M ≪ N, and an
optional fused epilogue ``out = SiLU(O) ⊙ gate`` (docs/cross_modulation.md, mode "silu" with ``gate = SiLU(L0)``),
so FASA's attention output never reaches memory.

One custom op carries every layout: q, gate and the output are (B, h, N, d)-indexed tensors with
arbitrary strides, so a channels-first (B, C, H, W) map (head m owns channels m·d … m·d+d−1) is
read and written in place through a strided view, and CvT's (B, T, C) tokens likewise. The
forward also returns per-query softmax statistics (max and log-sum, base 2, fp32); the backward recomputes the
probabilities and the pre-gate output from it (flash-style: nothing N × M is stored).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_rules, dispatch
from .validate import check_tensor, is_dense

OP = "downsampled_attention"
MAX_HEAD_DIM = 128
LOG2E = 1.4426950408889634

#: Output layouts (storage order of the (B, h, N, d)-indexed result).
BHND, CHANNELS_FIRST, TOKENS = 0, 1, 2


# ---- layouts ---------------------------------------------------------------------------------------
def _empty_out(q: Tensor, layout: int) -> Tensor:
    """The (B, h, N, d) output stored as (B, h, N, d), (B, h·d, N) (channels-first) or (B, N, h·d)."""
    b, h, n, d = q.shape
    if layout == CHANNELS_FIRST:
        return torch.empty((b, h, d, n), dtype=q.dtype, device=q.device).transpose(2, 3)
    if layout == TOKENS:
        return torch.empty((b, n, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)
    return torch.empty((b, h, n, d), dtype=q.dtype, device=q.device)


def _empty_grad(t: Tensor) -> Tensor:
    """A gradient buffer in ``t``'s layout when it is dense (any permutation), else contiguous."""
    return torch.empty_like(t) if is_dense(t) else torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _stats_shape(q: Tensor):
    """Softmax statistics saved for the backward, (B, h, N, 2): per query the max of the raw dot
    products q·k and ``log2 Σ 2^((q·k − max)·scale·log2 e)``. The scale multiplies ``q·k − max``
    (small) rather than the logits, and max and log-sum are kept apart, so large logits lose no
    precision to rounding at their own magnitude."""
    return tuple(q.shape[:3]) + (2,)


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


# ---- reference (the oracle; composite math in fp32 for half inputs) ---------------------------------
def reference(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None, gate: Optional[Tensor] = None) -> Tensor:
    """Eager PyTorch: ``softmax(scale · q kᵀ) v`` (then ``SiLU(·) ⊙ gate``), in the input dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v
    return F.silu(out) * gate if gate is not None else out


def _reference_fwd(q, k, v, gate, out, stats, scale):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = q.to(acc) @ k.to(acc).transpose(-1, -2)                      # raw dot products
    m = s.amax(-1, keepdim=True)
    p = torch.exp2((s - m) * (scale * LOG2E))                        # scale applied to s − max
    l = p.sum(-1, keepdim=True)
    o = (p / l) @ v.to(acc)
    if gate is not None:
        o = F.silu(o) * gate.to(acc)
    out.copy_(o)
    stats.copy_(torch.cat([m, torch.log2(l)], -1))


def _reference_bwd(grad, q, k, v, gate, lse, dq, dk, dv, dgate, scale):
    # The oracle backend: fp32 inputs are differentiated in float64 (fp16/bf16 in fp32), the
    # probabilities recomputed whole rather than from the fp32 statistics. In fp32, recomputing
    # P from the rounded max and log-sum measured 2-3x eager's RMS error at peaked softmaxes
    # (logits ~10).
    acc = torch.float64 if q.dtype in (torch.float32, torch.float64) else torch.float32
    qa, ka, va, ga = q.to(acc), k.to(acc), v.to(acc), grad.to(acc)
    s = qa @ ka.transpose(-1, -2)
    p = torch.softmax(s * scale, dim=-1)
    if gate is not None:
        o = p @ va
        sg = torch.sigmoid(o)
        dgate.copy_(ga * o * sg)
        ga = ga * gate.to(acc) * sg * (1 + o * (1 - sg))
    dv.copy_(p.transpose(-1, -2) @ ga)
    dp = ga @ va.transpose(-1, -2)
    # Σ_j P ⊙ dP (= rowsum(dO ⊙ O) exactly) from the same rounded dP: its rounding then cancels
    # in dP − D when P is near one-hot, as in eager's softmax backward.
    ds = p * (dp - (p * dp).sum(-1, keepdim=True)) * scale
    dq.copy_(ds @ ka)
    dk.copy_(ds.transpose(-1, -2) @ qa)


# ---- compiled / Triton kernels -----------------------------------------------------------------------
def _ext_fwd(q, k, v, gate, out, lse, scale):
    torch.ops.fastvit_ops._downsampled_attention_forward(q, k, v, gate, out, lse, scale)


def _ext_bwd(grad, q, k, v, gate, lse, dq, dk, dv, dgate, scale):
    torch.ops.fastvit_ops._downsampled_attention_backward(grad, q, k, v, gate, lse, dq, dk, dv, dgate, scale)


def _triton_fwd(q, k, v, gate, out, lse, scale):
    from fastvit_ops.kernels import attention as kern

    kern.attention_forward(q, k, v, gate, out, lse, scale)


def _triton_bwd(grad, q, k, v, gate, lse, dq, dk, dv, dgate, scale):
    from fastvit_ops.kernels import attention as kern

    kern.attention_backward(grad, q, k, v, gate, lse, dq, dk, dv, dgate, scale)


dispatch.register_kernels(OP, "forward", cpu=_ext_fwd, triton=_triton_fwd, reference=_reference_fwd)
dispatch.register_kernels(OP, "backward", cpu=_ext_bwd, triton=_triton_bwd, reference=_reference_bwd)
FORWARD = dispatch.KernelTable(OP, "forward")  # read-only views: kernel by name
BACKWARD = dispatch.KernelTable(OP, "backward")


# ---- custom ops ------------------------------------------------------------------------------------
@torch.library.custom_op("fastvit_ops::downsampled_attention", mutates_args=())
def _op(q: Tensor, k: Tensor, v: Tensor, gate: Optional[Tensor], scale: float, layout: int,
        backend: str) -> Tuple[Tensor, Tensor]:
    out = _empty_out(q, layout)
    lse = torch.empty(_stats_shape(q), dtype=_lse_dtype(q), device=q.device)
    if q.numel() and out.numel():
        dispatch.run_kernel(OP, "forward", backend, q, k, v, gate, out, lse, scale)
    return out, lse


@_op.register_fake
def _(q, k, v, gate, scale, layout, backend):
    return _empty_out(q, layout), q.new_empty(_stats_shape(q), dtype=_lse_dtype(q))


@torch.library.custom_op("fastvit_ops::downsampled_attention_backward", mutates_args=())
def _op_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, gate: Optional[Tensor], lse: Tensor,
                 scale: float, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv = _empty_grad(q), _empty_grad(k), _empty_grad(v)
    dgate = _empty_grad(gate) if gate is not None else q.new_empty((0,))
    if q.shape[2] == 0 or q.shape[3] == 0:
        dk.zero_(), dv.zero_()
    elif q.numel():
        dispatch.run_kernel(OP, "backward", backend, grad, q, k, v, gate, lse.contiguous(), dq, dk, dv, dgate, scale)
    return dq, dk, dv, dgate


@_op_backward.register_fake
def _(grad, q, k, v, gate, lse, scale, backend):
    dgate = _empty_grad(gate) if gate is not None else q.new_empty((0,))
    return _empty_grad(q), _empty_grad(k), _empty_grad(v), dgate


def _setup_context(ctx, inputs, output):
    q, k, v, gate, scale, layout, backend = inputs
    _, lse = output
    ctx.save_for_backward(q, k, v, gate, lse)
    ctx.scale, ctx.backend = scale, backend
    ctx.has_gate = gate is not None


def _backward(ctx, grad, _grad_lse):
    q, k, v, gate, lse = ctx.saved_tensors
    dq, dk, dv, dgate = _op_backward(grad, q, k, v,
                                     gate if ctx.has_gate else None, lse, ctx.scale, ctx.backend)
    return dq, dk, dv, (dgate if ctx.has_gate else None), None, None, None


torch.library.register_autograd("fastvit_ops::downsampled_attention", _backward, setup_context=_setup_context)


# ---- how a call runs ---------------------------------------------------------------------------------
# A call is (q, k, v, gate, scale, layout): any-strided (B, h, N, d) q and gate, output stored in
# ``layout``.
def _eager(q, k, v, gate, scale, layout):
    if gate is None or layout != CHANNELS_FIRST:
        return reference(q, k, v, scale, gate)
    # FASA's order (the released code): q scaled first (which also makes the map's transposed
    # view contiguous for the matmuls), the attention output laid out as the (B, C, H, W) map and
    # the gate applied there, on contiguous tensors. The generic composition on the map's views
    # made the eager-by-rule path 0.78-0.83x the eager layer at FAT-B0 s3/s4 (fwd+bwd). Returned
    # as the (B, h, N, d) view of a channels-first result.
    o = torch.softmax((q * scale) @ k.transpose(-1, -2), dim=-1) @ v
    return (F.silu(o.transpose(2, 3).contiguous()) * gate.transpose(2, 3)).transpose(2, 3)


def _direct_forward(call: dispatch.Call) -> Tensor:
    """The C++ forward straight away: no custom-op dispatch or autograd glue (inference on CPU)."""
    q, k, v, gate, scale, layout = call.args
    out = _empty_out(q, layout)
    if q.numel() and out.numel():
        lse = torch.empty(_stats_shape(q), dtype=_lse_dtype(q), device=q.device)
        args = (q, k, v, gate, out, lse, scale)
        dispatch.choose(OP, "forward", call.with_args(*args)).fn(*args)
    return out


def _custom_op(q, k, v, gate, scale, layout, backend):
    return _op(q, k, v, gate, scale, layout, backend)[0]


def _cpu_autograd(call: dispatch.Call) -> Tensor:
    """The C++ autograd node: our forward and backward kernels without the custom op's Python
    dispatch and autograd glue (~0.25 ms per forward+backward at FAT-B0 s4, a quarter of it)."""
    q, k, v, gate, scale, layout = call.args
    return torch.ops.fastvit_ops._downsampled_attention_autograd(q, k, v, gate, scale, layout)


dispatch.register(OP, "call", dispatch.eager_impl(_eager), cpu_rules.eager_impl(_eager),
                  dispatch.Impl("cpu_forward", "cpu", _direct_forward, dispatch.no_grad_cpu,
                                "the C++ forward kernel called directly (no graph to record)"),
                  dispatch.Impl("cpu_autograd", "cpu", _cpu_autograd, dispatch.plain_cpu,
                                "the C++ autograd node _downsampled_attention_autograd (our forward "
                                "and backward kernels)"),
                  dispatch.custom_op_impl(_custom_op))


# ---- validation and public entries -------------------------------------------------------------------
def _check_qkv(q: Tensor, k: Tensor, v: Tensor, qname: str = "q") -> None:
    check_tensor(qname, q, 4)
    check_tensor("k", k, 4)
    check_tensor("v", v, 4)
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (the device of {qname}), got {t.device}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (the dtype of {qname}), got {t.dtype}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected shape {tuple(k.shape)} (the shape of k), got {tuple(v.shape)}")


def _check_heads(q: Tensor, k: Tensor, qname: str = "q") -> None:
    b, h, _, d = q.shape
    if k.shape[0] != b:
        raise ValueError(f"k: batch {k.shape[0]} differs from {qname}'s batch {b}")
    if k.shape[1] != h:
        raise ValueError(f"k: {k.shape[1]} heads, but {qname} has {h} heads")
    if k.shape[3] != d:
        raise ValueError(f"k: head dim {k.shape[3]} differs from {qname}'s head dim {d}")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"{qname}: head dim {d} exceeds the supported maximum {MAX_HEAD_DIM}")
    if k.shape[2] < 1 and q.shape[2] > 0:
        raise ValueError("k: needs at least one key (M >= 1)")


def _scale(scale, d: int) -> float:
    if scale is None:
        return float(d) ** -0.5 if d > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a positive float or None, got {scale!r}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected a positive finite float, got {scale!r}")
    return float(scale)


def attention_core(q: Tensor, k: Tensor, v: Tensor, scale: float, gate: Optional[Tensor] = None,
                   layout: int = BHND) -> Tensor:
    """Validated-elsewhere entry used by the fused modules: any-strided (B, h, N, d) q and gate,
    output stored in ``layout`` (``BHND``, ``CHANNELS_FIRST`` or ``TOKENS``)."""
    call = dispatch.Call(OP, dispatch.get_backend(), (q, k, v, gate, float(scale), int(layout)), (k, v, gate))
    return dispatch.run(OP, call)


def downsampled_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    """Attention of full-resolution queries over a short key/value set (docs/attention.md), fused.

    ``softmax_over_keys(scale · q kᵀ) v``, flash-style: keys/values stay on chip, queries stream,
    the softmax is max-subtracted in fp32 (exp2 with the scale folded in), and the backward
    recomputes the probabilities — no (N × M) matrix reaches memory.

    Args:
        q: queries (B, h, N, d), any strides; float16, bfloat16, float32 or float64. N ≥ 0,
            d ≤ 128 (any value, e.g. 16, 20, 24, 40).
        k, v: keys and values (B, h, M, d), M ≥ 1 (tested up to 1024+); same dtype and device.
        scale: the logit scale, a positive float; ``None`` means d^(−1/2).

    Returns:
        (B, h, N, d) contiguous tensor in q's dtype (math in fp32 for half inputs, fp64 for fp64).
        Differentiable in q, k, v.

    Raises:
        TypeError: non-tensors, non-floating dtypes, mismatched dtypes, a non-numeric scale.
        ValueError: not 4-D, different devices, q and k/v disagreeing on batch, heads or head dim,
            d > 128, M = 0, k and v of different shapes, a scale that is not positive and finite.
        RuntimeError: the backend requested with ``fastvit_ops.backend`` cannot run here.
    """
    _check_qkv(q, k, v)
    _check_heads(q, k)
    return attention_core(q, k, v, _scale(scale, q.shape[-1]), None, BHND)


def downsampled_attention_nchw(q_map: Tensor, k: Tensor, v: Tensor, num_heads: int,
                               scale: Optional[float] = None, gate: Optional[Tensor] = None) -> Tensor:
    """Channels-first downsampled attention with an optional fused gate (FASA's global branch).

    Queries are read straight from the map: token i is pixel i (row-major), head m owns channels
    m·d … m·d+d−1 (d = C / num_heads); the result is written straight back to (B, C, H, W). With
    ``gate`` the epilogue ``SiLU(attn) ⊙ gate`` is applied in the kernel (docs/cross_modulation.md, mode "silu",
    where FASA passes ``gate = SiLU(L0)``), so the attention output never reaches memory.

    Args:
        q_map: (B, C, H, W) float16/bfloat16/float32/float64, NCHW or channels_last.
        k, v: (B, num_heads, M, d), any strides.
        num_heads: h, a divisor of C with C / h ≤ 128.
        scale: the logit scale; ``None`` means d^(−1/2).
        gate: optional (B, C, H, W) like ``q_map``.

    Returns:
        (B, C, H, W) contiguous NCHW tensor in q_map's dtype. Differentiable in q_map, k, v, gate.

    Raises:
        TypeError / ValueError as :func:`downsampled_attention`; ValueError also when C is not a
        multiple of ``num_heads`` or ``gate``'s shape differs from ``q_map``'s.
    """
    check_tensor("q_map", q_map, 4)
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads: expected a positive int, got {num_heads!r}")
    b, c, hh, ww = q_map.shape
    if c % num_heads:
        raise ValueError(f"num_heads: {num_heads} does not divide the {c} channels of q_map")
    d = c // num_heads
    _check_qkv(q_map, k, v, "q_map")
    q = q_map.reshape(b, num_heads, d, hh * ww).transpose(2, 3)
    _check_heads(q, k, "q_map")
    g = None
    if gate is not None:
        check_tensor("gate", gate)
        if gate.shape != q_map.shape:
            raise ValueError(f"gate: expected shape {tuple(q_map.shape)} (the shape of q_map), got {tuple(gate.shape)}")
        if gate.device != q_map.device:
            raise ValueError(f"gate: expected device {q_map.device} (the device of q_map), got {gate.device}")
        if gate.dtype != q_map.dtype:
            raise TypeError(f"gate: expected dtype {q_map.dtype} (the dtype of q_map), got {gate.dtype}")
        g = gate.reshape(b, num_heads, d, hh * ww).transpose(2, 3)
    out = attention_core(q, k, v, _scale(scale, d), g, CHANNELS_FIRST)
    return out.transpose(2, 3).reshape(b, c, hh, ww)


__all__ = ["downsampled_attention", "downsampled_attention_nchw", "reference"]
