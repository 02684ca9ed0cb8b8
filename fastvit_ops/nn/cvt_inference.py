"""The CPU inference path of the fused CvT transformer block (``fastvit_ops.nn.cvt.Block``).

When it runs: :func:`fastvit_ops.nn._plan.applies` (eval, fp32 plain CPU tensor, nothing needing
gradients, no compiler/autocast/functorch/dispatch mode). Outputs equal the reference's up to fp32
rounding. CvT's time is in its Linear layers (≈ 85% of its multiply-adds) and in the element-wise
passes between them (LayerNorm, QuickGELU's three passes, residual adds). The plan:

* runs every Linear on oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, the op Inductor
  emits for CPU linears under ``freezing``): on the 2-core Zen 4 it measured 2× PyTorch's default
  fp32 GEMM (MKL) at CvT's shapes (8·197 × 384 → 1536: 32 vs 70 ms on the shared machine);
* QuickGELU ``h·σ(1.702 h)`` becomes one SiLU: ``fc1``'s weight and bias are scaled by 1.702
  (``h' = 1.702 h``), so ``QuickGELU(h) = SiLU(h') / 1.702``, and the 1/1.702 is folded into
  ``fc2``'s weight (no activation between). The SiLU and the residual adds (``x + proj(·)``,
  ``x + fc2(·)``) are in-place passes over the GEMM's output, not oneDNN post-ops: with AVX2
  (forced on the Zen 4, 2 threads) its swish post-op made fc1 1.2-1.6 ms slower than GEMM + pass
  (8·197 × 384 → 1536: 9.8 vs 8.5 ms) and its add post-op 0.1-0.8 ms slower; the converted cvt_13
  forward went 410 → 386 ms (batch 8, same process, interleaved). AVX-512: the same (242 vs 241).
* q, k and v come from the one-pass depthwise projections with each BN folded
  (:func:`fastvit_ops.conv_projection_qkv`'s kernel) and the attention reads the heads as strided
  views of the tokens and writes ``proj``'s input in token order; both kernels are the ones the
  dispatch registry picks for the call (:func:`fastvit_ops.ops.dispatch.run_kernel`), called
  without the public ops' custom-op glue.

The private oneDNN op is used only after a self-test against ``F.linear`` on the first plan built
in the process (:func:`onednn_linear`); where it is missing or disagrees, ``F.linear`` runs
instead. Any part that is not the layer a step computes (a user's replacement, another
activation, an attention that is not ``dw_bn``) is called as the module it is. Plans are cached per
block under :func:`fastvit_ops.nn._plan.state_key`.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import dispatch
from ..ops.attention import OP as ATTENTION
from ..ops.conv_projection import OP as CONV_PROJECTION
from ..reference import cvt as ref
from ._bn import fold_eval_bn, is_eval_bn
from ._plan import detached

QUICK_GELU = 1.702


@functools.lru_cache(maxsize=None)
def onednn_linear() -> bool:
    """Whether ``torch.ops.mkldnn._linear_pointwise`` exists here and agrees with ``F.linear`` on a
    random fp32 problem."""
    try:
        if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
            return False
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=g) for s in ((37, 24), (40, 24), (40,)))
        with torch.no_grad():
            ok = torch.allclose(torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""), F.linear(x, w, b),
                                atol=1e-4)
        return bool(ok)
    except Exception:  # noqa: BLE001 - any failure means: do not use it
        return False


def _linear(w: Tensor, b: Optional[Tensor], act: str = "none") -> Callable[[Tensor], Tensor]:
    """``act(x Wᵀ + b)`` on (…, in) tokens, act ``"none"`` or ``"swish"`` (SiLU, a separate in-place
    pass: oneDNN's swish post-op measured slower, see the module docstring)."""
    if onednn_linear():
        lp = torch.ops.mkldnn._linear_pointwise

        def gemm(x: Tensor) -> Tensor:
            return lp(x.reshape(-1, x.shape[-1]), w, b, "none", [], "").view(*x.shape[:-1], w.shape[0])
    else:
        def gemm(x: Tensor) -> Tensor:
            return F.linear(x, w, b)
    if act == "swish":
        return lambda x: F.silu(gemm(x), inplace=True)
    return gemm


def _linear_add(w: Tensor, b: Optional[Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """``(x, r) -> r + x Wᵀ + b`` (a new tensor; the add is a separate in-place pass, as above)."""
    gemm = _linear(w, b)
    return lambda x, r: gemm(x).add_(r)


def _plain_linear(m) -> bool:
    return isinstance(m, nn.Linear)


def _layer_norm(norm: nn.Module) -> Callable[[Tensor], Tensor]:
    """CvT's LayerNorm (fp32 in, so the reference's fp32 upcast is a no-op) or a plain nn.LayerNorm."""
    if isinstance(norm, nn.LayerNorm) and norm.elementwise_affine:
        shape, eps = norm.normalized_shape, norm.eps
        w, b = detached(norm.weight, norm.bias)
        return lambda x: F.layer_norm(x, shape, w, b, eps)
    return norm


def _identity(m) -> bool:
    return isinstance(m, (nn.Identity, nn.Dropout, ref.DropPath))


def _attention(attn: nn.Module) -> Optional[Callable[[Tensor, Tensor, int, int], Tensor]]:
    """``(z, x, h, w) -> x + attn(z, h, w)`` for CvT's ``dw_bn`` attention with eval BNs and plain
    Linear projections; None for anything else (the block then calls the module)."""
    if not isinstance(attn, ref.Attention) or attn.method != "dw_bn":
        return None
    projs = (attn.conv_proj_q, attn.conv_proj_k, attn.conv_proj_v)
    if any(not isinstance(p, nn.Sequential) or not is_eval_bn(getattr(p, "bn", None)) for p in projs):
        return None
    convs = [p.conv for p in projs]
    k = convs[0].kernel_size[0]
    if not (convs[1].stride == convs[2].stride and all(
            isinstance(c, nn.Conv2d) and c.groups == c.in_channels == c.out_channels and c.bias is None
            and c.kernel_size == (k, k) and c.padding == (k // 2, k // 2) and c.dilation == (1, 1)
            and c.stride[0] == c.stride[1] and c.stride[0] in (1, 2) for c in convs) and k % 2 == 1 and k <= 31):
        return None
    if not all(_plain_linear(m) for m in (attn.proj_q, attn.proj_k, attn.proj_v, attn.proj)):
        return None
    if not (_identity(attn.attn_drop) and _identity(attn.proj_drop)):
        return None
    folded = [detached(*fold_eval_bn(p.conv, p.bn)) for p in projs]
    (wq, bq), (wk, bk), (wv, bv) = folded
    sq, skv = convs[0].stride[0], convs[1].stride[0]
    lin_q, lin_k, lin_v = (_linear(*detached(m.weight, m.bias)) for m in (attn.proj_q, attn.proj_k, attn.proj_v))
    proj_add = _linear_add(*detached(attn.proj.weight, attn.proj.bias))
    heads, dim, scale, cls = attn.num_heads, attn.dim, float(attn.scale), bool(attn.with_cls_token)

    d = dim // heads

    def split(t: Tensor) -> Tensor:  # (B, T, C) → (B, heads, T, d) view
        return t.view(t.shape[0], t.shape[1], heads, d).transpose(1, 2)

    def run(z: Tensor, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = z.shape
        if c != dim or n != int(cls) + h * w:
            raise ValueError(f"x: expected (B, {int(cls)} + h·w = {int(cls) + h * w}, {dim}) tokens, got {tuple(z.shape)}")
        backend = dispatch.get_backend()
        q, kk, v = dispatch.run_kernel(CONV_PROJECTION, "forward", backend, z, wq, bq, wk, bk, wv, bv, h, w,
                                       int(cls), sq, skv)   # the kernel the registry picks
        del z
        q, kk, v = split(lin_q(q)), split(lin_k(kk)), split(lin_v(v))
        out = torch.empty((b, n, heads, d), dtype=q.dtype, device=q.device)  # written in token order
        lse = torch.empty((b, heads, n, 2), dtype=torch.float32, device=q.device)
        dispatch.run_kernel(ATTENTION, "forward", backend, q, kk, v, None, out.transpose(1, 2), lse, scale)
        del q, kk, v, lse
        return proj_add(out.view(b, n, dim), x)
    return run


def _mlp(mlp: nn.Module) -> Optional[Callable[[Tensor, Tensor], Tensor]]:
    """``(z, x) -> x + mlp(z)`` for CvT's ``fc1 → QuickGELU → fc2`` (dropout identity in eval), the
    QuickGELU a SiLU epilogue with its 1.702 folded into the weights (module docstring); None else."""
    fc1, act, fc2, drop = (getattr(mlp, a, None) for a in ("fc1", "act", "fc2", "drop"))
    if not (_plain_linear(fc1) and _plain_linear(fc2) and isinstance(act, ref.QuickGELU)
            and (drop is None or _identity(drop))):
        return None
    w1, b1, w2, b2 = detached(fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    hidden = _linear(w1 * QUICK_GELU, b1 * QUICK_GELU if b1 is not None else None, "swish")
    out_add = _linear_add(w2 / QUICK_GELU, b2)

    def run(z: Tensor, x: Tensor) -> Tensor:
        return out_add(hidden(z), x)
    return run


def block(blk: nn.Module) -> Callable[[Tensor, int, int], Tensor]:
    """CvT Block: ``x ← x + Attn(LN1(x), h, w)``; ``x ← x + MLP(LN2(x))`` (DropPath identity in eval)."""
    norm1, norm2 = _layer_norm(blk.norm1), _layer_norm(blk.norm2)
    attn, mlp = _attention(blk.attn), _mlp(blk.mlp)
    if not _identity(blk.drop_path):
        attn = mlp = None
    attn_module, mlp_module, drop_path = blk.attn, blk.mlp, blk.drop_path

    def run(x: Tensor, h: int, w: int) -> Tensor:
        x = x.contiguous()
        z = norm1(x)
        x = attn(z, x, h, w) if attn is not None else x + drop_path(attn_module(z, h, w))
        z = norm2(x)
        return mlp(z, x) if mlp is not None else x + drop_path(mlp_module(z))
    return run
