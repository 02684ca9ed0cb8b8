"""Bytes moved and FLOPs executed by the Triton kernels, estimated from the captured launches.

Each kernel has a formula in terms of its launch grid and block sizes (what one program loads,
computes and stores). DRAM bytes count each program's loads as misses except where the formula
says the reuse is within one program; so the estimate is an upper bound of DRAM traffic when L2
holds nothing between programs, and a fair count of the instruction work. Compared with the op's
floor (``Plan.min_bytes``, ``Plan.min_flops``) it shows how far the kernels are from the roofline
before any GPU run.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

# kernel name -> fn(launch, elem_size) -> (bytes, flops); filled in beside each kernel's design.
FORMULAS: Dict[str, Callable] = {}


def estimate(launches, plan) -> Tuple[float, float]:
    """(bytes, flops) summed over the launches that have a formula (0, 0 where none has)."""
    import torch

    from .plans import DTYPES

    size = torch.empty((), dtype=DTYPES[plan.dtype]).element_size()
    # An autotuned launch counts once, at its cheapest config (what the tuner should settle on).
    best: Dict[object, Tuple[float, float]] = {}
    for i, l in enumerate(launches):
        f = FORMULAS.get(l.kernel)
        if f is None:
            continue
        b, fl = f(l, size)
        key = ("group", l.group) if l.group is not None else i
        if key not in best or b < best[key][0]:
            best[key] = (b, fl)
    return sum(b for b, _ in best.values()), sum(f for _, f in best.values())


def _cdiv(a, b):
    return -(-a // b)


def _n_programs(l) -> int:
    n = 1
    for g in l.grid:
        n *= g
    return n


def _window(bh, bw, K, S, H, W):
    """Input footprint of a bh×bw output tile (masked-off lanes fetch nothing), reloads in L1."""
    return min(bh * S + K - 1, H) * min(bw * S + K - 1, W)


def _dw_fwd(l, size):
    c, i = l.constexprs, l.ints
    K, S, bh, bw = c["K"], c["S"], c["BH"], c["BW"]
    n = _n_programs(l)
    window = _window(bh, bw, K, S, i["H"], i["W"])
    o = min(bh, i["Ho"]) * min(bw, i["Wo"])
    out = o * (4 if c["GRAD_MODE"] else size) + o * size * (int(c["GRAD_MODE"]) + int(c["RESIDUAL"]))
    # FLOPs: every lane of the tile executes, masked or not
    return n * (window * size + out + K * K * size), n * bh * bw * 2.0 * K * K


def _dw_dgrad(l, size):
    c = l.constexprs
    K, S, bh, bw = c["K"], c["S"], c["BH"], c["BW"]
    n = _n_programs(l)
    i = l.ints
    window = min(bh + K, i["Ho"]) * min(bw + K, i["Wo"])  # g footprint of an (S·BH)×(S·BW) dx tile, fp32
    o = min(S * bh, i["H"]) * min(S * bw, i["W"])
    return n * (window * 4 + o * size * (1 + int(c["RESIDUAL"]))), n * S * S * bh * bw * 2.0 * K * K / (S * S)


def _dw_wgrad(l, size):
    c, i = l.constexprs, l.ints
    K, S, bh, bw, bk = c["K"], c["S"], c["BH"], c["BW"], c["BK"]
    C, split = l.grid
    tiles = i["B"] * _cdiv(i["Ho"], bh) * _cdiv(i["Wo"], bw)
    window = _window(bh, bw, K, S, i["H"], i["W"])
    per_tile = min(bh, i["Ho"]) * min(bw, i["Wo"]) * 4 + window * size
    # the padded tap axis (BK ≥ K) is computed too; the partials are written and summed once
    return C * tiles * per_tile + 2.0 * C * split * (K * K + 1) * 4, C * tiles * bh * bw * 2.0 * bk * K


def _attn_dims(l):
    c, i = l.constexprs, l.ints
    return c["BLOCK_N"], c["BLOCK_M"], c["BLOCK_D"], i["N"], i["M"], i["D"], c["HAS_GATE"]


def _attn_fwd(l, size):
    bn, bm, bd, N, M, D, gate = _attn_dims(l)
    n = _n_programs(l)
    m_pad = _cdiv(M, bm) * bm
    per = bn * D * size * (2 + int(gate)) + 2 * M * D * size + 8 * bn
    return n * per, n * 4.0 * bn * m_pad * bd


def _attn_bwd_single(l, size):
    bn, bm, bd, N, M, D, gate = _attn_dims(l)
    bh, split = l.grid
    q_tiles = _cdiv(N, bn)
    per_query = D * size * (3 + 2 * int(gate)) + 8
    mm = 6 if gate else 5  # S, [O], dP, dQ, dV, dK
    return (bh * (split * 2 * M * D * size + N * per_query) + 2.0 * split * bh * 2 * M * D * 4,
            bh * q_tiles * mm * 2.0 * bn * bm * bd)


def _attn_bwd_q(l, size):
    bn, bm, bd, N, M, D, gate = _attn_dims(l)
    n = _n_programs(l)
    passes = 3 if gate else 2
    m_pad = _cdiv(M, bm) * bm
    per = bn * D * size * (3 + 2 * int(gate)) + bn * D * 4 * int(gate) + 12 * bn + passes * 2 * M * D * size
    mm = (2 if gate else 0) + 2 + 3  # [S, PV], (S, dP), (S, dP, dQ)
    return n * per, n * mm * 2.0 * bn * m_pad * bd


def _attn_bwd_kv(l, size):
    bn, bm, bd, N, M, D, gate = _attn_dims(l)
    progs, split = l.grid
    q_tiles = _cdiv(N, bn)
    per_query = D * (4 if gate else size) + D * size + 12
    # each (key tile, split) program loads its K, V tile and writes its dK, dV partial; the splits
    # of one key tile together read every query once
    return (progs * split * (2 * bm * D * size + 2 * bm * D * 4) + progs * N * per_query,
            progs * q_tiles * 4 * 2.0 * bn * bm * bd)


def _gc(reads, writes, flops):
    # flops per element: forward similarity (channel means, dot, statistics) 5, apply 5; backward
    # reductions 6, apply 6; together a little above the op's floor of 20
    def f(l, size):
        C, N = l.ints["C"], l.ints["N"]
        B = _n_programs(l) // max(1, _cdiv(N, l.constexprs["BLOCK_N"]))
        G = l.ints.get("G", 8)
        return B * N * (C * size * (reads + writes) + 8 * G), B * N * C * float(flops)
    return f


def _elementwise(tensors, flops):
    def f(l, size):
        n = l.ints["n"]
        return n * size * tensors, flops * n
    return f


FORMULAS.update({
    "_dw_fwd_kernel": _dw_fwd, "_dw_dgrad_kernel": _dw_dgrad, "_dw_wgrad_kernel": _dw_wgrad,
    "_attn_fwd_kernel": _attn_fwd, "_attn_bwd_single_kernel": _attn_bwd_single,
    "_attn_bwd_q_kernel": _attn_bwd_q, "_attn_bwd_kv_kernel": _attn_bwd_kv,
    "_fwd_sim_kernel": _gc(1, 0, 5), "_fwd_apply_kernel": _gc(1, 1, 5), "_bwd_reduce_kernel": _gc(2, 0, 6),
    "_bwd_apply_kernel": _gc(1, 1, 6),
    "_cross_mod_fwd_kernel": _elementwise(3, 10), "_cross_mod_bwd_kernel": _elementwise(5, 20),
})
