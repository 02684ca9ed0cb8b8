"""VT-ResNet-18/34 (VT paper §4, Table 11): the paper's Table 2 counts, the trunk's torchvision
names, fused vs reference builds on every backend, convert()/revert(), forward and backward."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fastvit_ops
from conftest import assert_error_rule, backends_for, randomize_
from fastvit_ops import models
from fastvit_ops.nn import vt as fused_vt
from fastvit_ops.nn import vt_resnet as fused_vt_resnet
from fastvit_ops.reference import vt as ref_vt
from fastvit_ops.reference.vt_resnet import BasicBlock, VTResNet

# Paper Table 2 (VT-R18 / VT-R34): parameters (M) and FLOPs (M multiply-adds at 224²), and the
# exact counts this implementation gives.
PAPER = {"vt_resnet18": (11.7e6, 1570e6, 11_676_200, 1_585_242_112),
         "vt_resnet34": (21.9e6, 3280e6, 22_044_456, 3_337_347_072)}


def multiply_adds(model, size=224):
    """Multiply-adds of every convolution and matrix product (FlopCounterMode counts 2 per MAC)."""
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.randn(1, 3, size, size))
    return fc.get_total_flops() // 2


@pytest.mark.parametrize("name", list(PAPER))
def test_counts_match_paper_table2(name):
    paper_params, paper_flops, params, flops = PAPER[name]
    model = models.create(name, reference=True).eval()
    assert sum(p.numel() for p in model.parameters()) == params
    assert multiply_adds(model) == flops
    assert abs(params / paper_params - 1) <= 0.02
    assert abs(flops / paper_flops - 1) <= 0.03


def test_structure():
    """2 / 3 VT modules; filter tokenizer first, recurrent after; 256 → 512 in the first projector;
    no projector in the last module; torchvision's trunk names; 16 tokens of 1024 channels."""
    for name, n in (("vt_resnet18", 2), ("vt_resnet34", 3)):
        m = models.create(name, reference=True)
        assert len(m.vt) == n
        assert type(m.vt[0].tokenizer) is ref_vt.FilterTokenizer
        assert all(type(v.tokenizer) is ref_vt.RecurrentTokenizer for v in m.vt[1:])
        assert m.vt[0].projector.shortcut.weight.shape == (512, 256)
        assert all(v.projector.shortcut is None for v in m.vt[1:-1])
        assert m.vt[-1].projector is None
        assert m.vt[0].tokenizer.wa.weight.shape == (16, 256)
        assert m.vt[-1].transformer.f1.weight.shape == (1024, 1024)
        assert m.vt[-1].transformer.k.weight.shape == (256, 1024)
        assert m.head.weight.shape == (1000, 1024)
    keys = models.create("vt_resnet18", reference=True).state_dict()
    for k in ("conv1.weight", "bn1.running_var", "layer1.0.conv2.weight", "layer2.0.downsample.0.weight",
              "layer3.1.bn2.bias"):
        assert k in keys, k
    assert not any(k.startswith("layer4") for k in keys)


def test_fused_build_uses_fused_blocks_and_loads_reference_weights():
    ref = models.create("vt_resnet18", reference=True)
    fused = models.create("vt_resnet18")
    assert isinstance(fused.vt[0].tokenizer, fused_vt.FilterTokenizer)
    assert isinstance(fused.vt[1].tokenizer, fused_vt.RecurrentTokenizer)
    assert isinstance(fused.vt[0].projector, fused_vt.Projector)
    assert isinstance(fused, fused_vt_resnet.VTResNet) and isinstance(fused.layer2[0], fused_vt_resnet.BasicBlock)
    assert [(k, v.shape) for k, v in fused.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]
    fused.load_state_dict(ref.state_dict(), strict=True)
    conv = fastvit_ops.convert(ref)
    assert conv.fastvit_ops_report == {"FilterTokenizer": 1, "RecurrentTokenizer": 1, "TokenTransformer": 2,
                                       "Projector": 1, "BasicBlock": 6, "VTResNet": 1}
    back = fastvit_ops.revert(conv)
    assert type(back) is VTResNet and type(back.layer1[0]) is BasicBlock
    assert all(type(m) in (ref_vt.FilterTokenizer, ref_vt.RecurrentTokenizer, ref_vt.TokenTransformer,
                           ref_vt.Projector) for v in back.vt for m in v.children() if m is not None)


