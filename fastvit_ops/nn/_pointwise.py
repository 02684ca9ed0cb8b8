"""Dense convolutions with a fused epilogue for CPU inference (oneDNN post-ops), used by the fused
FAT modules' inference path.

``conv_epilogue(x, weight, bias, stride, padding, activation, residual)`` is
``act(F.conv2d(x, weight, bias, stride, padding)) [+ residual]``. On a channels_last fp32 CPU
tensor with nothing needing gradients it is one oneDNN convolution whose activation (ReLU, exact
GELU) or residual add runs as a post-op on the tile just computed, so the conv's output is written
once instead of written, read and written again per epilogue (``torch.ops.mkldnn.
_convolution_pointwise``, the op inductor's CPU backend lowers to under ``freezing``). Everywhere
else (autograd, other devices and dtypes, the compiler, PyTorch builds without oneDNN) it is the
same composite of ``F.conv2d``, the activation and ``+``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

_ONEDNN_ACT = {None: "none", "relu": "relu", "gelu": "gelu"}


def _onednn_ok(x: Tensor, *others: Optional[Tensor]) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.compiler.is_compiling():
        return False
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x,) + others):
        return False  # the fused op has no autograd formula
    if any(t is not None and (t.device != x.device or t.dtype != x.dtype) for t in others):
        return False
    return x.is_contiguous(memory_format=torch.channels_last)


def conv_epilogue(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int = 1, padding: int = 0,
                  activation: Optional[str] = None, residual: Optional[Tensor] = None) -> Tensor:
    """``act(conv2d(x, weight, bias, stride, padding)) + residual`` (ungrouped, no dilation).

    Args:
        x: (B, C_in, H, W); weight (C_out, C_in, k, k); bias (C_out,) or None.
        activation: None, ``"relu"`` or ``"gelu"`` (exact, erf).
        residual: None or (B, C_out, H_out, W_out), added after the activation.

    Returns (B, C_out, H_out, W_out), channels_last when ``x`` is. The oneDNN post-op path equals
    the composite up to fp32 rounding (same convolution; the epilogue applied in registers).
    """
    if activation not in _ONEDNN_ACT:
        raise ValueError(f"activation: expected one of {tuple(_ONEDNN_ACT)}, got {activation!r}")
    pads, strides = [padding, padding], [stride, stride]
    if _onednn_ok(x, weight, bias, residual) and (residual is None or activation is None):
        if residual is not None and residual.is_contiguous(memory_format=torch.channels_last):
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual, weight, bias, pads, strides, [1, 1], 1, "add", 1.0, None, [], None)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, weight, bias, pads, strides, [1, 1], 1, _ONEDNN_ACT[activation], [], "none")
    y = F.conv2d(x, weight, bias, stride, padding)
    if activation == "relu":
        y = F.relu(y)
    elif activation == "gelu":
        y = F.gelu(y)
    return y if residual is None else y + residual


def conv_add_(out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``out += conv2d(x, weight, bias)`` in place (1×1-style: stride 1, no padding), for inference
    temporaries: on channels_last fp32 CPU tensors oneDNN accumulates into ``out`` as the conv's
    post-op (no output buffer at all), elsewhere ``out.add_(F.conv2d(...))``. Returns ``out``."""
    if (_onednn_ok(x, weight, bias, out) and out.is_contiguous(memory_format=torch.channels_last)
            and not out.requires_grad):
        return torch.ops.mkldnn._convolution_pointwise_.binary(
            out, x, weight, bias, [0, 0], [1, 1], [1, 1], 1, "add", 1.0, None, [], None)
    return out.add_(F.conv2d(x, weight, bias))
