"""fastvit_ops.benchmarks.implementation: what a benchmark column really ran (the fused ops'
choices, the graphs torch.compile captured), and every case compiling from empty dynamo caches."""
import torch

import fastvit_ops
from fastvit_ops.benchmarks import implementation as impl


def _step(x, w):
    return fastvit_ops.dwconv2d(x, w).sum()


def test_fused_implementation_names_the_backend_that_ran():
    x, w = torch.randn(1, 4, 9, 9, requires_grad=True), torch.randn(4, 1, 3, 3, requires_grad=True)
    with fastvit_ops.backend("reference"):
        text = impl.fused_implementation(lambda: _step(x, w).backward())
    assert "dwconv2d forward: reference" in text and "dwconv2d backward: reference" in text, text
    assert impl.fused_implementation(lambda: (x * 2).sum()) == "no fastvit_ops op (plain PyTorch)"


def test_compiled_graphs_tells_compiled_from_eager():
    def f(x):
        return torch.sin(x) * 2

    x = torch.randn(8)
    assert impl.compiled_graphs(lambda: f(x)) == 0  # negative control: eager code
    torch._dynamo.reset()
    assert impl.compiled_graphs(lambda: torch.compile(f, backend="eager")(x)) > 0


def test_fresh_compile_resets_dynamo(monkeypatch):
    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    impl.fresh_compile(lambda x: x + 1)
    impl.fresh_compile(lambda x: x + 1)
    assert len(resets) == 2, "each benchmark case compiles from empty dynamo caches"


def test_a_variant_that_fails_to_compile_does_not_lose_the_row(monkeypatch):
    """One variant's compiler crash (torch 2.14.1's Inductor on vt_resnet18's training step with
    ATen forced to AVX2) is recorded in the row; the other variants are still timed."""
    from fastvit_ops.benchmarks import models as model_bench

    def tiny():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                   torch.nn.Linear(4, 1000))

    def broken_compile(model):
        def run(*args):
            raise RuntimeError("index 4397790291545385479 is out of bounds\nmore")
        return run
    monkeypatch.setattr(model_bench, "build", lambda name, device: (tiny(), tiny()))
    monkeypatch.setattr(torch, "compile", broken_compile)
    row = model_bench.throughput("tiny", 2, torch.device("cpu"), "train", size=16, rounds=1, max_seconds=1.0)
    for v in ("reference_compile", "fused_compile"):
        assert row[f"{v}_error"] == "RuntimeError: index 4397790291545385479 is out of bounds"
        assert f"{v}_img_s" not in row
    assert row["reference_img_s"] > 0 and row["fused_img_s"] > 0 and row["fused_speedup"] > 0


def test_compile_caches_are_kept_per_simd_level(tmp_path):
    """Inductor's FX graph cache key omits the vector ISA, so an ATEN_CPU_CAPABILITY=avx2 run on an
    AVX-512 machine would reuse AVX-512 kernels: each SIMD level gets a cache folder of its own."""
    import os
    import subprocess
    import sys

    code = ("from fastvit_ops.benchmarks.implementation import isolate_inductor_cache as f, inductor_vec_isa as v;"
            "a = f(); b = f(); assert a == b, (a, b); print(v()); print(a)")
    env = {k: val for k, val in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path)
    dirs = {}
    for cap in ("default", "avx2", None):
        e = dict(env) if cap is None else dict(env, ATEN_CPU_CAPABILITY=cap)
        out = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, check=True)
        isa, path = out.stdout.strip().splitlines()[-2:]
        assert os.path.dirname(path) == str(tmp_path) and path.endswith("vec_" + isa.replace(" ", "_")), (isa, path)
        dirs[cap] = path
    assert dirs["default"] != dirs[None]  # the scalar build never shares the vector builds' kernels
    if torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2"):
        assert dirs["avx2"] != dirs[None]


def test_interleaved_rounds_rotate_the_order():
    """No function always runs right after the same one (a cache-sweeping eager call would hand
    its successor cold inputs in every round)."""
    from fastvit_ops.benchmarks.timing import interleaved_median_ms

    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("eager", "fused", "compile")}
    interleaved_median_ms(fns, "cpu", warmup=0, reps=12, max_seconds=60)
    rounds = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    assert len(rounds) == 12 and all(sorted(r) == sorted(fns) for r in rounds)
    after_eager = {r[r.index("eager") + 1] for r in rounds if r.index("eager") < 2}
    assert after_eager == {"fused", "compile"}
    assert {r[0] for r in rounds} == set(fns)
