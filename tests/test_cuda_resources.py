"""The CUDA kernels (csrc/cuda/*.cu) compile for sm_80 and sm_90 without register spills.

Each source is compiled to a cubin with ``nvcc -Xptxas -v`` (no GPU needed), and ptxas's report
of every kernel must show a zero-byte stack frame and no spill stores. A kernel that may spill
must be listed in ``ALLOWED_SPILLS`` with the reason. Skipped where there is no nvcc or torch is
not a CUDA build.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
ALLOWED_SPILLS: dict = {}  # mangled-name substring -> why its spills are acceptable (none today)


def _nvcc():
    for cand in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.exists(cand):
            return cand
    return None


def _includes():
    from torch.utils import cpp_extension

    dirs = [os.path.join(ROOT, "csrc"), sysconfig.get_paths()["include"]] + cpp_extension.include_paths()
    for entry in sys.path:  # CUDA library headers shipped inside torch's pip wheels
        dirs += glob.glob(os.path.join(entry, "nvidia", "*", "include"))
    return [f"-I{d}" for d in dirs]


pytestmark = pytest.mark.skipif(_nvcc() is None or torch.version.cuda is None,
                                reason="needs nvcc and a CUDA build of torch")

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_cuda_kernels_do_not_spill(source, arch, tmp_path):
    cmd = [_nvcc(), "-cubin", f"-arch={arch}", "-O3", "--expt-relaxed-constexpr", "-std=c++20", "-Xptxas", "-v",
           "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", "-DFASTVIT_OPS_WITH_CUDA",
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
           "-D__CUDA_NO_HALF2_OPERATORS__", *_includes(), source, "-o", str(tmp_path / "k.cubin")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = proc.stderr + proc.stdout
    kernels, bad, name = 0, [], None
    for line in report.splitlines():
        m = _ENTRY.search(line)
        if m:
            name = m.group(1)
            continue
        m = _FRAME.search(line)
        if m and name is not None:
            kernels += 1
            if any(int(v) for v in m.groups()) and not any(k in name for k in ALLOWED_SPILLS):
                bad.append(f"{name}: {line.strip()}")
            name = None
    assert kernels > 0, f"ptxas reported no kernels:\n{report[-2000:]}"
    assert not bad, "kernels with a stack frame or spills:\n" + "\n".join(bad)
