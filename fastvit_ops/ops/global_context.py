"""FCViT grouped token-global similarity with normalization (docs/global_context.md): custom ops, autograd,
dispatch.

Two public functions:

* :func:`token_global_similarity` — steps 1–4, ``S'`` (B, G, H, W);
* :func:`global_context` — all six steps, ``x + GC(x)`` (B, C, H, W).

Algorithm (per sample b; every backend computes exactly this, in fp32 — fp64 for fp64 inputs):

* pass 1: ``g = mean_i x`` (the channel means);  tiny MLP ``c = fc2(maxout(fc1(g)))`` in torch.
* pass 2: the similarity *relative to the mean self-similarity* ``T̄ = mean_γ T_γ``, formed from
  centered inputs, ``D[γ,i] = s·Σ_e (x[γd+e,i] − g[γd+e])·g[γd+e] + (T_γ − T̄)``,
  ``T_γ = s·Σ_e g[γd+e]²``, with
  ``T_γ − T̄ = (s/G)·Σ_κ Σ_e (g[γd+e] − g[κd+e])·(g[γd+e] + g[κd+e])`` (:func:`group_offsets`).
  D equals ``S − T̄`` exactly in real arithmetic, and ``T̄`` is S's mean (Σ_i (x − g) = 0), so D is
  centred: it never forms the large ``|S|`` or ``T_γ`` (no catastrophic cancellation when
  ``|mean(x)| ≫ std(x)``), nor an offset larger than S's spread (a shift by one group's ``T_γ``,
  as before, cost 10× eager's error where that group's means stood out). Its mean and unbiased std over (G, N)
  are two-pass per group (``mean_γ``, ``M2_γ = Σ(D−mean_γ)²``, each shifted by one of its own
  values) merged exactly across groups (Chan et al.), as accurate as ``torch.std_mean``; a constant
  input gives exactly σ = 0 and ``Ŝ = 0`` → ``S' = β`` (the reference's finite result).
* pass 3: ``S' = α_γ·(D − mean)/(σ + eps) + β_γ``; ``out = x + S'·c`` (or ``S'`` itself).

Backward (closed form; ``n = G·N``, ``r = 1/(σ+eps)``, ``dŜ = α·dS'``)::

    dS   = r·(dŜ − mean(dŜ)) − Ŝ·Σ(dŜ·Ŝ)/((n−1)·σ)            (σ-term 0 at σ = 0, like torch.std)
    dx   = [dy] + s·g_c·dS[γ(c)] + (dg_sim + dg_mlp)_c / N
    dg_sim_c = s·Σ_i dS[γ(c),i]·x[c,i],   dc_c = Σ_i dy[c,i]·S'[γ(c),i],   dS'[γ] = Σ_{c∈γ} dy·c
    dα = Σ dS'·Ŝ,  dβ = Σ dS'

computed as one reduction pass over (x, dy) that also writes the small maps Ŝ, dS' (B, G, N),
a little (B, C) / (B, G) glue with the MLP backward, and one pass writing dx. Nothing large is
saved by the forward: Ŝ is recomputed from x (d FMAs per element); (g, mean, σ) are kept, O(B·C).

Backends: ``reference`` and ``triton`` run the glue below as torch ops around pass-level kernels
(``KERNELS``); ``cpu`` runs each whole direction as one C++ call (``_gc_forward_full`` /
``_gc_backward_full``: the same glue in C++/ATen, no per-op Python dispatch). The kernels walk
NCHW rows; other layouts are copied to NCHW first and results are returned in the input's layout.

Released code: github ma-xu/FCViT ``models/fcvit.py`` ``GlobalContext`` (``weighted_gc=True``,
``compete=True``, ``head=8``); reference layer: :class:`fastvit_ops.reference.fcvit.GlobalContext`.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_rules, dispatch
from .validate import check_tensor, is_dense

OP_SIM = "token_global_similarity"
OP_GC = "global_context"


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dense(x: Tensor) -> Tensor:
    """NCHW-contiguous view/copy: the kernels walk rows of N = H·W tokens."""
    return x.contiguous()


def _like_input(out: Tensor, x: Tensor) -> Tensor:
    """``out`` (contiguous) in ``x``'s dense layout (channels_last stays channels_last)."""
    if x.is_contiguous() or not is_dense(x):
        return out
    return torch.empty_like(x, dtype=out.dtype).copy_(out)


