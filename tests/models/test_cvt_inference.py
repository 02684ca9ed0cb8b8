"""The fused CvT block's CPU inference path (fastvit_ops.nn.cvt_inference): oneDNN matmuls with
in-place epilogues (residual add, QuickGELU as SiLU with 1.702 folded), BN-folded one-pass conv
projections, the fused attention; the same values as the reference block by the 2x rule against
float64, with and without the oneDNN op; plans rebuilt on any change and dropped when pickling."""
import copy
import pickle

import pytest
import torch

import fastvit_ops
from fastvit_ops import numerics
from conftest import assert_error_rule, randomize_
from fastvit_ops.nn import cvt as fused_cvt
from fastvit_ops.nn import cvt_inference
from fastvit_ops.reference import cvt as ref_cvt

LAYERS = dict(fastvit_ops.nn.CVT_LAYERS)
KW = dict(method="dw_bn", kernel_size=3, stride_kv=2, stride_q=1, padding_kv=1, padding_q=1)


def _pair(dim=48, heads=3, cls=True, scale=0.2):
    ref = randomize_(ref_cvt.Block(dim, dim, heads, qkv_bias=True, with_cls_token=cls, **KW), scale).eval()
    fused = fused_cvt.Block(dim, dim, heads, qkv_bias=True, with_cls_token=cls, layers=LAYERS, **KW).eval()
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _exact(ref, x, h, w):
    with torch.no_grad():
        return copy.deepcopy(ref).double()(x.double(), h, w)


def _plan_built(m):
    return m.__dict__.get("_fastvit_ops_plan") is not None


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "f_linear"])
@pytest.mark.parametrize("cls,h,w", [(True, 7, 6), (False, 9, 9), (False, 4, 11)])
def test_block_plan_matches_reference(onednn, cls, h, w, monkeypatch):
    if onednn and not cvt_inference.onednn_linear():
        pytest.skip("torch.ops.mkldnn._linear_pointwise is not available here")
    monkeypatch.setattr(cvt_inference, "onednn_linear", lambda: onednn)
    ref, fused = _pair(cls=cls)
    x = torch.randn(2, int(cls) + h * w, 48)
    before = x.clone()
    with torch.no_grad():
        y_ref, y = ref(x, h, w), fused(x, h, w)
    assert _plan_built(fused)
    assert torch.equal(x, before), "the plan wrote into its input"
    assert_error_rule(f"CvT Block cls={cls} {h}x{w}", y, y_ref, _exact(ref, x, h, w), numerics.COMPOUNDED_FACTOR)


def test_onednn_linear_self_test_passes_on_x86():
    import platform
    if platform.machine() not in ("x86_64", "AMD64") or not torch.backends.mkldnn.is_available():
        pytest.skip("oneDNN CPU kernels are only expected on x86")
    assert cvt_inference.onednn_linear()


def test_non_plan_parts_run_as_modules():
    """An MLP with another activation and a dropout-free attention replaced by the user run as modules."""
    ref, fused = _pair()
    for m in (ref, fused):
        m.mlp.act = torch.nn.GELU()
    x = torch.randn(2, 1 + 36, 48)
    with torch.no_grad():
        assert_error_rule("CvT Block with GELU", fused(x, 6, 6), ref(x, 6, 6), _exact(ref, x, 6, 6), numerics.COMPOUNDED_FACTOR)


def test_plan_rebuilt_on_changes_and_dropped_when_pickling():
    ref, fused = _pair()
    x = torch.randn(2, 1 + 25, 48)
    with torch.no_grad():
        fused(x, 5, 5)
        for m in (ref, fused):
            m.attn.conv_proj_k.bn.running_var.mul_(2.0)
            m.mlp.fc1.bias.add_(0.3)
        assert_error_rule("after in-place edits", fused(x, 5, 5), ref(x, 5, 5), _exact(ref, x, 5, 5))
        new = {k: v.clone() * 0.7 if v.is_floating_point() else v for k, v in ref.state_dict().items()}
        ref.load_state_dict(new)
        fused.load_state_dict(new, assign=True)
        assert_error_rule("after load_state_dict(assign=True)", fused(x, 5, 5), ref(x, 5, 5), _exact(ref, x, 5, 5))
    clone = pickle.loads(pickle.dumps(fused))
    assert not _plan_built(clone)
    with torch.no_grad():
        torch.testing.assert_close(clone(x, 5, 5), fused(x, 5, 5))


def test_grad_takes_the_differentiable_path():
    ref, fused = _pair()
    x = torch.randn(2, 1 + 16, 48)
    y = fused(x, 4, 4)
    assert not _plan_built(fused) and y.requires_grad
    y.square().sum().backward()


def test_converted_cvt_13_runs_the_plans():
    ref = randomize_(fastvit_ops.models.create("cvt_13", reference=True), 0.05).eval()
    conv = fastvit_ops.convert(ref)
    assert conv.fastvit_ops_report["Block"] == 13
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y_ref, y = ref(x), conv(x)
    assert all(_plan_built(m) for m in conv.modules() if isinstance(m, fused_cvt.Block))
    exact = copy.deepcopy(ref).double()
    with torch.no_grad():
        assert_error_rule("converted cvt_13 logits", y, y_ref, exact(x.double()))
