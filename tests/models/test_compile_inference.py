"""torch.compile of converted models keeps the fused inference plans: in eval mode with no grad,
each planned block (FATBlock, FCViTBlock, CvT Block) is one opaque fastvit_ops::module_inference op
whose kernel runs the block's cached plan; in training the differentiable fused ops are traced.
fullgraph=True for every family, eval and train; outputs against eager by the 2x rule."""
import copy

import pytest
import torch

import fastvit_ops
from conftest import assert_error_rule, randomize_
from fastvit_ops import numerics
from fastvit_ops import models
from fastvit_ops.nn import _plan

FAMILIES = ["fat_b0", "fcvit_tiny", "cvt_13", "vt_resnet18"]
# Opaque ops per model: the planned modules not inside another (FAT-B0: 12 blocks and the stem; its
# ConvFFNs run inside their blocks' plans).
PLANNED = {"fat_b0": 13, "fcvit_tiny": 17, "cvt_13": 13, "vt_resnet18": 0}


def outermost_planned(model):
    planned = [m for m in model.modules() if isinstance(m, _plan.PlannedModule)]
    inner = {id(s) for m in planned for s in m.modules() if s is not m}
    return [m for m in planned if id(m) not in inner]


def build(name, seed=0):
    torch.manual_seed(seed)
    ref = randomize_(models.create(name, reference=True, num_classes=10), 0.05).eval()
    return ref, fastvit_ops.convert(ref).eval()


def graph_ops(model, x):
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0
    return [str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("name", FAMILIES)
def test_eval_compile_keeps_the_plans(name):
    ref, conv = build(name)
    x = torch.randn(2, 3, 64, 64)
    planned = outermost_planned(conv)
    assert len(planned) == PLANNED[name]
    with torch.no_grad():
        ops = graph_ops(conv, x)
        assert ops.count("fastvit_ops.module_inference.default") == PLANNED[name]
        for m in planned:  # explain() ran the graph once; start the compiled run without plans
            m.__dict__.pop("_fastvit_ops_plan", None)
        torch._dynamo.reset()
        compiled = torch.compile(conv, fullgraph=True, backend="aot_eager")
        y = compiled(x)
        assert all(m.__dict__.get("_fastvit_ops_plan") is not None for m in planned), \
            "the compiled graph did not run the blocks' plans"
        assert_error_rule(f"compiled {name}", y, conv(x), copy.deepcopy(ref).double()(x.double()))


@pytest.mark.parametrize("name", ["fcvit_tiny", "cvt_13"])
def test_compiled_plan_follows_weight_changes(name):
    """The plan's weights are not graph inputs: the op's kernel rebuilds the plan when they change."""
    ref, conv = build(name)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch._dynamo.reset()
        compiled = torch.compile(conv, fullgraph=True, backend="aot_eager")
        compiled(x)
        for m in (ref, conv):
            for p in m.parameters():
                p.mul_(1.1)
        y = compiled(x)
        # A network's logits against the reference's: the compounded factor (numerics.py).
        assert_error_rule(f"compiled {name} after an in-place update", y, ref(x),
                          copy.deepcopy(ref).double()(x.double()), numerics.COMPOUNDED_FACTOR)


@pytest.mark.parametrize("name", FAMILIES)
def test_train_compile_fullgraph_matches_eager(name):
    """Training (grad, train mode): no opaque op; forward and backward match eager."""
    ref, conv = build(name)
    x = torch.randn(2, 3, 64, 64)
    eager, comp = conv.train(), copy.deepcopy(conv).train()
    ops = graph_ops(comp, x)
    assert "fastvit_ops.module_inference.default" not in ops
    torch._dynamo.reset()
    compiled = torch.compile(comp, fullgraph=True, backend="aot_eager")
    ye, yc = eager(x), compiled(x)
    torch.testing.assert_close(yc, ye, rtol=1e-4, atol=1e-5)
    ye.square().sum().backward()
    yc.square().sum().backward()
    for (n, a), b in zip(comp.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5, msg=n)


def test_inductor_compiles_around_the_opaque_blocks():
    ref, conv = build("fcvit_tiny")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch._dynamo.reset()
        y = torch.compile(conv, fullgraph=True)(x)
        assert_error_rule("inductor fcvit_tiny", y, conv(x), copy.deepcopy(ref).double()(x.double()))


def test_export_does_not_use_the_opaque_op():
    ref, conv = build("cvt_13")
    ep = torch.export.export(conv, (torch.randn(1, 3, 64, 64),))
    assert not any("module_inference" in str(n.target) for n in ep.graph.nodes)
