"""The fused FAT modules' CPU inference path (fastvit_ops.nn.fat): channels_last, BN folded into the
convs (cached until the parameters change), GELU/ReLU/residual adds as oneDNN post-ops, the
ConvFFN's hidden map in place and in chunks of samples. Same values as the reference modules."""
import copy

import pytest
import torch

import fastvit_ops
from conftest import assert_error_rule, randomize_
from fastvit_ops.nn import fat as fused_fat
from fastvit_ops.nn._pointwise import conv_add_, conv_epilogue
from fastvit_ops.reference import fat as ref_fat

CFG = ref_fat.CONFIGS["fat_b0"]
# (dim, out_dim, kernel, heads, window, stride): every FAT-B0 block configuration.
BLOCKS = [(32, 32, 3, 2, 8, 1), (32, 80, 3, 2, 8, 2), (80, 80, 5, 5, 4, 1), (80, 160, 5, 5, 4, 2),
          (160, 160, 7, 10, 2, 1), (160, 256, 7, 10, 2, 2), (256, 256, 9, 16, 1, 1)]


def _pair(ref_cls, fused_cls, *args):
    ref = randomize_(ref_cls(*args)).eval()
    fused = fused_cls(*args).eval()
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _exact(ref, x):
    with torch.no_grad():
        return copy.deepcopy(ref).double()(x.double())


