"""One small random call of every public op, for the tests that run all ops alike (backward
backend, deterministic mode, bad input).

``CASES[name](gen, dtype, batch)`` returns ``(fn, tensors)``: ``fn(*tensors)`` calls the op and
returns a tensor or a tuple of tensors; ``tensors`` are the differentiable inputs (leaf tensors
that require grad). Inputs come from ``gen`` (a ``torch.Generator``) so a case is reproducible.
"""
from __future__ import annotations

import torch

import fastvit_ops
from fastvit_ops.ops.context_dwconv import context_dwconv2d


def _r(gen, dtype, *shape, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).requires_grad_()


def cross_modulation(gen, dtype, B=2):
    def fn(a, b):
        return fastvit_ops.sigmoid_cross_modulation(a, b, "full")
    return fn, [_r(gen, dtype, B, 4, 5, 3), _r(gen, dtype, B, 4, 5, 3)]


def dwconv(gen, dtype, B=2):
    def fn(x, w, b):
        return fastvit_ops.dwconv2d(x, w, b, activation="silu")
    return fn, [_r(gen, dtype, B, 3, 7, 6), _r(gen, dtype, 3, 1, 5, 5, scale=0.3), _r(gen, dtype, 3)]


def attention(gen, dtype, B=2):
    def fn(q, k, v):
        return fastvit_ops.downsampled_attention(q, k, v)
    return fn, [_r(gen, dtype, B, 2, 9, 8), _r(gen, dtype, B, 2, 4, 8), _r(gen, dtype, B, 2, 4, 8)]


def attention_nchw(gen, dtype, B=2):
    def fn(q, k, v, g):
        return fastvit_ops.downsampled_attention_nchw(q, k, v, 2, gate=g)
    return fn, [_r(gen, dtype, B, 8, 3, 5), _r(gen, dtype, B, 2, 4, 4), _r(gen, dtype, B, 2, 4, 4),
                _r(gen, dtype, B, 8, 3, 5)]


def conv_projection(gen, dtype, B=2):
    def fn(x, wq, bq, wk, bk, wv, bv):
        return fastvit_ops.conv_projection_qkv(x, (3, 4), True, wq, bq, wk, bk, wv, bv)
    ws = []
    for _ in range(3):
        ws += [_r(gen, dtype, 4, 1, 3, 3, scale=0.3), _r(gen, dtype, 4)]
    return fn, [_r(gen, dtype, B, 13, 4)] + ws


def similarity(gen, dtype, B=2):
    def fn(x, a, b):
        return fastvit_ops.token_global_similarity(x, a, b, groups=2)
    return fn, [_r(gen, dtype, B, 6, 5, 4), _r(gen, dtype, 2), _r(gen, dtype, 2)]


def global_context(gen, dtype, B=2):
    def fn(x, w1, b1, w2, b2, a, b):
        return fastvit_ops.global_context(x, w1, b1, w2, b2, a, b, groups=2)
    return fn, [_r(gen, dtype, B, 6, 5, 4), _r(gen, dtype, 4, 6, scale=0.4), _r(gen, dtype, 4),
                _r(gen, dtype, 6, 2, scale=0.7), _r(gen, dtype, 6), _r(gen, dtype, 2), _r(gen, dtype, 2)]


def context_dwconv(gen, dtype, B=2):
    def fn(x, sp, c, w, b):
        return context_dwconv2d(x, sp, c, w, b, activation="gelu")
    return fn, [_r(gen, dtype, B, 4, 6, 5), _r(gen, dtype, B, 2, 6, 5), _r(gen, dtype, B, 4),
                _r(gen, dtype, 4, 1, 3, 3, scale=0.3), _r(gen, dtype, 4)]


CASES = {
    "sigmoid_cross_modulation": cross_modulation,
    "dwconv2d": dwconv,
    "downsampled_attention": attention,
    "downsampled_attention_nchw": attention_nchw,
    "conv_projection_qkv": conv_projection,
    "token_global_similarity": similarity,
    "global_context": global_context,
    "context_dwconv2d": context_dwconv,
}


def outputs(result):
    return list(result) if isinstance(result, (tuple, list)) else [result]


def forward_backward(name, seed, dtype=torch.float32, batch=2):
    """(outputs, gradients of every input) of one case, with a random upstream gradient."""
    gen = torch.Generator().manual_seed(seed)
    fn, ins = CASES[name](gen, dtype, batch)
    outs = outputs(fn(*ins))
    dys = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, ins, dys, allow_unused=True)
    return [o.detach() for o in outs], [torch.zeros_like(t) if g is None else g for t, g in zip(ins, grads)]
