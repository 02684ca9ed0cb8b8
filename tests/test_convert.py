"""fastvit_ops.convert / revert: layers swapped for fused drop-ins, weights and outputs kept."""
import collections

import pytest
import torch
from torch import nn

import fastvit_ops
from fastvit_ops import models
from fastvit_ops.convert import convert, revert
from fastvit_ops.reference import fat as ref_fat
from conftest import randomize_
from fastvit_ops.convert import _pairs
from fastvit_ops.nn.dwconv import DepthwiseConv2d as FusedDW


def _fused_counts(model):
    """{reference class name: count} of the fused drop-ins (and fused depthwise convs) in ``model``."""
    pairs = _pairs()
    by_fused = {f: r.__name__ for r, f in pairs.items()}
    return dict(collections.Counter(by_fused.get(type(m), "DepthwiseConv2d") for m in model.modules()
                                    if type(m) in by_fused or isinstance(m, FusedDW)))


def _convertible_counts(model):
    """{class name: count} of what ``convert`` would swap in ``model``: reference layers and depthwise
    ``nn.Conv2d`` layers the fused conv runs."""
    pairs = _pairs()
    counts = collections.Counter()
    for m in model.modules():
        if type(m) in pairs:
            counts[type(m).__name__] += 1
        elif isinstance(m, nn.Conv2d) and not isinstance(m, FusedDW):
            try:
                FusedDW.from_conv(m)
            except ValueError:
                continue
            counts["DepthwiseConv2d"] += 1
    return dict(counts)


def test_report_check_sees_a_layer_left_unconverted():
    """Negative control: one reference layer put back makes the counts disagree."""
    fused = convert(models.create("fat_b0", reference=True).eval())
    blk = fused.layers[0].blocks[0]
    blk.ffn = revert(blk.ffn)
    assert fused.fastvit_ops_report != _fused_counts(fused)
    assert _convertible_counts(fused)


@pytest.mark.parametrize("name", ["fat_b0", "fcvit_tiny", "cvt_13"])
def test_convert_keeps_outputs_and_state(name):
    ref = models.create(name, reference=True).eval()
    fused = convert(ref)
    assert fused is not ref
    assert list(fused.state_dict()) == list(ref.state_dict())
    fused_types = tuple({*fastvit_ops.nn.FAT_LAYERS.values(), *fastvit_ops.nn.FCVIT_LAYERS.values(),
                         *fastvit_ops.nn.CVT_LAYERS.values()})
    assert not any(isinstance(m, fused_types) for m in ref.modules()), "inplace=False leaves the input alone"
    # The report counts exactly the fused modules now in the model, by the reference class each
    # replaced, and nothing convertible is left behind.
    assert fused.fastvit_ops_report == _fused_counts(fused)
    assert fused.fastvit_ops_report == _convertible_counts(ref)
    assert not _convertible_counts(fused)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-4)


def test_convert_fat_b0_counts_and_grads():
    ref = models.create("fat_b0", reference=True)
    fused = convert(ref)
    rep = fused.fastvit_ops_report
    assert sum(v for k, v in rep.items() if k.startswith("FASA")) == 12  # depths 2+2+6+2
    assert sum(v for k, v in rep.items() if "DepthwiseConv2d" in k or "depthwise" in k) == 55
    x = torch.randn(2, 3, 64, 64)
    fused(x).square().mean().backward()
    ref(x).square().mean().backward()
    for (n, a), b in zip(fused.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_inplace_and_revert_roundtrip():
    model = models.create("fat_b0", reference=True).eval()
    params = [p.data_ptr() for p in model.parameters()]
    out = convert(model, inplace=True)
    assert [p.data_ptr() for p in out.parameters()] == params, "inplace conversion keeps the same tensors"
    back = revert(out)
    assert not any(type(m) in fastvit_ops.nn.FAT_LAYERS.values() for m in back.modules())
    assert back.fastvit_ops_report
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(back(x), out(x), rtol=1e-4, atol=1e-4)


def test_duck_typed_authors_fasa():
    """A class named FASA with the authors' attributes (not ours) is converted by duck typing."""
    class FASA(nn.Module):  # stands in for the authors' class: same name and attributes, not ours
        def __init__(self, *args):
            super().__init__()
            self.__dict__.update(ref_fat.FASA(*args).__dict__)

        forward, attention, modulate = ref_fat.FASA.forward, ref_fat.FASA.attention, ref_fat.FASA.modulate

    AuthorsFASA = FASA
    m = AuthorsFASA(32, 3, 2, 4).eval()
    wrapper = nn.Sequential(m)
    conv = convert(wrapper)
    assert isinstance(conv[0], fastvit_ops.nn.FAT_LAYERS["FASA"])
    assert any("duck-typed" in k for k in conv.fastvit_ops_report)
    x = torch.randn(2, 32, 15, 13)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), wrapper(x), rtol=1e-5, atol=1e-5)


def test_duck_typed_authors_fat_block_stem_and_ffn():
    """Classes named FATBlock, ConvFFN and PatchEmbedding with the authors' attributes (not ours) are
    converted by duck typing, and the converted stem + stride-2 block keep the outputs (they run the
    CPU inference path: channels_last, BNs folded)."""
    def authors(ref_cls):
        cls = type(ref_cls.__name__, (nn.Module,), {"forward": ref_cls.forward})

        def make(*args):
            m = cls()
            m.__dict__.update(ref_cls(*args).__dict__)
            return m
        return make

    stem = authors(ref_fat.PatchEmbedding)(3, 32)
    block = authors(ref_fat.FATBlock)(32, 80, 3, 2, 8, 5, 4, 2)
    block.ffn = authors(ref_fat.ConvFFN)(32, 128, 5, 2, 80)
    model = randomize_(nn.Sequential(stem, block)).eval()
    conv = convert(model)
    rep = conv.fastvit_ops_report
    for name in ("PatchEmbedding", "FATBlock", "ConvFFN"):
        assert isinstance([m for m in conv.modules() if type(m).__name__ == name][0], fastvit_ops.nn.FAT_LAYERS[name])
        assert any(k.startswith(name) and "duck-typed" in k for k in rep), rep
    x = torch.randn(2, 3, 45, 39)
    with torch.no_grad():
        y = conv(x)
        assert y.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y, model(x), rtol=1e-4, atol=1e-4)


def test_plain_depthwise_convs_only():
    model = nn.Sequential(nn.Conv2d(8, 8, 7, padding=3, groups=8), nn.Conv2d(8, 8, 3, padding=1),
                          nn.Conv2d(8, 8, 4, padding=2, groups=8), nn.Conv2d(8, 8, 3, padding=1, dilation=2, groups=8))
    conv = convert(model)
    assert conv.fastvit_ops_report == {"depthwise nn.Conv2d": 1}
    assert type(conv[1]) is nn.Conv2d and type(conv[2]) is nn.Conv2d and type(conv[3]) is nn.Conv2d
    x = torch.randn(1, 8, 9, 11)
    torch.testing.assert_close(conv(x), model(x), rtol=1e-5, atol=1e-5)


def test_convert_rejects_non_modules():
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        convert("fat_b0")
