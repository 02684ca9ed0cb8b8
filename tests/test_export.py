"""Export of converted models (fastvit_ops/export.py): torch.export keeps the fused custom ops and
its program runs; AOTInductor compiles a small model; fastvit_ops.export.onnx_export lowers every fused op to
standard ONNX operators and onnxruntime matches PyTorch by the 2x rule of docs/numerics.md. The ONNX tests
skip without onnx / onnxruntime / onnxscript."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import fastvit_ops
from conftest import assert_error_rule, randomize_
from fastvit_ops import export, models, numerics
from fastvit_ops.ops import attention, dwconv

MODELS = ["fat_b0", "fcvit_tiny", "cvt_13", "vt_resnet18"]
# The fused custom ops each converted model's eval forward keeps under torch.export.
CUSTOM_OPS = {"fat_b0": {"dwconv2d", "downsampled_attention"}, "fcvit_tiny": {"dwconv2d", "global_context"},
              "cvt_13": {"conv_projection_qkv", "downsampled_attention"}, "vt_resnet18": set()}
HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime", "onnxscript"))
requires_onnx = pytest.mark.skipif(not HAS_ONNX, reason="needs onnx, onnxruntime and onnxscript (the 'export' extra)")


def build(name, seed=0):
    """(reference fp32, converted fp32, reference fp64) with the same random weights, eval mode;
    64×64 inputs (the smallest every model takes) keep export time down."""
    torch.manual_seed(seed)
    ref = randomize_(models.create(name, reference=True, num_classes=10), 0.05).eval()
    exact = models.create(name, reference=True, num_classes=10).double().eval()
    exact.load_state_dict(ref.state_dict())
    return ref, fastvit_ops.convert(ref).eval(), exact


_EXPORTED = {}


def exported(name):
    """(reference, exact, ExportedProgram of the converted model), traced once per model and shared by
    the torch.export and ONNX tests (tracing a whole model is most of their time)."""
    if name not in _EXPORTED:
        ref, conv, exact = build(name)
        _EXPORTED[name] = ref, exact, torch.export.export(conv, (torch.randn(2, 3, 64, 64),))
    return _EXPORTED[name]


def fastvit_targets(graph):
    return {n.target.name().split("::")[1] for n in graph.nodes
            if n.op == "call_function" and hasattr(n.target, "name") and n.target.name().startswith("fastvit_ops::")}


@pytest.mark.parametrize("name", MODELS)
def test_torch_export_keeps_custom_ops_and_runs(name):
    ref, exact, ep = exported(name)
    assert fastvit_targets(ep.graph) == CUSTOM_OPS[name]
    x2 = torch.randn(2, 3, 64, 64)  # a fresh input: the program is not a recording of one call
    with torch.no_grad():
        y = ep.module()(x2)
        assert_error_rule(f"{name} exported", y, ref(x2), exact(x2.double()))


def _op_samples():
    """(op name, args for the custom op without ``backend``) — small random inputs for each."""
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    B, C, H, W, G = 2, 16, 6, 7, 4
    x = r(B, C, H, W)
    mlp = (r(8, C) * 0.3, r(8), r(C, 4) * 0.3, r(C))
    q, k, v, gate = r(B, 2, 13, 8), r(B, 2, 5, 8), r(B, 2, 5, 8), r(B, 2, 13, 8)
    toks = r(B, 1 + H * W, C)
    wqkv = [t for _ in range(3) for t in (r(C, 1, 3, 3), r(C))]
    return [
        ("dwconv2d", (x, r(C, 1, 5, 5), r(C), 1, 2, dwconv._ACT_ID["silu"], True)),
        ("dwconv2d", (x, r(C, 1, 3, 3), None, 2, 1, dwconv._ACT_ID[None], False)),
        ("downsampled_attention", (q, k, v, gate, 0.4, attention.BHND)),
        ("downsampled_attention", (q, k, v, None, 0.35, attention.TOKENS)),
        ("sigmoid_cross_modulation", (r(B, C, H, W), r(B, C, H, W), "silu")),
        ("token_global_similarity", (x, r(G), r(G), G, 1e-5)),
        ("global_context", (x, *mlp, r(G), r(G), G, 1e-5, True)),
        ("global_context", (x, *mlp, r(G), r(G), G, 1e-5, False)),
        ("context_dwconv2d", (x, r(B, G, H, W), r(B, C), r(C, 1, 3, 3), r(C), 1, 1, dwconv._ACT_ID["gelu"])),
        ("conv_projection_qkv", (toks, *wqkv, H, W, 1, 1, 2)),
    ]


@pytest.mark.parametrize("i", range(len(_op_samples())))
def test_decomposition_matches_the_op(i):
    """Every output of each decomposition (softmax statistics, channel means included) equals the
    custom op's on the reference backend, in float64; a float32 run stays within the 2x rule."""
    name, args = _op_samples()[i]
    assert set(export.DECOMPOSITIONS) >= {name}
    op = getattr(torch.ops.fastvit_ops, name).default
    assert op not in torch._decomp.decomposition_table
    with export.onnx_decompositions():
        assert torch._decomp.decomposition_table[op] is export.DECOMPOSITIONS[name]
    assert op not in torch._decomp.decomposition_table
    to64 = [a.double() if isinstance(a, torch.Tensor) else a for a in args]
    want = op(*to64, "reference")
    got = export.DECOMPOSITIONS[name](*to64, "reference")
    want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
    assert len(got) == len(want)
    for j, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype, (name, j)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"{name} output {j}")
    got32 = export.DECOMPOSITIONS[name](*args, "reference")
    eager32 = op(*args, "reference")
    first = lambda t: t[0] if isinstance(t, tuple) else t  # noqa: E731
    assert_error_rule(f"{name} decomposition fp32", first(got32), first(eager32), want[0])