# ---- the tiny MLP on (B, C): competitive bottleneck (maxout of fc1's two halves) ----------------
def _mlp(g: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor):
    acc = g.dtype
    h = w2.shape[1]
    u = F.linear(g, w1.to(acc), b1.to(acc))
    ua, ub = u[:, :h], u[:, h:]
    m = torch.maximum(ua, ub)
    return F.linear(m, w2.to(acc), b2.to(acc)), ua, ub, m


def _mlp_backward(dc: Tensor, g: Tensor, w1, b1, w2, b2):
    """Gradients of ``c = fc2(max(u_a, u_b))``, ``u = fc1(g)``; ties split the gradient in half
    (``torch.maximum``'s rule)."""
    acc = g.dtype
    _, ua, ub, m = _mlp(g, w1, b1, w2, b2)
    dw2 = dc.t() @ m
    db2 = dc.sum(0)
    dm = dc @ w2.to(acc)
    half = torch.where(ua == ub, 0.5 * dm, dm)
    dua = torch.where(ua >= ub, half, torch.zeros_like(dm))
    dub = torch.where(ub >= ua, half, torch.zeros_like(dm))
    du = torch.cat([dua, dub], 1)
    dw1 = du.t() @ g
    db1 = du.sum(0)
    dg = du @ w1.to(acc)
    return dg, (dw1.to(w1.dtype), db1.to(b1.dtype), dw2.to(w2.dtype), db2.to(b2.dtype))


# ---- eager composition (what ``auto`` runs where our kernels are not faster: see dispatch) --------
def reference(x: Tensor, rescale_weight: Tensor, rescale_bias: Tensor, groups: int, eps: float,
              mlp=None, residual: bool = True) -> Tensor:
    """Eager PyTorch, as the released FCViT code writes it: ``S'`` (``mlp=None``), else
    ``[x +] S'·c`` with ``mlp = (fc1_weight, fc1_bias, fc2_weight, fc2_bias)``. Differentiable."""
    B, C, H, W = x.shape
    G, d = groups, C // groups
    g = x.mean(dim=(2, 3))
    s = torch.einsum("bgdn,bgd->bgn", x.reshape(B, G, d, H * W), g.reshape(B, G, d)) * d ** -0.5
    std, mean = torch.std_mean(s, dim=(1, 2), keepdim=True)
    s = (s - mean) / (std + eps) * rescale_weight.view(1, G, 1) + rescale_bias.view(1, G, 1)
    if mlp is None:
        return s.reshape(B, G, H, W)
    w1, b1, w2, b2 = mlp
    u = F.linear(g, w1, b1)
    h = w2.shape[1]
    c = F.linear(torch.maximum(u[:, :h], u[:, h:]), w2, b2)
    y = (s.reshape(B, G, 1, H * W) * c.reshape(B, G, d, 1)).reshape(B, C, H, W)
    return x + y if residual else y


# ---- reference backend: the same algorithm in torch ops (the readable spec of the kernels) ------
def group_offsets(ga: Tensor, s: float) -> Tensor:
    """``T_γ − T̄`` (B, G) from the group means ``ga`` (B, G, d): each pairwise difference of self-
    similarities formed as ``Σ_e (a − b)(a + b)`` before it is summed (no cancellation between the
    large ``T``s; exactly 0 for a constant input), averaged over κ in a fixed order."""
    a, b = ga.unsqueeze(2), ga.unsqueeze(1)
    return ((a - b) * (a + b)).sum(-1).mean(-1) * s


