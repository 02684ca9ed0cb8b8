"""The fused FAT modules' CPU inference path (fastvit_ops.nn.fat_inference): channels_last, BN folded
into the convs (the plan rebuilt when the module changes), GELU/ReLU/residual adds in place, the
ConvFFN's hidden map in place and in chunks of samples, a module call for any part it does not
recognise. Same values as the reference modules."""
import copy

import pytest
import torch

import fastvit_ops
from fastvit_ops import numerics
from conftest import assert_error_rule, assert_pooled_rule, randomize_
from fastvit_ops.nn import fat as fused_fat
from fastvit_ops.nn import fat_inference
from fastvit_ops.ops import dispatch
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


def _eager(ref, x):
    """The reference in fp32 three equally valid ways (NCHW and channels_last input: other
    convolution algorithms; the batch reversed): the error rule's yardstick, the largest error
    counting. Over a whole block one eager run's largest error is one element's luck."""
    with torch.no_grad():
        return [ref(x), ref(x.contiguous(memory_format=torch.channels_last)), ref(x.flip(0)).flip(0)]


class Wrapped(torch.nn.Module):
    """A user's layer the inference plan does not recognise: it must call it as it is."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def _wrap_every_part(blk):
    """The block with each part the plan fuses replaced by an opaque module computing the same."""
    for owner, name in ((blk, "cpe"), (blk, "norm1"), (blk, "norm2"), (blk.attn, "q"), (blk.attn, "kv"),
                        (blk.attn, "local_mixer"), (blk.attn, "mixer"), (blk.ffn, "fc1"), (blk.ffn, "dwconv"),
                        (blk.ffn, "bn"), (blk.ffn, "fc2")):
        setattr(owner, name, Wrapped(getattr(owner, name)))
    if isinstance(blk.downsample, torch.nn.Sequential):
        blk.downsample = Wrapped(blk.downsample)
    blk.attn.pool = Wrapped(blk.attn.pool)
    return blk


@pytest.mark.parametrize("cfg", BLOCKS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("size", [(9, 11), (16, 16)])
def test_block_inference_path_matches_reference(cfg, size):
    dim, out_dim, k, heads, window, stride = cfg
    ref, fused = _pair(ref_fat.FATBlock, fused_fat.FATBlock, dim, out_dim, k, heads, window, 5, 4, stride)
    x = torch.randn(3, dim, *size)
    exact = _exact(ref, x)
    with torch.no_grad():
        y_ref, y = ref(x), fused(x)
    assert fused.__dict__["_fastvit_ops_plan"][1] is not None, "the inference plan was not used"
    assert y.is_contiguous(memory_format=torch.channels_last) and y.shape == y_ref.shape
    eager = _eager(ref, x)
    assert_error_rule(f"FATBlock{cfg}", y, eager, exact, numerics.COMPOUNDED_FACTOR)
    # Every part replaced by a module the plan does not recognise: the same path calls them as
    # they are (what a user's modified block runs) and gives the same result.
    _wrap_every_part(fused)
    with torch.no_grad():
        y2 = fused(x)
    assert_error_rule(f"FATBlock{cfg} with opaque parts", y2, eager, exact, numerics.COMPOUNDED_FACTOR)


def test_swapped_part_rebuilds_the_plan():
    """A block whose norm is replaced after the plan was built (say, by a user's layer) gets a new
    plan that calls the new module, although none of the tensors the old plan read changed."""
    ref, fused = _pair(ref_fat.FATBlock, fused_fat.FATBlock, 32, 32, 3, 2, 8, 5, 4, 1)
    x = torch.randn(2, 32, 9, 9)
    with torch.no_grad():
        fused(x)
        old_plan = fused.__dict__["_fastvit_ops_plan"][1]
        ref.norm1, fused.norm1 = Wrapped(ref.norm1), Wrapped(copy.deepcopy(fused.norm1))
        with torch.no_grad():
            ref.norm1.inner.weight.mul_(-2.0)
            fused.norm1.inner.weight.mul_(-2.0)
        y_ref, y = ref(x), fused(x)
        assert fused.__dict__["_fastvit_ops_plan"][1] is not old_plan
        torch.testing.assert_close(fused(x), y)
    assert_error_rule("FATBlock with a custom norm", y, y_ref, _exact(ref, x), numerics.COMPOUNDED_FACTOR)


def test_inference_plan_runs_the_kernels_the_registry_picks():
    """The plan's depthwise and attention kernels are dispatch.choose's for the requested backend:
    the C++ ones under auto (with the extension), the reference ones under backend("reference")."""
    ref, fused = _pair(ref_fat.FATBlock, fused_fat.FATBlock, 80, 160, 5, 5, 4, 5, 4, 2)
    x = torch.randn(2, 80, 10, 10)
    exact = _exact(ref, x)
    with torch.no_grad():
        y_ref = ref(x)
        with dispatch.recording() as log:
            y = fused(x)
        with fastvit_ops.backend("reference"), dispatch.recording() as log_ref:
            y2 = fused(x)
    picked = {(c.op, c.stage) for c in log}
    assert {("dwconv2d", "forward"), ("downsampled_attention", "forward")} <= picked
    want = "cpu" if dispatch.backend_available("cpu", torch.device("cpu"))[0] else "reference"
    assert {c.call.resolved() for c in log} == {want}
    assert {c.impl.backend for c in log_ref if c.stage == "forward"} == {"reference"}
    assert y2.is_contiguous(memory_format=torch.channels_last)
    assert_error_rule("FATBlock plan", y, y_ref, exact, numerics.COMPOUNDED_FACTOR)
    assert_error_rule("FATBlock plan on the reference kernels", y2, y_ref, exact, numerics.COMPOUNDED_FACTOR)


def test_block_inference_chunks_the_ffn(monkeypatch):
    """Maps above FFN_CHUNK_BYTES run fc1 → DW → fc2 a few samples at a time, adding into the shortcut."""
    ref, fused = _pair(ref_fat.FATBlock, fused_fat.FATBlock, 32, 32, 3, 2, 8, 5, 4, 1)
    x = torch.randn(5, 32, 12, 12)
    with torch.no_grad():
        whole = fused(x)
        monkeypatch.setattr(fat_inference, "FFN_CHUNK_BYTES", 2 * 128 * 12 * 12 * 4)  # two samples per chunk
        assert fat_inference._chunk(x, 128) == 2
        chunked = fused(x)
        y_ref = ref(x)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    assert_error_rule("chunked FATBlock", chunked, y_ref, _exact(ref, x), numerics.COMPOUNDED_FACTOR)


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
    assert_error_rule("FATBlock after in-place parameter updates", y, y_ref, _exact(ref, x), numerics.COMPOUNDED_FACTOR)


def test_block_with_grad_takes_the_differentiable_path():
    ref, fused = _pair(ref_fat.FATBlock, fused_fat.FATBlock, 32, 80, 3, 2, 8, 5, 4, 2)
    x = torch.randn(2, 32, 9, 9)
    y = fused(x)  # eval, grad mode on, parameters require grad: the autograd composition
    assert y.requires_grad and y.is_contiguous()
    y.square().sum().backward()
    ref(x).square().sum().backward()
    exact = copy.deepcopy(ref).double()
    exact.zero_grad()
    exact(x.double()).square().sum().backward()
    # A whole block's parameter gradients, pooled and judged by the compounded rule against float64
    # (a fixed 1e-4 tolerance failed once in CI on cpe.weight, where both fp32 sums carry rounding).
    items = [(a.grad, [b.grad], e.grad) for (_, a), b, e in zip(fused.named_parameters(), ref.parameters(),
                                                                 exact.parameters())]
    assert_pooled_rule("FAT block parameter gradients", items, numerics.COMPOUNDED_FACTOR)


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
                      copy.deepcopy(ref).double()(x.double()).detach(), numerics.COMPOUNDED_FACTOR)


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
    assert_error_rule("converted fat_b0 logits", y, y_ref, _exact(ref, x), numerics.COMPOUNDED_FACTOR)


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
        assert_error_rule(f"converted fat_b0 under {name}", y, y_ref, exact, numerics.COMPOUNDED_FACTOR)


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
    assert_error_rule("converted fat_b0 after load_state_dict(assign=True)", y, y_ref, _exact(ref, x), numerics.COMPOUNDED_FACTOR)


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
    assert_error_rule("FATBlock after a replaced parameter and a new eps", y, y_ref, _exact(ref, x), numerics.COMPOUNDED_FACTOR)


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


# ---- the FASA module alone ---------------------------------------------------------------------------
# (dim, kernel, heads, window): every FAT-B0 stage's FASA.
FASAS = [(32, 3, 2, 8), (80, 5, 5, 4), (160, 7, 10, 2), (256, 9, 16, 1)]


@pytest.mark.parametrize("cfg", FASAS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fasa_module_inference_path_matches_reference(cfg, layout):
    """The FASA module in CPU inference runs its own plan (channels_last, pool BN folded), NCHW or
    channels_last input, odd sizes; a module whose parts the plan does not recognise is called
    part by part through the same plan."""
    ref, fused = _pair(ref_fat.FASA, fused_fat.FASA, *cfg)
    x = torch.randn(3, cfg[0], 13, 11)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    exact = _exact(ref, x)
    eager = _eager(ref, x)
    with torch.no_grad():
        y = fused(x)
    assert fused.__dict__["_fastvit_ops_plan"][1] is not None, "the inference plan was not used"
    assert y.is_contiguous(memory_format=torch.channels_last) and y.shape == x.shape
    assert_error_rule(f"FASA{cfg} {layout}", y, eager, exact, numerics.COMPOUNDED_FACTOR)
    for name in ("q", "kv", "local_mixer", "mixer", "pool"):
        setattr(fused, name, Wrapped(getattr(fused, name)))
    with torch.no_grad():
        y2 = fused(x)
    assert_error_rule(f"FASA{cfg} with opaque parts", y2, eager, exact, numerics.COMPOUNDED_FACTOR)


def test_fasa_module_plan_follows_changes_and_modes():
    """The plan is rebuilt after in-place BN/weight edits and a replaced parameter; training, grad
    mode and float64 take the differentiable path; a wrong input raises the validated errors."""
    ref, fused = _pair(ref_fat.FASA, fused_fat.FASA, 80, 5, 5, 4)
    x = torch.randn(2, 80, 10, 9)
    with torch.no_grad():
        fused(x)
        plan = fused.__dict__["_fastvit_ops_plan"][1]
        for m in (ref, fused):
            m.pool.bn0.running_var.mul_(3.0)
            m.mixer.weight.mul_(-1.0)
            m.q.weight = torch.nn.Parameter(m.q.weight * 0.5)
        y_ref, y = ref(x), fused(x)
    assert fused.__dict__["_fastvit_ops_plan"][1] is not plan
    assert_error_rule("FASA after parameter edits", y, y_ref, _exact(ref, x), numerics.COMPOUNDED_FACTOR)
    y = fused(x)  # grad mode, parameters requiring grad: the autograd composition, NCHW out
    assert y.requires_grad and y.is_contiguous()
    y.sum().backward()
    assert fused.q.weight.grad is not None
    with torch.no_grad():
        fused.train()
        assert fused(x).is_contiguous()        # batch statistics, not the plan
        fused.eval()
        y64 = copy.deepcopy(fused).double()(x.double())
    assert y64.dtype == torch.float64 and y64.is_contiguous()
    with torch.no_grad(), pytest.raises(ValueError, match="x: expected 80 channels"):
        fused(torch.randn(2, 40, 10, 9))
    with torch.no_grad(), pytest.raises(ValueError, match="x: expected a 4-D"):
        fused(torch.randn(80, 10, 9))


def test_fasa_module_pickles_after_inference(tmp_path):
    ref, fused = _pair(ref_fat.FASA, fused_fat.FASA, 32, 3, 2, 8)
    x = torch.randn(2, 32, 12, 12)
    with torch.inference_mode():
        y = fused(x)
    torch.save(fused, tmp_path / "fasa.pt")
    loaded = torch.load(tmp_path / "fasa.pt", weights_only=False)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)
        torch.testing.assert_close(copy.deepcopy(fused)(x), y, rtol=0, atol=0)


def test_fasa_module_compiles_to_its_plan():
    """Under torch.compile (eval, no grad) a FASA module on its own is one opaque op running its plan."""
    from fastvit_ops.nn import _plan

    ref, fused = _pair(ref_fat.FASA, fused_fat.FASA, 32, 3, 2, 8)
    x = torch.randn(2, 32, 12, 12)
    with torch.no_grad():
        torch._dynamo.reset()
        explained = torch._dynamo.explain(fused)(x)
        ops = [str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
        assert explained.graph_break_count == 0 and ops.count("fastvit_ops.module_inference.default") == 1
        fused.__dict__.pop(_plan._PLAN, None)
        torch._dynamo.reset()
        y = torch.compile(fused, fullgraph=True, backend="aot_eager")(x)
        assert fused.__dict__.get(_plan._PLAN) is not None
        assert_error_rule("compiled FASA", y, ref(x), _exact(ref, x), numerics.COMPOUNDED_FACTOR)


def test_model_made_under_inference_mode_runs_and_follows_edits():
    """Issue reproducer: a model converted under torch.inference_mode has inference-tensor
    parameters, which have no version counter; the plan's key raised RuntimeError ("Inference
    tensors do not track version counter") on the first call. Now the plans and folds are rebuilt
    on every call (a warning says so), so an in-place edit made there is never missed."""
    torch.manual_seed(0)
    ref = randomize_(fastvit_ops.models.create("fat_b0", reference=True, num_classes=10), 0.05).eval()
    x = torch.randn(1, 3, 48, 48)
    with torch.inference_mode():
        fused = fastvit_ops.convert(copy.deepcopy(ref)).eval()
        with pytest.warns(RuntimeWarning, match="inference tensor"):
            y = fused(x)
        assert_error_rule("fat_b0 made under inference_mode", y, ref(x), _exact(ref, x), numerics.COMPOUNDED_FACTOR)
        sd = {k: (v.mul(1.5) if v.is_floating_point() and not k.endswith("running_var") else v)
              for k, v in ref.state_dict().items()}
        ref.load_state_dict(sd)
        fused.load_state_dict(sd)        # in place into inference tensors: no version bump
        y2 = fused(x)
        assert_error_rule("fat_b0 after an in-place load under inference_mode", y2, ref(x), _exact(ref, x),
                          numerics.COMPOUNDED_FACTOR)
