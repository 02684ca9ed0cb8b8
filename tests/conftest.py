"""Shared test fixtures: checkpoint key files, seeds, backends."""
from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# Without a GPU, Triton kernels are proven on the CPU interpreter; it must be set before the first
# `import triton`, which fastvit_ops does lazily.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastvit_ops  # noqa: E402
from fastvit_ops import numerics  # noqa: E402
from fastvit_ops.numerics import error_rule  # noqa: E402
from fastvit_ops.ops import dispatch  # noqa: E402
from fastvit_ops.ops.dispatch import backend_available  # noqa: E402

# Property-based tests (hypothesis, tests/ops/test_properties.py), profiles: ``default`` = ``ci``
# (what a plain ``python -m pytest``, and so CI, runs: 500 examples per op, ~2.5 minutes on 2
# cores), ``quick`` (50, for iterating locally) and ``thorough`` (5000); choose one with
# ``--hypothesis-profile=...`` or FASTVIT_OPS_HYPOTHESIS_PROFILE.
# Random examples every run (like the seeds below); a failure prints the falsifying example (its
# tensors come from a drawn seed, so the printed call rebuilds them) and a ``@reproduce_failure``
# blob that replays it exactly.
settings.register_profile("ci", max_examples=500, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("default", parent=settings.get_profile("ci"))
settings.register_profile("quick", parent=settings.get_profile("ci"), max_examples=50)
settings.register_profile("thorough", parent=settings.get_profile("ci"), max_examples=5000)
settings.load_profile(os.environ.get("FASTVIT_OPS_HYPOTHESIS_PROFILE", "default"))

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def backends_for(device: str = "cpu"):
    """The backends that can run on ``device`` here, each as a pytest param (unavailable ones skip)."""
    out = []
    for name in sorted(dispatch.backend_names(), key=lambda n: n != "reference"):
        ok, why = backend_available(name, torch.device(device))
        if (name == "cpu" and device != "cpu") or (name == "cuda" and device != "cuda"):
            continue
        out.append(pytest.param(name, marks=() if ok else pytest.mark.skip(reason=why), id=name))
    return out


def spy_kernels(monkeypatch, op: str, stages=("forward", "backward"), calls=None) -> list:
    """A list (``calls``, or a new one) that records ``("fwd"|"bwd", implementation name)`` each
    time one of ``op``'s kernels runs (the registry's entries wrapped for this test)."""
    calls = [] if calls is None else calls

    def spy(impl, stage):
        def fn(*args):
            calls.append(({"forward": "fwd", "backward": "bwd"}.get(stage, stage), impl.name))
            return impl.fn(*args)
        return impl._replace(fn=fn)
    for stage in stages:
        replace_impls(monkeypatch, op, stage, spy)
    return calls


def replace_impls(monkeypatch, op: str, stage: str, new) -> None:
    """For this test, ``op``'s ``stage`` list with every implementation ``impl`` replaced by
    ``new(impl, stage)``."""
    impls = dispatch.implementations(op, stage)
    monkeypatch.setitem(dispatch._TABLE[op], stage, [new(impl, stage) for impl in impls])


def randomize_(module: torch.nn.Module, scale: float = 0.2) -> torch.nn.Module:
    """Random weights everywhere and non-trivial BN running statistics (eval-mode BN folding matters)."""
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn_like(t) * 0.1)
            else:
                t.copy_(torch.randn_like(t) * scale)
    return module


NORMS = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm)