def _ref_forward(x, g, c, alpha, beta, groups, eps, residual):
    B, C, H, W = x.shape
    G, N = groups, H * W
    d, n = C // G, G * H * W
    acc = g.dtype
    s = d ** -0.5
    xa = x.to(acc).reshape(B, G, d, N)
    ga = g.view(B, G, d)
    D = s * torch.einsum("bgdn,bgd->bgn", xa - ga.unsqueeze(-1), ga) + group_offsets(ga, s).unsqueeze(-1)
    # Two-level two-pass statistics, as the kernels form them: per group (mean_γ, M2_γ =
    # Σ (D − mean_γ)²), then merged exactly (Chan et al.). A one-pass Σ D² − (Σ D)²/n loses digits
    # to cancellation when the mean is large next to σ, and σ scales every gradient. Within a group
    # the pass is shifted by one of its values (D_γ sits near its offset T_γ − T̄); across groups
    # not at all, D being centred already (a shift by one group's mean put that group's offset
    # into every Ŝ), but the mean of the group means gets one correction pass, so equal means
    # (a constant input: D the same everywhere) merge to exactly that mean: σ = 0, Ŝ = 0, S' = β.
    t = D - D[:, :, :1]
    tm = t.mean(-1, keepdim=True)
    m2_g = ((t - tm) ** 2).sum(-1)
    mean_g = D[:, :, 0] + tm.squeeze(-1)
    um = mean_g.mean(1, keepdim=True)
    um = um + (mean_g - um).mean(1, keepdim=True)  # corrected: exactly m when every mean_γ is m
    mean = um.squeeze(1)
    m2 = m2_g.sum(1) + N * ((mean_g - um) ** 2).sum(1)
    sigma = (m2 / (n - 1)).sqrt()
    shat = (D - mean.view(B, 1, 1)) / (sigma.view(B, 1, 1) + eps)
    sp = alpha.view(1, G, 1) * shat + beta.view(1, G, 1)
    if c is None:
        out = sp.reshape(B, G, H, W).to(x.dtype)
    else:
        y = sp.unsqueeze(2) * c.view(B, G, d, 1)
        if residual:
            y = y + xa
        out = y.reshape(B, C, H, W).to(x.dtype)
    return out, torch.stack([mean, sigma], 1)


def _ref_bwd_reduce(grad, x, g, c, alpha, beta, stats, groups, eps):
    B, C, H, W = x.shape
    G, N = groups, H * W
    d = C // G
    acc = g.dtype
    s = d ** -0.5
    xt = x.to(acc).reshape(B, G, d, N) - g.view(B, G, d, 1)
    ga = g.view(B, G, d)
    D = s * torch.einsum("bgdn,bgd->bgn", xt, ga) + group_offsets(ga, s).unsqueeze(-1)
    mean, sigma = stats[:, 0], stats[:, 1]
    shat = (D - mean.view(B, 1, 1)) / (sigma.view(B, 1, 1) + eps)
    if c is not None:
        dy = grad.to(acc).reshape(B, G, d, N)
        dsp = torch.einsum("bgdn,bgd->bgn", dy, c.view(B, G, d))
        sp = alpha.view(1, G, 1) * shat + beta.view(1, G, 1)
        dc = torch.einsum("bgdn,bgn->bgd", dy, sp).reshape(B, C)
    else:
        dsp = grad.to(acc).reshape(B, G, N)
        dc = torch.zeros_like(g)
    A = torch.einsum("bgdn,bgn->bgd", xt, dsp).reshape(B, C)
    Bt = torch.einsum("bgdn,bgn->bgd", xt, shat).reshape(B, C)
    chan = torch.stack([A, Bt, dc], 1)
    grp = torch.stack([dsp.sum(-1), (dsp * shat).sum(-1), shat.sum(-1)], 1)
    return shat, dsp, chan, grp


def _ref_bwd_apply(x, grad, shat, dsp, coef, gs, bias):
    B, C, H, W = x.shape
    G = shat.shape[1]
    d = C // G
    t = coef[:, :, 0:1] * dsp + coef[:, :, 1:2] + coef[:, :, 2:3] * shat  # dS, (B, G, N)
    dx = gs.view(B, G, d, 1) * t.unsqueeze(2) + bias.view(B, G, d, 1)
    if grad is not None:
        dx = dx + grad.to(dx.dtype).reshape(B, G, d, H * W)
    return dx.reshape(B, C, H, W).to(x.dtype)


# ---- Triton kernels (pass level; the C++ backend runs whole ops, below) -------------------------
def _triton_forward(*args):
    from fastvit_ops.kernels import global_context as k
    return k.gc_forward(*args)


def _triton_bwd_reduce(*args):
    from fastvit_ops.kernels import global_context as k
    return k.gc_backward_reduce(*args)


def _triton_bwd_apply(*args):
    from fastvit_ops.kernels import global_context as k
    return k.gc_backward_apply(*args)


