"""dwconv2d (docs/dwconv.md) on every backend that runs here, against the float64 eager reference."""
import contextlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastvit_ops
from conftest import HAS_CUDA, assert_error_rule, backends_for, requires_cuda, spy_kernels
from fastvit_ops.nn.dwconv import DepthwiseConv2d
from fastvit_ops.ops import dwconv as dw
from fastvit_ops.ops.dwconv import dwconv2d
from fastvit_ops.reference.common import DepthwiseConv2d as RefDepthwiseConv2d

CPU_BACKENDS = backends_for("cpu")
ACTS = [None, "silu", "gelu"]


def eager(x, w, b, stride=1, padding=None, activation=None, residual=False):
    """What the models write: nn.Conv2d(groups=C), then the activation module, then ``x +``."""
    k = w.shape[-1]
    y = F.conv2d(x, w, b, stride, k // 2 if padding is None else padding, 1, x.shape[1])
    if activation == "silu":
        y = F.silu(y)
    elif activation == "gelu":
        y = F.gelu(y)
    return x + y if residual else y


def make(shape, k, dtype=torch.float64, device="cpu", bias=True, scale=1.0):
    C = shape[1]
    x = (torch.randn(shape, dtype=dtype, device=device) * scale).requires_grad_()
    w = (torch.randn(C, 1, k, k, dtype=dtype, device=device) / k).requires_grad_()
    b = torch.randn(C, dtype=dtype, device=device).requires_grad_() if bias else None
    return x, w, b


def backend_ok(name, device="cpu"):
    return fastvit_ops.backend_available(name, torch.device(device))[0]


def _configs():
    """k ∈ {1, 3, 5, 11} × stride 1/2 × each epilogue, + residual (stride 1); odd H, W = 7 × 9."""
    out = []
    for k in (1, 3, 5, 11):
        for stride in (1, 2):
            for act in ACTS:
                out.append(pytest.param(k, stride, act, False, id=f"k{k}-s{stride}-{act}"))
        for act in (None, "gelu"):
            out.append(pytest.param(k, 1, act, True, id=f"k{k}-s1-{act}-residual"))
    return out


# ---- gradients ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,stride,act,residual", _configs())
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_float64(backend, k, stride, act, residual):
    # The interpreter runs Triton at ms per op: one channel and the fast (random-projection)
    # gradcheck there.
    fast = backend == "triton"
    x, w, b = make((1, 1 if fast else 2, 7, 9), k)
    with fastvit_ops.backend(backend):
        assert torch.autograd.gradcheck(
            lambda x_, w_, b_: dwconv2d(x_, w_, b_, stride, None, act, residual), (x, w, b), fast_mode=fast)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_no_bias_and_explicit_padding(backend):
    x, w, _ = make((2, 3, 6, 5), 3)
    with fastvit_ops.backend(backend):
        assert torch.autograd.gradcheck(lambda x_, w_: dwconv2d(x_, w_, None, 2, 0, "silu"), (x, w),
                                        fast_mode=backend == "triton")
        assert torch.autograd.gradcheck(lambda x_, w_: dwconv2d(x_, w_, None, 1, 2), (x, w),
                                        fast_mode=backend == "triton")


def _check_against_eager(shape, k, stride, padding, act, residual, backend, tol=1e-10):
    x, w, b = make(shape, k, scale=2.0)
    with fastvit_ops.backend(backend):
        y = dwconv2d(x, w, b, stride, padding, act, residual)
    ref = eager(x, w, b, stride, padding, act, residual)
    dy = torch.randn_like(ref)
    got = torch.autograd.grad(y, (x, w, b), dy)
    want = torch.autograd.grad(ref, (x, w, b), dy)
    label = f"{shape} k={k} s={stride} p={padding} {act} res={residual}"
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol, msg=label)
    for name, g, r in zip(("dx", "dw", "db"), got, want):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol, msg=f"{name} {label}")


