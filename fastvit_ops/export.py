"""Export: ``torch.export``, AOTInductor and ONNX for models that use the fused ops.

``torch.export.export(convert(model), (x,))`` keeps every fused op as a ``fastvit_ops::*`` custom op
(traced through its fake kernel), so the exported program and an AOTInductor package built from it
run our kernels. ONNX needs standard operators instead: :func:`onnx_export` (``torch.onnx.export``
with the same arguments) lowers every forward custom op to its reference composition (plain ATen:
``conv2d``, ``matmul``, ``softmax``, ``mean``, …) by putting :data:`DECOMPOSITIONS` in
``torch._decomp``'s global table, which the ONNX exporter reads, for the length of the export only.

They must not stay there: with a decomposition in that table, Inductor refuses to fall back to the
custom op whenever the ``CI`` environment variable is set (``make_fallback``'s "a decomposition
exists" assertion), which broke ``torch.compile`` and AOTInductor of every fused op on CI machines
(GitHub Actions sets ``CI=true``).

The decompositions compute every output of the op (the softmax statistics and channel means some
ops return for their backward included), with the math of the ``reference`` backend, so an ONNX
model matches the PyTorch one to rounding. Registered on ``import fastvit_ops``.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator

import torch

from .ops import attention, context_dwconv, conv_projection, cross_modulation, dwconv, global_context

__all__ = ["DECOMPOSITIONS", "onnx_decompositions", "onnx_export"]


def _dwconv2d(x, weight, bias, stride, padding, activation, residual, backend):
    return dwconv.FORWARD["reference"](x, weight, bias, stride, padding, activation, residual)


def _downsampled_attention(q, k, v, gate, scale, layout, backend):
    # The reference backend's math (``attention._reference_fwd``), written functionally: that one
    # fills preallocated outputs, which a decomposition may not do.
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = q.to(acc) @ k.to(acc).transpose(-1, -2)
    m = s.amax(-1, keepdim=True)
    p = torch.exp2((s - m) * (scale * attention.LOG2E))
    l = p.sum(-1, keepdim=True)
    o = (p / l) @ v.to(acc)
    if gate is not None:
        o = torch.nn.functional.silu(o) * gate.to(acc)
    return o.to(q.dtype), torch.cat([m, torch.log2(l)], -1).to(attention._lse_dtype(q))


def _sigmoid_cross_modulation(local, global_, mode, backend):
    return cross_modulation.FORWARD["reference"](local, global_, mode)


def _similarity(x, alpha, beta, groups, eps):
    """S' (B, G, N), the channel means g (B, C) and the statistics (B, 2) the backward reads, in the
    accumulation dtype: the released code's math (``global_context.reference``), which exports to
    far fewer ONNX nodes than the reference backend's two-level statistics. The kernels keep the
    mean of ``D = S − T̄`` (S shifted by the groups' mean self-similarity ``T̄ = mean_γ d^-1/2 Σ_e g_γe²``)
    and σ of S."""
    B, C, H, W = x.shape
    G, d = groups, C // groups
    xa = x.to(global_context._acc(x.dtype))
    g = xa.mean(dim=(2, 3))
    s = torch.einsum("bgdn,bgd->bgn", xa.reshape(B, G, d, H * W), g.reshape(B, G, d)) * d ** -0.5
    # Unbiased σ over (G, N) written out: torch.std_mean's own decomposition fails under
    # opcheck's aot_dispatch tracing once this function is in the global decomposition table.
    mean = s.mean(dim=(1, 2), keepdim=True)
    std = ((s - mean).square().sum(dim=(1, 2), keepdim=True) / (s.shape[1] * s.shape[2] - 1)).sqrt()
    sp = (s - mean) / (std + eps) * alpha.to(s.dtype).view(1, G, 1) + beta.to(s.dtype).view(1, G, 1)
    tbar = (g * g).sum(-1, keepdim=True) * (d ** -0.5 / G)
    return sp, g, torch.cat([mean.view(B, 1) - tbar, std.view(B, 1)], 1)


def _token_global_similarity(x, alpha, beta, groups, eps, backend):
    sp, g, stats = _similarity(x, alpha, beta, groups, eps)
    B, _, H, W = x.shape
    return sp.reshape(B, groups, H, W).to(x.dtype), g, stats


def _global_context(x, w1, b1, w2, b2, alpha, beta, groups, eps, residual, backend):
    sp, g, stats = _similarity(x, alpha, beta, groups, eps)
    B, C, H, W = x.shape
    u = torch.nn.functional.linear(g, w1.to(g.dtype), b1.to(g.dtype))
    h = w2.shape[1]
    c = torch.nn.functional.linear(torch.maximum(u[:, :h], u[:, h:]), w2.to(g.dtype), b2.to(g.dtype))
    y = (sp.unsqueeze(2) * c.view(B, groups, C // groups, 1)).reshape(B, C, H, W)
    return (x.to(y.dtype) + y if residual else y).to(x.dtype), g, stats


def _context_dwconv2d(x, sp, c, weight, bias, stride, padding, activation, backend):
    return context_dwconv.FORWARD["reference"](x, sp, c, weight, bias, stride, padding, activation)


def _conv_projection_qkv(x, wq, bq, wk, bk, wv, bv, h, w, cls, stride_q, stride_kv, backend):
    return conv_projection.FORWARD["reference"](x, wq, bq, wk, bk, wv, bv, h, w, cls, stride_q, stride_kv)


#: forward custom op → its decomposition (same arguments, same outputs, ATen ops only).
DECOMPOSITIONS: Dict[str, object] = {
    "dwconv2d": _dwconv2d,
    "downsampled_attention": _downsampled_attention,
    "sigmoid_cross_modulation": _sigmoid_cross_modulation,
    "token_global_similarity": _token_global_similarity,
    "global_context": _global_context,
    "context_dwconv2d": _context_dwconv2d,
    "conv_projection_qkv": _conv_projection_qkv,
}


@contextlib.contextmanager
def onnx_decompositions() -> Iterator[None]:
    """Within the block, ``torch._decomp.decomposition_table`` holds :data:`DECOMPOSITIONS` (entries
    already there are left alone), so ``torch.onnx.export`` lowers the fused ops to standard
    operators; on exit the table is as it was. Not thread-safe: the table is process-global, and
    ``torch.compile``/AOTInductor in another thread during the block would see the entries.
    """
    table = torch._decomp.decomposition_table
    added = []
    try:
        for name, fn in DECOMPOSITIONS.items():
            op = getattr(torch.ops.fastvit_ops, name).default
            if op not in table:
                table[op] = fn
                added.append(op)
        yield
    finally:
        for op in added:
            table.pop(op, None)


def onnx_export(model, args=(), f=None, **kwargs):
    """``torch.onnx.export(model, args, f, **kwargs)`` with the fused ops lowered to standard ONNX
    operators (their reference composition, the same math as the ``reference`` backend).

    ``model``: a module (converted or not) or a ``torch.export.ExportedProgram``; ``args`` its
    example inputs (e.g. one ``(B, 3, H, W)`` float32 NCHW image batch). Keyword arguments go to
    ``torch.onnx.export`` unchanged; the dynamo exporter (its default) is the one supported, since
    the TorchScript one cannot see through the eager C++ fast paths. Returns its ``ONNXProgram``.
    Needs ``onnx``, ``onnxscript`` (and ``onnxruntime`` to run the result): the ``export`` extra.
    Raises ``ValueError`` for ``dynamo=False``.
    """
    if kwargs.get("dynamo", True) is False:
        raise ValueError("onnx_export: dynamo=False (the TorchScript exporter) is not supported; "
                         "expected the default dynamo exporter")
    with onnx_decompositions():
        return torch.onnx.export(model, args, f, **kwargs)