# Pass-level kernels of the backends that share the torch glue below: (forward, backward reduce
# pass, backward apply pass). Inputs: x dense NCHW; g, c, alpha, beta, stats, coef, gs, bias
# contiguous in the accumulation dtype.
KERNELS = {
    "reference": (_ref_forward, _ref_bwd_reduce, _ref_bwd_apply),
    "triton": (_triton_forward, _triton_bwd_reduce, _triton_bwd_apply),
}


# ---- forward / backward drivers (below autograd: no autograd calls) -----------------------------
#: Maps of at most this many values per sample (G·H·W) run the fp32 forward in float64, as the C++
#: kernel does (``kTinyMap``): over a handful of similarities one fp32 rounding moves
#: Ŝ = (D − mean)/σ by as much as σ is small (the reference backend measured 2-4x eager's error
#: there on single elements).
TINY_MAP = 64

# forward(x, mlp, alpha, beta, groups, eps, residual) -> (out NCHW-contiguous, g, stats)
# backward(grad, x, g, stats, mlp, alpha, beta, groups, eps, residual)
#     -> (dx NCHW-contiguous, dalpha, dbeta[, dfc1_w, dfc1_b, dfc2_w, dfc2_b])
# ``mlp`` is (fc1_w, fc1_b, fc2_w, fc2_b) for global_context, None for the similarity alone.
def _glue_forward(kernels, x, mlp, alpha, beta, groups, eps, residual):
    if x.dtype == torch.float32 and x.dim() == 4 and groups * x.shape[2] * x.shape[3] <= TINY_MAP:
        wide = torch.float64
        mlp_w = None if mlp is None else tuple(t.to(wide) for t in mlp)
        out, g, stats = _glue_forward(kernels, x.to(wide), mlp_w, alpha.to(wide), beta.to(wide), groups, eps,
                                      residual)
        return out.to(x.dtype), g.to(x.dtype), stats.to(x.dtype)  # each rounded once
    fwd = kernels[0]
    acc = _acc(x.dtype)
    xd = _dense(x)
    # Channel means accumulated in float64, as the C++ kernel does: at large-mean inputs (|x| ~ 10³)
    # an fp32 mean's error reaches D and σ, and dx then exceeded 2× eager's error for 1% of seeds.
    g = xd.mean(dim=(2, 3), dtype=torch.float64).to(acc)
    c = _mlp(g, *mlp)[0].contiguous() if mlp is not None else None
    out, stats = fwd(xd, g, c, alpha.to(acc).contiguous(), beta.to(acc).contiguous(), groups,
                     float(eps), residual)
    return out, g, stats


def _glue_backward(kernels, grad, x, g, stats, mlp, alpha, beta, groups, eps, residual):
    if x.dtype == torch.float32:
        # fp32: the whole backward in float64 from the fp32 tensors (see _wide_backward).
        return _wide_backward(lambda *a: _glue_backward(kernels, *a), kernels[0], grad, x, mlp, alpha, beta,
                              groups, eps, residual)
    _, reduce_, apply_ = kernels
    B, C, H, W = x.shape
    G, N = groups, H * W
    d, n = C // G, G * H * W
    s = d ** -0.5
    acc = g.dtype
    xd = _dense(x)
    grad = grad.contiguous()
    al, be = alpha.to(acc).contiguous(), beta.to(acc).contiguous()
    c = _mlp(g, *mlp)[0].contiguous() if mlp is not None else None
    shat, dsp, chan, grp = reduce_(grad, xd, g, c, al, be, stats, groups, float(eps))
    A, Bt, dc = chan.unbind(1)
    P, Q, R = grp.unbind(1)
    sigma = stats[:, 1]
    r = 1.0 / (sigma + eps)
    m1 = (P @ al) / n  # mean(dŜ)
    # σ-term of the std backward; 0 where σ = 0 (torch.std's backward masks it the same way)
    k = torch.where(sigma > 0, (Q @ al) / ((n - 1) * sigma), torch.zeros_like(sigma))
    a1 = r.unsqueeze(1) * al  # (B, G): dS = a1·dS' + a0 + a2·Ŝ
    a0 = (-r * m1).unsqueeze(1).expand(B, G)
    a2 = (-k).unsqueeze(1).expand(B, G)
    coef = torch.stack([a1, a0, a2], 2).contiguous()
    sum_ds = a1 * P + a0 * N + a2 * R  # Σ_i dS[γ, i], (B, G)
    dg = s * (g * sum_ds.repeat_interleave(d, 1) + a1.repeat_interleave(d, 1) * A
              + a2.repeat_interleave(d, 1) * Bt)
    mlp_grads = ()
    if mlp is not None:
        dg_mlp, mlp_grads = _mlp_backward(dc, g, *mlp)
        dg = dg + dg_mlp
    dx = apply_(xd, grad if residual else None, shat, dsp, coef, (s * g).contiguous(),
                (dg / N).contiguous())
    return (dx, Q.sum(0).to(alpha.dtype), P.sum(0).to(beta.dtype)) + mlp_grads


