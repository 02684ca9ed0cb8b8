"""The Triton kernels' GPU code paths, run under the interpreter at small shapes: the block sizes a
GPU launch uses (multi-tile planes, several query/key tiles, split walks) that the interpreter's
own one-tile configs never reach. Plus the launch-grid arithmetic at sizes users run (checked
without running anything) and 64-bit offsets, which a tiny kernel given a huge stride exercises.
"""
import pytest
import torch

import fastvit_ops
from conftest import assert_error_rule
from fastvit_ops._availability import interpreting
from fastvit_ops.ops import attention as attn_op
from fastvit_ops.ops import dwconv as dw_op
from fastvit_ops.ops import global_context as gc_op

pytestmark = pytest.mark.skipif(
    not (interpreting() and fastvit_ops.backend_available("triton", torch.device("cpu"))[0]),
    reason="runs the Triton kernels under TRITON_INTERPRET=1 (the CPU test setup)")


def _kernels(name):
    import importlib

    return importlib.import_module(f"fastvit_ops.kernels.{name}")


# ---- depthwise conv: every GPU autotune config, multi-tile planes --------------------------------
DW_CASES = [  # (shape, k, stride, padding, act, residual)
    ((2, 3, 19, 70), 3, 1, 1, 0, True),
    ((2, 3, 19, 70), 5, 2, 2, 0, False),
    ((1, 2, 21, 37), 7, 1, 3, 1, False),
    ((1, 2, 18, 35), 5, 2, 1, 2, False),   # padding other than k // 2
]


N_DW_CONFIGS = 6  # len(kernels.dwconv.GPU_CONFIGS); kernels cannot be imported at collection without Triton


def test_dwconv_every_gpu_config_is_tested():
    assert len(_kernels("dwconv").GPU_CONFIGS) == N_DW_CONFIGS


