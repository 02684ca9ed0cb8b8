"""Model registry: every model builds with the authors' state_dict, fused and reference alike."""
import pytest
import torch

import fastvit_ops
from conftest import checkpoint_spec
from fastvit_ops import models

RELEASED = ["fat_b0", "fat_b1", "fat_b2", "fat_b3", "fcvit_tiny", "fcvit_b12", "fcvit_b24", "fcvit_b48", "cvt_13", "cvt_21"]
NAMES = RELEASED + ["vt_resnet18", "vt_resnet34"]  # VT-ResNets: built from the paper, no released weights


def test_list_models():
    assert models.list_models() == NAMES


def test_create_unknown_name():
    with pytest.raises(ValueError, match="name: unknown model 'fat_b9'"):
        models.create("fat_b9")


@pytest.mark.parametrize("name", RELEASED)
def test_fused_model_state_dict_is_the_checkpoint(name):
    """The default (fused) build has exactly the released keys/shapes and loads the reference weights strictly."""
    entries, n_params = checkpoint_spec(name)
    fused = models.create(name)
    assert [(k, tuple(v.shape)) for k, v in fused.state_dict().items()] == entries
    assert sum(p.numel() for p in fused.parameters()) == n_params
    ref = models.create(name, reference=True)
    fused.load_state_dict(ref.state_dict(), strict=True)
    for (k, a), b in zip(fused.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k


def test_fused_layers_are_used():
    """Non-reference builds contain the fused drop-ins of fastvit_ops.nn; reference builds none."""
    fused_types = tuple(set(fastvit_ops.nn.FAT_LAYERS.values()))
    fused = models.create("fat_b0")
    ref = models.create("fat_b0", reference=True)
    assert any(isinstance(m, fused_types) for m in fused.modules())
    assert not any(isinstance(m, fused_types) for m in ref.modules())


@pytest.mark.slow
def test_fused_fat_b0_matches_reference():
    ref = models.create("fat_b0", reference=True).eval()
    fused = models.create("fat_b0").eval()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-4)