def _wide_backward(backward, forward, grad, x, mlp, alpha, beta, groups, eps, residual):
    """The backward of fp32 ``x`` computed in float64 from the fp32 tensors, each gradient rounded
    once. The gradients of α, β and the MLP are sums over B·H·W terms that cancel (terms ~10³×
    the result are common): in fp32, the error of such a sum is a coin toss against eager's, which
    is sometimes nearly exact by luck, and it measured up to 500× eager's (α at groups = 1). The
    channel means and statistics the forward saved in fp32 are recomputed in float64 (an error of
    one fp32 rounding in them moves every term)."""
    wide = torch.float64
    xw = x.to(wide).contiguous()  # the pass-level kernels walk NCHW rows
    al, be = alpha.to(wide), beta.to(wide)
    g = xw.mean(dim=(2, 3))
    stats = forward(xw, g, None, al, be, groups, float(eps), False)[1]
    mlpw = tuple(t.to(wide) for t in mlp) if mlp is not None else None
    grads = backward(grad.to(wide), xw, g, stats, mlpw, al, be, groups, eps, residual)
    like = (x, alpha, beta) + (tuple(mlp) if mlp is not None else ())
    return tuple(t.to(ref.dtype) for t, ref in zip(grads, like))


def _ext_forward(x, mlp, alpha, beta, groups, eps, residual):
    """C++: the whole op in one call (the glue above, written in C++ with ATen)."""
    w = mlp if mlp is not None else (None,) * 4
    return torch.ops.fastvit_ops._gc_forward_full(x, *w, alpha, beta, groups, float(eps), residual)


def _ext_backward(grad, x, g, stats, mlp, alpha, beta, groups, eps, residual):
    w = mlp if mlp is not None else (None,) * 4
    out = torch.ops.fastvit_ops._gc_backward_full(grad, x, g, stats, *w, alpha, beta, groups,
                                                   float(eps), residual)
    return tuple(out) if mlp is not None else tuple(out[:3])


def _with(kernels_name, glue):
    def run(*args):
        return glue(KERNELS[kernels_name], *args)
    return run


for _op_name in (OP_SIM, OP_GC):
    dispatch.register_kernels(_op_name, "forward", cpu=_ext_forward, triton=_with("triton", _glue_forward),
                              reference=_with("reference", _glue_forward))
    dispatch.register_kernels(_op_name, "backward", cpu=_ext_backward, triton=_with("triton", _glue_backward),
                              reference=_with("reference", _glue_backward))
FORWARD = dispatch.KernelTable(OP_GC, "forward")  # read-only views: kernel by name
BACKWARD = dispatch.KernelTable(OP_GC, "backward")


def _forward(op, x, mlp, alpha, beta, groups, eps, residual, backend):
    out, g, stats = dispatch.run_kernel(op, "forward", backend, x, mlp, alpha, beta, groups, eps, residual)
    if mlp is not None:
        out = _like_input(out, x)
    return out, g, stats


def _backward(op, grad, x, g, stats, mlp, alpha, beta, groups, eps, residual, backend):
    """Returns dx, dalpha, dbeta and (when ``mlp``) the MLP parameter gradients."""
    grads = dispatch.run_kernel(op, "backward", backend, grad, x, g, stats, mlp, alpha, beta, groups, eps, residual)
    return (_like_input(grads[0], x),) + tuple(grads[1:])


# ---- custom ops ----------------------------------------------------------------------------------
def _fake_stats(x):
    acc = _acc(x.dtype)
    B, C = x.shape[:2]
    return x.new_empty((B, C), dtype=acc), x.new_empty((B, 2), dtype=acc)


