"""Build fastvit_ops and its compiled kernels ``fastvit_ops._C``.

The C++ CPU kernels (csrc/ops.cpp, csrc/cpu/*.cpp) are always built. The CUDA kernels
(csrc/cuda/*.cu) are added when torch is a CUDA build and nvcc is found, unless
``FASTVIT_OPS_SKIP_CUDA_BUILD=1``. Knobs: ``TORCH_CUDA_ARCH_LIST`` (default ``9.0+PTX``),
``MAX_JOBS`` (parallel compile jobs, read by torch's ninja build),
``FASTVIT_OPS_SKIP_EXTENSION=1`` (pure-Python install: reference and Triton backends only).

Install with ``pip install --no-build-isolation -e .`` so the build sees the installed torch.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cuda_header_dirs():
    """Headers of the CUDA libraries that ship inside torch's pip wheels (nvidia/*/include).

    A bare nvcc toolkit can lack them (cusparse.h, cublas_v2.h, ...), while ATen's CUDA headers
    include them.
    """
    dirs = []
    for entry in sys.path:
        dirs += glob.glob(os.path.join(entry, "nvidia", "*", "include"))
        dirs += glob.glob(os.path.join(entry, "nvidia", "*", "*", "include"))
    return sorted({d for d in dirs if os.path.isdir(d)})


def _find_cuda_home():
    """Set CUDA_HOME to the toolkit folder before torch looks for it.

    torch guesses CUDA_HOME from the folder above ``which nvcc``; a wrapper script in
    /usr/local/bin makes that /usr/local, whose lib/ has no libcudart. Prefer a real toolkit.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for cand in ("/usr/local/cuda",) + tuple(sorted(glob.glob("/usr/local/cuda-*"), reverse=True)):
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = cand
            return


def _extensions():
    if _flag("FASTVIT_OPS_SKIP_EXTENSION"):
        return [], {}
    _find_cuda_home()
    import torch
    from torch.utils import cpp_extension

    class BuildExtension(cpp_extension.BuildExtension):
        """Keep objects in ./build/temp so ``pip install -e .`` rebuilds only what changed."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join(ROOT, "build", "temp")

    sources = [os.path.relpath(p, ROOT) for p in
               sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    cxx = ["-O3", "-fopenmp"]  # the C++ standard comes from torch (C++17 or C++20)
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    with_cuda = (not _flag("FASTVIT_OPS_SKIP_CUDA_BUILD") and torch.version.cuda is not None
                 and cpp_extension.CUDA_HOME is not None)
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0+PTX")
        sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))]
        cxx.append("-DFASTVIT_OPS_WITH_CUDA")
        nvcc.append("-DFASTVIT_OPS_WITH_CUDA")
        ext_cls = cpp_extension.CUDAExtension
        include_dirs = [os.path.join(ROOT, "csrc")] + _cuda_header_dirs()
    else:
        ext_cls = cpp_extension.CppExtension
        include_dirs = [os.path.join(ROOT, "csrc")]
    print(f"fastvit_ops: building _C with {'CPU+CUDA' if with_cuda else 'CPU'} kernels", file=sys.stderr)
    ext = ext_cls(
        name="fastvit_ops._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if with_cuda else {"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="fastvit_ops",
    version="0.1.0",
    description="Fused Triton / CUDA / C++ kernels for hybrid conv-attention vision backbones (FAT, FCViT, CvT, VT)",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["fastvit_ops", "fastvit_ops.*"]) + ["fastvit_ops.kernels"],
    package_dir={"fastvit_ops.kernels": "kernels"},
    install_requires=["torch>=2.6", "rich>=13", "matplotlib>=3.7"],
    extras_require={
        "triton": ["triton>=3.2"],
        # timm needs torchvision; 0.29.1 is the release paired with torch 2.14.1 (pinned so pip does not
        # move torch to fit a newer torchvision).
        "timm": ["timm>=1.0", "torchvision==0.29.1"],
        # torch.onnx.export (the dynamo exporter needs onnxscript) and onnxruntime to run the result.
        "export": ["onnx>=1.17", "onnxruntime>=1.20", "onnxscript>=0.2"],
        # CI installs the timm and export extras too (about 25 s of downloads) so their tests run.
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "numpy",
                 "timm>=1.0", "torchvision==0.29.1", "onnx>=1.17", "onnxruntime>=1.20", "onnxscript>=0.2"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["fastvit-ops=fastvit_ops.__main__:main"]},
    zip_safe=False,
)
