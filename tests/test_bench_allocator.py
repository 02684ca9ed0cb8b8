"""fastvit_ops.benchmarks.allocator: bench pins glibc's heap so every column is timed alike, and
records the state it timed in."""
import json
import platform
import subprocess
import sys

import pytest

from fastvit_ops.benchmarks import allocator


_MALLINFO = """
import ctypes, sys, torch
class MallInfo(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo
if sys.argv[1] == "steady":
    from fastvit_ops.benchmarks.allocator import state, steady_heap
    assert steady_heap() == state() and "steady" in state(), state()
mapped = 0
for mib in (4, 16, 30):   # buffers of the bench's activations' sizes
    before = libc.mallinfo2().hblks
    t = torch.empty(mib << 20, dtype=torch.uint8)
    mapped += libc.mallinfo2().hblks - before
    del t
print(mapped)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_steady_heap_keeps_large_buffers_off_fresh_mmaps():
    """After steady_heap() the bench's 4-30 MiB buffers come from the heap (no fresh mmap whose
    pages fault in on every call); with glibc's defaults a fresh process maps each of them."""
    def mapped(mode):
        r = subprocess.run([sys.executable, "-c", _MALLINFO, mode], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return int(r.stdout.split()[-1])
    assert mapped("glibc") == 3
    assert mapped("steady") == 0


def test_bench_records_the_heap_state(tmp_path):
    from fastvit_ops.__main__ import main
    js = tmp_path / "b.json"
    assert main(["bench", "--quick", "--batch", "1", "--no-compile", "--no-models", "--ops",
                 "sigmoid_cross_modulation", "--json", str(js)]) == 0
    env = json.loads(js.read_text())["env"]
    assert env["malloc"] == allocator.state()
    if platform.libc_ver()[0] == "glibc":
        assert "steady" in env["malloc"]
