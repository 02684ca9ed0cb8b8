"""The bad-input catalogue: for each public op and module, every case its docstring lists under
``Raises:`` is triggered, and the error is of the documented type and names the argument. Then
non-finite inputs (NaN, ±inf) propagate as eager PyTorch's do (no crash, no hang), and empty
batches (B = 0) give empty outputs and gradients of the right shapes, on every backend here."""
import faulthandler
import re

import pytest
import torch
from torch import nn

import fastvit_ops
from conftest import backends_for
from fastvit_ops import models
from fastvit_ops.nn.dwconv import DepthwiseConv2d
from fastvit_ops.ops import attention as att
from fastvit_ops.ops import cross_modulation as cm
from fastvit_ops.ops import dwconv as dw
from fastvit_ops.ops import global_context as gcm
from fastvit_ops.ops.context_dwconv import context_dwconv2d
from fastvit_ops.reference import fat as ref_fat
from fastvit_ops.reference import fcvit as ref_fcvit
from op_cases import CASES, outputs


def t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(shape, dtype=dtype, device=device)


META = "meta"  # a second device on any machine, for the device-mismatch cases
X4 = t(2, 4, 6, 6)
W3, B4 = t(4, 1, 3, 3), t(4)
Q, K, V = t(1, 2, 5, 8), t(1, 2, 3, 8), t(1, 2, 3, 8)
GC_W = [t(2, 4), t(2), t(4, 1), t(4)]  # fc1 (2h, C), fc1 bias, fc2 (C, h), fc2 bias; h = 1
AB = [t(2), t(2)]
TOK = t(2, 1 + 3 * 4, 4)
PROJ = [t(4, 1, 3, 3), t(4), t(4, 1, 3, 3), t(4), t(4, 1, 3, 3), t(4)]


def _proj(x=TOK, hw=(3, 4), cls=True, params=PROJ, sq=1, skv=2):
    return lambda: fastvit_ops.conv_projection_qkv(x, hw, cls, *params, sq, skv)


def _with(params, i, value):
    out = list(params)
    out[i] = value
    return out


class NotFasa(nn.Module):
    num_heads = 2


