"""Converted models survive pickle / deepcopy / torch.save + torch.load before inference, after
inference (cached plans and folds exist) and after a train step, and the copy computes the same
output. The cached BatchNorm folds (``fastvit_ops.nn._bn.cached_fold``) follow every event that
changes what they were folded from."""
import copy
import io
import pickle

import pytest
import torch

import fastvit_ops
from conftest import assert_error_rule, randomize_
from fastvit_ops import models
from fastvit_ops.nn import _bn
from fastvit_ops.nn import fat as fused_fat
from fastvit_ops.nn import _plan, fat_inference
from fastvit_ops.reference import fat as ref_fat

MODELS = ["fat_b0", "fcvit_tiny", "cvt_13"]
SIZE = 64  # the smallest image every model's stem and stages take (FAT's /32, CvT's /16)


def _converted(name):
    ref = randomize_(models.create(name, reference=True), scale=0.05).eval()
    return fastvit_ops.convert(ref).eval()


def _train_step(model, x):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()


def _copies(model, name):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    sd_buf = io.BytesIO()
    torch.save(model.state_dict(), sd_buf)
    sd_buf.seek(0)
    # a fresh converted model (default weights, no cached state) given the saved state_dict
    fresh = fastvit_ops.convert(models.create(name, reference=True)).eval()
    fresh.load_state_dict(torch.load(sd_buf, weights_only=True))
    return {"pickle": pickle.loads(pickle.dumps(model)), "deepcopy": copy.deepcopy(model),
            "torch.save/load": torch.load(buf, weights_only=False), "state_dict save/load": fresh}


def _check_copies(model, x, label, train):
    with torch.no_grad():
        y = model(x)
    copies = _copies(model, label.split()[0])
    for how, other in copies.items():
        assert type(other) is type(model)
        for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
            assert torch.equal(a, b), f"{label} {how}: {k} differs"
    train_y = None
    if train:  # (moves the BN statistics: after the copies were made)
        model.train()
        train_y = model(x).detach()
        model.eval()
    for how, other in copies.items():
        with torch.no_grad():
            torch.testing.assert_close(other(x), y, rtol=0, atol=0, msg=lambda m: f"{label} {how}: {m}")
        if train_y is not None:  # the copy trains on: batch statistics, autograd path
            other.train()
            torch.testing.assert_close(other(x).detach(), train_y, rtol=0, atol=0,
                                       msg=lambda m: f"{label} {how}, training mode: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_round_trips_compute_the_same_output(name):
    """Before inference, after inference (plans and folds cached) and after a train step."""
    model = _converted(name)
    x = torch.randn(2, 3, SIZE, SIZE)
    _check_copies(model, x, f"{name} before inference", train=False)
    with torch.inference_mode():
        model(x)  # builds the inference plans and folds
    _check_copies(model, x, f"{name} after inference", train=False)
    _train_step(model, x)
    _check_copies(model, x, f"{name} after a train step", train=True)


# ---- the BN fold cache ------------------------------------------------------------------------------------
def _ffn_pair():
    ref = randomize_(ref_fat.ConvFFN(16, 32, 3, 1, 16)).eval()
    fused = fused_fat.ConvFFN(16, 32, 3, 1, 16).eval()
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _folds(module):
    """The cached inference state in ``module``: BN folds (``_bn.cached_fold``) and FAT inference
    plans (``nn.fat_inference``, which fold the BNs of the blocks they run)."""
    found = {f"{id(m)} {name}": hit for m in module.modules() for name, hit in _bn.fold_cache(m).items()}
    found.update({f"{id(m)} plan": m.__dict__[_plan._PLAN] for m in module.modules()
                  if _plan._PLAN in m.__dict__})
    return found


def _check(label, ref, fused, x):
    with torch.no_grad():
        y, y_ref = fused(x), ref(x)
        exact = copy.deepcopy(ref).double()(x.double())
    assert _folds(fused), f"{label}: the inference path cached no fold or plan"
    assert y.dtype == y_ref.dtype
    assert_error_rule(label, y, y_ref, exact.to(y.dtype) if y.dtype == torch.float64 else exact)


def _new_state(ref):
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    for k, v in sd.items():
        if v.is_floating_point():
            v.copy_(torch.rand_like(v) + 0.5 if k.endswith("running_var") else torch.randn_like(v) * 0.3)
    return sd


@pytest.mark.parametrize("assign", [False, True])
def test_fold_follows_load_state_dict(assign):
    ref, fused = _ffn_pair()
    x = torch.randn(2, 16, 8, 8)
    _check("first call", ref, fused, x)
    sd = _new_state(ref)
    ref.load_state_dict(sd)
    fused.load_state_dict({k: v.clone() for k, v in sd.items()}, assign=assign)
    _check(f"after load_state_dict(assign={assign})", ref, fused, x)


def test_fold_follows_to_half_and_back_and_dtype():
    ref, fused = _ffn_pair()
    x = torch.randn(2, 16, 8, 8)
    _check("fp32", ref, fused, x)
    fused.half()
    sd = _new_state(ref)  # new weights while the model is half: the old fp32 fold must not return
    ref.load_state_dict(sd)
    fused.load_state_dict(sd)  # copied into the fp16 tensors (rounded)
    fused.float()
    ref.load_state_dict(fused.state_dict())
    _check("after .half(), new weights, .float()", ref, fused, x)
    ref.double(), fused.double()
    with torch.no_grad():
        torch.testing.assert_close(fused(x.double()), ref(x.double()), rtol=1e-12, atol=1e-12)


def test_fold_follows_train_steps_and_eval():
    ref, fused = _ffn_pair()
    x = torch.randn(4, 16, 8, 8)
    _check("eval", ref, fused, x)
    for m in (ref, fused):  # one identical SGD step in training mode (BN statistics move too)
        _train_step(m, x)
    for (k, a), b in zip(ref.state_dict().items(), fused.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    fused.load_state_dict(ref.state_dict())
    _check("eval after a train step", ref, fused, x)


def test_fold_follows_requires_grad_and_replaced_tensors():
    ref, fused = _ffn_pair()
    x = torch.randn(2, 16, 8, 8)
    fused.requires_grad_(False)
    _check("requires_grad off", ref, fused, x)
    fused.requires_grad_(True)
    _check("requires_grad on", ref, fused, x)
    for m in (ref, fused):  # new objects for a BN statistic and the conv weight
        m.bn.running_var = torch.rand_like(m.bn.running_var) + 0.5
        m.fc2.weight = torch.nn.Parameter(torch.randn_like(m.fc2.weight) * 0.3)
    fused.load_state_dict(ref.state_dict())
    _check("replaced tensors", ref, fused, x)
    fused.bn.eps = ref.bn.eps = 0.25  # a hyperparameter of the fold
    _check("new eps", ref, fused, x)


def test_fold_cache_is_not_pickled_and_rebuilds():
    ref, fused = _ffn_pair()
    x = torch.randn(2, 16, 8, 8)
    _check("first call", ref, fused, x)
    for other in (pickle.loads(pickle.dumps(fused)), copy.deepcopy(fused)):
        assert not _folds(other), "the fold cache travelled with the module"
        _check("copy", ref, other, x)