@pytest.mark.parametrize("cfg", BLOCKS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("size", [(9, 11), (16, 16)])
def test_block_inference_path_matches_reference(cfg, size, monkeypatch):
    dim, out_dim, k, heads, window, stride = cfg
    ref, fused = _pair(ref_fat.FATBlock, fused_fat.FATBlock, dim, out_dim, k, heads, window, 5, 4, stride)
    x = torch.randn(3, dim, *size)
    exact = _exact(ref, x)
    with torch.no_grad():
        y_ref, y = ref(x), fused(x)
    assert fused.__dict__["_fastvit_ops_plan"][1] is not None, "the flat inference plan was not used"
    assert y.is_contiguous(memory_format=torch.channels_last) and y.shape == y_ref.shape
    assert_error_rule(f"FATBlock{cfg}", y, y_ref, exact)
    # The module-by-module inference path (what non-standard blocks run) gives the same result.
    calls = []
    real = fused_fat._ffn_inference
    monkeypatch.setattr(fused_fat, "_block_plan", lambda blk: None)
    monkeypatch.setattr(fused_fat, "_ffn_inference", lambda *a: calls.append(1) or real(*a))
    fused.__dict__.pop("_fastvit_ops_plan")
    with torch.no_grad():
        y2 = fused(x)
    assert calls, "the module inference path was not taken"
    assert_error_rule(f"FATBlock{cfg} module path", y2, y_ref, exact)


def test_non_standard_block_keeps_the_module_path():
    """A block whose norm is not a GroupNorm (say, a user's replacement) runs the module path."""
    ref, fused = _pair(ref_fat.FATBlock, fused_fat.FATBlock, 32, 32, 3, 2, 8, 5, 4, 1)

    class MyNorm(torch.nn.Module):
        def __init__(self, gn):
            super().__init__()
            self.gn = gn

        def forward(self, x):
            return self.gn(x)

    x = torch.randn(2, 32, 9, 9)
    with torch.no_grad():
        fused(x)
        assert fused.__dict__["_fastvit_ops_plan"][1] is not None  # standard until the swap
        # Swapped after the plan was built: the plan must not outlive the structure it read, even
        # though none of the tensors it read changed.
        ref.norm1, fused.norm1 = MyNorm(ref.norm1), MyNorm(copy.deepcopy(fused.norm1))
        with torch.no_grad():
            ref.norm1.gn.weight.mul_(-2.0)
            fused.norm1.gn.weight.mul_(-2.0)
        y_ref, y = ref(x), fused(x)
        assert fused.__dict__["_fastvit_ops_plan"][1] is None  # remembered as non-standard
        torch.testing.assert_close(fused(x), y)
    assert_error_rule("FATBlock with a custom norm", y, y_ref, _exact(ref, x))


def test_block_inference_chunks_the_ffn(monkeypatch):
    """Maps above FFN_CHUNK_BYTES run fc1 → DW → fc2 a few samples at a time, adding into the shortcut."""
    ref, fused = _pair(ref_fat.FATBlock, fused_fat.FATBlock, 32, 32, 3, 2, 8, 5, 4, 1)
    x = torch.randn(5, 32, 12, 12)
    with torch.no_grad():
        whole = fused(x)
        monkeypatch.setattr(fused_fat, "FFN_CHUNK_BYTES", 2 * 128 * 12 * 12 * 4)  # two samples per chunk
        assert fused_fat._ffn_chunk(x, 128) == 2
        chunked = fused(x)
        y_ref = ref(x)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    assert_error_rule("chunked FATBlock", chunked, y_ref, _exact(ref, x))


def test_folds_are_refreshed_when_parameters_change():
    ref, fused = _pair(ref_fat.FATBlock, fused_fat.FATBlock, 80, 160, 5, 5, 4, 5, 4, 2)
    x = torch.randn(2, 80, 10, 10)
    with torch.no_grad():
        fused(x)  # fills the fold cache
        for m in (ref, fused):
            m.ffn.bn.running_var.mul_(3.0)
            m.downsample[1].running_mean.add_(0.5)
            m.ffn.fc2.weight.mul_(-1.0)
            m.attn.pool.bn0.weight.add_(1.0)
        y_ref, y = ref(x), fused(x)
    assert_error_rule("FATBlock after in-place parameter updates", y, y_ref, _exact(ref, x))


def test_block_with_grad_takes_the_differentiable_path():
    ref, fused = _pair(ref_fat.FATBlock, fused_fat.FATBlock, 32, 80, 3, 2, 8, 5, 4, 2)
    x = torch.randn(2, 32, 9, 9)
    y = fused(x)  # eval, grad mode on, parameters require grad: the autograd composition
    assert y.requires_grad and y.is_contiguous()
    y.square().sum().backward()
    ref(x).square().sum().backward()
    for (n, a), b in zip(fused.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("train", [False, True])
def test_convffn_matches_reference(stride, train):
    ref, fused = _pair(ref_fat.ConvFFN, fused_fat.ConvFFN, 48, 192, 5, stride, 64)
    ref.train(train), fused.train(train)
    x = torch.randn(2, 48, 13, 13)
    with torch.no_grad():
        y_ref, y = ref(x), fused(x)
    assert y.is_contiguous(memory_format=torch.channels_last) != train
    assert_error_rule(f"ConvFFN stride {stride} train={train}", y, y_ref,
                      copy.deepcopy(ref).double()(x.double()).detach())


def test_patch_embedding_inference_path():
    ref, fused = _pair(ref_fat.PatchEmbedding, fused_fat.PatchEmbedding, 3, 32)
    x = torch.randn(2, 3, 37, 41)
    with torch.no_grad():
        y_ref, y = ref(x), fused(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_error_rule("PatchEmbedding", y, y_ref, _exact(ref, x))


def test_converted_fat_b0_inference_runs_channels_last():
    ref = randomize_(fastvit_ops.models.create("fat_b0", reference=True)).eval()
    conv = fastvit_ops.convert(ref)
    rep = conv.fastvit_ops_report
    assert rep.get("FATBlock") == 12 and rep.get("ConvFFN") == 12 and rep.get("PatchEmbedding") == 1
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = conv.layers[0](conv.patch_embed(x))
        y_ref, y = ref(x), conv(x)
    assert feats.is_contiguous(memory_format=torch.channels_last)
    assert_error_rule("converted fat_b0 logits", y, y_ref, _exact(ref, x))


# ---- the conv + epilogue helpers --------------------------------------------------------------------------
@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_epilogue_matches_composite(activation, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 24, 7, 9).contiguous(memory_format=fmt)
    w, b = torch.randn(40, 24, 3, 3) * 0.2, torch.randn(40)
    res = torch.randn(3, 40, 4, 5).contiguous(memory_format=fmt)
    act = {None: lambda t: t, "relu": torch.relu, "gelu": torch.nn.functional.gelu}[activation]
    expect = act(torch.nn.functional.conv2d(x, w, b, 2, 1))
    with torch.no_grad():
        for residual in (None, res):
            y = conv_epilogue(x, w, b, 2, 1, activation, residual)
            torch.testing.assert_close(y, expect if residual is None else expect + residual, rtol=1e-5, atol=1e-5)
            assert y.is_contiguous(memory_format=fmt)
    with pytest.raises(ValueError, match="activation"):
        conv_epilogue(x, w, b, activation="tanh")


def test_conv_epilogue_with_grad_is_differentiable_and_conv_add_accumulates():
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(6, 8, 1, 1, requires_grad=True)
    res = torch.randn(2, 6, 5, 5)
    y = conv_epilogue(x, w, None, activation="gelu", residual=res)
    gx, gw = torch.autograd.grad(y.square().sum(), (x, w))
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y2 = torch.nn.functional.gelu(torch.nn.functional.conv2d(x2, w2)) + res
    ex, ew = torch.autograd.grad(y2.square().sum(), (x2, w2))
    torch.testing.assert_close(gx, ex), torch.testing.assert_close(gw, ew)
    with torch.no_grad():
        out = torch.randn(2, 6, 5, 5).contiguous(memory_format=torch.channels_last)
        expect = out + torch.nn.functional.conv2d(x, w)
        r = conv_add_(out[1:], x[1:], w, None)
        assert r.data_ptr() == out[1:].data_ptr()
        torch.testing.assert_close(out, torch.cat([expect[:1] - torch.nn.functional.conv2d(x[:1], w), expect[1:]]),
                                   rtol=1e-5, atol=1e-5)


def test_inference_mode_then_no_grad_then_training_graph():
    """Folds cached under torch.inference_mode serve later no_grad calls; a grad-enabled call takes
    the differentiable path and backpropagates."""
    ref = randomize_(fastvit_ops.models.create("fat_b0", reference=True)).eval()
    conv = fastvit_ops.convert(ref)
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        y_ref = ref(x)
    with torch.inference_mode():
        a = conv(x)
    with torch.no_grad():
        b = conv(x)
    c = conv(x)
    c.square().sum().backward()
    assert all(p.grad is not None for p in conv.parameters() if p.requires_grad)
    exact = _exact(ref, x)
    for name, y in (("inference_mode", a), ("no_grad", b), ("grad", c.detach())):
        assert_error_rule(f"converted fat_b0 under {name}", y, y_ref, exact)


def _reference_and_converted(name="fat_b0"):
    from fastvit_ops import models

    ref = randomize_(models.create(name, reference=True), scale=0.05).eval()
    return ref, fastvit_ops.convert(ref).eval()


@pytest.mark.slow
def test_plan_follows_load_state_dict_assign():
    """Issue reproducer: after an inference call builds the plans, load_state_dict(assign=True)
    replaces every parameter object; the converted model must compute with the new weights (it
    kept the old ones, 1.38 relative off, before the plan was keyed on the module's current
    tensors)."""
    ref, fused = _reference_and_converted()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        fused(x)
    sd2 = {k: v.clone() for k, v in ref.state_dict().items()}
    for k, v in sd2.items():
        if v.is_floating_point():
            v.copy_(torch.rand_like(v) + 0.5 if k.endswith("running_var") else torch.randn_like(v) * 0.05)
    ref.load_state_dict(sd2)
    fused.load_state_dict({k: v.clone() for k, v in sd2.items()}, assign=True)
    with torch.inference_mode():
        y_ref, y = ref(x), fused(x)
    assert_error_rule("converted fat_b0 after load_state_dict(assign=True)", y, y_ref, _exact(ref, x))


def test_plan_follows_replaced_parameter_and_edited_attribute():
    ref, fused = _pair(ref_fat.FATBlock, fused_fat.FATBlock, 32, 32, 3, 2, 8, 5, 4, 1)
    x = torch.randn(2, 32, 9, 9)
    with torch.no_grad():
        fused(x)
        for m in (ref, fused):  # a new Parameter object (the old one untouched) and a new eps
            m.attn.q.weight = torch.nn.Parameter(torch.randn_like(m.attn.q.weight))
            m.norm2.eps = 0.5
        fused.attn.q.weight.data.copy_(ref.attn.q.weight)
        y_ref, y = ref(x), fused(x)
    assert_error_rule("FATBlock after a replaced parameter and a new eps", y, y_ref, _exact(ref, x))


@pytest.mark.slow
def test_converted_model_pickles_after_inference(tmp_path):
    """Issue reproducer: torch.save(model) failed after the first inference call (the plan closure
    is not picklable). The loaded copy computes the same output."""
    ref, fused = _reference_and_converted()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        y = fused(x)
    path = tmp_path / "model.pt"
    torch.save(fused, path)
    loaded = torch.load(path, weights_only=False)
    clone = copy.deepcopy(fused)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)
        torch.testing.assert_close(clone(x), y, rtol=0, atol=0)
