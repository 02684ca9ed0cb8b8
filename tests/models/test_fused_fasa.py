"""fastvit_ops.fused_fasa(x, fasa): the whole FASA forward (docs/fat.md) for any module with FASA's
attributes equals the reference FASA(x), values and gradients, at every FAT-B0 stage."""
import copy

import pytest
import torch
from torch import nn

import fastvit_ops
from conftest import randomize_
from fastvit_ops.nn.fat import FASA_ATTRIBUTES
from fastvit_ops.reference import fat as ref_fat

# FAT-B0 stages (reference CONFIGS["fat_b0"]): (dim, kernel, heads, window, the map at 128² input).
CFG = ref_fat.CONFIGS["fat_b0"]
STAGES = [(d, k, h, w, (32 >> i, 32 >> i)) for i, (d, k, h, w) in enumerate(
    zip(CFG["embed_dims"], CFG["kernel_sizes"], CFG["num_heads"], CFG["window_sizes"]))]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


class FASA(nn.Module):  # the authors' class stand-in: same name and attributes, not ours, no fused forward
    def __init__(self, *args):
        super().__init__()
        self.__dict__.update(ref_fat.FASA(*args).__dict__)

    forward, attention, modulate = ref_fat.FASA.forward, ref_fat.FASA.attention, ref_fat.FASA.modulate


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _check(ref, mod, x, train, dtype):
    ref.train(train), mod.train(train)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yf = ref(xr), fastvit_ops.fused_fasa(xf, mod)
    assert yf.dtype == yr.dtype and yf.shape == yr.shape
    assert rel(yf, yr) <= TOL[dtype], f"output rel error {rel(yf, yr):.3g}"
    dy = torch.randn_like(yr)
    names = [n for n, _ in ref.named_parameters()] + ["x"]
    gr = torch.autograd.grad(yr, list(ref.parameters()) + [xr], dy)
    gf = torch.autograd.grad(yf, list(mod.parameters()) + [xf], dy)
    # Relative to each gradient's own norm, with a floor of a few ulps of the largest gradient: a
    # conv bias right before a train-mode BN has an analytically zero gradient (rounding noise).
    big = max(g.double().norm().item() for g in gr)
    gtol = 1e-4 if dtype == torch.float32 else 1e-10
    floor = 4 * torch.finfo(dtype).eps * big
    for n, a, b in zip(names, gf, gr):
        err = (a.double() - b.double()).norm().item()
        assert err <= gtol * b.double().norm().item() + floor, f"grad {n}: error {err:.3g}"
    if train:  # the pool's BN running statistics advance identically
        for (n, a), b in zip(mod.named_buffers(), ref.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("odd", [False, True], ids=["stage", "27x25"])
@pytest.mark.parametrize("stage", STAGES, ids=[f"stage{i + 1}" for i in range(4)])
def test_fused_fasa_equals_reference(stage, odd, train, dtype):
    dim, k, heads, window, hw = stage
    ref = randomize_(ref_fat.FASA(dim, k, heads, window)).to(dtype)
    mod = copy.deepcopy(ref)  # the reference module itself, run through fused_fasa
    x = torch.randn(2, dim, *((27, 25) if odd else hw), dtype=dtype)
    _check(ref, mod, x, train, dtype)


@pytest.mark.parametrize("kind", ["ours", "authors"])
def test_fused_fasa_any_fasa_module(kind):
    """Our fused FASA (whose forward is fused_fasa) and an authors'-code FASA give the same."""
    ref = randomize_(ref_fat.FASA(80, 5, 5, 4))
    if kind == "ours":
        mod = fastvit_ops.nn.FASA(80, 5, 5, 4)
    else:
        mod = FASA(80, 5, 5, 4)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(2, 80, 15, 13)
    _check(ref, mod, x, True, torch.float32)
    _check(ref, mod, x, False, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(mod.eval()(x), ref.eval()(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("train", [False, True])
def test_fused_fasa_channels_last_input(monkeypatch, train):
    """channels_last input: the token-layout attention path (no transposes), same values and grads."""
    import fastvit_ops.nn.fat as nfat
    layouts = []
    orig = nfat.attention_core
    monkeypatch.setattr(nfat, "attention_core", lambda *a: layouts.append(a[-1]) or orig(*a))
    ref = randomize_(ref_fat.FASA(32, 3, 2, 8)).double().train(train)
    x = torch.randn(2, 32, 19, 21, dtype=torch.float64).to(memory_format=torch.channels_last).requires_grad_()
    y = fastvit_ops.fused_fasa(x, ref)
    assert layouts == [nfat.TOKENS] and y.is_contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x] + list(ref.parameters()), dy)
    for m in ref.modules():  # the reference forward again from the same BN state
        if isinstance(m, torch.nn.BatchNorm2d) and train:
            m.reset_running_stats()
    want_y = ref(x)
    want = torch.autograd.grad(want_y, [x] + list(ref.parameters()), dy)
    assert rel(y, want_y) <= 1e-12
    for a, b in zip(got, want):  # atol: conv biases ahead of train-mode BN get exactly-zero grads
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_fused_fasa_uses_the_fused_kernels(monkeypatch):
    """The attention (gate in its epilogue, channels-first) and the SiLU depthwise conv are used."""
    import fastvit_ops.nn.fat as nfat
    calls = []
    orig_att, orig_dw = nfat.attention_core, nfat._dwconv2d
    monkeypatch.setattr(nfat, "attention_core", lambda *a: calls.append(("att", a[-1], a[4] is not None))
                        or orig_att(*a))
    monkeypatch.setattr(nfat, "_dwconv2d", lambda *a: calls.append(("dw", a[-1])) or orig_dw(*a))
    fastvit_ops.fused_fasa(torch.randn(1, 32, 16, 16), ref_fat.FASA(32, 3, 2, 8).eval())
    assert ("att", nfat.CHANNELS_FIRST, True) in calls and ("dw", "silu") in calls


def test_fused_fasa_errors():
    m = ref_fat.FASA(32, 3, 2, 4)
    bare = nn.Module()
    bare.q = m.q
    with pytest.raises(TypeError, match="lacks the FASA attribute.*kv.*local_mixer"):
        fastvit_ops.fused_fasa(torch.randn(1, 32, 8, 8), bare)
    with pytest.raises(TypeError, match="fasa: expected an nn.Module"):
        fastvit_ops.fused_fasa(torch.randn(1, 32, 8, 8), "FASA")
    with pytest.raises(ValueError, match="x: expected 32 channels"):
        fastvit_ops.fused_fasa(torch.randn(1, 16, 8, 8), m)
    with pytest.raises(ValueError, match="x: expected a 4-D"):
        fastvit_ops.fused_fasa(torch.randn(32, 8, 8), m)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        fastvit_ops.fused_fasa([1.0], m)
    assert set(FASA_ATTRIBUTES) >= {"q", "kv", "local_mixer", "mixer", "pool", "dim_head", "window_size"}


def test_fused_fasa_exported():
    assert fastvit_ops.fused_fasa is fastvit_ops.nn.fat.fused_fasa
    assert "fused_fasa" in fastvit_ops.__all__ and "fused_fasa" in fastvit_ops.__doc__
