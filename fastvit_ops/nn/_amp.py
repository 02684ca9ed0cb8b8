"""Autocast for the fused layers: the reference's casting policy, applied before the custom ops.

Under ``torch.autocast`` the reference layers' convolutions and linears run in the autocast dtype
(PyTorch casts their fp32 inputs and weights), and everything downstream follows that dtype. The
fused ops validate that their tensors share one dtype and are not autocast-registered, so the
fused modules cast first, exactly like autocast's own ``cached_cast``: only fp32 tensors are
cast (fp64 and already-low-precision tensors are left alone), and only while autocast is on for
the tensors' device type.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def autocast_like_conv(*tensors: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """The tensors as an autocast-listed op (``F.conv2d``/``F.linear``) would see them."""
    first = next((t for t in tensors if t is not None), None)
    if first is None:
        return tensors
    dev = first.device.type
    if not torch.is_autocast_enabled(dev):
        return tensors
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) if t is not None and t.dtype == torch.float32 else t for t in tensors)
