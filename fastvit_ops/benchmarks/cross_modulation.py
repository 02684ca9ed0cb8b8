"""Cases for ``sigmoid_cross_modulation``: FASA's gate at the FAT-B0 stage shapes."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.cross_modulation import sigmoid_cross_modulation
from . import Case
from .shapes import FAT_B0_STAGES

OP = "sigmoid_cross_modulation"


def eager(local, global_):
    """What the released FAT code writes: ``silu(L0) * sigmoid(G) * G``, i.e. SiLU·SiLU."""
    return F.silu(local) * F.silu(global_)


def fused(local, global_):
    return sigmoid_cross_modulation(local, global_, "silu")


def _case(shape, device, dtype, label):
    def make_inputs():
        return [torch.randn(shape, device=device, dtype=dtype).requires_grad_() for _ in range(2)]

    n = 1
    for s in shape:
        n *= s
    size = torch.empty((), dtype=dtype).element_size()
    # Per element: 2 sigmoids (exp + div) and ~6 mul/add; bytes: read 2, write 1.
    return Case(OP, label, make_inputs, eager, fused, flops=10.0 * n, bytes=3.0 * n * size)


def bench_cases(batch: int, device, dtype=torch.float32):
    return [_case((batch, c, hw, hw), device, dtype, f"FAT-B0 s{i + 1} ({batch},{c},{hw},{hw})")
            for i, (c, hw, *_rest) in enumerate(FAT_B0_STAGES)]


def check_cases(device):
    return [_case((2, 5, 9, 7), device, torch.float32, "(2,5,9,7) fp32"),
            _case((1, 4, 3, 3), device, torch.float64, "(1,4,3,3) fp64")]
