"""fastvit_ops.nn.pointwise: 1×1 convolutions on large NCHW CPU maps as a GEMM — the convolution's
values and gradients (the error rule against float64), NCHW output, and the GEMM only where it
applies (everything else calls the module)."""
import pytest
import torch
from torch import nn

from conftest import assert_error_rule
from fastvit_ops.nn import pointwise
from fastvit_ops.nn.pointwise import pointwise_conv


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape,cout", [((2, 8, 56, 56), 12), ((1, 5, 57, 61), 3)])
def test_matches_the_convolution(shape, cout, bias):
    conv = nn.Conv2d(shape[1], cout, 1, bias=bias)
    x = torch.randn(shape) * 3
    with torch.no_grad():
        assert pointwise._gemm_applies(conv, x)
        y, y_eager, exact = pointwise_conv(conv, x), conv(x), conv.double()(x.double())
        conv.float()
        assert y.dtype == torch.float32 and y.is_contiguous() and y.shape == y_eager.shape
        assert_error_rule("y", y, y_eager, exact)
        # float64: the same sum as the convolution, to rounding
        torch.testing.assert_close(pointwise_conv(conv.double(), x.double()), exact, rtol=1e-12, atol=1e-12)
        conv.float()


def test_training_keeps_the_convolution():
    """With a gradient needed the module runs (its weight gradient is more accurate than the
    batched product's), so training and autograd see exactly nn.Conv2d."""
    conv = nn.Conv2d(8, 8, 1)
    x = torch.randn(1, 8, 56, 56)
    assert not pointwise._gemm_applies(conv, x)  # the parameters require grad
    assert not pointwise._gemm_applies(conv.requires_grad_(False), x.requires_grad_())
    y = pointwise_conv(conv, x)
    torch.testing.assert_close(y, conv(x), rtol=0, atol=0)


@torch.no_grad()
def test_only_where_it_applies():
    conv = nn.Conv2d(8, 8, 1)
    big = torch.randn(1, 8, 56, 56)
    assert pointwise._gemm_applies(conv, big)
    assert not pointwise._gemm_applies(conv, torch.randn(1, 8, 28, 28))  # small map: the conv is as fast
    assert not pointwise._gemm_applies(conv, big.contiguous(memory_format=torch.channels_last))
    assert not pointwise._gemm_applies(conv, big[..., ::2].repeat(1, 1, 1, 2)[..., 1:57])  # not contiguous
    assert not pointwise._gemm_applies(conv, big.half())
    for other in (nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1, stride=2), nn.Conv2d(8, 8, 1, groups=2),
                  nn.Conv2d(8, 8, 1, padding=1), nn.Conv2d(8, 8, 1, dilation=2)):
        assert not pointwise._gemm_applies(other, big)

    class Custom(nn.Conv2d):  # a subclass with its own forward keeps it
        def forward(self, x):
            return super().forward(x) * 2

    custom = Custom(8, 8, 1)
    assert not pointwise._gemm_applies(custom, big)
    torch.testing.assert_close(pointwise_conv(custom, big), custom(big))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not pointwise._gemm_applies(conv, big)
        assert pointwise_conv(conv, big).dtype == torch.bfloat16  # autocast's conv, as the module does


def test_fasa_and_convffn_inference_at_56x56(monkeypatch):
    """FAT-B0 stage 1 (C = 32, 56×56, NCHW) in eval without gradients: FASA's q and mixer and
    ConvFFN's fc1 and fc2 take the GEMM, and the blocks match the reference under the rule."""
    import copy

    import fastvit_ops
    from conftest import randomize_
    from fastvit_ops import numerics
    from fastvit_ops.nn import fat as fused_fat
    from fastvit_ops.reference import fat as ref_fat

    taken = []
    applies = pointwise._gemm_applies
    monkeypatch.setattr(pointwise, "_gemm_applies", lambda conv, x: taken.append(applies(conv, x)) or taken[-1])
    x = torch.randn(2, 32, 56, 56)
    ref = randomize_(ref_fat.FASA(32, 3, 2, 8)).eval()
    with torch.no_grad():
        y = fastvit_ops.fused_fasa(x, copy.deepcopy(ref))
        assert_error_rule("FASA 56x56 eval", y, ref(x), copy.deepcopy(ref).double()(x.double()),
                          numerics.COMPOUNDED_FACTOR)
    assert taken == [True, True]  # q, mixer
    taken.clear()
    ffn_ref = randomize_(ref_fat.ConvFFN(32, 128, 5, 1, 32)).eval()
    ffn = fused_fat.ConvFFN(32, 128, 5, 1, 32).eval()
    ffn.load_state_dict(ffn_ref.state_dict())
    with torch.no_grad():
        y = fused_fat._ffn_composite(ffn, x)
        assert_error_rule("ConvFFN 56x56 eval", y, ffn_ref(x), copy.deepcopy(ffn_ref).double()(x.double()),
                          numerics.COMPOUNDED_FACTOR)
    assert taken == [True, True]  # fc1, fc2