# (id, call, exception type, argument the message must name)
CATALOGUE = [
    # sigmoid_cross_modulation
    ("cm local not a tensor", lambda: fastvit_ops.sigmoid_cross_modulation(1.0, X4), TypeError, "local"),
    ("cm integer global_", lambda: fastvit_ops.sigmoid_cross_modulation(X4, X4.long()), TypeError, "global_"),
    ("cm dtypes differ", lambda: fastvit_ops.sigmoid_cross_modulation(X4, X4.double()), TypeError, "global_"),
    ("cm shapes differ", lambda: fastvit_ops.sigmoid_cross_modulation(X4, X4[:1]), ValueError, "global_"),
    ("cm devices differ", lambda: fastvit_ops.sigmoid_cross_modulation(X4, X4.to(META)), ValueError, "global_"),
    ("cm unknown mode", lambda: fastvit_ops.sigmoid_cross_modulation(X4, X4, "relu"), ValueError, "mode"),
    # dwconv2d
    ("dw x not a tensor", lambda: fastvit_ops.dwconv2d(X4.tolist(), W3), TypeError, "x"),
    ("dw integer weight", lambda: fastvit_ops.dwconv2d(X4, W3.int()), TypeError, "weight"),
    ("dw dtypes differ", lambda: fastvit_ops.dwconv2d(X4, W3.double()), TypeError, "weight"),
    ("dw bias dtype", lambda: fastvit_ops.dwconv2d(X4, W3, B4.half()), TypeError, "bias"),
    ("dw stride not an int", lambda: fastvit_ops.dwconv2d(X4, W3, stride=1.0), TypeError, "stride"),
    ("dw padding not an int", lambda: fastvit_ops.dwconv2d(X4, W3, padding="same"), TypeError, "padding"),
    ("dw residual not a bool", lambda: fastvit_ops.dwconv2d(X4, W3, residual=1), TypeError, "residual"),
    ("dw x not 4-D", lambda: fastvit_ops.dwconv2d(X4[0], W3), ValueError, "x"),
    ("dw weight not (C,1,k,k)", lambda: fastvit_ops.dwconv2d(X4, t(4, 2, 3, 3)), ValueError, "weight"),
    ("dw weight channels", lambda: fastvit_ops.dwconv2d(X4, t(3, 1, 3, 3)), ValueError, "weight"),
    ("dw even k", lambda: fastvit_ops.dwconv2d(X4, t(4, 1, 4, 4)), ValueError, "weight"),
    ("dw k > 31", lambda: fastvit_ops.dwconv2d(t(1, 4, 40, 40), t(4, 1, 33, 33)), ValueError, "weight"),
    ("dw stride 3", lambda: fastvit_ops.dwconv2d(X4, W3, stride=3), ValueError, "stride"),
    ("dw unequal stride pair", lambda: fastvit_ops.dwconv2d(X4, W3, stride=(1, 2)), ValueError, "stride"),
    ("dw padding >= k", lambda: fastvit_ops.dwconv2d(X4, W3, padding=3), ValueError, "padding"),
    ("dw negative padding", lambda: fastvit_ops.dwconv2d(X4, W3, padding=-1), ValueError, "padding"),
    ("dw input smaller than kernel", lambda: fastvit_ops.dwconv2d(t(1, 4, 2, 9), t(4, 1, 5, 5), padding=0),
     ValueError, "x"),
    ("dw devices differ", lambda: fastvit_ops.dwconv2d(X4, W3.to(META)), ValueError, "weight"),
    ("dw unknown activation", lambda: fastvit_ops.dwconv2d(X4, W3, activation="relu"), ValueError, "activation"),
    ("dw residual with stride 2", lambda: fastvit_ops.dwconv2d(X4, W3, stride=2, residual=True), ValueError,
     "residual"),
    ("dw residual with padding 0", lambda: fastvit_ops.dwconv2d(X4, W3, padding=0, residual=True), ValueError,
     "residual"),
    ("dw bias shape", lambda: fastvit_ops.dwconv2d(X4, W3, t(3)), ValueError, "bias"),
    # downsampled_attention
    ("att q not a tensor", lambda: fastvit_ops.downsampled_attention(None, K, V), TypeError, "q"),
    ("att integer k", lambda: fastvit_ops.downsampled_attention(Q, K.long(), V), TypeError, "k"),
    ("att dtypes differ", lambda: fastvit_ops.downsampled_attention(Q, K, V.double()), TypeError, "v"),
    ("att scale not numeric", lambda: fastvit_ops.downsampled_attention(Q, K, V, "1"), TypeError, "scale"),
    ("att q not 4-D", lambda: fastvit_ops.downsampled_attention(Q[0], K, V), ValueError, "q"),
    ("att devices differ", lambda: fastvit_ops.downsampled_attention(Q, K.to(META), V), ValueError, "k"),
    ("att batch differs", lambda: fastvit_ops.downsampled_attention(Q, t(2, 2, 3, 8), t(2, 2, 3, 8)), ValueError, "k"),
    ("att heads differ", lambda: fastvit_ops.downsampled_attention(Q, t(1, 1, 3, 8), t(1, 1, 3, 8)), ValueError, "k"),
    ("att head dim differs", lambda: fastvit_ops.downsampled_attention(Q, t(1, 2, 3, 4), t(1, 2, 3, 4)), ValueError,
     "k"),
    ("att d > 128", lambda: fastvit_ops.downsampled_attention(t(1, 1, 2, 130), t(1, 1, 2, 130), t(1, 1, 2, 130)),
     ValueError, "q"),
    ("att M = 0", lambda: fastvit_ops.downsampled_attention(Q, t(1, 2, 0, 8), t(1, 2, 0, 8)), ValueError, "k"),
    ("att k, v shapes", lambda: fastvit_ops.downsampled_attention(Q, K, t(1, 2, 4, 8)), ValueError, "v"),
    ("att scale 0", lambda: fastvit_ops.downsampled_attention(Q, K, V, 0.0), ValueError, "scale"),
    ("att scale inf", lambda: fastvit_ops.downsampled_attention(Q, K, V, float("inf")), ValueError, "scale"),
    ("att scale nan", lambda: fastvit_ops.downsampled_attention(Q, K, V, float("nan")), ValueError, "scale"),
    # downsampled_attention_nchw
    ("nchw q_map not 4-D", lambda: fastvit_ops.downsampled_attention_nchw(t(4, 6, 6), K, V, 2), ValueError, "q_map"),
    ("nchw num_heads 0", lambda: fastvit_ops.downsampled_attention_nchw(t(1, 16, 3, 3), K, V, 0), ValueError,
     "num_heads"),
    ("nchw num_heads not dividing C", lambda: fastvit_ops.downsampled_attention_nchw(t(1, 15, 3, 3), K, V, 2),
     ValueError, "num_heads"),
    ("nchw gate shape", lambda: fastvit_ops.downsampled_attention_nchw(t(1, 16, 3, 3), K, V, 2, gate=t(1, 16, 3, 2)),
     ValueError, "gate"),
    ("nchw gate dtype", lambda: fastvit_ops.downsampled_attention_nchw(t(1, 16, 3, 3), K, V, 2,
                                                                       gate=t(1, 16, 3, 3).double()), TypeError, "gate"),
    ("nchw gate device", lambda: fastvit_ops.downsampled_attention_nchw(t(1, 16, 3, 3), K, V, 2,
                                                                        gate=t(1, 16, 3, 3, device=META)), ValueError,
     "gate"),
    ("nchw head dim differs", lambda: fastvit_ops.downsampled_attention_nchw(t(1, 8, 3, 3), K, V, 2), ValueError, "k"),
    # conv_projection_qkv
    ("proj integer x", _proj(x=TOK.long()), TypeError, "x"),
    ("proj weight dtype", _proj(params=_with(PROJ, 2, PROJ[2].double())), TypeError, "weight_k"),
    ("proj x not 3-D", _proj(x=TOK[0]), ValueError, "x"),
    ("proj token count", _proj(hw=(3, 3)), ValueError, "x"),
    ("proj weight shape", _proj(params=_with(PROJ, 4, t(4, 2, 3, 3))), ValueError, "weight_v"),
    ("proj even k", _proj(params=[t(4, 1, 2, 2), t(4)] * 3), ValueError, "weight_q"),
    ("proj k > 31", _proj(params=[t(4, 1, 33, 33), t(4)] * 3), ValueError, "weight_q"),
    ("proj k differs", _proj(params=_with(PROJ, 2, t(4, 1, 5, 5))), ValueError, "weight_k"),
    ("proj stride_q 3", _proj(sq=3), ValueError, "stride_q"),
    ("proj stride_kv 0", _proj(skv=0), ValueError, "stride_kv"),
    ("proj devices differ", _proj(params=_with(PROJ, 5, PROJ[5].to(META))), ValueError, "bias_v"),
    ("proj bias shape", _proj(params=_with(PROJ, 3, t(3))), ValueError, "bias_k"),
    # token_global_similarity
    ("sim x not a tensor", lambda: fastvit_ops.token_global_similarity(3, *AB, 2), TypeError, "x"),
    ("sim integer rescale_weight", lambda: fastvit_ops.token_global_similarity(X4, AB[0].long(), AB[1], 2), TypeError,
     "rescale_weight"),
    ("sim x not 4-D", lambda: fastvit_ops.token_global_similarity(X4[0], *AB, 2), ValueError, "x"),
    ("sim groups not dividing C", lambda: fastvit_ops.token_global_similarity(X4, t(3), t(3), 3), ValueError, "groups"),
    ("sim groups 0", lambda: fastvit_ops.token_global_similarity(X4, *AB, 0), ValueError, "groups"),
    ("sim parameter shape", lambda: fastvit_ops.token_global_similarity(X4, AB[0], t(3), 2), ValueError,
     "rescale_bias"),
    ("sim devices differ", lambda: fastvit_ops.token_global_similarity(X4, AB[0].to(META), AB[1], 2), ValueError,
     "rescale_weight"),
    ("sim negative eps", lambda: fastvit_ops.token_global_similarity(X4, *AB, 2, -1e-5), ValueError, "eps"),
    # global_context
    ("gc x not a tensor", lambda: fastvit_ops.global_context("x", *GC_W, *AB, 2), TypeError, "x"),
    ("gc integer fc1_bias", lambda: fastvit_ops.global_context(X4, *_with(GC_W, 1, GC_W[1].long()), *AB, 2),
     TypeError, "fc1_bias"),
    ("gc x not 4-D", lambda: fastvit_ops.global_context(X4[0], *GC_W, *AB, 2), ValueError, "x"),
    ("gc groups not dividing C", lambda: fastvit_ops.global_context(X4, *GC_W, t(3), t(3), 3), ValueError, "groups"),
    ("gc fc1_weight shape", lambda: fastvit_ops.global_context(X4, *_with(GC_W, 0, t(2, 3)), *AB, 2), ValueError,
     "fc1_weight"),
    ("gc fc2_weight rank", lambda: fastvit_ops.global_context(X4, *_with(GC_W, 2, t(4)), *AB, 2), ValueError,
     "fc2_weight"),
    ("gc fc2_bias device", lambda: fastvit_ops.global_context(X4, *_with(GC_W, 3, GC_W[3].to(META)), *AB, 2),
     ValueError, "fc2_bias"),
    ("gc rescale_weight shape", lambda: fastvit_ops.global_context(X4, *GC_W, t(4), AB[1], 2), ValueError,
     "rescale_weight"),
    ("gc negative eps", lambda: fastvit_ops.global_context(X4, *GC_W, *AB, 2, -1.0), ValueError, "eps"),
    # context_dwconv2d (FCViT's fused token mixer)
    ("ctx sp shape", lambda: context_dwconv2d(X4, t(2, 3, 6, 6), t(2, 4), W3), ValueError, "sp"),
    ("ctx c shape", lambda: context_dwconv2d(X4, t(2, 2, 6, 6), t(2, 3), W3), ValueError, "c"),
    ("ctx sp device", lambda: context_dwconv2d(X4, t(2, 2, 6, 6, device=META), t(2, 4), W3), ValueError, "sp"),
    ("ctx weight as dwconv2d", lambda: context_dwconv2d(X4, t(2, 2, 6, 6), t(2, 4), t(4, 1, 4, 4)), ValueError,
     "weight"),
    # fused_fasa
    ("fasa not a module", lambda: fastvit_ops.fused_fasa(X4, object()), TypeError, "fasa"),
    ("fasa lacks attributes", lambda: fastvit_ops.fused_fasa(X4, NotFasa()), TypeError, "fasa"),
    ("fasa integer x", lambda: fastvit_ops.fused_fasa(X4.long(), ref_fat.FASA(4, 3, 2, 2)), TypeError, "x"),
    ("fasa x not 4-D", lambda: fastvit_ops.fused_fasa(X4[0], ref_fat.FASA(4, 3, 2, 2)), ValueError, "x"),
    ("fasa channels", lambda: fastvit_ops.fused_fasa(t(1, 6, 4, 4), ref_fat.FASA(4, 3, 2, 2)), ValueError, "x"),
    # whole-model entries
    ("convert non-module", lambda: fastvit_ops.convert("fat_b0"), TypeError, "model"),
    ("revert non-module", lambda: fastvit_ops.revert(3), TypeError, "model"),
    ("fuse non-module", lambda: fastvit_ops.fuse_for_inference([]), TypeError, "model"),
    ("fuse in training mode", lambda: fastvit_ops.fuse_for_inference(nn.Sequential(nn.Conv2d(2, 2, 1))), ValueError,
     "model"),
    ("unknown model", lambda: models.create("fat_b9"), ValueError, "name"),
    ("unknown backend", lambda: fastvit_ops.backend("gpu").__enter__(), ValueError, "backend"),
    ("unavailable backend", lambda: _run_on("cuda"), RuntimeError, "backend"),
    # modules
    ("DepthwiseConv2d even kernel", lambda: DepthwiseConv2d(4, 4), ValueError, "kernel_size"),
    ("DepthwiseConv2d stride 3", lambda: DepthwiseConv2d(4, 3, stride=3), ValueError, "stride"),
    ("DepthwiseConv2d.from_conv non-conv", lambda: DepthwiseConv2d.from_conv(nn.Linear(2, 2)), TypeError, "conv"),
    ("DepthwiseConv2d.from_conv dense conv", lambda: DepthwiseConv2d.from_conv(nn.Conv2d(4, 4, 3)), ValueError, "conv"),
    ("DepthwiseConv2d.from_conv dilation", lambda: DepthwiseConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=4, dilation=2)),
     ValueError, "conv"),
    ("DepthwiseConv2d.from_conv padding_mode",
     lambda: DepthwiseConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=4, padding=1, padding_mode="reflect")), ValueError,
     "conv"),
    ("DepthwiseConv2d.fold_bn non-BN", lambda: DepthwiseConv2d(4, 3).fold_bn(nn.LayerNorm(4)), TypeError, "bn"),
    ("DepthwiseConv2d.fold_bn channels", lambda: DepthwiseConv2d(4, 3).fold_bn(nn.BatchNorm2d(3)), ValueError, "bn"),
    ("DepthwiseConv2d.fold_bn no stats",
     lambda: DepthwiseConv2d(4, 3).fold_bn(nn.BatchNorm2d(4, track_running_stats=False)), ValueError, "bn"),
    ("GlobalContext groups", lambda: ref_fcvit.GlobalContext(12, groups=5), ValueError, "groups"),
    ("FASA num_heads", lambda: ref_fat.FASA(6, 3, 4, 2), ValueError, "num_heads"),
    ("FASA window_size", lambda: ref_fat.FASA(4, 3, 2, 3), ValueError, "window_size"),
    ("ConvFFN stride", lambda: ref_fat.ConvFFN(4, 8, 3, 3, 4), ValueError, "stride"),
]


