"""Which implementation runs a call of a fused op, and why the others do not.

:func:`explain` makes random inputs of the given shape for one public op, calls it (and its
backward, unless ``inference``) under :func:`fastvit_ops.ops.dispatch.recording`, and returns
every choice the dispatch registry made on the way: the op, the stage ("call": how the public
function runs it; "forward"/"backward": the kernel), and each candidate implementation in order
with whether it ran and why. ``python -m fastvit_ops explain <op> --shape ...`` prints it.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .ops import dispatch

Inputs = Tuple[Callable[..., object], List[torch.Tensor]]


def _rand(shape, dtype, device, scale=1.0):
    return torch.randn(shape, dtype=torch.float64).mul_(scale).to(device=device, dtype=dtype)


def _dwconv(shape, dtype, device, o):
    from .ops.dwconv import dwconv2d

    B, C, H, W = shape
    k = o.get("kernel") or 3
    w, b = _rand((C, 1, k, k), dtype, device, 0.3), _rand((C,), dtype, device)
    act = o.get("activation")
    return (lambda x, w, b: dwconv2d(x, w, b, o.get("stride") or 1, None, act, bool(o.get("residual")))), \
        [_rand(shape, dtype, device), w, b]


def _context_dwconv(shape, dtype, device, o):
    from .ops.context_dwconv import context_dwconv2d

    B, C, H, W = shape
    k, G = o.get("kernel") or 3, o.get("groups") or (8 if C % 8 == 0 else 1)
    ins = [_rand(shape, dtype, device), _rand((B, G, H, W), dtype, device), _rand((B, C), dtype, device),
           _rand((C, 1, k, k), dtype, device, 0.3), _rand((C,), dtype, device)]
    return (lambda x, sp, c, w, b: context_dwconv2d(x, sp, c, w, b, o.get("stride") or 1)), ins


def _conv_projection(shape, dtype, device, o):
    from .ops.conv_projection import conv_projection_qkv

    B, C, H, W = shape
    k = o.get("kernel") or 3
    ws = [_rand(s, dtype, device, 0.3) for _ in range(3) for s in ((C, 1, k, k), (C,))]
    return (lambda x, *w: conv_projection_qkv(x, (H, W), True, *w)), [_rand((B, 1 + H * W, C), dtype, device)] + ws


def _cross_modulation(shape, dtype, device, o):
    from .ops.cross_modulation import sigmoid_cross_modulation

    return (lambda a, b: sigmoid_cross_modulation(a, b)), [_rand(shape, dtype, device), _rand(shape, dtype, device)]


def _attention(shape, dtype, device, o):
    from .ops.attention import downsampled_attention

    B, h, N, d = shape
    M = o.get("keys") or 49
    return downsampled_attention, [_rand(shape, dtype, device), _rand((B, h, M, d), dtype, device),
                                   _rand((B, h, M, d), dtype, device)]


def _attention_nchw(shape, dtype, device, o):
    from .ops.attention import downsampled_attention_nchw

    B, C, H, W = shape
    h, M = o.get("heads") or 1, o.get("keys") or 49
    kv = [_rand((B, h, M, C // h), dtype, device) for _ in range(2)]
    return (lambda q, k, v, g: downsampled_attention_nchw(q, k, v, h, gate=g)), \
        [_rand(shape, dtype, device), *kv, _rand(shape, dtype, device)]


def _gc_params(C, G, dtype, device):
    h = max(C // 8, 1)
    return [_rand((2 * h, C), dtype, device, 0.3), _rand((2 * h,), dtype, device), _rand((C, h), dtype, device, 0.3),
            _rand((C,), dtype, device), _rand((G,), dtype, device), _rand((G,), dtype, device)]


def _global_context(shape, dtype, device, o):
    from .ops.global_context import global_context

    C = shape[1]
    G = o.get("groups") or (8 if C % 8 == 0 else 1)
    return (lambda x, *p: global_context(x, *p, groups=G)), [_rand(shape, dtype, device)] + _gc_params(C, G, dtype, device)


def _similarity(shape, dtype, device, o):
    from .ops.global_context import token_global_similarity

    C = shape[1]
    G = o.get("groups") or (8 if C % 8 == 0 else 1)
    return (lambda x, a, b: token_global_similarity(x, a, b, groups=G)), \
        [_rand(shape, dtype, device)] + _gc_params(C, G, dtype, device)[4:]


#: public op → (builder, what ``--shape`` means)
OPS: Dict[str, Tuple[Callable, str]] = {
    "dwconv2d": (_dwconv, "x (B, C, H, W)"),
    "context_dwconv2d": (_context_dwconv, "x (B, C, H, W)"),
    "conv_projection_qkv": (_conv_projection, "the token map (B, C, H, W); tokens (B, 1 + H·W, C)"),
    "sigmoid_cross_modulation": (_cross_modulation, "local / global_ (any shape)"),
    "downsampled_attention": (_attention, "q (B, h, N, d)"),
    "downsampled_attention_nchw": (_attention_nchw, "q_map (B, C, H, W)"),
    "global_context": (_global_context, "x (B, C, H, W)"),
    "token_global_similarity": (_similarity, "x (B, C, H, W)"),
}


def explain(op: str, shape: Sequence[int], dtype: torch.dtype = torch.float32, device: str = "cpu",
            backend: Optional[str] = None, inference: bool = False, channels_last: bool = False,
            **options) -> List[dispatch.Choice]:
    """Call public op ``op`` once on random inputs of ``shape`` (forward, and backward unless
    ``inference``: then under ``torch.no_grad``) and return every :class:`~fastvit_ops.ops.dispatch.Choice`
    the registry made. ``options``: ``kernel``, ``stride``, ``activation``, ``residual``, ``keys``,
    ``heads``, ``groups`` where the op has them. Raises ``ValueError`` for an unknown op and what the
    op itself raises for bad shapes."""
    if op not in OPS:
        raise ValueError(f"op: expected one of {sorted(OPS)}, got {op!r}")
    fn, ins = OPS[op][0](tuple(shape), dtype, torch.device(device), options)
    if channels_last and ins[0].dim() == 4:
        ins[0] = ins[0].contiguous(memory_format=torch.channels_last)
    if not inference:
        ins = [t.requires_grad_() for t in ins]
    with dispatch.recording() as log, dispatch.backend(backend or dispatch.get_backend()):
        with torch.no_grad() if inference else torch.enable_grad():
            out = fn(*ins)
    if not inference:
        outs = [o for o in (out if isinstance(out, (tuple, list)) else [out])]
        with dispatch.recording() as log_bwd:
            torch.autograd.grad([o.sum() for o in outs], ins, allow_unused=True)
        log += log_bwd
    return log


def registry() -> List[Tuple[str, str, List[dispatch.Impl]]]:
    """Every registered (op, stage, ordered implementations) (``info --verbose``)."""
    order = {"call": 0, "forward": 1, "backward": 2}
    return [(op, stage, list(dispatch.implementations(op, stage)))
            for op, stages in dispatch.ops().items() for stage in sorted(stages, key=lambda s: order.get(s, 3))]
