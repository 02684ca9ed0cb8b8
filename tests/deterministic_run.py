"""Run by tests/test_deterministic.py in fresh processes: under
``torch.use_deterministic_algorithms(True)``, hash (SHA-256 of the bytes) the outputs and input
gradients of every public op on each backend here, and the eval logits and training-mode
parameter gradients of converted fat_b0 / fcvit_tiny / cvt_13, each computed twice in the
process. Prints one JSON object {case: hash}; a case whose two runs differ in this process maps to
``"differs within the process"``.

``--churn``: allocate and free tensors of many sizes first, so this process's allocator hands the
kernels other addresses (and alignments) than a plain run's.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import fastvit_ops  # noqa: E402
from fastvit_ops import models  # noqa: E402
from fastvit_ops.ops.dispatch import backend_available  # noqa: E402

MODELS = ("fat_b0", "fcvit_tiny", "cvt_13")


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def op_hashes(backends):
    from op_cases import CASES, forward_backward

    out = {}
    for name in sorted(CASES):
        for backend in backends:
            runs = []
            for _ in range(2):
                with fastvit_ops.backend(backend):
                    outs, grads = forward_backward(name, seed=1234, dtype=torch.float32, batch=3)
                runs.append(digest(outs + grads))
            out[f"{name}/{backend}"] = runs[0] if runs[0] == runs[1] else "differs within the process"
    return out


def model_hashes():
    from conftest import randomize_model_

    out = {}
    for name in MODELS:
        gen = torch.Generator().manual_seed(99)
        model = fastvit_ops.convert(randomize_model_(models.create(name, reference=True), gen))
        x = torch.randn(2, 3, 64, 64, generator=gen)
        dy = torch.randn(2, 1000, generator=gen)
        runs = []
        for _ in range(2):
            model.eval()
            with torch.no_grad():
                logits = model(x)
            model.train()
            params = [p for p in model.parameters()]
            grads = torch.autograd.grad(model(x), params, dy, allow_unused=True)
            runs.append(digest([logits] + [g for g in grads if g is not None]))
            # the train-mode forward moved the BN statistics: put them back for the second run
            model = fastvit_ops.convert(randomize_model_(models.create(name, reference=True),
                                                         torch.Generator().manual_seed(99)))
        out[f"model {name}"] = runs[0] if runs[0] == runs[1] else "differs within the process"
    return out


def main(argv):
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(int(os.environ.get("FASTVIT_OPS_TEST_THREADS", "2")))
    if "--churn" in argv:
        junk = [torch.empty(int(n)) for n in torch.randint(1, 1 << 16, (200,))]
        del junk[::2]
    backends = [b for b in ("auto", "reference", "cpu", "triton") if backend_available(b, torch.device("cpu"))[0]]
    result = op_hashes(backends)
    if "--no-models" not in argv:
        result.update(model_hashes())
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1:])