def small(layers=None, seed=0):
    """A VT-ResNet with narrow widths whose single-head attention widths (≤ 32) the fused kernels
    take, so the fused blocks run their kernels (at the paper's widths 256–1024 they fall back)."""
    torch.manual_seed(seed)
    return VTResNet((1, 1, 1), 3, num_classes=7, widths=(8, 12, 16), vt_channels=24, num_tokens=5,
                    token_channels=32, qk_channels=32, layers=layers)


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_forward_backward_every_backend(backend, request):
    """fp32 forward and backward of the fused build on each backend, held to the 2× rule against a
    float64 reference (eager fp32 reference as the yardstick); the fused VT blocks run their kernel."""
    from properties import KNOWN_DEFECTS

    if ("downsampled_attention", str(backend)) in KNOWN_DEFECTS:
        # The projector's q-weight gradient measured 2.5-3.2x eager's fp32 error through the C++
        # attention: the known attention defect of tests/ops/test_known_defects.py. Not strict: it
        # depends on the random inputs.
        request.applymarker(pytest.mark.xfail(strict=False, reason="known attention fp32 defect (test_known_defects.py)"))
    ref = randomize_(small(), 0.1).train()
    fused = small(dict(fastvit_ops.nn.VT_LAYERS))
    fused.load_state_dict(ref.state_dict())
    fused.train()
    exact = small().double()
    exact.load_state_dict(ref.state_dict())
    exact.train()
    x = torch.randn(3, 3, 40, 36)
    calls = []
    orig = fused_vt.attention_core

    def spy(*a, **k):
        calls.append(a[0].shape)
        return orig(*a, **k)
    fused_vt.attention_core = spy
    try:
        with fastvit_ops.backend(backend):
            y = fused(x)
            y.square().sum().backward()
    finally:
        fused_vt.attention_core = orig
    assert len(calls) >= 5  # 3 tokenizers + 2 projectors; the transformer's widths match too
    y_ref = ref(x)
    y_ref.square().sum().backward()
    y_exact = exact(x.double())
    y_exact.square().sum().backward()
    assert_error_rule("logits", y.detach(), y_ref.detach(), y_exact.detach())
    for (n, pf), pr, pe in zip(fused.named_parameters(), ref.parameters(), exact.parameters()):
        assert_error_rule(f"grad {n}", pf.grad, pr.grad, pe.grad)


@pytest.mark.slow
def test_vt_resnet18_fused_matches_reference_224():
    ref = models.create("vt_resnet18", reference=True).eval()
    fused = fastvit_ops.convert(ref)
    exact = models.create("vt_resnet18", reference=True).double().eval()
    exact.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert_error_rule("vt_resnet18 logits", fused(x), ref(x), exact(x.double()))


def test_bad_input():
    with pytest.raises(ValueError, match="vt_modules"):
        VTResNet(vt_modules=0)
    with pytest.raises(ValueError, match="layers: unknown layer name"):
        VTResNet(layers={"Nope": torch.nn.Identity})
    m = models.create("vt_resnet18", reference=True)
    with pytest.raises(ValueError, match="tokens"):
        m.vt[1](torch.randn(1, 512, 4, 4))


