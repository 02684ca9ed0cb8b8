"""Dense convolutions with their epilogue (activation, residual add) for the fused FAT modules'
inference path.

``conv_epilogue`` is ``act(F.conv2d(x, weight, bias, stride, padding)) [+ residual]``: when no
autograd graph is recorded the activation and the add run in place on the conv's fresh output, so
no second map is allocated per epilogue. oneDNN's own post-op fusion
(``torch.ops.mkldnn._convolution_pointwise``, what inductor emits under ``freezing``) was tried
here and measured no faster on converted FAT-B0 (123.0 vs 123.2 ms per batch-8 forward, 2-core
Zen 4): its per-call primitive setup (~30–60 µs) ate what the saved pass gave back, and it is a
private op, so the public conv plus in-place epilogues is what runs.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = (None, "relu", "gelu")


def _no_graph(*tensors: Optional[Tensor]) -> bool:
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def conv_epilogue(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int = 1, padding: int = 0,
                  activation: Optional[str] = None, residual: Optional[Tensor] = None) -> Tensor:
    """``act(conv2d(x, weight, bias, stride, padding)) + residual`` (ungrouped, no dilation).

    Args:
        x: (B, C_in, H, W); weight (C_out, C_in, k, k); bias (C_out,) or None; same dtype/device.
        activation: None, ``"relu"`` or ``"gelu"`` (exact, erf).
        residual: None or (B, C_out, H_out, W_out), added after the activation.

    Returns (B, C_out, H_out, W_out) in the conv's layout (channels_last when ``x`` is).
    Differentiable (out of place) when a graph is recorded; in place on the conv output otherwise.

    Raises:
        ValueError: an unknown ``activation``.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    y = F.conv2d(x, weight, bias, stride, padding)
    if _no_graph(x, weight, bias, residual):
        if activation == "relu":
            y.relu_()
        elif activation == "gelu":
            torch.ops.aten.gelu_(y)
        return y if residual is None else y.add_(residual)
    if activation == "relu":
        y = F.relu(y)
    elif activation == "gelu":
        y = F.gelu(y)
    return y if residual is None else y + residual


def conv_add_(out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``out += conv2d(x, weight, bias)`` in place (stride 1, no padding), for an inference temporary
    ``out`` (e.g. a slice of the block's shortcut). Returns ``out``."""
    return out.add_(F.conv2d(x, weight, bias))
