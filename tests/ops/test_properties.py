"""Property-based tests of every public op (hypothesis): random shapes (1×1 maps, N = 0 queries,
M = 1 key, C = 1, odd sizes, empty batches), strides (sliced, transposed, channels_last, stride-0
expanded batches), dtypes, every mode / activation / padding / stride, on each backend here
(Triton under the interpreter at tiny sizes). The checks are in tests/properties.py.

Profiles (tests/conftest.py): ``default`` = ``ci`` (500 examples per op, in every plain pytest run
and so in CI: ~2.5 minutes on 2 cores), ``quick`` (50), ``thorough`` (5000).
"""
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastvit_ops
from fastvit_ops.ops import attention as att
from fastvit_ops.ops import cross_modulation as cm
from fastvit_ops.ops import dwconv as dw
from fastvit_ops.ops import global_context as gcm
from test_conv_projection import eager as projection_eager  # the released forward_conv
from properties import KNOWN_DEFECTS, LAYOUTS, backends, check_op, dtype_for, keep, lay_out, random, reverse, transpose_hw

SEEDS = st.integers(0, 2**31 - 1)


@st.composite
def setting(draw, has_triton=True, has_cpu=True):
    backend = draw(backends(has_triton, has_cpu))
    return backend, draw(dtype_for(backend)), draw(SEEDS)


# ---- sigmoid_cross_modulation ------------------------------------------------------------------------
@given(setting(), st.lists(st.integers(0, 9), min_size=1, max_size=4), st.sampled_from(cm.MODES),
       st.sampled_from(LAYOUTS), st.sampled_from(LAYOUTS), st.floats(0.5, 8.0))
def test_sigmoid_cross_modulation(case, shape, mode, layout_l, layout_g, scale):
    backend, dtype, seed = case

    def make(seed):
        gen = torch.Generator().manual_seed(seed)
        return [lay_out(random(gen, shape, dtype, scale), layout_l), lay_out(random(gen, shape, dtype, scale), layout_g)]
    check_op(f"cross_modulation {tuple(shape)} {mode}", lambda a, b: fastvit_ops.sigmoid_cross_modulation(a, b, mode),
             lambda a, b: cm.reference(a, b, mode), make, backend, seed)


# ---- dwconv2d ----------------------------------------------------------------------------------------
@st.composite
def dwconv_case(draw):
    backend, dtype, seed = draw(setting())
    small = backend == "triton"
    k = draw(st.sampled_from((1, 3, 5, 7) if small else (1, 3, 3, 5, 5, 7, 9, 11, 31)))
    stride = draw(st.sampled_from((1, 2)))
    padding = draw(st.one_of(st.none(), st.integers(0, k - 1)))
    p = k // 2 if padding is None else padding
    H = draw(st.integers(max(1, k - 2 * p), max(1, k - 2 * p) + (6 if small else 12)))
    W = draw(st.integers(max(1, k - 2 * p), max(1, k - 2 * p) + (6 if small else 12)))
    residual = stride == 1 and p == k // 2 and draw(st.booleans())
    return dict(backend=backend, dtype=dtype, seed=seed, B=draw(st.integers(0, 2 if small else 3)),
                C=draw(st.integers(1, 3 if small else 6)), H=H, W=W, k=k, stride=stride, padding=padding,
                activation=draw(st.sampled_from(dw.ACTIVATIONS)), residual=residual, bias=draw(st.booleans()),
                layout=draw(st.sampled_from(LAYOUTS)))


@given(dwconv_case())
def test_dwconv2d(c):
    def make(seed):
        gen = torch.Generator().manual_seed(seed)
        x = lay_out(random(gen, (c["B"], c["C"], c["H"], c["W"]), c["dtype"], 2.0), c["layout"])
        w = random(gen, (c["C"], 1, c["k"], c["k"]), c["dtype"], 1.0 / c["k"])
        return [x, w] + ([random(gen, (c["C"],), c["dtype"])] if c["bias"] else [])
    args = (c["stride"], c["padding"], c["activation"], c["residual"])

    def fused(x, w, b=None):
        return fastvit_ops.dwconv2d(x, w, b, *args)

    def eager(x, w, b=None):
        return dw.reference(x, w, b, *args)
    n_in = 3 if c["bias"] else 2
    variants = [((transpose_hw, transpose_hw, keep)[:n_in], (transpose_hw,))]
    check_op(f"dwconv2d {c}", fused, eager, make, c["backend"], c["seed"], variants)