def _run_on(name):
    with fastvit_ops.backend(name):
        fastvit_ops.sigmoid_cross_modulation(X4, X4)


@pytest.mark.parametrize("call,exc,arg", [pytest.param(*c[1:], id=c[0]) for c in CATALOGUE])
def test_documented_errors_name_the_argument(call, exc, arg):
    if arg == "backend" and exc is RuntimeError and torch.cuda.is_available():
        pytest.skip("the cuda backend is available here")
    with pytest.raises(exc) as info:
        call()
    assert re.search(rf"(^|[^\w]){re.escape(arg)}([^\w]|$)", str(info.value)), \
        f"{exc.__name__} does not name {arg!r}: {info.value}"


def test_the_catalogue_covers_every_public_op():
    ops = {"sigmoid_cross_modulation": "cm ", "dwconv2d": "dw ", "downsampled_attention": "att ",
           "downsampled_attention_nchw": "nchw ", "conv_projection_qkv": "proj ", "token_global_similarity": "sim ",
           "global_context": "gc ", "fused_fasa": "fasa ", "convert": "convert ", "fuse_for_inference": "fuse "}
    assert set(ops) <= set(fastvit_ops.__all__)
    for op, prefix in ops.items():
        assert any(c[0].startswith(prefix) for c in CATALOGUE), op


