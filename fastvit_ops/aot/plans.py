"""The Triton launches the ops make at the real layer shapes, as callables for ``capture()``.

Each plan entry runs one op's Triton forward and backward glue (the same functions the custom ops
call) on ``meta`` tensors of a FAT-B0 / FCViT-tiny / CvT-13 layer shape at 224², so every
specialization (dtype, head_dim, kernel size, stride, epilogue, block sizes) those models launch
is compiled. ``min_bytes`` and ``min_flops`` are the op's floor for that call: every input read
once, every output written once, and the arithmetic the math needs (no padding, no recompute).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List

import torch

from ..benchmarks.shapes import CVT13_STAGES, FAT_B0_STAGES, FCVIT_TINY_STAGES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
FCVIT_TINY_MLP = (8, 8, 4, 4)   # the channel mixer's hidden width multiple per stage
FAT_KEYS = 49                   # FASA pools to 7×7 keys at every stage at 224²


@dataclasses.dataclass
class Plan:
    op: str
    label: str
    dtype: str
    run: Callable[[], None]
    min_bytes: float            # forward + backward floor
    min_flops: float


def _t(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def _dwconv(label, shape, k, stride, act, residual, dtype, name):
    from ..ops import dwconv as op

    B, C, H, W = shape
    p = k // 2
    Ho, Wo = (H + 2 * p - k) // stride + 1, (W + 2 * p - k) // stride + 1

    def run():
        x, w, b = _t(B, C, H, W, dtype=dtype), _t(C, 1, k, k, dtype=dtype), _t(C, dtype=dtype)
        op._triton_fwd(x, w, b, stride, p, act, residual)
        op._triton_bwd(_t(B, C, Ho, Wo, dtype=dtype), x, w, b, stride, p, act, residual)

    size = torch.empty((), dtype=dtype).element_size()
    n_in, n_out = B * C * H * W, B * C * Ho * Wo
    # forward: x, w in, y out; backward: dy, x, w in, dx, dw, db out
    return Plan("dwconv2d", label, name, run, size * (3 * n_in + 2 * n_out + 2 * C * k * k),
                2.0 * k * k * n_out * 3)


def _cross_mod(label, shape, dtype, name):
    from ..ops import cross_modulation as op

    def run():
        a, g = _t(*shape, dtype=dtype), _t(*shape, dtype=dtype)
        for mode in ("silu", "full"):
            op._triton_fwd(a, g, mode)
            op._triton_bwd(_t(*shape, dtype=dtype), a, g, mode)

    n = 1
    for s in shape:
        n *= s
    size = torch.empty((), dtype=dtype).element_size()
    # both modes run: twice (read 2, write 1; read 3, write 2)
    return Plan("sigmoid_cross_modulation", label, name, run, 2 * size * n * (3 + 5), 60.0 * n)


def _attention(label, b, h, n, m, d, gate, layout, dtype, name):
    from ..ops import attention as op

    def query_like():
        if layout == op.CHANNELS_FIRST:
            return _t(b, h, d, n, dtype=dtype).transpose(2, 3)
        return _t(b, n, h, d, dtype=dtype).transpose(1, 2)

    def run():
        q, k, v = query_like(), _t(b, h, m, d, dtype=dtype), _t(b, h, m, d, dtype=dtype)
        g = query_like() if gate else None
        out = op._empty_out(q, layout)
        lse = torch.empty(op._stats_shape(q), dtype=op._lse_dtype(q), device="meta")
        op._triton_fwd(q, k, v, g, out, lse, d ** -0.5)
        dq, dk, dv = op._empty_grad(q), op._empty_grad(k), op._empty_grad(v)
        dg = op._empty_grad(g) if gate else q.new_empty((0,))
        op._triton_bwd(query_like(), q, k, v, g, lse, dq, dk, dv, dg, d ** -0.5)

    size = torch.empty((), dtype=dtype).element_size()
    nq, nk = b * h * n * d, b * h * m * d
    fwd = (2 + int(gate)) * nq + 2 * nk            # q, [gate], out; k, v
    bwd = (3 + 2 * int(gate)) * nq + 4 * nk        # dout, q, [gate, dgate], dq; k, v, dk, dv
    return Plan("downsampled_attention", label, name, run, size * (fwd + bwd) + 4 * 8 * b * h * n,
                4.0 * b * h * n * m * d * (1 + 2.5))


def _global_context(label, shape, dtype, name):
    from ..ops import global_context as op

    B, C, H, W = shape
    hidden = max(C // 8, 4)  # FCViT's GlobalContext: reduction 8 (at least 4 wide)

    def run():
        x = _t(B, C, H, W, dtype=dtype)
        acc = op._acc(dtype)
        mlp = (_t(2 * hidden, C, dtype=acc), _t(2 * hidden, dtype=acc), _t(C, hidden, dtype=acc), _t(C, dtype=acc))
        al, be = _t(8, dtype=acc), _t(8, dtype=acc)
        kernels = op.KERNELS["triton"]
        out, g, stats = op._glue_forward(kernels, x, mlp, al, be, 8, 1e-5, True)
        op._glue_backward(kernels, _t(B, C, H, W, dtype=dtype), x, g, stats, mlp, al, be, 8, 1e-5, True)

    size = torch.empty((), dtype=dtype).element_size()
    n = B * C * H * W
    return Plan("global_context", label, name, run, size * n * 5, 20.0 * n)


def plans(batch: int = 64, dtypes=("fp32", "bf16", "fp16")) -> List[Plan]:
    """Every Triton launch of the ops at the FAT-B0, FCViT-tiny and CvT-13 layer shapes."""
    from ..ops.attention import CHANNELS_FIRST, TOKENS

    out: List[Plan] = []
    for name in dtypes:
        dt = DTYPES[name]
        for i, (c, hw, heads, k, _window) in enumerate(FAT_B0_STAGES):
            s = f"FAT-B0 s{i + 1}"
            x = (batch, c, hw, hw)
            out.append(_dwconv(f"{s} CPE {x} k{k} +x", x, k, 1, 0, True, dt, name))
            out.append(_dwconv(f"{s} local {x} k{k} silu", x, k, 1, 1, False, dt, name))
            hid = (batch, 4 * c, hw, hw)
            out.append(_dwconv(f"{s} ConvFFN {hid} k5 +x", hid, 5, 1, 0, True, dt, name))
            if i < 3:
                out.append(_dwconv(f"{s} ConvFFN-down {hid} k5/s2", hid, 5, 2, 0, False, dt, name))
            out.append(_cross_mod(f"{s} {x}", x, dt, name))
            out.append(_attention(f"{s} FASA (N{hw * hw},M{FAT_KEYS},d{c // heads}) gate", batch, heads, hw * hw,
                                  FAT_KEYS, c // heads, True, CHANNELS_FIRST, dt, name))
        for i, ((c, hw), r) in enumerate(zip(FCVIT_TINY_STAGES, FCVIT_TINY_MLP)):
            s = f"FCViT-tiny s{i + 1}"
            x = (batch, c, hw, hw)
            out.append(_dwconv(f"{s} token {x} k11", x, 11, 1, 0, False, dt, name))
            hid = (batch, r * c, hw, hw)
            out.append(_dwconv(f"{s} channel {hid} k3 gelu", hid, 3, 1, 2, False, dt, name))
            out.append(_global_context(f"{s} {x}", x, dt, name))
        for i, (c, hw, heads) in enumerate(CVT13_STAGES):
            cls = int(i == 2)
            n, m = hw * hw + cls, ((hw + 1) // 2) ** 2 + cls
            out.append(_attention(f"CvT-13 s{i + 1} (N{n},M{m},d{c // heads})", batch, heads, n, m, c // heads,
                                  False, TOKENS, dt, name))
        # RepLKNet's large-kernel sweep shape (the depthwise conv's published targets).
        for k in (13, 31):
            x = (batch, 384, 32, 32)
            out.append(_dwconv(f"sweep {x} k{k}", x, k, 1, 0, False, dt, name))
    return out
