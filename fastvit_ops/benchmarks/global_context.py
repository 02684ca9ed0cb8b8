"""Cases for ``global_context`` (FCViT's ``x + GC(x)``, docs/global_context.md) and the FCViT token mixer that
uses it twice (docs/fcvit.md), at the FCViT-tiny and FCViT-B12 stage shapes (224²)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..nn.fcvit import TokenMixer as FusedTokenMixer
from ..ops.global_context import global_context
from ..reference import fcvit as ref
from .. import numerics
from . import Case
from .shapes import FCVIT_B12_STAGES, FCVIT_TINY_STAGES

OP = "global_context"
OP_MIXER = "fcvit_token_mixer"


def eager(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, rescale_weight, rescale_bias,
          groups: int = 8, eps: float = 1e-5):
    """``x + GC(x)`` as the released FCViT code writes it (= ``x + reference GlobalContext(x)``)."""
    B, C, H, W = x.shape
    G, d = groups, C // groups
    g = x.mean(dim=(2, 3))
    s = torch.einsum("bgdn,bgd->bgn", x.reshape(B, G, d, H * W), g.reshape(B, G, d)) * d ** -0.5
    std, mean = torch.std_mean(s, dim=(1, 2), keepdim=True)
    s = (s - mean) / (std + eps)
    s = s * rescale_weight.view(1, G, 1) + rescale_bias.view(1, G, 1)
    u = F.linear(g, fc1_weight, fc1_bias)
    h = fc2_weight.shape[1]
    c = F.linear(torch.maximum(u[:, :h], u[:, h:]), fc2_weight, fc2_bias)
    return x + (s.reshape(B, G, 1, H * W) * c.reshape(B, G, d, 1)).reshape(B, C, H, W)


def fused(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, rescale_weight, rescale_bias):
    return global_context(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, rescale_weight,
                          rescale_bias)


def _gc_case(shape, device, dtype, label):
    B, C, H, W = shape

    def make_inputs():
        gc = ref.GlobalContext(C).to(device=device, dtype=dtype)
        with torch.no_grad():  # random α, β (init 1, 0) so no term is trivial
            gc.rescale_weight.normal_(1.0, 0.3)
            gc.rescale_bias.normal_(0.0, 0.3)
        x = torch.randn(shape, device=device, dtype=dtype).requires_grad_()
        ps = [gc.fc1.weight, gc.fc1.bias, gc.fc2.weight, gc.fc2.bias, gc.rescale_weight,
              gc.rescale_bias]
        return [x] + [p.detach().clone().requires_grad_() for p in ps]

    n = B * C * H * W
    size = torch.empty((), dtype=dtype).element_size()
    # Per element: mean 1, similarity 2, statistics 3, apply 2 flops; read x once, write once.
    return Case(OP, label, make_inputs, eager, fused, flops=8.0 * n, bytes=2.0 * n * size)


def _mixer_case(shape, device, dtype, label):
    """The whole token mixer; inputs are x and the module's own parameters (so fwd+bwd computes
    every parameter gradient). ``eager`` is the reference module, ``fused`` the fused
    ``TokenMixer.forward`` on the same module (fused global context, same 11×11 convs)."""
    B, C, H, W = shape
    tm = ref.TokenMixer(C).to(device=device, dtype=dtype)
    with torch.no_grad():
        for gc in (tm.gc1, tm.gc2):
            gc.rescale_weight.normal_(1.0, 0.3)
            gc.rescale_bias.normal_(0.0, 0.3)

    names = [n for n, _ in tm.named_parameters()]

    def make_inputs():
        return [torch.randn(shape, device=device, dtype=dtype).requires_grad_()] + list(tm.parameters())

    def eager_mixer(x, *ps):
        # The passed parameters (not tm's own), so ``check`` can run it in float64.
        return torch.func.functional_call(tm, dict(zip(names, ps)), (x,))

    def fused_mixer(x, *ps):
        return FusedTokenMixer.forward(tm, x)

    n = B * C * H * W
    r = max(C // 8, 16)
    size = torch.empty((), dtype=dtype).element_size()
    flops = 2 * (2 * 121 * n + 2 * 2 * r * n + 8 * n)  # two rounds: DW 11×11, 1×1 C→r→C, GC
    # A whole block (two global contexts, two 11×11 depthwise convs, four 1×1 convs): the gradients
    # of gc1's parameters carry every later layer's rounding through cancelling sums, and their
    # largest error measured 1.96× eager's on the Triton backend in a passing run (2.0× failed CI).
    return Case(OP_MIXER, label, make_inputs, eager_mixer, fused_mixer, flops=float(flops),
                bytes=2.0 * n * size, factor=numerics.COMPOUNDED_FACTOR)


def bench_cases(batch: int, device, dtype=torch.float32):
    cases = []
    for make, op in ((_gc_case, OP), (_mixer_case, OP_MIXER)):
        for model, stages in (("FCViT-tiny", FCVIT_TINY_STAGES), ("FCViT-B12", FCVIT_B12_STAGES)):
            for i, (c, hw) in enumerate(stages):
                shape = (batch, c, hw, hw)
                cases.append(make(shape, device, dtype, f"{model} s{i + 1} {shape}"))
    return cases


def check_cases(device):
    return [_gc_case((2, 16, 9, 7), device, torch.float32, "(2,16,9,7) fp32"),
            _gc_case((1, 8, 3, 5), device, torch.float64, "(1,8,3,5) fp64"),
            _mixer_case((2, 16, 9, 7), device, torch.float32, "(2,16,9,7) fp32")]