# ---- downsampled_attention ---------------------------------------------------------------------------
def _attention_setting(draw):
    """(backend, dtype, seed) for the attention ops. fp32 on a backend with the known attention
    defect (properties.KNOWN_DEFECTS) is drawn as fp64 instead: its outliers (2.3-4.5x eager's
    error on single elements) show at large logits and, at 500 examples, at natural ones too
    (d = 8, 20 queries, 8 keys, gate: dq 3.4x). fp32 there is tests/ops/test_known_defects.py's
    strict-xfail reproducers until the kernels are fixed."""
    backend, dtype, seed = draw(setting())
    if dtype == torch.float32 and ("downsampled_attention", backend) in KNOWN_DEFECTS:
        dtype = torch.float64
    return backend, dtype, seed


@st.composite
def attention_case(draw):
    backend, dtype, seed = _attention_setting(draw)
    small = backend == "triton"
    d = draw(st.sampled_from((1, 2, 3, 8, 16, 20) if small else (1, 2, 3, 5, 8, 16, 20, 24, 40, 64, 128)))
    return dict(backend=backend, dtype=dtype, seed=seed, B=draw(st.integers(0, 2)), h=draw(st.integers(1, 3)),
                N=draw(st.integers(0, 12 if small else 40)), M=draw(st.integers(1, 6 if small else 20)), d=d,
                scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))),
                logit=draw(st.sampled_from((0.5, 1.0, 3.0))),
                layouts=draw(st.lists(st.sampled_from(LAYOUTS), min_size=3, max_size=3)))


@given(attention_case())
def test_downsampled_attention(c):
    B, h, N, M, d = c["B"], c["h"], c["N"], c["M"], c["d"]

    def make(seed):
        gen = torch.Generator().manual_seed(seed)
        return [lay_out(random(gen, (B, h, N, d), c["dtype"], c["logit"]), c["layouts"][0]),
                lay_out(random(gen, (B, h, M, d), c["dtype"], c["logit"]), c["layouts"][1]),
                lay_out(random(gen, (B, h, M, d), c["dtype"]), c["layouts"][2])]
    scale = c["scale"]
    check_op(f"downsampled_attention {c}", lambda q, k, v: fastvit_ops.downsampled_attention(q, k, v, scale),
             lambda q, k, v: att.reference(q, k, v, scale), make, c["backend"], c["seed"],
             [((keep, reverse(2), reverse(2)), (keep,))] + _folded_scale(scale, d, 3))


def _folded_scale(scale, d, n_in):
    """Eager with the logit scale folded into q, or into k, first (scale 1 after): equally valid
    roundings of the logits, flash-attention's tests' "reorder_ops" reference."""
    s = d ** -0.5 if scale is None else scale
    extra = (keep,) * (n_in - 3)
    fold_q = (lambda q, k, v, *g: att.reference(q, k, v, 1.0, *g), (lambda t: t * s, keep, keep) + extra,
              (lambda t: t * s, keep, keep) + extra, (keep,), (keep,))
    fold_k = (lambda q, k, v, *g: att.reference(q, k, v, 1.0, *g), (keep, lambda t: t * s, keep) + extra,
              (keep, lambda t: t * s, keep) + extra, (keep,), (keep,))
    return [fold_q, fold_k]


def _nchw_folded_scale(scale, heads, d, gate):
    s = d ** -0.5 if scale is None else scale

    def eager_unscaled(q, k, v, g=None):
        return _nchw_eager(q, k, v, heads, 1.0, g)
    extra = (keep,) if gate else ()
    return [(eager_unscaled, (lambda t: t * s, keep, keep) + extra, (lambda t: t * s, keep, keep) + extra,
             (keep,), (keep,)),
            (eager_unscaled, (keep, lambda t: t * s, keep) + extra, (keep, lambda t: t * s, keep) + extra,
             (keep,), (keep,))]


