"""Every reduction in global_context's backward — the gradients of α, β and of the MLP's weights and
biases, and dx — within the rule of docs/numerics.md at groups 1..8, on random, constant, large-mean inputs
and tiny maps, on each backend here (issue 14 item 4: in fp32 these cancelling sums were up to 12×
eager's error at groups = 1 — seeds 171 and 186 — and up to 500× on other inputs)."""
import pytest
import torch

import fastvit_ops
from conftest import assert_error_rule, assert_pooled_rule, backends_for
from fastvit_ops.ops.global_context import reference

BACKENDS = backends_for("cpu")
NAMES = ["x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "rescale_weight", "rescale_bias"]


def issue_case(seed):
    """The issue's reproducer: (1, 7, 19, 2), groups 1, hidden 2 (its torch.manual_seed order)."""
    torch.manual_seed(seed)
    x = torch.randn(1, 7, 19, 2)
    w1, b1 = torch.randn(4, 7) / 7 ** .5, torch.randn(4)
    w2, b2 = torch.randn(7, 2) / 2 ** .5, torch.randn(7)
    al, be = torch.randn(1), torch.randn(1)
    dy = torch.randn_like(x)  # the issue's y = global_context(...); dy = torch.randn_like(y)
    return [x, w1, b1, w2, b2, al, be], 1, dy


def random_case(gen, B, G, d, H, W, kind):
    C, h = G * d, max(1, G * d // 4)
    x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    if kind == "large_mean":
        x = x * 0.5 + 300.0
    elif kind == "constant":
        x = torch.full_like(x, 0.7)
    elif kind == "constant_group":
        x[:, :d] = -1.25
    params = [torch.randn(2 * h, C, generator=gen, dtype=torch.float64) / C ** .5,
              torch.randn(2 * h, generator=gen, dtype=torch.float64),
              torch.randn(C, h, generator=gen, dtype=torch.float64) / h ** .5,
              torch.randn(C, generator=gen, dtype=torch.float64),
              1 + 0.3 * torch.randn(G, generator=gen, dtype=torch.float64),
              0.3 * torch.randn(G, generator=gen, dtype=torch.float64)]
    return [t.float() for t in [x] + params], G


def check(ins, G, backend, seed, label, dy=None, pools=None):
    """Forward and every gradient of ``x + GC(x)`` in fp32 against float64, eager fp32 the yardstick;
    with ``pools`` (a dict) the results are collected there to be judged together instead."""
    gen = torch.Generator().manual_seed(seed + 1)

    def run(tensors, fused):
        leaves = [t.clone().requires_grad_() for t in tensors]
        if fused:
            with fastvit_ops.backend(backend):
                y = fastvit_ops.global_context(*leaves, groups=G)
        else:
            y = reference(leaves[0], leaves[5], leaves[6], G, 1e-5, tuple(leaves[1:5]))
        return y, leaves

    y64, l64 = run([t.double() for t in ins], False)
    if dy is None:
        dy = torch.randn(y64.shape, generator=gen, dtype=torch.float64).float()
    g64 = torch.autograd.grad(y64, l64, dy.double())
    ye, le = run(ins, False)
    ge = torch.autograd.grad(ye, le, dy)
    yf, lf = run(ins, True)
    gf = torch.autograd.grad(yf, lf, dy)
    if pools is not None:
        pools.setdefault("forward", []).append((yf.detach(), [ye.detach()], y64.detach()))
        for name, a, b, e in zip(NAMES, gf, ge, g64):
            pools.setdefault(f"d{name}", []).append((a, [b], e))
        return
    assert_error_rule(f"{label} forward", yf.detach(), ye.detach(), y64.detach())
    for name, a, b, e in zip(NAMES, gf, ge, g64):
        assert_error_rule(f"{label} d{name}", a, b, e)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [171, 186])
def test_issue_reproducers(seed, backend):
    ins, G, dy = issue_case(seed)
    check(ins, G, backend, seed, f"issue seed {seed}", dy)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["randn", "large_mean", "constant", "constant_group", "tiny"])
