"""The fused FCViT modules' CPU inference path (fastvit_ops.nn.fcvit_inference): layer scales and
BN folded, the channel mixer's GELU fused into its depthwise conv in place, channels_last running
sum, residuals in place, chunks of samples on large maps; cached plans rebuilt on any change and
dropped when pickling. Same values as the reference modules by the 2x rule against float64."""
import copy
import pickle

import pytest
import torch

import fastvit_ops
from fastvit_ops import numerics
from conftest import assert_error_rule, assert_pooled_rule, randomize_
from fastvit_ops.nn import fcvit as fused_fcvit
from fastvit_ops.nn import fcvit_inference
from fastvit_ops.reference import fcvit as ref_fcvit

LAYERS = dict(fastvit_ops.nn.FCVIT_LAYERS)


def _pair(dim=32, mlp_ratio=4.0, scale=0.2, **kw):
    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    ref = randomize_(ref_fcvit.FCViTBlock(dim, mlp_ratio, **kw), scale).eval()
    fused = fused_fcvit.FCViTBlock(dim, mlp_ratio, layers=LAYERS, **kw).eval()
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _exact(ref, x):
    with torch.no_grad():
        return copy.deepcopy(ref).double()(x.double())


def _plan_built(m):
    return m.__dict__.get("_fastvit_ops_plan") is not None


@pytest.mark.parametrize("dim,size", [(32, (13, 11)), (64, (7, 7)), (32, (50, 49))])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_block_plan_matches_reference(dim, size, layout):
    ref, fused = _pair(dim)
    x = torch.randn(2, dim, *size)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y_ref, y = ref(x), fused(x)
    assert _plan_built(fused), "the inference plan was not used"
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_error_rule(f"FCViTBlock {dim} {size} {layout}", y, y_ref, _exact(ref, x), numerics.COMPOUNDED_FACTOR)


def test_block_plan_does_not_touch_its_input():
    ref, fused = _pair()
    x = torch.randn(2, 32, 9, 9)
    before = x.clone()
    with torch.no_grad():
        fused(x)
    assert torch.equal(x, before)


def test_block_plan_chunks_the_channel_mixer(monkeypatch):
    ref, fused = _pair()
    x = torch.randn(5, 32, 12, 12)
    with torch.no_grad():
        whole = fused(x)
        monkeypatch.setattr(fcvit_inference, "CHANNEL_MIXER_CHUNK_BYTES", 2 * 128 * 12 * 12 * 4)  # 2 samples
        fused.__dict__.pop("_fastvit_ops_plan")
        chunked = fused(x)
        y_ref = ref(x)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    assert_error_rule("chunked FCViTBlock", chunked, y_ref, _exact(ref, x), numerics.COMPOUNDED_FACTOR)


def test_without_layer_scale_and_with_custom_parts():
    """No layer scale; a channel mixer whose activation is not GELU and a token mixer the plan does
    not know run as modules inside the plan."""
    ref, fused = _pair(use_layer_scale=False)
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        assert_error_rule("FCViTBlock without layer scale", fused(x), ref(x), _exact(ref, x), numerics.COMPOUNDED_FACTOR)
        for m in (ref, fused):
            m.channel_mixer.act = torch.nn.SiLU()
            m.token_mixer = torch.nn.Sequential(torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.Tanh())
        fused.token_mixer.load_state_dict(ref.token_mixer.state_dict())
        y_ref, y = ref(x), fused(x)
    assert_error_rule("FCViTBlock with custom parts", y, y_ref, _exact(ref, x), numerics.COMPOUNDED_FACTOR)