@pytest.mark.parametrize("backend", [p for p in CPU_BACKENDS if p.id != "triton"])
def test_matches_eager_float64_many_shapes(backend):
    """Widths around the vector and block widths (8, 16, 32, 64), tall/flat planes, k up to 31,
    padding 0 / k//2 / k−1, both strides."""
    cases = [((2, 3, 5, 1), 1), ((1, 2, 1, 1), 3), ((2, 2, 8, 8), 3), ((1, 3, 9, 17), 5), ((1, 2, 33, 16), 7),
             ((1, 2, 12, 65), 9), ((1, 1, 70, 3), 3), ((2, 2, 16, 16), 31), ((1, 2, 20, 40), 13), ((1, 1, 4, 130), 11)]
    for shape, k in cases:
        for stride in (1, 2):
            for padding in sorted({k // 2, 0, k - 1}):
                if shape[2] + 2 * padding < k or shape[3] + 2 * padding < k:
                    continue
                act = ACTS[(k + stride + padding) % 3]
                _check_against_eager(shape, k, stride, padding, act, False, backend)
        _check_against_eager(shape, k, 1, k // 2, "silu", True, backend)


# The C++ CPU backend computes some small planes (at most 1024 padded outputs, stride 2 or small k;
# csrc/cpu/dwconv.cpp, use_flat) as one flat 1-D array, the rest row by row. These cases sit on the
# flat path's edges: tiny odd planes, one register block vs several (fp32 16 / fp64 8 lanes × 16
# vectors), stride 2 with odd sizes (4 de-interleaved sub-planes), padding 0 / k−1.
SMALL_PLANES = [((2, 3, 5, 7), 3), ((2, 2, 7, 7), 3), ((1, 2, 7, 7), 9), ((1, 2, 14, 14), 5), ((1, 2, 13, 15), 7),
                ((1, 2, 1, 9), 3), ((1, 1, 20, 20), 3), ((1, 2, 28, 28), 5), ((1, 1, 9, 35), 11), ((1, 1, 33, 31), 1)]


@pytest.mark.parametrize("backend", [p for p in CPU_BACKENDS if p.id == "cpu"])
def test_small_planes_match_eager_float64(backend):
    for shape, k in SMALL_PLANES:
        for stride in (1, 2):
            for padding in sorted({k // 2, 0, k - 1, min(1, k - 1)}):
                if shape[2] + 2 * padding < k or shape[3] + 2 * padding < k:
                    continue
                act = ACTS[(k + stride + padding + shape[3]) % 3]
                _check_against_eager(shape, k, stride, padding, act, False, backend)
        for act in ACTS:
            _check_against_eager(shape, k, 1, k // 2, act, True, backend)


@pytest.mark.parametrize("k,stride,padding,act,residual",
                         [(3, 2, 1, "silu", False), (5, 2, 0, None, False), (5, 1, 4, "gelu", False),
                          (3, 1, 1, "gelu", True), (7, 2, 6, "silu", False), (5, 1, 2, "silu", True)])
def test_small_planes_gradcheck_cpu(k, stride, padding, act, residual):
    if not backend_ok("cpu"):
        pytest.skip("the C++ extension is not built")
    for shape in ((1, 2, 5, 7), (1, 1, 7, 7)):
        x, w, b = make(shape, k)
        with fastvit_ops.backend("cpu"):
            assert torch.autograd.gradcheck(
                lambda x_, w_, b_: dwconv2d(x_, w_, b_, stride, padding, act, residual), (x, w, b))


@pytest.mark.parametrize("act,residual", [(None, False), ("silu", False), ("gelu", False), (None, True)])
def test_small_planes_float32_model_shapes(act, residual):
    """fp32 at (smaller-batch) model shapes of the flat path, against the fp64 reference."""
    if not backend_ok("cpu"):
        pytest.skip("the C++ extension is not built")
    cases = [((2, 64, 7, 7), 3, 1), ((2, 16, 14, 14), 5, 2), ((2, 8, 28, 28), 5, 2), ((2, 8, 28, 28), 5, 1),
             ((2, 8, 7, 7), 9, 1), ((1, 8, 14, 14), 11, 1)]
    for shape, k, stride in cases:
        if residual and stride != 1:
            continue
        x, w, b = (t.detach() for t in make(shape, k, dtype=torch.float32, scale=2.0))
        dy = torch.randn(dw._out_shape(x, k, stride, k // 2))
        ins = [t.clone().requires_grad_() for t in (x, w, b)]
        with fastvit_ops.backend("cpu"):
            y = dwconv2d(*ins, stride, None, act, residual)
        got = torch.autograd.grad(y, ins, dy)
        ins64 = [t.double().requires_grad_() for t in (x, w, b)]
        ref = dw.reference(*ins64, stride, None, act, residual)
        want = torch.autograd.grad(ref, ins64, dy.double())
        label = f"{shape} k={k} s={stride} {act} res={residual}"
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5, msg=label)
        for name, g, r in zip(("dx", "dw", "db"), got, want):
            torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4 * r.abs().max().item(),
                                       msg=f"{name} {label}")


@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_float32_small_planes_every_epilogue(channels_last):
    """The raw fp32 forward against the fp64 reference on small planes: kernels larger than the
    plane, both strides, every epilogue, 1×1 planes, plane sizes that are not multiples of the
    vector width, channels_last and a strided (non-dense) input. With C a multiple of the vector
    width and k ≤ 13 this runs the channel-blocked kernel (vector lanes = channels, register
    transposes in and out); test_each_cpu_path_matches_eager_float64 reruns it on each kernel."""
    if not backend_ok("cpu"):
        pytest.skip("the C++ extension is not built")
    op = torch.ops.fastvit_ops._dwconv2d_forward
    for (B, C, H, W) in [(2, 32, 7, 9), (1, 16, 1, 1), (2, 48, 5, 3), (1, 16, 16, 16), (1, 32, 14, 13),
                         (1, 16, 23, 17)]:
        for k in (1, 3, 5, 7, 9, 11, 13):
            cases = [(1, 0, False, k // 2), (1, 1, False, k // 2), (1, 2, True, k // 2), (2, 0, False, k // 2),
                     (2, 2, False, k // 2), (1, 0, False, 0), (2, 0, False, k - 1)]
            for stride, act, residual, p in cases:
                if H + 2 * p < k or W + 2 * p < k:
                    continue
                x = torch.randn(B, C, H, W) * 2
                if channels_last:
                    x = x.to(memory_format=torch.channels_last)
                elif k == 5:
                    x = torch.randn(B, C, H, W + 3)[..., 1:W + 1] * 2  # rows not contiguous with each other
                w, b = torch.randn(C, 1, k, k) / k, torch.randn(C)
                y = op(x, w, b, stride, p, act, residual)
                ref = dw._reference_fwd(x.double(), w.double(), b.double(), stride, p, act, residual)
                torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5,
                                           msg=f"{(B, C, H, W)} k={k} s={stride} p={p} act={act} res={residual}")


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_backward_float32_small_planes_every_epilogue(layout):
    """The raw fp32 backward against the fp64 reference on small planes at stride 1: kernels larger
    than the plane, every epilogue, "same" and other paddings, 1×1 planes, plane sizes that are
    not multiples of the vector width, partial gradients, and an incoming gradient with other
    strides. With C a multiple of the vector width and k ≤ 13 this runs the channel-blocked
    backward (vector lanes = channels); test_each_cpu_path_matches_eager_float64 reruns it on each
    kernel."""
    if not backend_ok("cpu"):
        pytest.skip("the C++ extension is not built")
    op = torch.ops.fastvit_ops._dwconv2d_backward
    for (B, C, H, W) in [(2, 32, 7, 9), (1, 16, 1, 1), (2, 48, 5, 3), (1, 16, 14, 13), (1, 16, 23, 17)]:
        for k in (1, 3, 5, 9, 13):
            for act, residual, p in [(0, False, k // 2), (1, False, k // 2), (2, True, k // 2), (0, True, k // 2),
                                     (2, False, 0), (1, False, k - 1)]:
                if H + 2 * p < k or W + 2 * p < k:
                    continue
                x = torch.randn(B, C, H, W) * 2
                if layout == "channels_last":
                    x = x.to(memory_format=torch.channels_last)
                elif layout == "strided":
                    x = torch.randn(B, C, H, W + 3)[..., 1:W + 1] * 2
                w, b = torch.randn(C, 1, k, k) / k, torch.randn(C)
                Ho, Wo = H + 2 * p - k + 1, W + 2 * p - k + 1
                dy = torch.randn(B, C, Wo, Ho).transpose(2, 3) if layout == "strided" else torch.randn(B, C, Ho, Wo)
                want = dw._reference_bwd(dy.double(), x.double(), w.double(), b.double(), 1, p, act, residual)
                label = f"{(B, C, H, W)} k={k} p={p} act={act} res={residual}"
                for need_dx, need_dw in [(True, True), (True, False), (False, True)]:
                    got = op(dy, x, w, b, 1, p, act, residual, need_dx, need_dw)
                    for name, g, r, needed in zip(("dx", "dw", "db"), got, want, (need_dx, need_dw, True)):
                        if needed:
                            torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4 * (1 + r.abs().max().item()),
                                                       msg=f"{name} {label}")


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("act", ["silu", "gelu"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_reaches_only_the_outputs_that_see_it(backend, k, act, channels_last):
    """A few NaN inputs make exactly eager's outputs NaN: the C++ epilogues compute two vectors of
    unrelated outputs with one shared division, which once carried a NaN lane into the other
    vector (15 NaN outputs where eager had 9). Random positions, planes of several vectors."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 8, 5, 37).contiguous(memory_format=fmt)
    flat = x.permute(0, 2, 3, 1) if channels_last else x
    for i in torch.randperm(x.numel())[:3].tolist():
        flat.reshape(-1)[i] = float("nan")
    w, b = torch.randn(8, 1, k, k), torch.randn(8)
    want = torch.isnan(dw.reference(x, w, b, activation=act))
    with fastvit_ops.backend(backend):
        with torch.no_grad():
            got = torch.isnan(dwconv2d(x, w, b, activation=act))
        y = dwconv2d(x.clone().requires_grad_(), w, b, activation=act)
    assert want.any()
    assert torch.equal(got, want), f"NaN at {int(got.sum())} outputs, eager at {int(want.sum())}"
    assert torch.equal(torch.isnan(y), want)


@pytest.mark.parametrize("channels_last", [False, True])
def test_channels_last_output_and_in_place_forward(channels_last):
    """The C++ forward returns x's layout (the channel-blocked fp32 path writes channels_last
    directly, the other paths copy once), and _dwconv2d_same_ overwrites x with act(DW(x)) [+ x]
    where the channel-blocked path runs, returning False and leaving x alone elsewhere."""
    if not backend_ok("cpu"):
        pytest.skip("the C++ extension is not built")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    # C = 16, 32, 48 are multiples of every capability's vector width (4, 8 or 16 fp32 lanes), 18 of none.
    for (B, C, H, W), k, act, residual, dtype in [((2, 32, 9, 11), 5, 2, True, torch.float32),
                                                 ((1, 16, 1, 1), 3, 1, False, torch.float32),
                                                 ((2, 48, 7, 5), 13, 0, True, torch.float32),
                                                 ((2, 18, 9, 9), 3, 0, True, torch.float32),   # C % width != 0
                                                 ((2, 32, 9, 9), 3, 1, False, torch.float64)]:  # not fp32
        x = (torch.randn(B, C, H, W, dtype=dtype) * 2).contiguous(memory_format=fmt)
        w, b = torch.randn(C, 1, k, k, dtype=dtype) / k, torch.randn(C, dtype=dtype)
        ref = dw._reference_fwd(x.double(), w.double(), b.double(), 1, k // 2, act, residual)
        y = torch.ops.fastvit_ops._dwconv2d_forward(x, w, b, 1, k // 2, act, residual)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
        cl_in = channels_last and not x.is_contiguous()
        assert y.is_contiguous(memory_format=torch.channels_last if cl_in else torch.contiguous_format)
        z = x.clone()
        done = torch.ops.fastvit_ops._dwconv2d_same_(z, w, b, act, residual)
        assert done == (dtype == torch.float32 and C % 16 == 0)  # (C = 18 is a multiple of no width)
        torch.testing.assert_close(z.double(), ref if done else x.double(), rtol=1e-5, atol=1e-5)
        assert z.stride() == x.stride()
    with pytest.raises(RuntimeError, match="weight"):
        torch.ops.fastvit_ops._dwconv2d_same_(torch.randn(1, 16, 5, 5), torch.randn(16, 1, 3), None, 0, False)


def test_small_planes_strided_grad_and_partial_backward():
    """The raw backward with a non-contiguous dy, and dx-only / dw-only calls, on small planes."""
    if not backend_ok("cpu"):
        pytest.skip("the C++ extension is not built")
    for shape, k, stride, act in (((2, 3, 7, 9), 3, 2, 1), ((2, 3, 9, 7), 5, 1, 2), ((1, 2, 6, 6), 3, 1, 0)):
        x, w, b = (t.detach() for t in make(shape, k))
        Ho, Wo = (dw.output_size(n, k, stride, k // 2) for n in shape[2:])
        dy = torch.randn(shape[0], shape[1], Wo, Ho, dtype=torch.float64).transpose(2, 3)  # sW != 1
        want = dw._reference_bwd(dy, x, w, b, stride, k // 2, act, False)
        op = torch.ops.fastvit_ops._dwconv2d_backward
        full = op(dy, x, w, b, stride, k // 2, act, False, True, True)
        dx_only = op(dy, x, w, b, stride, k // 2, act, False, True, False)
        dw_only = op(dy, x, w, b, stride, k // 2, act, False, False, True)
        for got, r in zip(full, want):
            torch.testing.assert_close(got, r, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(dx_only[0], want[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(dw_only[1], want[1], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(dx_only[2], want[2], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path", ["rows", "flat", "cblock"])
def test_each_cpu_path_matches_eager_float64(path):
    """The C++ backend picks one of three kernels (rows, flat, cblock) per call;
    FASTVIT_OPS_DWCONV_PATH (read once, at load) forces one wherever it applies, here in a
    subprocess for every shape these tests cover."""
    if not backend_ok("cpu"):
        pytest.skip("the C++ extension is not built")
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", FASTVIT_OPS_DWCONV_PATH=path)
    tests = [f"{__file__}::{name}" for name in ("test_matches_eager_float64_many_shapes",
                                                 "test_forward_float32_small_planes_every_epilogue",
                                                 "test_backward_float32_small_planes_every_epilogue",
                                                 "test_small_planes_match_eager_float64",
                                                 "test_small_planes_gradcheck_cpu",
                                                 "test_small_planes_float32_model_shapes",
                                                 "test_small_planes_strided_grad_and_partial_backward",
                                                 "test_layouts")]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests,
                        "-k", "not reference and not triton"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


def test_triton_matches_eager_float64():
    if not backend_ok("triton"):
        pytest.skip("triton not available here")
    for shape, k, stride, padding in [((1, 2, 5, 6), 3, 2, 1), ((1, 1, 6, 5), 5, 1, 0), ((1, 1, 4, 4), 7, 2, 3)]:
        _check_against_eager(shape, k, stride, padding, "gelu", False, "triton")


# ---- numerics in low precision -----------------------------------------------------------------------
@pytest.mark.parametrize("act,residual", [(None, False), ("silu", False), ("gelu", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_low_precision_error_rule(backend, dtype, act, residual):
    if backend == "triton" and dtype != torch.float32:
        pytest.skip("the Triton interpreter computes half-precision math wrongly; GPU tests cover it")
    shape, k = ((1, 3, 6, 7), 5) if backend == "triton" else ((2, 8, 13, 11), 7)
    x64, w64, b64 = (t.detach() for t in make(shape, k, scale=2.0))
    # The exact result of the *rounded* inputs, so only the op's own error is measured.
    x, w, b = x64.to(dtype), w64.to(dtype), b64.to(dtype)
    dy = torch.randn(shape, dtype=torch.float64).to(dtype)
    ins64 = [t.double().requires_grad_() for t in (x, w, b)]
    exact = eager(*ins64, 1, None, act, residual)
    exact_g = torch.autograd.grad(exact, ins64, dy.double())

    ins = [t.clone().requires_grad_() for t in (x, w, b)]
    with fastvit_ops.backend(backend):
        out = dwconv2d(*ins, 1, None, act, residual)
        got_g = torch.autograd.grad(out, ins, dy)
    ins_e = [t.clone().requires_grad_() for t in (x, w, b)]
    ref = eager(*ins_e, 1, None, act, residual)
    ref_g = torch.autograd.grad(ref, ins_e, dy)
    assert out.dtype == dtype and all(g.dtype == dtype for g in got_g)
    assert_error_rule("forward", out, ref, exact)
    for name, g, r, e in zip(("dx", "dweight", "dbias"), got_g, ref_g, exact_g):
        assert_error_rule(name, g, r, e)


# ---- layouts ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_layouts(backend):
    """channels_last, sliced and transposed inputs give the contiguous result; channels_last stays
    channels_last for the output and dx."""
    base = torch.randn(2, 6, 9, 10, dtype=torch.float64)
    cases = {
        "channels_last": base.to(memory_format=torch.channels_last),
        "sliced": torch.randn(2, 6, 9, 20, dtype=torch.float64)[..., ::2],
        "transposed": base.transpose(2, 3),
        "channel_slice": torch.randn(2, 12, 9, 10, dtype=torch.float64)[:, ::2],
    }
    w = torch.randn(6, 1, 3, 3, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    for name, x in cases.items():
        for stride, act, residual in ((1, "gelu", True), (2, None, False)):
            xc = x.detach().contiguous().requires_grad_()
            xs = x.detach().requires_grad_()
            with fastvit_ops.backend(backend):
                out = dwconv2d(xc, w, b, stride, None, act, residual)
                dy = torch.randn_like(out)
                ref_g = torch.autograd.grad(out, (xc,), dy)[0]
                out2 = dwconv2d(xs, w, b, stride, None, act, residual)
                g2 = torch.autograd.grad(out2, (xs,), dy)[0]
            torch.testing.assert_close(out2, out, msg=name)
            torch.testing.assert_close(g2, ref_g, msg=name)
            if name == "channels_last":
                assert out2.is_contiguous(memory_format=torch.channels_last), "output keeps channels_last"
                assert g2.is_contiguous(memory_format=torch.channels_last), "dx keeps channels_last"
    # A non-contiguous weight (a strided view) and a non-contiguous bias.
    wbig = torch.randn(6, 1, 3, 6, dtype=torch.float64)[..., ::2]
    bbig = torch.randn(12, dtype=torch.float64)[::2]
    x = base.clone()
    with fastvit_ops.backend(backend):
        out = dwconv2d(x, wbig, bbig)
    torch.testing.assert_close(out, eager(x, wbig, bbig))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch(backend):
    x = torch.randn(0, 4, 5, 5, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, requires_grad=True)
    with fastvit_ops.backend(backend):
        y = dwconv2d(x, w, None, 2)
        assert y.shape == (0, 4, 3, 3)
        dx, dw_ = torch.autograd.grad(y.sum(), (x, w))
    assert dx.shape == x.shape and torch.equal(dw_, torch.zeros_like(w))


def test_deterministic_backward():
    """The cpu backward reduces dweight/dbias in a fixed order: bitwise equal across runs and threads."""
    if not backend_ok("cpu"):
        pytest.skip("the C++ extension is not built")
    x, w, b = make((4, 8, 21, 19), 7, dtype=torch.float32)
    dy = torch.randn(4, 8, 21, 19)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            with fastvit_ops.backend("cpu"):
                results.append(torch.autograd.grad(dwconv2d(x, w, b, 1, None, "silu"), (x, w, b), dy))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert torch.equal(a, c)


def test_poisoned_outputs_are_written(monkeypatch):
    """Triton launchers allocate with torch.empty: fill those with NaN so an unwritten element shows."""
    if not backend_ok("triton"):
        pytest.skip("triton not available here")
    from fastvit_ops.kernels import dwconv as kmod

    real_empty, real_empty_like = torch.empty, torch.empty_like

    def nan_empty(*a, **kw):
        return real_empty(*a, **kw).fill_(float("nan"))

    def nan_empty_like(*a, **kw):
        return real_empty_like(*a, **kw).fill_(float("nan"))

    monkeypatch.setattr(kmod.torch, "empty", nan_empty)
    monkeypatch.setattr(kmod.torch, "empty_like", nan_empty_like)
    x, w, b = make((1, 2, 5, 7), 3)
    dy = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    y = kmod.dwconv_forward(x.detach(), w.detach(), b.detach(), 2, 1, 1, False)
    dx, dw_, db = kmod.dwconv_backward(dy, x.detach(), w.detach(), b.detach(), 2, 1, 1, False)
    monkeypatch.undo()
    for t in (y, dx, dw_, db):
        assert not t.isnan().any()
    ref = eager(x, w, b, 2, 1, "silu")
    torch.testing.assert_close(y, ref.detach())
    torch.testing.assert_close(dx, torch.autograd.grad(ref, x, dy)[0])


# ---- torch.library / torch.compile ------------------------------------------------------------------------
@pytest.mark.parametrize("act_id,residual,stride", [(0, False, 2), (2, True, 1), (1, False, 1)])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend, act_id, residual, stride):
    x, w, b = make((2, 3, 5, 7), 3)
    torch.library.opcheck(torch.ops.fastvit_ops.dwconv2d.default, (x, w, b, stride, 1, act_id, residual, backend))
    torch.library.opcheck(torch.ops.fastvit_ops.dwconv2d.default, (x, w, None, stride, 1, act_id, residual, backend))
    xcl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(torch.ops.fastvit_ops.dwconv2d.default, (xcl, w, b, stride, 1, act_id, residual, backend))
    y = dw.reference(x.detach(), w.detach(), b.detach(), stride, 1, dw._ACT_NAME[act_id], residual)
    dy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.fastvit_ops.dwconv2d_backward.default,
                          (dy, x.detach(), w.detach(), b.detach(), stride, 1, act_id, residual, True, True, backend))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def block(x, w, b):
        y = dwconv2d(x * 2, w, b, 1, None, "gelu", True)
        return dwconv2d(y, w, None, 2).sum(dim=1)

    compiled = torch.compile(block, fullgraph=True)
    x, w, b = make((2, 4, 9, 7), 3, dtype=torch.float32)
    out = compiled(x, w, b)
    ref = block(x, w, b)
    torch.testing.assert_close(out, ref)
    got = torch.autograd.grad(out.sum(), (x, w, b))
    want = torch.autograd.grad(ref.sum(), (x, w, b))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, w, b), eager(eager(x * 2, w, b, 1, None, "gelu", True), w, None, 2).sum(1))


# ---- dispatch ----------------------------------------------------------------------------------------------
def test_dispatch_runs_the_requested_backend(monkeypatch, without_cpu_rules):
    calls = spy_kernels(monkeypatch, "dwconv2d")
    x, w, b = make((1, 2, 5, 5), 3)
    # A non-dense input keeps the cpu backend on the custom op (the eager fast path takes NCHW and
    # channels_last only)
    x_cl = torch.randn(1, 2, 5, 8, dtype=x.dtype)[..., 1:6].requires_grad_()
    for name in ("reference",) + (("cpu",) if backend_ok("cpu") else ()):
        calls.clear()
        with fastvit_ops.backend(name):
            dwconv2d(x_cl, w, b).sum().backward()
        assert calls == [("fwd", name), ("bwd", name)]
    if backend_ok("cpu"):
        calls.clear()
        monkeypatch.setattr(dw, "cpu_forward_choice", lambda *a: "cpu")
        dwconv2d(x_cl, w, b).sum().backward()
        assert calls == [("fwd", "cpu"), ("bwd", "cpu")], "auto picks the C++ kernel on CPU"
        # NCHW eager calls on cpu/auto: the C++ autograd node, no Python table involved
        for name in ("cpu", "auto"):
            calls.clear()
            with fastvit_ops.backend(name):
                y = dwconv2d(x, w, b)
                assert type(y.grad_fn).__name__ == "CppFunction"
                y.sum().backward()
            assert calls == []
        with fastvit_ops.backend("reference"):  # reference is never rerouted
            assert "CppFunction" not in type(dwconv2d(x, w, b).grad_fn).__name__


@pytest.mark.skipif(not backend_ok("cpu"), reason="needs the C++ CPU extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("choice", ["cpu", "onednn"])
def test_eager_cpu_fast_path_matches_custom_op(monkeypatch, dtype, choice, without_cpu_rules):
    """Plain eager NCHW CPU calls take the C++ autograd node (_dwconv2d_autograd) with the forward
    `auto` chose (our kernel, or oneDNN + epilogue); forward and every gradient equal the custom
    op's running the same choice, including partial gradients (x only, weight only, no bias)."""
    monkeypatch.setattr(dw, "cpu_forward_choice", lambda *a: choice)
    for shape, k, stride, act, residual, cl in [((2, 16, 7, 9), 5, 1, "silu", True, False),
                                                ((1, 32, 14, 13), 3, 2, "gelu", False, False),
                                                ((2, 3, 9, 7), 7, 1, None, False, False),
                                                ((2, 32, 7, 9), 5, 1, "gelu", True, True),
                                                ((2, 3, 9, 7), 3, 2, "silu", False, True)]:
        x, w, b = (t.detach().to(dtype) for t in make(shape, k))
        if cl:  # channels_last takes the fast path too and stays channels_last
            x = x.contiguous(memory_format=torch.channels_last)
        dy = torch.randn(dw._out_shape(x, k, stride, k // 2), dtype=dtype)
        for grads in ((True, True, True), (True, False, False), (False, True, True), (True, True, None)):
            ins = [t.clone().requires_grad_(g) if g is not None else None for t, g in zip((x, w, b), grads)]
            y = dwconv2d(*ins, stride, None, act, residual)
            assert type(y.grad_fn).__name__ == "CppFunction"
            assert y.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
            leaves = [t for t in ins if t is not None and t.requires_grad]
            got = torch.autograd.grad(y, leaves, dy)
            ins2 = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in ins]
            want_y = dw._op(*ins2, stride, k // 2, dw._ACT_ID[act], residual, "auto")
            want = torch.autograd.grad(want_y, [t for t in ins2 if t is not None and t.requires_grad], dy)
            torch.testing.assert_close(y, want_y, rtol=0, atol=0)
            for a, c in zip(got, want):
                torch.testing.assert_close(a, c, rtol=0, atol=0)
    with torch.inference_mode():  # below autograd: the forward alone
        torch.testing.assert_close(dwconv2d(x, w, b, 1, None, "silu"), dw._op(x, w, b, 1, k // 2, 1, False, "auto"))


@pytest.mark.skipif(not backend_ok("cpu"), reason="needs the C++ CPU extension")
def test_eager_cpu_fast_path_refuses_double_backward(without_cpu_rules):
    x, w, b = (t.detach().requires_grad_() for t in make((1, 16, 5, 5), 3))
    y = dwconv2d(x, w, b, 1, None, "gelu")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


@contextlib.contextmanager
def _deterministic():
    prev, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=warn)


@pytest.mark.skipif(not backend_ok("cpu"), reason="needs the C++ CPU extension")
def test_auto_cpu_forward_choice_is_a_fixed_rule():
    """``auto``'s CPU forward comes from a rule on the call (cpu_rules.dwconv_forward): nothing is
    timed or cached, another process picks the same kernel for every call, and under
    torch.use_deterministic_algorithms(True) it is always ours."""
    import subprocess
    import sys

    from fastvit_ops.ops import cpu_rules

    calls = [((8, 32, 56, 56), 3, 1, 1, 0, True), ((8, 128, 56, 56), 5, 2, 2, 0, False),
             ((8, 256, 7, 7), 9, 1, 4, 1, False), ((8, 160, 14, 14), 3, 1, 1, 2, False),
             ((8, 384, 32, 32), 31, 1, 15, 0, False), ((2, 3, 7, 6), 5, 2, 2, 2, False)]
    script = ("import torch, fastvit_ops\nfrom fastvit_ops.ops import cpu_rules\n"
              f"print([cpu_rules.dwconv_forward(s, cl, torch.float32, k, st, p, a, False) for s, k, st, p, a, cl in "
              f"[(s, k, st, p, a, cl) for s, k, st, p, a, r in {calls!r} for cl in (False, True)]])")
    here = [cpu_rules.dwconv_forward(s, cl, torch.float32, k, st, p, a, False)
            for s, k, st, p, a, r in calls for cl in (False, True)]
    assert set(here) <= {"cpu", "onednn"}
    assert here == [cpu_rules.dwconv_forward(s, cl, torch.float32, k, st, p, a, False)
                    for s, k, st, p, a, r in calls for cl in (False, True)]
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == repr(here), "another process chose differently"
    with _deterministic():
        assert all(cpu_rules.dwconv_forward(s, False, torch.float32, k, st, p, a, False) == "cpu"
                   for s, k, st, p, a, r in calls)
    x, w, b = make((2, 3, 7, 6), 5)
    with _deterministic():
        assert dw.cpu_forward_choice(x, w, b, 2, 2, 2, False) == "cpu"
        assert not dw.onednn_forward("auto", x, w, b, 2, 2, 2, False)
    assert not dw.onednn_forward("cpu", x, w, b, 2, 2, 2, False), "backend('cpu') always runs ours"


@pytest.mark.skipif(not backend_ok("cpu"), reason="needs the C++ CPU extension")
def test_channels_last_stride2_rule_runs_onednn_where_it_measured_faster():
    """On avx2/avx512, ``auto``'s forward of a large channels_last k = 5, stride-2 depthwise conv
    without an epilogue (FAT's ConvFFN-down, FASA's pool, the stride-2 shortcut in the inference
    plans) is oneDNN's, measured 0.5-0.9x ours there; NCHW, smaller calls, epilogues, other k and
    stride stay ours. The values are oneDNN's convolution's (error rule vs float64)."""
    from fastvit_ops.ops import cpu_rules
    from fastvit_ops.ops import dispatch

    if cpu_rules.capability() not in ("avx2", "avx512"):
        pytest.skip(f"the rule is for avx2/avx512, this build runs {cpu_rules.capability()}")

    def rule(shape, cl=True, k=5, stride=2, act=0):
        return cpu_rules.dwconv_forward(shape, cl, torch.float32, k, stride, k // 2, act, False)
    assert rule((8, 128, 56, 56)) == rule((2, 128, 56, 56)) == rule((8, 640, 14, 14)) == "onednn"
    assert rule((8, 128, 56, 56), cl=False) == "cpu"
    assert rule((8, 32, 28, 28)) == rule((8, 160, 14, 14)) == "cpu"
    assert rule((8, 128, 56, 56), act=1) == rule((8, 128, 56, 56), k=3) == rule((8, 128, 56, 56), stride=1) == "cpu"
    x = torch.randn(2, 128, 56, 56).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(128, 1, 5, 5) * 0.2, torch.randn(128)
    with torch.no_grad(), dispatch.recording() as log:
        y = dwconv2d(x, w, b, 2)
    assert [c.impl.name for c in log if c.stage == "forward"] == ["onednn"]
    assert y.is_contiguous(memory_format=torch.channels_last)
    exact = F.conv2d(x.double(), w.double(), b.double(), 2, 2, 1, 128)
    assert_error_rule("channels_last k5/s2 by oneDNN", y, F.conv2d(x, w, b, 2, 2, 1, 128), exact)


@pytest.mark.skipif(not backend_ok("cpu"), reason="needs the C++ CPU extension")
@pytest.mark.parametrize("choice", ["cpu", "onednn"])
def test_auto_cpu_forward_either_choice_is_right(monkeypatch, choice):
    """Whichever forward ``auto`` keeps, values, layout and (fused C++) gradients match the reference."""
    monkeypatch.setattr(dw, "cpu_forward_choice", lambda *a: choice)
    for shape, k, stride, act, residual, cl in [((2, 5, 9, 7), 3, 1, "silu", True, False),
                                               ((1, 4, 11, 8), 5, 2, "gelu", False, True),
                                               ((2, 3, 6, 6), 7, 1, None, True, True)]:
        x, w, b = make(shape, k, dtype=torch.float64)
        if cl:
            x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        y = dwconv2d(x, w, b, stride, None, act, residual)
        ref = eager(x, w, b, stride, None, act, residual)
        torch.testing.assert_close(y, ref)
        assert y.is_contiguous(memory_format=torch.channels_last) == cl
        dy = torch.randn_like(y)
        for g, r in zip(torch.autograd.grad(y, (x, w, b), dy), torch.autograd.grad(ref, (x, w, b), dy)):
            torch.testing.assert_close(g, r)


def test_backward_skips_unneeded_gradients():
    """Only the gradients autograd asks for are returned (and the others are not computed)."""
    x, w, b = make((1, 2, 6, 6), 3)
    for backend in [p.id for p in CPU_BACKENDS if backend_ok(p.id)]:
        with fastvit_ops.backend(backend):
            y = dwconv2d(x, w.detach(), None)
            (gx,) = torch.autograd.grad(y.sum(), (x,))
            y = dwconv2d(x.detach(), w, b)
            gw, gb = torch.autograd.grad(y.sum(), (w, b))
        ref = eager(x, w, b)
        rx, rw, rb = torch.autograd.grad(ref.sum(), (x, w, b))
        torch.testing.assert_close(gx, rx)
        torch.testing.assert_close(gw, rw)
        torch.testing.assert_close(gb, rb)


# ---- bad input ---------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 4, 8, 8)
    w = torch.randn(4, 1, 3, 3)
    with pytest.raises(ValueError, match="weight: kernel size must be odd"):
        dwconv2d(x, torch.randn(4, 1, 4, 4))
    with pytest.raises(ValueError, match="weight: kernel size must be odd"):
        dwconv2d(torch.randn(1, 4, 40, 40), torch.randn(4, 1, 33, 33))
    with pytest.raises(ValueError, match=r"weight: expected shape \(C, 1, k, k\)"):
        dwconv2d(x, torch.randn(4, 2, 3, 3))
    with pytest.raises(ValueError, match=r"weight: expected shape \(C, 1, k, k\)"):
        dwconv2d(x, torch.randn(5, 1, 3, 3))
    with pytest.raises(ValueError, match=r"weight: expected shape \(C, 1, k, k\)"):
        dwconv2d(x, torch.randn(4, 1, 3, 5))
    with pytest.raises(ValueError, match="stride: expected one of"):
        dwconv2d(x, w, stride=3)
    with pytest.raises(ValueError, match="stride: expected an int or a pair of equal ints"):
        dwconv2d(x, w, stride=(1, 2))
    with pytest.raises(TypeError, match="stride: expected an int"):
        dwconv2d(x, w, stride=1.0)
    with pytest.raises(ValueError, match="padding: expected 0 <= padding < k"):
        dwconv2d(x, w, padding=3)
    with pytest.raises(ValueError, match="padding: expected 0 <= padding < k"):
        dwconv2d(x, w, padding=-1)
    with pytest.raises(TypeError, match="weight: expected dtype"):
        dwconv2d(x, w.double())
    with pytest.raises(TypeError, match="bias: expected dtype"):
        dwconv2d(x, w, torch.randn(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="weight: expected device"):
        dwconv2d(x, w.to("meta"))
    with pytest.raises(ValueError, match=r"bias: expected shape \(4,\)"):
        dwconv2d(x, w, torch.randn(5))
    with pytest.raises(ValueError, match="x: expected a 4-D tensor"):
        dwconv2d(torch.randn(4, 8, 8), w)
    with pytest.raises(TypeError, match="x: expected dtype"):
        dwconv2d(x.int(), w)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        dwconv2d([1.0], w)
    with pytest.raises(ValueError, match="activation: expected one of"):
        dwconv2d(x, w, activation="relu")
    with pytest.raises(ValueError, match="residual: needs stride 1"):
        dwconv2d(x, w, stride=2, residual=True)
    with pytest.raises(ValueError, match="residual: needs stride 1"):
        dwconv2d(x, w, padding=0, residual=True)
    with pytest.raises(ValueError, match="x: spatial size"):
        dwconv2d(torch.randn(1, 4, 2, 8), w, padding=0)
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        with fastvit_ops.backend("cuda"):
            dwconv2d(x, w)


def test_compiled_kernels_reject_bad_arguments():
    """The C++ op checks its own arguments too (it can be called directly through torch.ops)."""
    if not backend_ok("cpu"):
        pytest.skip("the C++ extension is not built")
    x, w = torch.randn(1, 2, 5, 5), torch.randn(2, 1, 3, 3)
    op = torch.ops.fastvit_ops._dwconv2d_forward
    with pytest.raises(RuntimeError, match="stride must be 1 or 2"):
        op(x, w, None, 3, 1, 0, False)
    with pytest.raises(RuntimeError, match="kernel size must be odd"):
        op(x, torch.randn(2, 1, 2, 2), None, 1, 0, 0, False)
    with pytest.raises(RuntimeError, match="residual needs stride 1"):
        op(x, w, None, 2, 1, 0, True)


# ---- the nn module -----------------------------------------------------------------------------------------
def test_module_is_a_drop_in():
    torch.manual_seed(0)
    for stride, bias, padding in ((1, True, None), (2, False, None), (1, True, 0)):
        ref = RefDepthwiseConv2d(6, 5, stride=stride, bias=bias, padding=padding).double()
        mod = DepthwiseConv2d(6, 5, stride=stride, bias=bias, padding=padding).double()
        assert isinstance(mod, RefDepthwiseConv2d)
        assert list(mod.state_dict()) == list(ref.state_dict())
        mod.load_state_dict(ref.state_dict(), strict=True)
        x = torch.randn(2, 6, 11, 10, dtype=torch.float64)
        torch.testing.assert_close(mod(x), ref(x))
        torch.testing.assert_close(mod(x, activation="gelu"), F.gelu(ref(x)))
    mod = DepthwiseConv2d(6, 3).double()
    x = torch.randn(1, 6, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(mod(x, residual=True), x + F.conv2d(x, mod.weight, mod.bias, 1, 1, 1, 6))
    with pytest.raises(ValueError, match="kernel_size"):
        DepthwiseConv2d(4, 4)
    with pytest.raises(ValueError, match="stride"):
        DepthwiseConv2d(4, 3, stride=3)


def test_module_from_conv():
    conv = nn.Conv2d(8, 8, 7, stride=2, padding=3, groups=8).double()
    mod = DepthwiseConv2d.from_conv(conv)
    x = torch.randn(2, 8, 13, 12, dtype=torch.float64)
    torch.testing.assert_close(mod(x), conv(x))
    assert mod.weight.dtype == torch.float64 and mod.weight is not conv.weight
    same = DepthwiseConv2d.from_conv(nn.Conv2d(4, 4, 3, padding="same", groups=4, bias=False))
    assert same.padding == (1, 1) and same.bias is None
    with pytest.raises(TypeError, match="conv: expected an nn.Conv2d"):
        DepthwiseConv2d.from_conv(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="depthwise"):
        DepthwiseConv2d.from_conv(nn.Conv2d(4, 8, 3, groups=4))
    with pytest.raises(ValueError, match="dilation"):
        DepthwiseConv2d.from_conv(nn.Conv2d(4, 4, 3, dilation=2, groups=4))
    with pytest.raises(ValueError, match="padding_mode"):
        DepthwiseConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect", groups=4))
    with pytest.raises(ValueError, match="square"):
        DepthwiseConv2d.from_conv(nn.Conv2d(4, 4, (3, 5), groups=4))
    with pytest.raises(ValueError, match="kernel_size"):
        DepthwiseConv2d.from_conv(nn.Conv2d(4, 4, 2, groups=4))


def test_module_fold_bn():
    mod = DepthwiseConv2d(6, 3, stride=2, bias=False).double()
    bn = nn.BatchNorm2d(6).double()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    bn.eval()
    folded = mod.fold_bn(bn)
    x = torch.randn(2, 6, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(folded(x), bn(mod(x)))
    assert folded.bias is not None and mod.bias is None
    with pytest.raises(ValueError, match="bn: expected 6 features"):
        mod.fold_bn(nn.BatchNorm2d(5))
    with pytest.raises(ValueError, match="running statistics"):
        mod.fold_bn(nn.BatchNorm2d(6, track_running_stats=False))
    with pytest.raises(TypeError, match="bn: expected an nn.BatchNorm2d"):
        mod.fold_bn(nn.LayerNorm(6))


# ---- GPU (run where a CUDA device is lent) ---------------------------------------------------------------
GPU_CASES = [((4, 32, 56, 56), 3, 1, None, True), ((4, 80, 28, 28), 5, 2, None, False),
             ((4, 160, 14, 14), 7, 1, "silu", False), ((4, 256, 7, 7), 9, 1, "gelu", True),
             ((2, 64, 32, 32), 31, 1, None, False), ((2, 32, 17, 23), 11, 2, "gelu", False)]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", backends_for("cuda") if HAS_CUDA else [])
def test_cuda_error_rule(backend, dtype):
    for shape, k, stride, act, residual in GPU_CASES:
        x64, w64, b64 = (t.detach() for t in make(shape, k, device="cuda", scale=2.0))
        x, w, b = x64.to(dtype), w64.to(dtype), b64.to(dtype)
        ins64 = [t.double().requires_grad_() for t in (x, w, b)]
        exact = eager(*ins64, stride, None, act, residual)
        dy = torch.randn(exact.shape, device="cuda").to(dtype)
        exact_g = torch.autograd.grad(exact, ins64, dy.double())
        ins = [t.clone().requires_grad_() for t in (x, w, b)]
        with fastvit_ops.backend(backend):
            out = dwconv2d(*ins, stride, None, act, residual)
            got_g = torch.autograd.grad(out, ins, dy)
        ins_e = [t.clone().requires_grad_() for t in (x, w, b)]
        ref = eager(*ins_e, stride, None, act, residual)
        ref_g = torch.autograd.grad(ref, ins_e, dy)
        assert_error_rule(f"forward {shape} k={k}", out, ref, exact)
        for name, g, r, e in zip(("dx", "dweight", "dbias"), got_g, ref_g, exact_g):
            assert_error_rule(f"{name} {shape} k={k}", g, r, e)


@requires_cuda
@pytest.mark.parametrize("backend", backends_for("cuda") if HAS_CUDA else [])
def test_cuda_gradcheck_and_layouts(backend):
    for k, stride, act, residual in ((3, 1, "silu", True), (5, 2, "gelu", False), (11, 1, None, False)):
        x, w, b = make((1, 2, 7, 9), k, device="cuda")
        with fastvit_ops.backend(backend):
            assert torch.autograd.gradcheck(lambda x_, w_, b_: dwconv2d(x_, w_, b_, stride, None, act, residual),
                                            (x, w, b))
    x, w, b = make((2, 8, 12, 10), 5, device="cuda", dtype=torch.float32)
    xcl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    with fastvit_ops.backend(backend):
        y = dwconv2d(xcl, w, b, 1, None, "gelu", True)
        (gx,) = torch.autograd.grad(y.sum(), (xcl,))
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, eager(x, w, b, 1, None, "gelu", True))
    torch.testing.assert_close(gx, torch.autograd.grad(eager(x, w, b, 1, None, "gelu", True).sum(), (x,))[0])


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_half_precision_weight_gradient_of_padding_only_taps(backend):
    """bf16, a 1×1 map, k = 3, stride 2, padding 1: only the centre tap sees data, the other eight
    weight gradients are exactly 0. torch's CPU bf16 depthwise backward (which the reference
    backend called) left them uninitialised (garbage or NaN in 49 of 50 calls, found by the
    conv_projection_qkv property test); every backend must give 0."""
    C = 5
    for _ in range(20):
        junk = [torch.full((n,), float("nan"), dtype=torch.bfloat16) for n in (45, 64, 128, 1024)]
        del junk  # freed NaN blocks for the allocator to hand out again
        tokens = torch.randn(1, 2, C).bfloat16()
        x = tokens[:, 1:].transpose(1, 2).reshape(1, C, 1, 1).requires_grad_()
        w = torch.randn(C, 1, 3, 3).bfloat16().requires_grad_()
        with fastvit_ops.backend(backend):
            y = fastvit_ops.dwconv2d(x, w, None, 2, 1)
        dy = torch.randn(1, 2, C).bfloat16()[:, 1:].transpose(1, 2).reshape(1, C, 1, 1)  # a token view too
        (dw,) = torch.autograd.grad(y, w, dy)
        assert torch.isfinite(dw).all(), dw
        assert (dw.reshape(C, 9)[:, [0, 1, 2, 3, 5, 6, 7, 8]] == 0).all(), dw


def test_reference_survives_torch_bf16_channels_last_hang():
    """torch's oneDNN bf16 depthwise forward on a channels_last input never returns at some
    shapes (k = 31, padding 25, (3, 4, 8, 11); it hung a CI run in the property tests). The
    reference backend convolves such bf16 shapes in fp32 and rounds once: it must return, and
    match the fp32 result rounded to bf16. In a subprocess, so a regression fails instead of hanging."""
    code = ("import torch\n"
            "from fastvit_ops.ops import dwconv as dw\n"
            "g = torch.Generator().manual_seed(0)\n"
            "x = torch.randn(3, 4, 8, 11, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)\n"
            "w, b = torch.randn(4, 1, 31, 31, generator=g).bfloat16(), torch.randn(4, generator=g).bfloat16()\n"
            "y = dw.reference(x, w, b, 1, 25)\n"
            "want = torch.nn.functional.conv2d(x.float(), w.float(), b.float(), 1, 25, 1, 4).bfloat16()\n"
            "assert y.dtype == torch.bfloat16 and torch.equal(y, want)\n"
            "print('ok')\n")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the reference depthwise conv did not return within 120 s (bf16, channels_last, k = 31)")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