@pytest.mark.parametrize("groups", [1, 2, 3, 4, 5, 8])
def test_reductions_within_the_rule(groups, kind, backend):
    seed = torch.randint(0, 2**31 - 1, ()).item()
    gen = torch.Generator().manual_seed(seed)
    cases = 3 if backend == "triton" else 6
    pools = {}
    for i in range(cases):
        B = int(torch.randint(1, 3, (), generator=gen))
        d = int(torch.randint(1, 4, (), generator=gen))
        if kind == "tiny":  # 1×1 to 2×2 maps (G·H·W ≥ 2: the unbiased std needs two values)
            H, W = int(torch.randint(1, 3, (), generator=gen)), int(torch.randint(1, 3, (), generator=gen))
            if groups * H * W < 2:
                W = 2
        else:
            H, W = int(torch.randint(2, 9, (), generator=gen)), int(torch.randint(2, 9, (), generator=gen))
        if kind == "constant_group" and groups == 1:
            kind = "randn"
        ins, G = random_case(gen, B, groups, d, H, W, kind)
        check(ins, G, backend, seed + i, f"seed {seed} case {i} ({B}, {G * d}, {H}, {W}) {kind}", pools=pools)
    # Judged over the cases together (as tests/properties.py pools instances): a tiny map's
    # forward is a handful of numbers, where one instance's largest error is a toss-up.
    for name, items in pools.items():
        assert_pooled_rule(f"seed {seed} {kind} groups {groups} {name} ({cases} cases)", items)


@pytest.mark.parametrize("backend", BACKENDS)
def test_similarity_where_one_group_stands_out(backend):
    """S' where group 0 is constant and its means stand out (T_0 many times the other groups' T_γ
    and S's spread), judged over 12 inputs with no floor. The kernels used to form S − T_0 and
    merge the groups' moments shifted by group 0's mean: that offset's rounding reached every
    Ŝ, 8-11x eager's RMS error (CI: a 6x global_context forward at groups 8). Now S − T̄, whose
    mean is 0, and no shift across groups: ~1.3x eager's RMS error, largest error ≤ eager's."""
    G, d = 8, 3
    seed = torch.randint(0, 2**31 - 1, ()).item()
    err_f, err_e = [], []
    for i in range(12):
        gen = torch.Generator().manual_seed(seed + i)
        x = torch.randn(2, G * d, 7, 7, generator=gen, dtype=torch.float64)
        x[:, :d] = -1.25 - 2 * torch.rand(1, generator=gen, dtype=torch.float64)
        x = x.float()
        al = (1 + 0.3 * torch.randn(G, generator=gen, dtype=torch.float64)).float()
        be = (0.3 * torch.randn(G, generator=gen, dtype=torch.float64)).float()
        with torch.no_grad():
            exact = reference(x.double(), al.double(), be.double(), G, 1e-5)
            err_e.append((reference(x, al, be, G, 1e-5).double() - exact).flatten())
            with fastvit_ops.backend(backend):
                err_f.append((fastvit_ops.token_global_similarity(x, al, be, groups=G).double() - exact).flatten())
    ef, ee = torch.cat(err_f), torch.cat(err_e)
    rms = lambda t: t.square().mean().sqrt().item()  # noqa: E731
    # RMS is what the old shift inflated (4.3x); the largest error's tail reached 2.5x eager's in
    # one CI run (0.9x over 24 inputs on average), so it is held to the compounded factor.
    assert rms(ef) <= 2 * rms(ee), f"seed {seed}: RMS error {rms(ef):.3g} vs eager {rms(ee):.3g}"
    assert ef.abs().max() <= 4 * ee.abs().max(), f"seed {seed}: max error {ef.abs().max():.3g} vs eager {ee.abs().max():.3g}"
