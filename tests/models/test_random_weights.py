"""Every model, converted, against its reference at random weights where every fused layer matters:
layer scales, global-context α/β, BatchNorm running statistics and all biases non-trivial (at the
default initialisation layer scales are 1e-5, α = 1, β = 0 and BatchNorm is the identity, so a
wrong fused layer could hide below any tolerance). Logits in eval mode and every parameter
gradient in training mode are judged by the rule of docs/numerics.md against float64, with eager fp32 as the
yardstick; no gradient is exempt, small ones included."""
import copy
import re

import pytest
import torch

import fastvit_ops
from fastvit_ops import numerics
from conftest import (MAXOUT_MARGIN, assert_error_rule, assert_pooled_rule, input_off_kinks, maxout_margin,
                      randomize_model_)
from fastvit_ops import models
from fastvit_ops.reference import fcvit as ref_fcvit

NAMES = models.list_models()
SIZE = 64  # FAT's stem and stages divide by 32, CvT's by 16


def _nontrivial(model):
    """The randomisation reached what matters: layer scales, α/β and BN statistics."""
    seen = {"layer_scale": 0, "rescale": 0, "running_var": 0}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        for key in seen:
            if key in name:
                seen[key] += 1
                assert not torch.allclose(t, torch.full_like(t, t.flatten()[0].item())), name
    return seen


def _grads(model, x, dy):
    model.train()
    params = [p for p in model.parameters()]
    y = model(x)
    return torch.autograd.grad(y, params, dy.to(y.dtype), allow_unused=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_converted_model_matches_reference_at_random_weights(name):
    gen = torch.Generator().manual_seed(torch.initial_seed() % 2**31)
    ref = randomize_model_(models.create(name, reference=True), gen)
    seen = _nontrivial(ref)
    if name.startswith("fcvit"):
        assert seen["layer_scale"] and seen["rescale"]
    if name.startswith(("fat", "cvt")):
        assert seen["running_var"]
    fused = fastvit_ops.convert(ref)
    exact_model = copy.deepcopy(ref).double()
    # Gradients are compared only where they are defined: no maxout within a rounding of a tie.
    x = input_off_kinks(exact_model, lambda: torch.randn(2, 3, SIZE, SIZE, generator=gen))
    x_cl = x.contiguous(memory_format=torch.channels_last)

    # The eager yardstick runs four equally valid ways: NCHW and channels_last inputs (other
    # convolution algorithms) and the batch in reverse order (every reduction over the batch, BN
    # statistics and weight gradients, summed in another order); the largest error counts. Deep
    # in a network every gradient carries the rounding of all the layers after it, so one eager
    # run is a noisy yardstick for a parameter of a few dozen elements.
    flip = [False, True]
    inputs = [(xi, f) for xi in (x, x_cl) for f in flip]

    def batch_order(t, f):
        return t.flip(0) if f else t

    # eval: logits (the CPU inference paths, folded BNs)
    for m in (ref, fused, exact_model):
        m.eval()
    with torch.no_grad():
        exact = exact_model(x.double())
        eager = [batch_order(ref(batch_order(xi, f)), f) for xi, f in inputs]
        got = fused(x)
    assert_error_rule(f"{name} eval logits", got, eager, exact)

    # training mode: logits and every parameter gradient (BN on batch statistics, autograd path)
    dy = torch.randn(exact.shape, generator=gen)
    g_exact = _grads(exact_model, x.double(), dy)
    g_eager = [_grads(ref, batch_order(xi, f), batch_order(dy, f)) for xi, f in inputs]
    g_fused = _grads(fused, x, dy)
    names = [n for n, _ in ref.named_parameters()]
    assert len(g_fused) == len(names)
    pools = {}
    for i, n in enumerate(names):
        e = g_exact[i]
        if e is None:  # a parameter the forward does not use
            assert g_fused[i] is None or not g_fused[i].any(), n
            continue
        assert g_fused[i] is not None, f"{name}: no gradient for {n}"
        pools.setdefault(re.sub(r"\.\d+(?=\.)", ".*", n), []).append((g_fused[i], [g[i] for g in g_eager], e))
    for pattern, items in pools.items():
        assert_pooled_rule(f"{name} grads {pattern} ({len(items)} tensors)", items, numerics.COMPOUNDED_FACTOR)


def test_pooled_rule_fails_a_gradient_4x_worse():
    """Negative control of the pooled judgement: small gradients 4x eager's error fail the one-op
    rule, 8x fail the compounded one, 1x pass."""
    exact = [torch.randn(8, dtype=torch.float64) * 10 ** i for i in range(4)]
    eager = [(e + torch.randn_like(e) * 1e-7 * e.abs().max()).float() for e in exact]

    def worse(f):
        return [(x + f * (e.double() - x)).float() for e, x in zip(eager, exact)]
    assert_pooled_rule("same", [(f, [e], x) for f, e, x in zip(worse(1.0), eager, exact)])
    assert_pooled_rule("same", [(f, [e], x) for f, e, x in zip(worse(1.0), eager, exact)], numerics.COMPOUNDED_FACTOR)
    with pytest.raises(AssertionError, match="exceeds the 2x rule"):
        assert_pooled_rule("4x", [(f, [e], x) for f, e, x in zip(worse(4.0), eager, exact)])
    with pytest.raises(AssertionError, match="exceeds the 4x rule"):
        assert_pooled_rule("8x", [(f, [e], x) for f, e, x in zip(worse(8.0), eager, exact)], numerics.COMPOUNDED_FACTOR)


def test_randomisation_is_seen_by_the_check():
    """Negative control: at the default initialisation the layer scales are all equal."""
    with pytest.raises(AssertionError, match="layer_scale"):
        _nontrivial(ref_fcvit.FCViT(**ref_fcvit.CONFIGS["fcvit_tiny"]))


# CI's seed 3006762286 failed fcvit_b48's gradients (patch_embed.proj.weight at 69x eager's error)
# before inputs were drawn off the maxout kinks: its first input put one maxout of network[4][11]'s
# gc1 at 1.5e-7 (relative) from a tie, the fused run's rounding landed on the other side of it than
# float64's, and every gradient below that block was the other one-sided gradient.
TIE_SEED = 3006762286


def test_maxout_near_tie_is_seen():
    """The guard sees the near-tie of CI's failing seed (the input the test first drew there) and
    not that of the input it draws instead."""
    torch.manual_seed(TIE_SEED)
    gen = torch.Generator().manual_seed(torch.initial_seed() % 2**31)
    ref = randomize_model_(models.create("fcvit_b48", reference=True), gen).double()
    first = torch.randn(2, 3, SIZE, SIZE, generator=gen)
    assert maxout_margin(ref, first.double()) < MAXOUT_MARGIN / 10
    assert maxout_margin(ref, input_off_kinks(ref, lambda: torch.randn(2, 3, SIZE, SIZE, generator=gen)).double()) >= MAXOUT_MARGIN
    assert maxout_margin(models.create("fat_b0", reference=True), first) == float("inf")


@pytest.mark.slow
def test_fcvit_b48_at_the_seed_with_a_maxout_tie():
    """The whole check at CI's failing seed (it draws past the near-tie input)."""
    torch.manual_seed(TIE_SEED)  # the test draws its weights from torch.initial_seed()
    test_converted_model_matches_reference_at_random_weights("fcvit_b48")