@pytest.mark.parametrize("ci", range(N_DW_CONFIGS), ids=lambda i: f"config{i}")
@pytest.mark.parametrize("case", DW_CASES, ids=lambda c: f"{c[0]}-k{c[1]}s{c[2]}p{c[3]}a{c[4]}r{int(c[5])}")
def test_dwconv_gpu_configs(ci, case):
    k_mod = _kernels("dwconv")
    config = k_mod.GPU_CONFIGS[ci]
    shape, k, stride, padding, act, residual = case
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(shape[1], 1, k, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    name = (None, "silu", "gelu")[act]
    ref = dw_op.reference(x, w, b, stride, padding, name, residual)
    dy = torch.randn_like(ref)
    grads = torch.autograd.grad(ref, (x, w, b), dy)
    with torch.no_grad():
        y = k_mod.dwconv_forward(x, w, b, stride, padding, act, residual, config=config)
        dx, dw, db = k_mod.dwconv_backward(dy, x, w, b, stride, padding, act, residual, config=config)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip((dx, dw, db), grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", ["channels_last", "strided_view", "grad_channels_last"])
@pytest.mark.parametrize("stride,act,residual", [(1, 1, True), (2, 2, False)])
def test_dwconv_reads_any_layout_in_place(layout, stride, act, residual):
    """x and grad are read through their strides: channels_last comes back channels_last (no
    NCHW copy in or out), a non-dense view is read where it lies, and the values are those of the
    NCHW-contiguous call."""
    k_mod = _kernels("dwconv")
    base = torch.randn(2, 6, 11, 13, dtype=torch.float64)
    if layout == "strided_view":
        x = torch.randn(2, 12, 11, 26, dtype=torch.float64)[:, ::2, :, ::2]
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last":
        x = base.to(memory_format=torch.channels_last)
    else:
        x = base
    w = torch.randn(6, 1, 5, 5, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    xc = x.contiguous()
    cfg = k_mod.GPU_CONFIGS[1]
    y = k_mod.dwconv_forward(x, w, b, stride, 2, act, residual, config=cfg)
    y_ref = k_mod.dwconv_forward(xc, w, b, stride, 2, act, residual, config=cfg)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    dy = torch.randn_like(y_ref)
    if layout != "strided_view":
        dy = dy.to(memory_format=torch.channels_last)
    got = k_mod.dwconv_backward(dy, x, w, b, stride, 2, act, residual, config=cfg)
    want = k_mod.dwconv_backward(dy.contiguous(), xc, w, b, stride, 2, act, residual, config=cfg)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=0, atol=0)
    assert got[0].is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


def test_dwconv_k31_gpu_tile():
    k_mod = _kernels("dwconv")
    x = torch.randn(1, 2, 34, 40, dtype=torch.float64)
    w = torch.randn(2, 1, 31, 31, dtype=torch.float64, requires_grad=True)
    xr = x.clone().requires_grad_()
    ref = dw_op.reference(xr, w, None, 1, 15)
    dy = torch.randn_like(ref)
    gx, gw = torch.autograd.grad(ref, (xr, w), dy)
    with torch.no_grad():
        cfg = k_mod.GPU_CONFIGS[0]
        torch.testing.assert_close(k_mod.dwconv_forward(x, w, None, 1, 15, 0, False, config=cfg), ref)
        dx, dw, _ = k_mod.dwconv_backward(dy, x, w, None, 1, 15, 0, False, config=cfg)
    torch.testing.assert_close(dx, gx)
    torch.testing.assert_close(dw, gw)


# ---- attention: GPU block sizes (one key tile with a split walk; several key tiles) ----------------
ATTN_CASES = [  # (b, h, n, m, d, gate)
    (1, 2, 70, 49, 16, True),     # FAT-like: one key tile, 3 query tiles walked by a split
    (1, 1, 40, 70, 20, False),    # several key tiles (query side + key side kernels)
    (1, 1, 40, 70, 20, True),     # ... with the gate (the stored gate-modified dO)
    (2, 1, 33, 50, 64, False),    # d = 64 in fp32: 32-key tiles, so M = 50 takes two
]


@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "b{}h{}n{}m{}d{}{}".format(*c[:5], "g" if c[5] else ""))
def test_attention_gpu_blocks(case, monkeypatch, request):
    from properties import KNOWN_DEFECTS

    if ("downsampled_attention", "triton") in KNOWN_DEFECTS:
        # The Triton attention's known fp32 outliers (tests/ops/test_known_defects.py): at a random
        # seed one output element measured 4.1 ulp of the scale (eager 0.7) in CI, over the rule's
        # 4-ulp floor. Not strict (it depends on the draw). A wrong block walk is off by far more:
        # _gross below fails the test for that (pytest.fail, not an AssertionError).
        request.applymarker(pytest.mark.xfail(strict=False, raises=AssertionError,
                                              reason="known Triton attention fp32 defect (test_known_defects.py)"))
    kern = _kernels("attention")
    real = kern.blocks
    monkeypatch.setattr(kern, "blocks", lambda n, m, d, dtype, gpu=None: real(n, m, d, dtype, gpu=True))
    b, h, n, m, d, gate = case
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for s in (n, m, m))
    g = torch.randn(b, h, n, d, requires_grad=True) if gate else None
    leaves = [q, k, v] + ([g] if gate else [])
    with fastvit_ops.backend("triton"):
        out = fastvit_ops.ops.attention.attention_core(q, k, v, 0.3, g)
    eager = attn_op.reference(q, k, v, 0.3, g)
    ex_leaves = [t.detach().double().requires_grad_() for t in leaves]
    exact = attn_op.reference(*ex_leaves[:3], 0.3, ex_leaves[3] if gate else None)
    dy = torch.randn_like(out)
    got = [out] + list(torch.autograd.grad(out, leaves, dy))
    want = [exact] + list(torch.autograd.grad(exact, ex_leaves, dy.double()))
    yard = [eager] + list(torch.autograd.grad(eager, leaves, dy))
    for name, a, e, x in zip(["out"] + ["d" + c for c in "q k v g".split()], got, yard, want):
        _gross(f"attention {name}", a, x)
    for name, a, e, x in zip(["out"] + ["d" + c for c in "q k v g".split()], got, yard, want):
        assert_error_rule(f"attention {name}", a, e, x)


def _gross(name, got, exact):
    """Errors of a wrong block walk (a key or query tile missed or counted twice), not rounding:
    over 1e-4 of the tensor's scale."""
    err, scale = (got.detach().double() - exact.detach()).abs().max().item(), exact.detach().abs().max().item()
    if not err <= 1e-4 * max(scale, 1e-30):
        pytest.fail(f"{name}: error {err:.3g} at scale {scale:.3g}")


# ---- global context: GPU token blocks (several per sample) ---------------------------------------
def test_global_context_gpu_blocks(monkeypatch):
    kgc = _kernels("global_context")
    real = kgc._blocks
    monkeypatch.setattr(kgc, "_blocks", lambda d, N, gpu=None: real(d, N, gpu=True))
    assert real(4, 600, gpu=True)[1] < 600  # the test shape spans several token blocks
    x = torch.randn(2, 32, 20, 30, dtype=torch.float64, requires_grad=True)
    ps = [torch.randn(8, 32, dtype=torch.float64) / 6, torch.randn(8, dtype=torch.float64),
          torch.randn(32, 4, dtype=torch.float64) / 2, torch.randn(32, dtype=torch.float64),
          torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)]
    ps = [p.requires_grad_() for p in ps]
    with fastvit_ops.backend("triton"):
        y = fastvit_ops.global_context(x, *ps)
    ref = gc_op.reference(x, ps[4], ps[5], 8, 1e-5, tuple(ps[:4]))
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)
    dy = torch.randn_like(y)
    for a, e in zip(torch.autograd.grad(y, [x] + ps, dy), torch.autograd.grad(ref, [x] + ps, dy)):
        torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-8)


