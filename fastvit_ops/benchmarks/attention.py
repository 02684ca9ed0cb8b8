"""Cases for ``downsampled_attention``: FAT-B0..B3 (channels-first + gate) and CvT-13 shapes at 224².

FAT cases time FASA's global branch as the authors write it (reshape/transpose the (B, C, H, W)
map to heads, ``softmax(q kᵀ)·v``, transpose back, ``SiLU(G) ⊙ gate``) against the fused
channels-first kernel with the gate epilogue; CvT cases time the (B, h, N, d) attention with the
``dim^(−1/2)`` scale. :func:`sdpa` is the ``F.scaled_dot_product_attention`` baseline.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.attention import downsampled_attention, downsampled_attention_nchw
from . import Case
from .shapes import CVT13_STAGES

OP = "downsampled_attention"

# (variant, channels, H = W, heads) per stage; FAT-B3 has FAT-B2's shapes (more blocks only).
FAT_STAGES = {
    "FAT-B0": [(32, 56, 2), (80, 28, 5), (160, 14, 10), (256, 7, 16)],
    "FAT-B1": [(48, 56, 3), (96, 28, 6), (192, 14, 12), (384, 7, 24)],
    "FAT-B2/B3": [(64, 56, 2), (128, 28, 4), (256, 14, 8), (512, 7, 16)],
}
FAT_KEYS = 49  # 7×7 pooled keys in every stage at 224²


def _heads(m, h):
    b, c, hh, ww = m.shape
    return m.reshape(b, h, c // h, hh * ww).transpose(-1, -2)


def fasa_eager(h):
    """FASA's global branch + gate in eager PyTorch (released code's reshapes and order)."""
    def run(q_map, k, v, gate):
        b, c, hh, ww = q_map.shape
        q = _heads(q_map, h) * (c // h) ** -0.5
        g = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        g = g.transpose(-1, -2).reshape(b, c, hh, ww)
        return F.silu(g) * gate
    return run


def fasa_eager_variants(h):
    """FASA's eager branch with the scale applied to the logits, or folded into k, instead of q:
    equally valid roundings of the logits (flash-attention's tests' "reorder_ops" reference), extra
    yardsticks for ``check`` (:attr:`Case.eager_variants`)."""
    def on_logits(q_map, k, v, gate):
        b, c, hh, ww = q_map.shape
        g = torch.softmax(_heads(q_map, h) @ k.transpose(-1, -2) * (c // h) ** -0.5, dim=-1) @ v
        return F.silu(g.transpose(-1, -2).reshape(b, c, hh, ww)) * gate

    def into_k(q_map, k, v, gate):
        b, c, hh, ww = q_map.shape
        g = torch.softmax(_heads(q_map, h) @ (k * (c // h) ** -0.5).transpose(-1, -2), dim=-1) @ v
        return F.silu(g.transpose(-1, -2).reshape(b, c, hh, ww)) * gate
    return [on_logits, into_k]


def fasa_fused(h):
    def run(q_map, k, v, gate):
        return downsampled_attention_nchw(q_map, k, v, h, gate=gate)
    return run


def fasa_sdpa(h):
    """Same computation with ``F.scaled_dot_product_attention`` for the attention itself."""
    def run(q_map, k, v, gate):
        b, c, hh, ww = q_map.shape
        g = F.scaled_dot_product_attention(_heads(q_map, h), k, v)
        return F.silu(g.transpose(-1, -2).reshape(b, c, hh, ww)) * gate
    return run


def cvt_eager(scale):
    def run(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v
    return run


def cvt_eager_variants(scale):
    """CvT's eager attention with the scale folded into q, or into k (see fasa_eager_variants)."""
    return [lambda q, k, v: torch.softmax((q * scale) @ k.transpose(-1, -2), dim=-1) @ v,
            lambda q, k, v: torch.softmax(q @ (k * scale).transpose(-1, -2), dim=-1) @ v]


def cvt_fused(scale):
    def run(q, k, v):
        return downsampled_attention(q, k, v, scale)
    return run


def cvt_sdpa(scale):
    def run(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return run


def sdpa(case: Case):
    """The SDPA baseline for a case built here (same inputs as ``case.eager``)."""
    return case.sdpa


def _fat_case(variant, stage, c, hw, h, batch, device, dtype):
    d = c // h
    n = hw * hw

    def make_inputs():
        q = torch.randn(batch, c, hw, hw, device=device, dtype=dtype).requires_grad_()
        k, v = (torch.randn(batch, h, FAT_KEYS, d, device=device, dtype=dtype).requires_grad_() for _ in range(2))
        gate = torch.randn(batch, c, hw, hw, device=device, dtype=dtype).requires_grad_()
        return [q, k, v, gate]

    size = torch.empty((), dtype=dtype).element_size()
    case = Case(OP, f"{variant} s{stage} ({batch},{h}h,N{n},M{FAT_KEYS},d{d}) gate", make_inputs,
                fasa_eager(h), fasa_fused(h),
                flops=4.0 * batch * h * n * FAT_KEYS * d,
                bytes=(3.0 * batch * c * n + 2.0 * batch * h * FAT_KEYS * d) * size)
    case.sdpa = fasa_sdpa(h)
    case.eager_variants = fasa_eager_variants(h)
    return case


def _cvt_case(stage, c, hw, h, batch, device, dtype):
    d = c // h
    cls = 1 if stage == 3 else 0
    n = hw * hw + cls
    m = ((hw + 1) // 2) ** 2 + cls
    scale = c ** -0.5  # CvT scales by the full width

    def make_inputs():
        # (B, T, C) tokens viewed as heads, as CvT's attention sees them.
        q = torch.randn(batch, n, h, d, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
        k, v = (torch.randn(batch, m, h, d, device=device, dtype=dtype).transpose(1, 2).requires_grad_() for _ in range(2))
        return [q, k, v]

    size = torch.empty((), dtype=dtype).element_size()
    case = Case(OP, f"CvT-13 s{stage} ({batch},{h}h,N{n},M{m},d{d})", make_inputs, cvt_eager(scale),
                cvt_fused(scale), flops=4.0 * batch * h * n * m * d,
                bytes=(2.0 * batch * n * c + 2.0 * batch * m * c) * size)
    case.sdpa = cvt_sdpa(scale)
    case.eager_variants = cvt_eager_variants(scale)
    return case


def bench_cases(batch: int, device, dtype=torch.float32):
    cases = []
    for variant, stages in FAT_STAGES.items():
        for i, (c, hw, h) in enumerate(stages):
            cases.append(_fat_case(variant, i + 1, c, hw, h, batch, device, dtype))
    for i, (c, hw, h) in enumerate(CVT13_STAGES):
        cases.append(_cvt_case(i + 1, c, hw, h, batch, device, dtype))
    return cases


def check_cases(device):
    return [_fat_case("FAT-tiny", 1, 8, 9, 2, 2, device, torch.float32),
            _fat_case("FAT-tiny", 2, 40, 5, 2, 1, device, torch.float64),
            _cvt_case(3, 24, 5, 3, 2, device, torch.float32)]