@torch.library.custom_op("fastvit_ops::token_global_similarity", mutates_args=())
def _sim_op(x: Tensor, alpha: Tensor, beta: Tensor, groups: int, eps: float,
            backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    return _forward(OP_SIM, x, None, alpha, beta, groups, eps, False, backend)


@_sim_op.register_fake
def _(x, alpha, beta, groups, eps, backend):
    B, _, H, W = x.shape
    return (x.new_empty((B, groups, H, W)),) + _fake_stats(x)


@torch.library.custom_op("fastvit_ops::token_global_similarity_backward", mutates_args=())
def _sim_op_backward(grad: Tensor, x: Tensor, g: Tensor, stats: Tensor, alpha: Tensor,
                     beta: Tensor, groups: int, eps: float,
                     backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    return _backward(OP_SIM, grad, x, g, stats, None, alpha, beta, groups, eps, False, backend)


@_sim_op_backward.register_fake
def _(grad, x, g, stats, alpha, beta, groups, eps, backend):
    return torch.empty_like(x) if is_dense(x) else x.new_empty(x.shape), \
        torch.empty_like(alpha), torch.empty_like(beta)


def _sim_setup(ctx, inputs, output):
    x, alpha, beta, groups, eps, backend = inputs
    _, g, stats = output
    ctx.save_for_backward(x, g, stats, alpha, beta)
    ctx.groups, ctx.eps, ctx.backend = groups, eps, backend
    ctx.mark_non_differentiable(g, stats)
    ctx.set_materialize_grads(False)


def _sim_bwd(ctx, grad, _g, _stats):
    x, g, stats, alpha, beta = ctx.saved_tensors
    if grad is None:
        return None, None, None, None, None, None
    dx, da, db = _sim_op_backward(grad, x, g, stats, alpha, beta, ctx.groups, ctx.eps, ctx.backend)
    return dx, da, db, None, None, None


torch.library.register_autograd("fastvit_ops::token_global_similarity", _sim_bwd,
                                setup_context=_sim_setup)


@torch.library.custom_op("fastvit_ops::global_context", mutates_args=())
def _gc_op(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, alpha: Tensor, beta: Tensor,
           groups: int, eps: float, residual: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    return _forward(OP_GC, x, (w1, b1, w2, b2), alpha, beta, groups, eps, residual, backend)


@_gc_op.register_fake
def _(x, w1, b1, w2, b2, alpha, beta, groups, eps, residual, backend):
    out = torch.empty_like(x) if is_dense(x) else x.new_empty(x.shape)
    return (out,) + _fake_stats(x)


@torch.library.custom_op("fastvit_ops::global_context_backward", mutates_args=())
def _gc_op_backward(grad: Tensor, x: Tensor, g: Tensor, stats: Tensor, w1: Tensor, b1: Tensor,
                    w2: Tensor, b2: Tensor, alpha: Tensor, beta: Tensor, groups: int, eps: float,
                    residual: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                           Tensor, Tensor]:
    dx, da, db, dw1, db1, dw2, db2 = _backward(OP_GC, grad, x, g, stats, (w1, b1, w2, b2), alpha,
                                               beta, groups, eps, residual, backend)
    return dx, dw1, db1, dw2, db2, da, db


@_gc_op_backward.register_fake
def _(grad, x, g, stats, w1, b1, w2, b2, alpha, beta, groups, eps, residual, backend):
    dx = torch.empty_like(x) if is_dense(x) else x.new_empty(x.shape)
    return (dx,) + tuple(torch.empty_like(t) for t in (w1, b1, w2, b2, alpha, beta))


def _gc_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, alpha, beta, groups, eps, residual, backend = inputs
    _, g, stats = output
    ctx.save_for_backward(x, g, stats, w1, b1, w2, b2, alpha, beta)
    ctx.groups, ctx.eps, ctx.residual, ctx.backend = groups, eps, residual, backend
    ctx.mark_non_differentiable(g, stats)
    ctx.set_materialize_grads(False)


def _gc_bwd(ctx, grad, _g, _stats):
    if grad is None:
        return (None,) * 11
    x, g, stats, w1, b1, w2, b2, alpha, beta = ctx.saved_tensors
    grads = _gc_op_backward(grad, x, g, stats, w1, b1, w2, b2, alpha, beta, ctx.groups, ctx.eps,
                            ctx.residual, ctx.backend)
    return tuple(grads) + (None, None, None, None)


torch.library.register_autograd("fastvit_ops::global_context", _gc_bwd, setup_context=_gc_setup)


# ---- how a call runs -------------------------------------------------------------------------------
# A call is the custom op's arguments without the backend: (x, rescale_weight, rescale_bias, groups,
# eps) for the similarity, (x, fc1_w, fc1_b, fc2_w, fc2_b, rescale_weight, rescale_bias, groups, eps,
# residual) for the global context. The cpu backend's ``cpu_autograd`` is _gc_forward_full /
# _gc_backward_full under a C++ autograd node: the same kernels and results as the custom op,
# without its per-call Python dispatch and autograd glue (a few hundred µs per forward+backward,
# more than the kernels at FCViT's small stages).
def _sim_eager(x, alpha, beta, groups, eps):
    return reference(x, alpha, beta, groups, eps)


def _sim_cpu_autograd(call: dispatch.Call) -> Tensor:
    x, alpha, beta, groups, eps = call.args
    return torch.ops.fastvit_ops._gc_autograd(x, None, None, None, None, alpha, beta, groups, eps, False)


def _gc_eager(x, w1, b1, w2, b2, alpha, beta, groups, eps, residual):
    return reference(x, alpha, beta, groups, eps, (w1, b1, w2, b2), residual)


def _gc_cpu_autograd(call: dispatch.Call) -> Tensor:
    return torch.ops.fastvit_ops._gc_autograd(*call.args)


dispatch.register(OP_SIM, "call", dispatch.eager_impl(_sim_eager), cpu_rules.eager_impl(_sim_eager),
                  dispatch.Impl("cpu_autograd", "cpu", _sim_cpu_autograd, dispatch.eager_cpu,
                                "the C++ autograd node _gc_autograd (our forward and backward kernels)"),
                  dispatch.custom_op_impl(lambda *a: _sim_op(*a)[0]))
dispatch.register(OP_GC, "call", dispatch.eager_impl(_gc_eager), cpu_rules.eager_impl(_gc_eager),
                  dispatch.Impl("cpu_autograd", "cpu", _gc_cpu_autograd, dispatch.eager_cpu,
                                "the C++ autograd node _gc_autograd (our forward and backward kernels)"),
                  dispatch.custom_op_impl(lambda *a: _gc_op(*a)[0]))


# ---- public API ----------------------------------------------------------------------------------
def _check_common(x, rescale_weight, rescale_bias, groups, eps):
    check_tensor("x", x, ndim=4)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
        raise ValueError(f"groups: expected a positive int, got {groups!r}")
    C = x.shape[1]
    if C % groups != 0:
        raise ValueError(f"groups: {groups} must divide the channel count C={C} of x")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps: expected a non-negative float, got {eps!r}")
    for name, t in (("rescale_weight", rescale_weight), ("rescale_bias", rescale_bias)):
        _check_param(name, t, (groups,), x)


def _check_param(name, t, shape, x):
    check_tensor(name, t)
    if t.device != x.device:
        raise ValueError(f"{name}: expected device {x.device} (the device of x), got {t.device}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


def token_global_similarity(x: Tensor, rescale_weight: Tensor, rescale_bias: Tensor,
                            groups: int = 8, eps: float = 1e-5) -> Tensor:
    """FCViT's normalized, rescaled token-global similarity ``S'`` (docs/global_context.md, steps 1–4).

    ``g = mean_{H,W} x``; ``S[b,γ,i] = d^-1/2·Σ_e x[b,γd+e,i]·g[b,γd+e]``; per sample
    ``Ŝ = (S − mean)/(std + eps)`` over (G, H·W) jointly with the **unbiased** std;
    ``S' = rescale_weight[γ]·Ŝ + rescale_bias[γ]``. Equals
    :meth:`fastvit_ops.reference.fcvit.GlobalContext.similarity` (released ma-xu/FCViT
    ``GlobalContext``, ``weighted_gc=True``). Statistics in fp32 (fp64 for fp64 input), stable for
    large-mean inputs; a constant input (σ = 0) gives ``S' = rescale_bias``.

    Args:
        x: (B, C, H, W), any strides (NCHW, channels_last, ...); float16/bfloat16/float32/float64.
        rescale_weight, rescale_bias: (groups,) floating, on x's device (α, β).
        groups: G, a positive divisor of C (d = C / G channels per group).
        eps: added to the std (not inside a square root), ≥ 0.

    Returns:
        ``S'``, (B, G, H, W) contiguous, ``x.dtype``. Differentiable in ``x`` and both parameters.

    Raises:
        TypeError: a non-tensor or non-floating input.
        ValueError: x not 4-D, ``groups`` not dividing C, parameter shapes other than (groups,),
            tensors on different devices, negative ``eps``.
        RuntimeError: the backend requested with ``fastvit_ops.backend`` cannot run here.
    """
    _check_common(x, rescale_weight, rescale_bias, groups, eps)
    call = dispatch.Call(OP_SIM, dispatch.get_backend(), (x, rescale_weight, rescale_bias, groups, float(eps)),
                         (rescale_weight, rescale_bias))
    return dispatch.run(OP_SIM, call)


def _check_mlp(x, groups, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    C = x.shape[1]
    check_tensor("fc2_weight", fc2_weight, ndim=2)
    h = fc2_weight.shape[1]
    if h < 1:
        raise ValueError(f"fc2_weight: expected shape ({C}, hidden ≥ 1), got {tuple(fc2_weight.shape)}")
    _check_param("fc1_weight", fc1_weight, (2 * h, C), x)
    _check_param("fc1_bias", fc1_bias, (2 * h,), x)
    _check_param("fc2_weight", fc2_weight, (C, h), x)
    _check_param("fc2_bias", fc2_bias, (C,), x)


def _global_context(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, rescale_weight, rescale_bias,
                    groups, eps, residual):
    _check_common(x, rescale_weight, rescale_bias, groups, eps)
    _check_mlp(x, groups, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    params = (fc1_weight, fc1_bias, fc2_weight, fc2_bias, rescale_weight, rescale_bias)
    call = dispatch.Call(OP_GC, dispatch.get_backend(), (x, *params, groups, float(eps), residual), params)
    return dispatch.run(OP_GC, call)


def global_context(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor, fc2_weight: Tensor,
                   fc2_bias: Tensor, rescale_weight: Tensor, rescale_bias: Tensor,
                   groups: int = 8, eps: float = 1e-5) -> Tensor:
    """``x + GC(x)``: FCViT's dynamic global context added to its input (docs/global_context.md, steps 1–6).

    ``GC(x)[b, γd+e] = S'[b,γ]·c[b, γd+e]`` with ``S'`` = :func:`token_global_similarity` and the
    competitive bottleneck ``c = fc2(max(u[:, :h], u[:, h:]))``, ``u = fc1(mean_{H,W} x)``
    (released ma-xu/FCViT ``GlobalContext`` with ``compete=True``; ``fc1``/``fc2`` are
    ``nn.Linear``). Equals ``x + fastvit_ops.reference.fcvit.GlobalContext(x)``.

    Args:
        x: (B, C, H, W), any strides; float16/bfloat16/float32/float64.
        fc1_weight: (2h, C), fc1_bias: (2h,), fc2_weight: (C, h), fc2_bias: (C,) — the
            ``nn.Linear`` parameters (h = C / reduction, 4 for C = 32 with reduction 8).
        rescale_weight, rescale_bias: (groups,).
        groups: G dividing C. eps: added to the std, ≥ 0.
        All parameters floating, on x's device (their dtype may differ from x's, e.g. under AMP;
        math runs in fp32, fp64 for fp64 x).

    Returns:
        (B, C, H, W) in ``x.dtype``, laid out like ``x`` when x is dense (channels_last stays
        channels_last), else contiguous. Differentiable in every tensor argument.

    Raises:
        TypeError: a non-tensor or non-floating input.
        ValueError: x not 4-D, ``groups`` not dividing C, a parameter of the wrong shape or
            device, negative ``eps``.
        RuntimeError: the backend requested with ``fastvit_ops.backend`` cannot run here.
    """
    return _global_context(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, rescale_weight,
                           rescale_bias, groups, eps, True)


__all__ = ["token_global_similarity", "global_context", "reference"]
