"""fastvit_ops.fuse_for_inference: eval-mode BatchNorms folded into adjacent convs, outputs kept."""
import pytest
import torch
from torch import nn

import fastvit_ops
from conftest import randomize_
from fastvit_ops import models
from fastvit_ops.fuse import count_batchnorms
from fastvit_ops.reference import fat as ref_fat


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("name,converted", [("fat_b0", False), ("fat_b0", True), ("cvt_13", True),
                                            ("fcvit_tiny", True), ("fcvit_tiny", False)])
def test_fused_model_keeps_eval_outputs(name, converted):
    model = randomize_(models.create(name, reference=True, num_classes=10)).eval()
    if converted:
        model = fastvit_ops.convert(model)
    n_bn, n_mod = count_batchnorms(model), len(list(model.modules()))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
        fused = fastvit_ops.fuse_for_inference(model)
        yf = fused(x)
    assert fused is not model and count_batchnorms(model) == n_bn, "inplace=False leaves the input alone"
    assert fused.fastvit_ops_fuse_report["bn_folded"] == n_bn > 0
    assert count_batchnorms(fused) == 0  # every BN of these models sits next to a conv
    assert len(list(fused.modules())) <= n_mod and not fused.training
    assert rel(yf, y) <= 1e-5, f"rel error {rel(yf, y):.3g}"


def test_counts_and_fewer_modules_fat_b0():
    model = models.create("fat_b0", reference=True).eval()
    fused = fastvit_ops.fuse_for_inference(model)
    # stem 4 + pools (stages 1–3: 3+2+1 BNs per block × 2/2/6 blocks = 6+4+6) + 3 downsamples + 12 ConvFFN
    assert fused.fastvit_ops_fuse_report == {"bn_folded": 4 + 16 + 3 + 12}
    # Sequential BNs are removed; ConvFFN.bn becomes Identity (one module each still).
    assert len(list(fused.modules())) == len(list(model.modules())) - (4 + 16 + 3)


def test_inplace_and_training_mode_error():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    with pytest.raises(ValueError, match="model: fuse_for_inference needs eval mode"):
        fastvit_ops.fuse_for_inference(model)
    with pytest.raises(ValueError, match="eval mode"):  # one BN still in training mode
        fastvit_ops.fuse_for_inference(_half_eval())
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        fastvit_ops.fuse_for_inference(None)
    randomize_(model).eval()
    x = torch.randn(2, 3, 9, 7)
    y = model(x)
    out = fastvit_ops.fuse_for_inference(model, inplace=True)
    assert out is model and len(model) == 2 and isinstance(model[1], nn.ReLU)
    assert rel(model(x), y) <= 1e-5


def _half_eval():
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)).eval()
    m[1].train()
    return m


def test_generic_patterns_and_untouched_bns():
    """Dense, depthwise and bias-free convs take the BN after them; BN→1×1 conv (FAT's ConvFFN)
    folds forward; a BN after a non-conv, or before a padded conv, stays."""
    model = nn.Sequential(
        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6),                       # dense, folds
        nn.Conv2d(6, 6, 5, 2, 2, groups=6, bias=False), nn.BatchNorm2d(6),     # depthwise no bias, folds
        nn.ReLU(), nn.BatchNorm2d(6),                                          # stays (after ReLU)
        ref_fat.ConvFFN(6, 12, 5, 1, 6),                                       # bn → fc2, folds
        nn.BatchNorm2d(6, affine=False),                                       # after ConvFFN: stays
    )
    randomize_(model).eval()
    x = torch.randn(2, 4, 11, 13)
    with torch.no_grad():
        y = model(x)
        fused = fastvit_ops.fuse_for_inference(model)
        assert fused.fastvit_ops_fuse_report == {"bn_folded": 3}
        assert count_batchnorms(fused) == 2 and isinstance(fused[4].bn, nn.Identity)
        assert rel(fused(x), y) <= 1e-5


def test_fused_fasa_after_folding():
    """fused_fasa still runs a pool whose BNs were folded away (and equals the reference)."""
    ref = randomize_(ref_fat.FASA(32, 3, 2, 8)).eval()
    fused = fastvit_ops.fuse_for_inference(ref)
    assert count_batchnorms(fused) == 0 and fused.fastvit_ops_fuse_report["bn_folded"] == 3
    x = torch.randn(2, 32, 17, 15)
    with torch.no_grad():
        assert rel(fastvit_ops.fused_fasa(x, fused), ref(x)) <= 1e-5
