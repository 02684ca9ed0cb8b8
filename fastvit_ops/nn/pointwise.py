"""1×1 convolutions on large NCHW CPU maps as one GEMM per sample.

oneDNN's NCHW 1×1 convolution takes a slow path on large maps with few channels: at FAT-B0's
stage-1 shape, x (8, 32, 56, 56) with a 32→32 1×1 conv, it measured 6.9 ms with AVX2 forced and
3.4 ms on AVX-512 (the 2-core Zen 4 CI machine, 2 threads), against 0.96 / 0.57 ms for the same
product as ``W (C_out × C_in) @ x[b] (C_in × H·W)`` (2.5–7× at 56×56 with 32–128 channels). On
28×28 maps and smaller the convolution is as fast or faster (AVX-512: the GEMM 0.6–0.9×), so only
maps of at least 56×56 take the GEMM. The result is the convolution's (a sum over C_in in fp32),
in the input's NCHW layout. Inference only (nothing requires a gradient): through the batched
product, the weight gradient's sum over B·H·W terms measured 2–3× the convolution's error.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.validate import is_channels_last

#: Smallest H·W that takes the GEMM (56×56, FAT-B0 / FCViT-tiny stage 1).
MIN_PIXELS = 56 * 56


def _needs_grad(conv: nn.Module, x: Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in conv.parameters()))


def _gemm_applies(conv: nn.Module, x: Tensor) -> bool:
    return (x.device.type == "cpu" and not _needs_grad(conv, x) and x.dim() == 4 and x.dtype in (torch.float32, torch.float64)
            and x.shape[-2] * x.shape[-1] >= MIN_PIXELS and x.is_contiguous() and not is_channels_last(x)
            and type(conv).forward is nn.Conv2d.forward and conv.kernel_size == (1, 1)
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding in ((0, 0), "valid") and conv.weight.dtype == x.dtype
            and conv.weight.device == x.device and x.shape[1] == conv.in_channels
            and not torch.is_autocast_enabled("cpu"))


def pointwise_conv(conv: nn.Module, x: Tensor) -> Tensor:
    """``conv(x)`` for a 1×1 convolution module; in inference on a large NCHW CPU map (H·W ≥ 56·56,
    fp32/fp64, stride 1, no padding, one group, no autocast, no gradient needed) computed as
    ``W @ x.view(B, C_in, H·W) + bias``.

    Args:
        conv: the module (an ``nn.Conv2d``; anything else, or another configuration, is called).
        x: (B, C_in, H, W).

    Returns:
        (B, C_out, H, W), NCHW-contiguous on the GEMM path, else whatever ``conv(x)`` returns.
    """
    if not _gemm_applies(conv, x):
        return conv(x)
    b, c, h, w = x.shape
    y = torch.matmul(conv.weight.view(conv.out_channels, c), x.view(b, c, h * w))
    if conv.bias is not None:
        y = y + conv.bias.view(1, -1, 1)
    return y.view(b, conv.out_channels, h, w)