# ---- non-finite inputs ------------------------------------------------------------------------------------
EAGER = {
    "sigmoid_cross_modulation": lambda a, b: cm.reference(a, b, "full"),
    "dwconv2d": lambda x, w, b: dw.reference(x, w, b, activation="silu"),
    "downsampled_attention": lambda q, k, v: att.reference(q, k, v),
    "downsampled_attention_nchw": lambda q, k, v, g: att.reference(
        q.reshape(q.shape[0], 2, -1, q.shape[2] * q.shape[3]).transpose(2, 3), k, v, k.shape[-1] ** -0.5,
        g.reshape(g.shape[0], 2, -1, g.shape[2] * g.shape[3]).transpose(2, 3)).transpose(2, 3).reshape(q.shape),
    "token_global_similarity": lambda x, a, b: gcm.reference(x, a, b, 2, 1e-5),
    "global_context": lambda x, w1, b1, w2, b2, a, b: gcm.reference(x, a, b, 2, 1e-5, (w1, b1, w2, b2)),
}
BACKENDS = backends_for("cpu")


@pytest.fixture
def no_hang():
    faulthandler.dump_traceback_later(120, exit=True)  # a hang fails the run instead of stalling it
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", sorted(CASES))
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_inputs_propagate(op, value, backend, no_hang):
    """One non-finite element in the first input: the op returns (no crash, no hang), its outputs
    are non-finite exactly where eager PyTorch's are (NaN or ±inf: SiLU(−inf) is NaN in eager, −inf
    in a kernel that computes x / (1 + e^−x); neither is finite), and the backward runs."""
    gen = torch.Generator().manual_seed(1)
    fn, ins = CASES[op](gen, torch.float32, 2)
    with torch.no_grad():
        ins[0].view(-1)[ins[0].numel() // 2] = value
    with fastvit_ops.backend(backend):
        outs = outputs(fn(*ins))
        grads = torch.autograd.grad([o.sum() for o in outs], ins, allow_unused=True)
    assert any(not torch.isfinite(o).all() for o in outs), f"{op}: a {value} input vanished from the output"
    if op in EAGER:
        with torch.no_grad():
            ref = outputs(EAGER[op](*ins))
        for o, r in zip(outs, ref):
            bad = torch.isfinite(o) != torch.isfinite(r)
            assert not bad.any(), (f"{op}: non-finite at {int((~torch.isfinite(o)).sum())} outputs, eager at "
                                   f"{int((~torch.isfinite(r)).sum())}; first difference at {bad.nonzero()[0].tolist()}")
    assert len(grads) == len(ins)


# ---- empty batches ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", sorted(CASES))
def test_empty_batch(op, backend):
    """B = 0: outputs and gradients of the B = 1 call's shapes with batch 0, no error."""
    gen = torch.Generator().manual_seed(2)
    fn, one = CASES[op](gen, torch.float32, 1)
    fn, ins = CASES[op](gen, torch.float32, 0)
    with fastvit_ops.backend(backend):
        want = [o.shape for o in outputs(fn(*one))]
        outs = outputs(fn(*ins))
        grads = torch.autograd.grad([o.sum() for o in outs], ins, allow_unused=True)
    for o, s in zip(outs, want):
        assert o.shape == (0,) + tuple(s[1:]) and o.dtype == torch.float32, (op, tuple(o.shape))
    for g, t_ in zip(grads, ins):
        assert g is None or g.shape == t_.shape, (op, g.shape, t_.shape)