@pytest.mark.parametrize("channels", [32, 256])
def test_projector_computes_each_projection_once(channels):
    """The fused Projector matches the reference with a fusable head (32) and with VT-ResNet's
    256-1024-wide single head, which takes the reference composite: there too q, k and v are
    computed once per call (falling back through the reference forward computed them twice)."""
    torch.manual_seed(0)
    ref = ref_vt.Projector(channels, 64, value_projection=True, out_channels=channels).eval()
    fused = fused_vt.Projector(channels, 64, value_projection=True, out_channels=channels).eval()
    fused.load_state_dict(ref.state_dict())
    calls = []
    for name in ("q", "k", "wv"):
        getattr(fused, name).register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    x, tokens = torch.randn(2, channels, 5, 7), torch.randn(2, 16, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x, tokens), ref(x, tokens), rtol=1e-5, atol=1e-5)
    assert sorted(calls) == ["k", "q", "wv"]


def _trunk_model(seed):
    """A VT-ResNet whose trunk has every kind of block (stride 1 identity shortcut, stride 2
    downsample), random weights and BN statistics, in eval mode: (reference, converted, float64)."""
    torch.manual_seed(seed)
    ref = randomize_(VTResNet((2, 1, 1), 2, num_classes=7, widths=(8, 12, 16), vt_channels=24, num_tokens=5,
                              token_channels=32, qk_channels=32), 0.3).eval()
    exact = VTResNet((2, 1, 1), 2, num_classes=7, widths=(8, 12, 16), vt_channels=24, num_tokens=5,
                     token_channels=32, qk_channels=32).double().eval()
    exact.load_state_dict(ref.state_dict())
    return ref, fastvit_ops.convert(ref), exact


def _planned(model):
    return [name for name, m in model.named_modules() if "_fastvit_ops_plan" in m.__dict__]


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_trunk_inference_plan_matches_reference(memory_format):
    """CPU inference runs the stem and every basic block through their plans (BN folded, stem
    channels_last) and holds the 2x rule on the trunk's map and the logits against float64; an
    odd input size exercises the pooling's edges."""
    ref, conv, exact = _trunk_model(int(torch.randint(0, 2**31, ()).item()))
    x = torch.randn(2, 3, 45, 39).contiguous(memory_format=memory_format)
    with torch.no_grad():
        got = conv.layer3(conv.layer2(conv.layer1(conv.stem(x))))
        want = ref.layer3(ref.layer2(ref.layer1(ref.stem(x))))
        exact_map = exact.layer3(exact.layer2(exact.layer1(exact.stem(x.double()))))
        assert_error_rule("trunk", got, want, exact_map)
        assert_error_rule("logits", conv(x), ref(x), exact(x.double()))
    assert set(_planned(conv)) == {"", "layer1.0", "layer1.1", "layer2.0", "layer3.0"}


def test_trunk_plan_follows_edits_and_modes():
    """Plans notice in-place edits of BN statistics and weights, a replaced activation, and are not
    used with gradients, in training, or when pickled (a copy rebuilds its own)."""
    import pickle

    ref, conv, _ = _trunk_model(0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), ref(x), rtol=1e-4, atol=1e-5)
        for m in (ref, conv):
            m.bn1.running_var.mul_(3.0)
            m.layer2[0].downsample[1].running_mean.add_(0.5)
            m.layer1[1].conv2.weight.mul_(-1.0)
        torch.testing.assert_close(conv(x), ref(x), rtol=1e-4, atol=1e-5)
        for m in (ref, conv):
            m.layer1[0].relu = torch.nn.GELU()  # not a ReLU: the block runs its reference forward
        torch.testing.assert_close(conv(x), ref(x), rtol=1e-4, atol=1e-5)
        copy_ = pickle.loads(pickle.dumps(conv))
        assert not _planned(copy_)
        torch.testing.assert_close(copy_(x), ref(x), rtol=1e-4, atol=1e-5)
    conv.train(), ref.train()
    torch.testing.assert_close(conv(x), ref(x), rtol=1e-4, atol=1e-5)  # batch statistics, graph kept
    conv.eval()
    for p in conv.parameters():
        p.grad = None
    conv(x.requires_grad_()).sum().backward()  # with gradients: the reference composition
    assert conv.conv1.weight.grad is not None