# ---- launch grids at the sizes users run (computed, not launched) --------------------------------
def test_dwconv_grids_fit_cuda_limits_at_batch_256_k31_224():
    k_mod = _kernels("dwconv")
    B, C, H, W, K = 256, 384, 224, 224, 31
    for cfg in k_mod.GPU_CONFIGS:
        bh, bw = cfg.kwargs["BH"], cfg.kwargs["BW"]
        (n,) = k_mod.fwd_grid(B, C, H, W, bh, bw)
        assert 0 < n <= k_mod.MAX_GRID_X
        (n,) = k_mod.dgrad_grid(B, C, H, W, 2, bh, bw)
        assert 0 < n <= k_mod.MAX_GRID_X
    bh, bw, _ = k_mod.wgrad_tile(K, gpu=True)
    # The old wgrad grid put B·tiles on axis 1: 256·112·7 = 200,704 > 65,535 (failed from batch 84).
    assert B * -(-H // bh) * -(-W // bw) > k_mod.MAX_GRID_Y
    for sms in (1, 108, 132, 1000):
        c, split = k_mod.wgrad_grid(B, C, H, W, bh, bw, sms)
        assert c == C and 1 <= split <= k_mod.MAX_GRID_Y
    assert k_mod.wgrad_grid(B, 1, H, W, bh, bw, 132)[1] <= k_mod.MAX_GRID_Y


def test_too_large_inputs_fail_before_any_launch():
    k_mod = _kernels("dwconv")
    with pytest.raises(ValueError, match="x: .* programs, over CUDA's"):
        k_mod.fwd_grid(2**20, 4096, 224, 224, 8, 32)
    x = torch.empty(2**16, 2**12, 64, 64, device="meta")  # 2^40 outputs: never allocated, never launched
    with pytest.raises(ValueError, match="programs, over CUDA's"):
        k_mod.dwconv_forward(x, torch.empty(2**12, 1, 3, 3, device="meta"), None, 1, 1, 0, False)


def test_attention_grids_fit_cuda_limits():
    kern = _kernels("attention")
    for (b, h, n, m, d) in [(256, 1, 3136, 784, 64), (256, 16, 49, 49, 16), (4096, 2, 3136, 49, 16)]:
        for dtype in (torch.float32, torch.bfloat16):
            bn, bm, bd, warps, _ = kern.blocks(n, m, d, dtype, gpu=True)
            assert b * h * -(-n // bn) <= kern.MAX_GRID_X
            q_tiles, kv_programs = -(-n // bn), b * h * -(-m // bm)
            assert kv_programs <= kern.MAX_GRID_X
            split = kern.bwd_split(kv_programs, q_tiles, 132)
            # The split keeps the key-side kernel's grid within axis 1's limit, never splits finer
            # than the query tiles, and gives 132 SMs at least ~4 programs each when there are tiles.
            assert split <= kern.MAX_GRID_Y and split <= q_tiles
            assert kv_programs * split >= min(4 * 132, kv_programs * q_tiles)
    # A few key-side programs (one head, one sample) are split over the query tiles to fill the SMs.
    assert kern.bwd_split(1, 98, 132) == 98 and kern.bwd_split(1, 98, 8) == 32


# ---- 64-bit offsets --------------------------------------------------------------------------------
def test_attention_offsets_are_64_bit():
    """q's batch stride is 2^30 elements (an int32), so b·stride passes 2^31 at b = 2: int32
    arithmetic wraps there. The storage is 8 GiB of address space of which a few pages are
    touched (the OS backs pages lazily)."""
    kern = _kernels("attention")
    b, n, m, d = 3, 20, 16, 16
    try:
        big = torch.empty(2 * 2**30 + n * d, dtype=torch.float32)
    except (RuntimeError, MemoryError):
        pytest.skip("8 GiB of address space not available")
    q = big.as_strided((b, 1, n, d), (2**30, n * d, d, 1))
    for i in range(b):
        q[i].copy_(torch.randn(1, n, d))
    k, v = torch.randn(b, 1, m, d), torch.randn(b, 1, m, d)
    out = torch.full((b, 1, n, d), float("nan"))
    lse = torch.empty(b, 1, n, 2)
    kern.attention_forward(q, k, v, None, out, lse, 0.25)
    torch.testing.assert_close(out, attn_op.reference(q.clone(), k, v, 0.25), rtol=1e-5, atol=1e-5)
    dy = torch.randn(b, 1, n, d)
    grads = [torch.empty(b, 1, n, d), torch.empty_like(k), torch.empty_like(v)]
    kern.attention_backward(dy, q, k, v, None, lse, grads[0], grads[1], grads[2], grads[0], 0.25)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(attn_op.reference(*leaves, 0.25), leaves, dy)
    for got, w in zip(grads, want):
        torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-5)
