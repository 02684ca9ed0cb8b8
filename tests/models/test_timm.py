"""timm integration (fastvit_ops/timm_models.py): registration, creation, local pretrained weights,
and each paper's evaluation settings through resolve_data_config. Skipped without timm."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

timm = pytest.importorskip("timm")

import fastvit_ops  # noqa: E402
from fastvit_ops import models, timm_models  # noqa: E402

# (crop_pct, interpolation) of each paper's released evaluation code (see timm_models' docstring).
EVAL = {"fat_b0": (0.875, "bicubic"), "fat_b1": (0.875, "bicubic"), "fat_b2": (0.875, "bicubic"),
        "fat_b3": (0.875, "bicubic"), "fcvit_tiny": (0.9, "bicubic"), "fcvit_b12": (0.9, "bicubic"),
        "fcvit_b24": (0.95, "bicubic"), "fcvit_b48": (0.95, "bicubic"), "cvt_13": (0.875, "bicubic"),
        "cvt_21": (0.875, "bicubic"), "vt_resnet18": (0.875, "bilinear"), "vt_resnet34": (0.875, "bilinear")}
ONE_PER_FAMILY = ["fat_b0", "fcvit_tiny", "cvt_13", "vt_resnet18"]


def test_every_model_registered_under_the_prefix():
    assert set(EVAL) == set(models.list_models())
    assert sorted(timm.list_models("fastvit_ops_*")) == sorted("fastvit_ops_" + n for n in models.list_models())


@pytest.mark.parametrize("name", sorted(EVAL))
def test_resolve_data_config_is_the_papers_eval(name):
    model = torch.nn.Module()  # resolve_data_config only reads the pretrained cfg
    model.pretrained_cfg = timm.models.get_pretrained_cfg("fastvit_ops_" + name).to_dict()
    cfg = timm.data.resolve_data_config({}, model=model)
    crop, interp = EVAL[name]
    assert cfg == {"input_size": (3, 224, 224), "interpolation": interp, "mean": (0.485, 0.456, 0.406),
                   "std": (0.229, 0.224, 0.225), "crop_pct": crop, "crop_mode": "center"}
    t = timm.data.create_transform(**cfg)
    resize = t.transforms[0]
    assert resize.size == int(224 / crop) and resize.interpolation.value == interp


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_create_model_builds_the_fused_model(name):
    model = timm.create_model("fastvit_ops_" + name, num_classes=7)
    ref = models.create(name, reference=True, num_classes=7)
    assert isinstance(model, type(ref))  # the reference model class or its fused subclass (VT-ResNet)
    assert [(k, v.shape) for k, v in model.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]
    fused_types = tuple(set(fastvit_ops.nn.FAT_LAYERS.values()) | set(fastvit_ops.nn.FCVIT_LAYERS.values())
                        | set(fastvit_ops.nn.CVT_LAYERS.values()) | set(fastvit_ops.nn.VT_LAYERS.values()))
    assert any(isinstance(m, fused_types) for m in model.modules())
    plain = timm.create_model("fastvit_ops_" + name, num_classes=7, reference=True)
    assert not any(isinstance(m, fused_types) for m in plain.modules())
    assert model.pretrained_cfg["architecture"] == "fastvit_ops_" + name


@pytest.mark.parametrize("name", ["fat_b0", "cvt_13"])
def test_pretrained_file_loads_a_local_checkpoint(name, tmp_path):
    torch.manual_seed(0)
    ref = models.create(name, reference=True)
    # Released checkpoints come as a bare state_dict or wrapped (FAT's training code: {"model": ...}),
    # keys possibly prefixed by DDP's "module.".
    path = tmp_path / f"{name}.pth"
    torch.save({"model": {"module." + k: v for k, v in ref.state_dict().items()}}, path)
    model = timm.create_model("fastvit_ops_" + name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    # Another head size: timm drops the classifier, the rest still loads.
    other = timm.create_model("fastvit_ops_" + name, pretrained=True, num_classes=5,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert other.head.weight.shape[0] == 5
    k = next(iter(ref.state_dict()))
    assert torch.equal(other.state_dict()[k], ref.state_dict()[k])


def test_pretrained_without_weights_raises():
    with pytest.raises(ValueError, match="pretrained_cfg_overlay=dict\\(file="):
        timm.create_model("fastvit_ops_fat_b0", pretrained=True)


def test_registration_when_timm_is_imported_after_fastvit_ops():
    """The post-import hook: importing fastvit_ops first, timm later, still registers."""
    code = ("import fastvit_ops, sys; assert 'timm' not in sys.modules; import timm; "
            "assert 'fastvit_ops_cvt_13' in timm.list_models('fastvit_ops_*')")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=300)


def test_register_is_idempotent():
    assert timm_models.register() == timm_models.register()