@st.composite
def attention_nchw_case(draw):
    backend, dtype, seed = _attention_setting(draw)
    small = backend == "triton"
    return dict(backend=backend, dtype=dtype, seed=seed, B=draw(st.integers(0, 2)), heads=draw(st.integers(1, 3)),
                d=draw(st.sampled_from((1, 2, 4, 8, 20) if small else (1, 2, 3, 4, 8, 16, 20, 32))),
                H=draw(st.integers(1, 4 if small else 8)), W=draw(st.integers(1, 4 if small else 8)),
                M=draw(st.integers(1, 5 if small else 16)), gate=draw(st.booleans()),
                scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))),
                layouts=draw(st.lists(st.sampled_from(LAYOUTS), min_size=4, max_size=4)))


def _nchw_eager(q_map, k, v, heads, scale, gate):
    b, ch, hh, ww = q_map.shape
    d = ch // heads
    q = q_map.reshape(b, heads, d, hh * ww).transpose(2, 3)
    g = gate.reshape(b, heads, d, hh * ww).transpose(2, 3) if gate is not None else None
    out = att.reference(q, k, v, d ** -0.5 if scale is None else scale, g)
    return out.transpose(2, 3).reshape(b, ch, hh, ww)


@given(attention_nchw_case())
def test_downsampled_attention_nchw(c):
    B, h, d, H, W, M = c["B"], c["heads"], c["d"], c["H"], c["W"], c["M"]
    lay = c["layouts"]

    def make(seed):
        gen = torch.Generator().manual_seed(seed)
        ins = [lay_out(random(gen, (B, h * d, H, W), c["dtype"]), lay[0]),
               lay_out(random(gen, (B, h, M, d), c["dtype"]), lay[1]),
               lay_out(random(gen, (B, h, M, d), c["dtype"]), lay[2])]
        if c["gate"]:
            ins.append(lay_out(random(gen, (B, h * d, H, W), c["dtype"]), lay[3]))
        return ins
    scale = c["scale"]

    def fused(q, k, v, g=None):
        return fastvit_ops.downsampled_attention_nchw(q, k, v, h, scale, g)

    def eager(q, k, v, g=None):
        return _nchw_eager(q, k, v, h, scale, g)
    check_op(f"downsampled_attention_nchw {c}", fused, eager, make, c["backend"], c["seed"],
             [((keep, reverse(2), reverse(2), keep), (keep,))] + _nchw_folded_scale(scale, h, d, c["gate"]))


# ---- conv_projection_qkv (reference and cpu kernels) -----------------------------------------------------
@st.composite
def projection_case(draw):
    backend, dtype, seed = draw(setting(has_triton=False))
    return dict(backend=backend, dtype=dtype, seed=seed, B=draw(st.integers(0, 2)), h=draw(st.integers(1, 9)),
                w=draw(st.integers(1, 9)), C=draw(st.integers(1, 6)), k=draw(st.sampled_from((1, 3, 5, 7))),
                cls=draw(st.booleans()), sq=draw(st.sampled_from((1, 2))), skv=draw(st.sampled_from((1, 2))),
                layout=draw(st.sampled_from(LAYOUTS)))


@given(projection_case())
def test_conv_projection_qkv(c):
    B, h, w, C, k, cls = c["B"], c["h"], c["w"], c["C"], c["k"], c["cls"]

    def make(seed):
        gen = torch.Generator().manual_seed(seed)
        ins = [lay_out(random(gen, (B, int(cls) + h * w, C), c["dtype"]), c["layout"])]
        for _ in range(3):
            ins += [random(gen, (C, 1, k, k), c["dtype"], 1.0 / k), random(gen, (C,), c["dtype"])]
        return ins

    def fused(x, *p):
        return fastvit_ops.conv_projection_qkv(x, (h, w), cls, *p, c["sq"], c["skv"])

    def eager(x, *p):
        return tuple(projection_eager(x, (h, w), cls, p[0::2], p[1::2], c["sq"], c["skv"]))
    check_op(f"conv_projection_qkv {c}", fused, eager, make, c["backend"], c["seed"])