def randomize_model_(model: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    """Random weights scaled by fan-in (activations stay O(1) through depth), norm affines around
    (1, 0), BN statistics away from (0, 1), layer scales in [0.2, 0.6], α around 1, β around 0."""
    def rnd(t, std, mean=0.0):
        t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype) * std + mean)

    with torch.no_grad():
        for m in model.modules():
            for name, p in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
                if not p.is_floating_point():
                    continue
                if name == "running_var":
                    p.copy_(torch.rand(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) + 0.5)
                elif name == "running_mean":
                    rnd(p, 0.2)
                elif name.startswith("layer_scale"):
                    p.copy_(torch.rand(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * 0.4 + 0.2)
                elif name == "rescale_weight":
                    rnd(p, 0.3, 1.0)
                elif name == "rescale_bias":
                    rnd(p, 0.3)
                elif name == "weight" and isinstance(m, NORMS):
                    rnd(p, 0.2, 1.0)
                elif name == "bias":
                    rnd(p, 0.1)
                elif p.dim() >= 2:
                    rnd(p, 1.0 / math.sqrt(p[0].numel()))
                else:
                    rnd(p, 0.2)
    return model


#: Smallest relative margin of a maxout (FCViT's competitive bottleneck: the larger of fc1's two
#: halves) at which two float32 runs may be held to one float64 gradient. ``max`` is not
#: differentiable at a tie: on either side of it the gradient goes to a different half, and through
#: the channel means to every pixel. A near-tie (|u_a − u_b| below the float32 rounding of u)
#: lets one run's rounding land on the other side of the kink than float64's: then its gradient is
#: the one-sided gradient at a point a rounding away (a valid answer, not an inaccurate one), and
#: no error rule applies. Measured: fcvit_b48 at seed 3006762286 had a margin of 1.5e-7 and the fused
#: run's rounding (4e-7 of u's scale) flipped it, 69x eager's error in patch_embed's weight gradient
#: (eager's runs stayed on float64's side). Over 12 other seeds the smallest margin over 96
#: maxouts was 1.7e-5..2.2e-4; u's float32 error deep in the network is ~1e-6 of its scale.
MAXOUT_MARGIN = 1e-5


def maxout_margin(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Smallest ``|u_a − u_b| / max|u|`` (per sample) over every FCViT ``GlobalContext`` maxout of
    ``model`` run on ``x`` (a copy in train mode, so BN statistics are batch statistics as in a
    training step and the model's running statistics are not touched); ``inf`` without any."""
    from fastvit_ops.reference.fcvit import GlobalContext
    gcs = [m for m in model.modules() if isinstance(m, GlobalContext)]
    if not gcs:
        return math.inf
    probe = copy.deepcopy(model).train()
    found = []

    def hook(m, h):
        def fn(_lin, _args, u):
            found.append(((u[:, :h] - u[:, h:]).abs() / u.abs().amax(dim=1, keepdim=True)).min().item())
        return fn
    for m in probe.modules():
        if isinstance(m, GlobalContext):
            m.fc1.register_forward_hook(hook(m, m.hidden))
    with torch.no_grad():
        probe(x.to(next(probe.parameters()).dtype))
    return min(found)


def input_off_kinks(model: torch.nn.Module, draw, tries: int = 20) -> torch.Tensor:
    """``draw()`` (a new random input each call) until ``model``'s maxouts are all at least
    ``MAXOUT_MARGIN`` from a tie (see there), so gradients compared across float32 runs are
    defined; fails after ``tries`` draws."""
    for _ in range(tries):
        x = draw()
        if maxout_margin(model, x.double()) >= MAXOUT_MARGIN:
            return x
    pytest.fail(f"no input in {tries} draws keeps every maxout {MAXOUT_MARGIN:g} from a tie")


def assert_error_rule(name: str, fused: torch.Tensor, eager, exact: torch.Tensor,
                      factor: float = numerics.FACTOR) -> None:
    """The error rule of docs/numerics.md (``fastvit_ops.numerics.error_rule``): the largest and the RMS error
    of ``fused`` against ``exact`` at most 2× eager's, or a few ulp of the tensor's scale.
    ``exact`` is the float64 reference; ``eager`` the eager PyTorch layer in the same dtype as
    ``fused`` (or several evaluations of it on different layouts: the largest error counts).
    ``factor``: ``numerics.COMPOUNDED_FACTOR`` for results of a whole block or model. Both errors
    are reported on failure.
    """
    assert fused.shape == exact.shape, f"{name}: shape {tuple(fused.shape)} != {tuple(exact.shape)}"
    for e in [eager] if isinstance(eager, torch.Tensor) else eager:
        assert fused.dtype == e.dtype, f"{name}: dtype {fused.dtype} != eager {e.dtype}"
    assert torch.isfinite(fused).all(), f"{name}: non-finite values"
    r = error_rule(fused, eager, exact, factor)
    assert r.ok, (f"{name} ({fused.dtype}, shape {tuple(fused.shape)}) exceeds the rule: max error {r.fused_error:.3g} "
                  f"(eager {r.eager_error:.3g}, {r.bad} elements over), RMS error {r.fused_rms:.3g} "
                  f"(eager {r.eager_rms:.3g}); floor {numerics.floor(fused.dtype, exact):.3g}")


def assert_pooled_rule(label: str, items, factor: float = numerics.FACTOR) -> None:
    """The error rule over several small tensors together (``items``: ``(fused, [eager, ...], exact)``
    each, e.g. one parameter's gradient in every block, or over several inputs), each scaled by its
    own largest exact magnitude. Per tensor, the largest error of two equally valid roundings
    is a toss-up deep in a network: over the 8 elements of one block's alpha or bias gradient
    (a cancelling sum amplifies the rounding of the upstream gradient) 2.5x either way was
    measured, and over 512 elements of a 1x1 conv's one outlier element at 2.2x (RMS 1.2x), as the
    check runner's pooled instances also found. The floor: 4 ulp (of the dtype) of each tensor's scale.
    ``factor``: ``numerics.COMPOUNDED_FACTOR`` for gradients of a whole block or model."""
    def pooled(select):
        return torch.cat([(select(it).double() / max(it[2].abs().max().item(), 1e-30)).reshape(-1) for it in items])
    exact = pooled(lambda it: it[2])
    err_f = (pooled(lambda it: it[0]) - exact).abs()
    errs_e = [(pooled(lambda it, k=k: it[1][k]) - exact).abs() for k in range(len(items[0][1]))]
    floor = numerics.ULPS * torch.finfo(items[0][0].dtype).eps  # of each tensor's scale (they are scaled to 1)
    max_e, rms_e = max(e.max().item() for e in errs_e), max(e.square().mean().sqrt().item() for e in errs_e)
    max_f, rms_f = err_f.max().item(), err_f.square().mean().sqrt().item()
    assert torch.isfinite(err_f).all(), f"{label}: non-finite values"
    assert max_f <= max(factor * max_e, floor) and rms_f <= max(factor * rms_e, floor), (
        f"{label} exceeds the {factor:g}x rule (relative to each tensor's scale): max error {max_f:.3g} (eager {max_e:.3g}), "
        f"RMS error {rms_f:.3g} (eager {rms_e:.3g})")


# The released models' state_dict listings (keys and shapes), see tests/data/checkpoints/README.md.
CHECKPOINTS = Path(__file__).resolve().parent / "data" / "checkpoints"

_LINE = re.compile(r"^(\S+) \(([\d, ]*)\)$")


def checkpoint_spec(name: str):
    """Parse ``tests/data/checkpoints/<name>.txt`` → (ordered list of (key, shape), parameter count)."""
    path = CHECKPOINTS / f"{name}.txt"
    if not path.exists():
        pytest.fail(f"checkpoint listing {path} not found")
    lines = path.read_text().splitlines()
    header = re.match(r"^# (\S+): (\d+) state_dict entries, (\d+) parameters$", lines[0])
    assert header, f"unexpected header in {path}: {lines[0]!r}"
    entries = []
    for line in lines[1:]:
        if not line.strip():
            continue
        m = _LINE.match(line)
        assert m, f"unparsable line in {path}: {line!r}"
        shape = tuple(int(s) for s in m.group(2).replace(" ", "").split(",") if s)
        entries.append((m.group(1), shape))
    assert len(entries) == int(header.group(2))
    return entries, int(header.group(3))


@pytest.fixture
def without_cpu_rules(monkeypatch):
    """``auto`` on CPU as if our C++ kernels had won everywhere (fastvit_ops/ops/cpu_rules.py's
    tables empty): for tests of the C++ paths' own dispatch at tiny shapes, which the measured
    rules would otherwise send to eager PyTorch on some capabilities."""
    from fastvit_ops.ops import cpu_rules

    for cap in list(cpu_rules.EAGER):
        monkeypatch.setitem(cpu_rules.EAGER, cap, frozenset())
    for cap in list(cpu_rules.DWCONV_ONEDNN):
        monkeypatch.setitem(cpu_rules.DWCONV_ONEDNN, cap, frozenset())


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    # Random inputs every run, but a failure must be reproducible: print the seed on failure.
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


def pytest_runtest_makereport(item, call):
    if call.excinfo is not None:
        for k, v in item.user_properties:
            if k == "seed":
                item.add_report_section(call.when, "seed", f"torch.manual_seed({v})")
