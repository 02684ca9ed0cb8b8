"""Cases for ``dwconv2d``: the depthwise convs of FAT-B0 and FCViT-tiny at 224² (docs/dwconv.md, docs/fat.md, docs/fcvit.md).

FAT-B0: the CPE (``x + DW_k(x)``, k = 3/5/7/9 per stage) and the FASA local mixer followed by SiLU
(same k); the ConvFFN DW_5 on the 4C hidden width, stride 1 (``U + DW_5(U)``) and, in the last
block of stages 1–3, stride 2. FCViT-tiny: the token mixer's DW_11 and the channel mixer's DW_3
followed by GELU (hidden width 8C in stages 1–2, 4C in stages 3–4). Plus the RepLKNet-style sweep
shape (B, 384, 32, 32) for k = 3, 7, 11, 31.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..ops.dwconv import dwconv2d, output_size
from . import Case
from .shapes import FAT_B0_STAGES, FCVIT_TINY_STAGES

OP = "dwconv2d"
FCVIT_TINY_MLP = (8, 8, 4, 4)
SWEEP_CHANNELS, SWEEP_SIZE = 384, 32


def eager(x, weight, bias, stride=1, activation=None, residual=False):
    """What the models write: ``nn.Conv2d(C, C, k, stride, k // 2, groups=C)``, then the activation
    module, then the residual add."""
    y = F.conv2d(x, weight, bias, stride, weight.shape[-1] // 2, 1, x.shape[1])
    if activation == "silu":
        y = F.silu(y)
    elif activation == "gelu":
        y = F.gelu(y)
    return x + y if residual else y


def fused(x, weight, bias, stride=1, activation=None, residual=False):
    return dwconv2d(x, weight, bias, stride, None, activation, residual)


def case(shape, k, stride=1, activation=None, residual=False, device="cpu", dtype=torch.float32,
         label=None, bias=True) -> Case:
    """One depthwise conv as a :class:`Case` (inputs x, weight, bias, all requiring grad)."""
    B, C, H, W = shape

    def make_inputs():
        x = torch.randn(shape, device=device, dtype=dtype).requires_grad_()
        w = (torch.randn(C, 1, k, k, device=device, dtype=dtype) / k).requires_grad_()
        b = torch.randn(C, device=device, dtype=dtype).requires_grad_() if bias else None
        return [x, w, b] if bias else [x, w]

    kw = dict(stride=stride, activation=activation, residual=residual)
    e = functools.partial(_with_optional_bias, eager, kw)
    f = functools.partial(_with_optional_bias, fused, kw)
    Ho, Wo = output_size(H, k, stride, k // 2), output_size(W, k, stride, k // 2)
    n_out = B * C * Ho * Wo
    size = torch.empty((), dtype=dtype).element_size()
    flops = 2.0 * n_out * k * k
    bytes_ = (B * C * H * W + n_out + C * k * k) * size
    epi = "".join([f" {activation}" if activation else "", " +x" if residual else ""])
    name = label or f"({B},{C},{H},{W})"
    return Case(OP, f"{name} k{k}/s{stride}{epi}", make_inputs, e, f, flops=flops, bytes=bytes_)


def _with_optional_bias(fn, kw, x, w, b=None):
    return fn(x, w, b, **kw)


def fat_b0_cases(batch, device, dtype=torch.float32):
    out = []
    for i, (c, hw, _heads, k, _ws) in enumerate(FAT_B0_STAGES):
        s = f"FAT-B0 s{i + 1}"
        shape = (batch, c, hw, hw)
        out.append(case(shape, k, residual=True, device=device, dtype=dtype, label=f"{s} CPE {shape}"))
        out.append(case(shape, k, activation="silu", device=device, dtype=dtype, label=f"{s} local {shape}"))
        hidden = (batch, 4 * c, hw, hw)
        out.append(case(hidden, 5, residual=True, device=device, dtype=dtype, label=f"{s} ConvFFN {hidden}"))
        if i < 3:
            out.append(case(hidden, 5, stride=2, device=device, dtype=dtype, label=f"{s} ConvFFN-down {hidden}"))
    return out


def fcvit_tiny_cases(batch, device, dtype=torch.float32):
    out = []
    for i, ((c, hw), r) in enumerate(zip(FCVIT_TINY_STAGES, FCVIT_TINY_MLP)):
        s = f"FCViT-tiny s{i + 1}"
        shape = (batch, c, hw, hw)
        out.append(case(shape, 11, device=device, dtype=dtype, label=f"{s} token {shape}"))
        hidden = (batch, r * c, hw, hw)
        out.append(case(hidden, 3, activation="gelu", device=device, dtype=dtype, label=f"{s} channel {hidden}"))
    return out


def sweep_cases(batch, device, dtype=torch.float32, ks=(3, 7, 11, 31)):
    shape = (batch, SWEEP_CHANNELS, SWEEP_SIZE, SWEEP_SIZE)
    return [case(shape, k, device=device, dtype=dtype, label=f"sweep {shape}") for k in ks]


def bench_cases(batch: int, device, dtype=torch.float32):
    return fat_b0_cases(batch, device, dtype) + fcvit_tiny_cases(batch, device, dtype) + sweep_cases(batch, device, dtype)


def check_cases(device):
    return [case((2, 5, 9, 7), 3, residual=True, device=device, label="(2,5,9,7) fp32"),
            case((2, 4, 11, 9), 7, stride=2, activation="gelu", device=device, label="(2,4,11,9) fp32"),
            case((1, 3, 6, 5), 5, activation="silu", device=device, dtype=torch.float64, label="(1,3,6,5) fp64")]