def test_plan_rebuilt_on_parameter_changes_and_dropped_when_pickling():
    ref, fused = _pair()
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        fused(x)
        for m in (ref, fused):
            m.layer_scale_2.mul_(-3.0)                            # in place
            m.channel_mixer.fc2.weight.add_(0.1)
        assert_error_rule("after in-place edits", fused(x), ref(x), _exact(ref, x), numerics.COMPOUNDED_FACTOR)
        new = {k: v.clone() * 1.5 for k, v in ref.state_dict().items()}
        ref.load_state_dict(new)
        fused.load_state_dict(new, assign=True)                    # new tensor objects
        assert_error_rule("after load_state_dict(assign=True)", fused(x), ref(x), _exact(ref, x), numerics.COMPOUNDED_FACTOR)
        fused.norm2.eps = 1e-2                                     # a hyperparameter
        ref.norm2.eps = 1e-2
        assert_error_rule("after editing eps", fused(x), ref(x), _exact(ref, x), numerics.COMPOUNDED_FACTOR)
    clone = pickle.loads(pickle.dumps(fused))
    assert not _plan_built(clone)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), fused(x))
    copy.deepcopy(fused)


def test_grad_and_training_take_the_differentiable_path():
    """In eval mode with grad on, no plan runs and every parameter gradient follows eager's. Each
    gradient is judged over 4 inputs together, against eager run four equally valid ways (NCHW and
    channels_last inputs, the batch in either order: other summation orders of every weight
    gradient), as test_random_weights does. With one eager run the largest error is the ratio of
    two independent roundings of the worst-conditioned element, a toss-up: one seed in four had
    one element of a 8-element α/β or bias gradient at 2.2-3.5x eager's (RMS ratios stay ~1), and
    pooled the ratios still reach 3x: the factor is numerics.COMPOUNDED_FACTOR."""
    ref, fused = _pair()
    exact = copy.deepcopy(ref).double()
    names = [n for n, _ in fused.named_parameters()]
    pools = {n: [] for n in names}

    def grads(model, x, flip=False):
        model.zero_grad()
        y = model(x.flip(0) if flip else x)
        y.square().sum().backward()
        return y, [p.grad.clone() for p in model.parameters()]
    for _ in range(4):
        x = torch.randn(2, 32, 8, 8)
        y, g_fused = grads(fused, x)  # eval, grad on, parameters require grad
        assert not _plan_built(fused) and y.requires_grad
        g_eager = [grads(ref, xi, flip)[1] for xi in (x, x.contiguous(memory_format=torch.channels_last))
                   for flip in (False, True)]
        g_exact = grads(exact, x.double())[1]
        for i, n in enumerate(names):
            pools[n].append((g_fused[i], [g[i] for g in g_eager], g_exact[i]))
    for n, items in pools.items():
        assert_pooled_rule(f"grad {n} (4 inputs)", items, numerics.COMPOUNDED_FACTOR)


@pytest.mark.parametrize("train", [False, True])
def test_channel_mixer_gelu_epilogue(train):
    ref = randomize_(ref_fcvit.ChannelMixer(16, 64), 0.3).train(train)
    fused = fused_fcvit.ChannelMixer(16, 64, layers=LAYERS).train(train)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 16, 9, 10, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y_ref = fused(x), ref(x2)
    exact = copy.deepcopy(ref).double()(x.detach().double())
    assert_error_rule("ChannelMixer", y.detach(), y_ref.detach(), exact.detach())
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)


def test_converted_fcvit_tiny_runs_the_plans():
    ref = randomize_(fastvit_ops.models.create("fcvit_tiny", reference=True), 0.05).eval()
    conv = fastvit_ops.convert(ref)
    rep = conv.fastvit_ops_report
    assert rep["FCViTBlock"] == 13 and rep["PatchEmbed"] == 4 and rep["ChannelMixer"] == 13
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y_ref, y = ref(x), conv(x)
        feats = conv.network[0](conv.patch_embed(x))
    assert feats.is_contiguous(memory_format=torch.channels_last)
    assert all(_plan_built(m) for m in conv.modules() if isinstance(m, fused_fcvit.FCViTBlock))
    assert_error_rule("converted fcvit_tiny logits", y, y_ref, _exact(ref, x), numerics.COMPOUNDED_FACTOR)