# ---- token_global_similarity / global_context ----------------------------------------------------------
@st.composite
def gc_case(draw, mlp):
    backend, dtype, seed = draw(setting())
    small = backend == "triton"
    G = draw(st.integers(1, 4 if small else 8))
    H = draw(st.integers(1, 5 if small else 9))
    W = draw(st.integers(1, 5 if small else 9))
    if G * H * W < 2:  # the unbiased std of one value is undefined (NaN in eager too)
        W += 1
    kind = draw(st.sampled_from(("randn", "randn", "large_mean", "constant_group", "constant")))
    if kind == "large_mean" and dtype == torch.float16 and G * H * W == 2:
        # Two normalised similarities are ±1/√2 whatever x is: x's gradient is an eps-sized residue
        # of cancelling fp32 terms of size ~300², in fp16's subnormal range. fp16 eager is NaN there,
        # fp32 eager 0.5% off, ours 1.1-1.3%: two roundings of noise, not a measure of accuracy
        # (2 of 50 such inputs broke 2x; every larger similarity set passed 50 of 50).
        W += 1
    return dict(backend=backend, dtype=dtype, seed=seed, B=draw(st.integers(0, 2)), G=G,
                d=draw(st.integers(1, 3 if small else 4)), H=H, W=W, hidden=draw(st.integers(1, 4)),
                eps=draw(st.sampled_from((1e-5, 1e-3, 0.0))), kind=kind,
                layout=draw(st.sampled_from(LAYOUTS)), mlp=mlp)


def _gc_inputs(c, seed):
    gen = torch.Generator().manual_seed(seed)
    B, C, H, W = c["B"], c["G"] * c["d"], c["H"], c["W"]
    x = random(gen, (B, C, H, W), torch.float64)
    if c["kind"] == "large_mean":
        x = x + 300.0
    elif c["kind"] == "constant":
        x = x[:, :, :1, :1].expand(B, C, H, W).contiguous()  # σ = 0: S' = β
    elif c["kind"] == "constant_group":
        x[:, : c["d"]] = 0.75  # one group constant, the rest random
    x = lay_out(x.to(c["dtype"]), c["layout"])
    ab = [random(gen, (c["G"],), c["dtype"], 0.5, 1.0), random(gen, (c["G"],), c["dtype"], 0.5)]
    h = c["hidden"]
    mlp = [random(gen, (2 * h, C), c["dtype"], C ** -0.5), random(gen, (2 * h,), c["dtype"]),
           random(gen, (C, h), c["dtype"], h ** -0.5), random(gen, (C,), c["dtype"])]
    return x, ab, mlp


def _gc_fp64_rtol(c) -> float:
    """float64 at a mean of 300 over unit spread: the statistics' sums cancel ~300² (10⁵), and on a
    2-value map by as much as the two values are close, so two equally good float64 evaluations
    differ well above 1e-10 (CI drew G·H·W = 2 twice: gradients 1.5e-9 and 1.2e-8 apart,
    relative): 1e-7 there, the default 1e-10 elsewhere."""
    return 1e-7 if c["kind"] == "large_mean" else 1e-10


@given(gc_case(mlp=False))
def test_token_global_similarity(c):
    G, eps = c["G"], c["eps"]

    def make(seed):
        x, (a, b), _ = _gc_inputs(c, seed)
        return [x, a, b]
    check_op(f"token_global_similarity {c}",
             lambda x, a, b: fastvit_ops.token_global_similarity(x, a, b, G, eps),
             lambda x, a, b: gcm.reference(x, a, b, G, eps), make, c["backend"], c["seed"],
             [((transpose_hw, keep, keep), (transpose_hw,))], fp64_rtol=_gc_fp64_rtol(c))


@given(gc_case(mlp=True))
def test_global_context(c):
    G, eps = c["G"], c["eps"]

    def make(seed):
        x, (a, b), mlp = _gc_inputs(c, seed)
        return [x] + mlp + [a, b]

    def fused(x, w1, b1, w2, b2, a, b):
        return fastvit_ops.global_context(x, w1, b1, w2, b2, a, b, G, eps)

    def eager(x, w1, b1, w2, b2, a, b):
        return gcm.reference(x, a, b, G, eps, (w1, b1, w2, b2))
    check_op(f"global_context {c}", fused, eager, make, c["backend"], c["seed"],
             [((transpose_hw,) + (keep,) * 6, (transpose_hw,))], fp64_rtol=_gc_fp64_rtol(c))
