"""Shared test fixtures: checkpoint key files, seeds, backends."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

# The authors' state_dict listings live beside the repository (../shared/checkpoints); CI clones
# main with shared/ next to it. FASTVIT_OPS_SHARED points elsewhere when needed.
SHARED = Path(os.environ.get("FASTVIT_OPS_SHARED", Path(__file__).resolve().parents[2] / "shared"))
CHECKPOINTS = SHARED / "checkpoints"

_LINE = re.compile(r"^(\S+) \(([\d, ]*)\)$")


def checkpoint_spec(name: str):
    """Parse ``checkpoints/<name>.txt`` → (ordered list of (key, shape), parameter count)."""
    path = CHECKPOINTS / f"{name}.txt"
    if not path.exists():
        pytest.fail(f"checkpoint listing {path} not found; set FASTVIT_OPS_SHARED")
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