def test_decompositions_stay_out_of_inductor_and_export_defaults():
    """Only onnx_export lowers the ops: torch.compile, torch.export's default run_decompositions and
    torch._decomp's global table (outside onnx_export) keep the fused kernels."""
    from torch._inductor.decomposition import select_decomp_table

    for name in export.DECOMPOSITIONS:
        op = getattr(torch.ops.fastvit_ops, name).default
        assert op not in select_decomp_table()
        assert op not in torch.export.default_decompositions()
        assert op not in torch._decomp.decomposition_table


def test_compile_with_the_ci_variable_set(monkeypatch):
    """With ``CI`` set (GitHub Actions sets CI=true), Inductor asserts when it falls back to an op
    that has a global decomposition: importing fastvit_ops once registered them there, and
    torch.compile of every fused op failed on CI machines."""
    monkeypatch.setenv("CI", "1")
    torch._dynamo.reset()
    x = torch.randn(1, 4, 9, 9, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, requires_grad=True)
    f = torch.compile(lambda x, w: fastvit_ops.dwconv2d(x, w, padding=1).sin(), fullgraph=True)
    got = f(x, w)
    got.sum().backward()
    want = torch.nn.functional.conv2d(x.detach().double(), w.detach().double(), padding=1, groups=4).sin()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert x.grad is not None and w.grad is not None
    torch._dynamo.reset()


def test_onnx_export_rejects_the_torchscript_exporter():
    with pytest.raises(ValueError, match="dynamo=False"):
        export.onnx_export(torch.nn.Identity(), (torch.randn(1),), dynamo=False)


def _run_onnx(program, x, path):
    import onnxruntime as ort

    domains = {n.domain for n in program.model_proto.graph.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard ONNX domains {domains}"
    program.save(path)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(y)


@requires_onnx
@pytest.mark.parametrize("name", MODELS)
def test_onnx_export_runs_in_onnxruntime(name, tmp_path):
    """onnx_export of the exported program (the module path below traces the same program)."""
    ref, exact, ep = exported(name)
    program = export.onnx_export(ep)
    assert "Conv" in {n.op_type for n in program.model_proto.graph.node}
    x = torch.randn(2, 3, 64, 64)
    y = _run_onnx(program, x, os.path.join(tmp_path, f"{name}.onnx"))
    with torch.no_grad():
        # a whole model's logits from another runtime's kernels: a compounded result (docs/numerics.md;
        # vt_resnet18 once measured 2.2x eager's largest error, RMS 1.4x)
        assert_error_rule(f"{name} in onnxruntime", y, ref(x), exact(x.double()), numerics.COMPOUNDED_FACTOR)


@requires_onnx
def test_onnx_export_of_the_module(tmp_path):
    """``onnx_export(convert(model), (x,))`` straight from the module (the README's usage); the
    global decomposition table is as before afterwards."""
    ref, conv, exact = build("fat_b0")
    before = dict(torch._decomp.decomposition_table)
    program = export.onnx_export(conv, (torch.randn(1, 3, 64, 64),))
    assert dict(torch._decomp.decomposition_table) == before
    x = torch.randn(1, 3, 64, 64)
    y = _run_onnx(program, x, os.path.join(tmp_path, "fat_b0.onnx"))
    with torch.no_grad():
        assert_error_rule("fat_b0 module → ONNX", y, ref(x), exact(x.double()), numerics.COMPOUNDED_FACTOR)


class _EveryOp(torch.nn.Module):
    """A small module that calls each fused op a converted model's eval forward keeps (dwconv2d,
    downsampled_attention, global_context, conv_projection_qkv), for the AOTInductor test."""

    def __init__(self, C=16, G=4):
        super().__init__()
        p = lambda *s: torch.nn.Parameter(torch.randn(*s) * 0.3)  # noqa: E731
        self.dw_w, self.dw_b = p(C, 1, 5, 5), p(C)
        self.gc = [p(8, C), p(8), p(C, 4), p(C), p(G), p(G)]
        for i, t in enumerate(self.gc):
            self.register_parameter(f"gc{i}", t)
        self.cp = [p(C, 1, 3, 3), p(C), p(C, 1, 3, 3), p(C), p(C, 1, 3, 3), p(C)]
        for i, t in enumerate(self.cp):
            self.register_parameter(f"cp{i}", t)
        self.G = G

    def forward(self, x):
        B, C, H, W = x.shape
        x = fastvit_ops.dwconv2d(x, self.dw_w, self.dw_b, activation="silu", residual=True)
        x = fastvit_ops.global_context(x, *self.gc, groups=self.G)
        t = x.flatten(2).transpose(1, 2)
        q, k, v = fastvit_ops.conv_projection_qkv(t, (H, W), False, *self.cp)
        h = 2
        split = lambda u: u.reshape(B, u.shape[1], h, C // h).transpose(1, 2)  # noqa: E731
        return fastvit_ops.downsampled_attention(split(q), split(k), split(v))


def test_aoti_compiles_and_runs(tmp_path):
    """AOTInductor packages a program with the fused custom ops; the package runs and matches eager."""
    torch.manual_seed(0)
    m = _EveryOp().eval()
    x = torch.randn(2, 16, 8, 9)
    ep = torch.export.export(m, (x,))
    assert fastvit_targets(ep.graph) == {"dwconv2d", "global_context", "conv_projection_qkv", "downsampled_attention"}
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "every_op.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    x2 = torch.randn(2, 16, 8, 9)
    with torch.no_grad():
        torch.testing.assert_close(runner(x2), m(x2), rtol=1e-5, atol=1e-5)
