"""Cases for the whole FASA module (FAT's token mixer, docs/fat.md): ``fastvit_ops.nn.FASA`` against
the reference ``FASA`` (the released code's computation), at the FAT-B0 stage shapes (224²).

Two cases per stage: ``eval`` (inference: forward only, the pool's BatchNorms folded by the fused
module) and ``train`` (forward and forward+backward with batch-statistics BatchNorm; the
forward+backward row also records the peak memory of each). Inputs are ``x`` and the module's
parameters, so forward+backward computes every parameter gradient.
"""
from __future__ import annotations

import torch

from ..nn.fat import FASA as FusedFASA
from ..reference import fat as ref
from .. import numerics
from . import Case
from .shapes import FAT_B0_STAGES

OP = "fasa_module"


def _case(shape, kernel_size, heads, window, device, dtype, train: bool, label: str) -> Case:
    b, c, h, w = shape
    gen = torch.Generator().manual_seed(0)
    reference = ref.FASA(c, kernel_size, heads, window)
    with torch.no_grad():  # non-trivial BN statistics, so eval-mode folding matters
        for name, t in reference.named_buffers():
            if name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
    reference = reference.to(device=device, dtype=dtype).train(train)
    fused = FusedFASA(c, kernel_size, heads, window).to(device=device, dtype=dtype).train(train)
    fused.load_state_dict(reference.state_dict())
    names = [n for n, _ in reference.named_parameters()]
    # float buffers (BN statistics) are inputs too, so ``check`` can run the reference in float64
    bufs = [n for n, t in reference.named_buffers() if t.is_floating_point()]

    def make_inputs():
        x = torch.randn(shape, device=device, dtype=dtype).requires_grad_()
        params = [p.detach().clone().requires_grad_() for p in reference.parameters()]
        buffers = [reference.get_buffer(n).detach().clone() for n in bufs]
        return [x] + params + buffers

    def call(module):
        def run(x, *tensors):
            return torch.func.functional_call(module, dict(zip(names + bufs, tensors)), (x,))
        return run

    n = b * c * h * w
    m = ((h + window - 1) // window) * ((w + window - 1) // window)
    size = torch.empty((), dtype=dtype).element_size()
    # q, mixer (C×C), kv on the pooled map, DW_k local branch, QKᵀ and PV per head
    flops = 2.0 * n * (2 * c + kernel_size ** 2) + 4.0 * b * c * h * w * m + 2.0 * b * 2 * c * c * m
    # The whole FASA block: judged with the compounded factor, as docs/numerics.md sets for blocks.
    return Case(OP, f"{label} {'train' if train else 'eval'}", make_inputs, call(reference), call(fused),
                backward=train, flops=flops, bytes=2.0 * n * size, factor=numerics.COMPOUNDED_FACTOR)


def bench_cases(batch: int, device, dtype=torch.float32):
    cases = []
    for i, (c, hw, heads, k, window) in enumerate(FAT_B0_STAGES):
        shape = (batch, c, hw, hw)
        for train in (False, True):
            cases.append(_case(shape, k, heads, window, device, dtype, train, f"FAT-B0 s{i + 1} {shape}"))
    return cases


def check_cases(device):
    return [_case((2, 8, 9, 7), 3, 2, 2, device, torch.float32, False, "(2,8,9,7) k3 w2 fp32"),
            _case((1, 8, 9, 7), 5, 2, 4, device, torch.float32, True, "(1,8,9,7) k5 w4 fp32")]
