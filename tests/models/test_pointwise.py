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
