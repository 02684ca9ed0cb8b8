"""Build fastvit_ops and its compiled kernels ``fastvit_ops._C``.

The C++ CPU kernels are always built: ``csrc/ops.cpp`` and ``csrc/cpu/*.cpp`` (schemas, argument
checks, threading; no ISA flags) once, and the SIMD kernels ``csrc/cpu/isa/*.cpp`` once per CPU
capability, the way PyTorch builds ``ATen/native/cpu``: ``DEFAULT`` (the platform's baseline, e.g.
SSE2 on x86-64 or NEON on aarch64), and on x86-64 also ``AVX2`` (AVX2 + FMA + F16C) and ``AVX512``
(AVX-512 F/BW/VL/DQ). The extension picks the best one the CPU supports when it loads
(``FASTVIT_OPS_CPU_CAPABILITY`` asks for a lower one). The CUDA kernels (``csrc/cuda/*.cu``) are
added when torch is a CUDA build and nvcc is found, unless ``FASTVIT_OPS_SKIP_CUDA_BUILD=1``.

Knobs: ``TORCH_CUDA_ARCH_LIST`` (default ``9.0+PTX``), ``MAX_JOBS`` (parallel compile jobs, read by
torch's ninja build), ``FASTVIT_OPS_SKIP_EXTENSION=1`` (pure-Python install: reference and Triton
backends only), ``FASTVIT_OPS_OPENMP=0`` (build without OpenMP: the kernels then run on one thread;
by default the compiler's OpenMP flags are found by a test compile, and a compiler without OpenMP
also gives a single-threaded build).

Install with ``pip install --no-build-isolation -e .`` so the build sees the installed torch.
"""
import glob
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _version():
    with open(os.path.join(ROOT, "fastvit_ops", "_version.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


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


# ---- CPU capabilities: compile flags of the csrc/cpu/isa/ kernels ----------------------------------
# Index = position in fastvit_ops::cpu::Capability (csrc/cpu/capability.h). The link order follows
# this list, after the baseline objects: where an inline function from a header (std::, c10::) is
# compiled into several objects, the linker keeps the first copy, so code outside the ISA
# namespaces always resolves to a baseline-compiled copy.
# (ATen's vector headers carry `#pragma unroll` for other compilers, and GCC 12's own AVX-512
# intrinsics header trips -Wmaybe-uninitialized: both silenced for these files only.)
_QUIET = ["-Wno-unknown-pragmas"]
CAPABILITIES = (
    ("DEFAULT", _QUIET),
    ("AVX2", _QUIET + ["-mavx2", "-mfma", "-mf16c"]),
    ("AVX512", _QUIET + ["-Wno-maybe-uninitialized", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                         "-mavx2", "-mfma", "-mf16c"]),
)


def _capabilities(compiler_type):
    """The capabilities to build: all three with GCC/clang on x86-64, else the baseline only."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return CAPABILITIES if x86 and compiler_type != "msvc" else CAPABILITIES[:1]


def _capability_defines(index, name):
    return [f"-DCPU_CAPABILITY={name}", f"-DCPU_CAPABILITY_{name}", f"-DFASTVIT_OPS_CAPABILITY_INDEX={index}"]


# ---- OpenMP: found per compiler by a test compile ----------------------------------------------------
_OMP_TEST = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"


def _compiles(cxx, cflags, ldflags, source=_OMP_TEST):
    tmp = tempfile.mkdtemp(prefix="fastvit_ops_omp_")
    try:
        src = os.path.join(tmp, "t.cpp")
        with open(src, "w") as f:
            f.write(source)
        cmd = [*cxx.split(), *cflags, src, "-o", os.path.join(tmp, "t"), *ldflags]
        return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    except OSError:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _openmp_flags(compiler_type, cxx):
    """(compile flags, link flags, description). GCC and LLVM clang take ``-fopenmp``; Apple clang
    needs ``-Xpreprocessor -fopenmp`` and a libomp (torch's own first, so one OpenMP runtime is
    loaded); MSVC ``/openmp``. Without OpenMP, at::parallel_for runs serially (``-fopenmp-simd``
    still honours the ``omp simd`` loop hints where the compiler has it)."""
    if os.environ.get("FASTVIT_OPS_OPENMP", "1").lower() in ("0", "false", "no", "off"):
        why = "off (FASTVIT_OPS_OPENMP=0)"
    elif compiler_type == "msvc":
        return ["/openmp"], [], "/openmp"
    else:
        candidates = [(["-fopenmp"], ["-fopenmp"])]
        if sys.platform == "darwin":
            import torch

            torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
            for prefix in ("/opt/homebrew/opt/libomp", "/usr/local/opt/libomp", "/opt/local"):
                inc = ["-Xpreprocessor", "-fopenmp", f"-I{prefix}/include"]
                candidates.append((inc, [f"-L{torch_lib}", "-lomp", f"-Wl,-rpath,{torch_lib}"]))
                candidates.append((inc, [f"-L{prefix}/lib", "-lomp"]))
        for cflags, ldflags in candidates:
            if _compiles(cxx, cflags, ldflags):
                return cflags, ldflags, " ".join(cflags + ldflags)
        why = f"not found for {cxx}"
    simd = ["-fopenmp-simd"] if compiler_type != "msvc" and _compiles(cxx, ["-fopenmp-simd"], [], "int main() {}\n") else []
    print(f"fastvit_ops: OpenMP {why}: the CPU kernels will run on one thread", file=sys.stderr)
    return simd, [], why


def _extensions():
    if _flag("FASTVIT_OPS_SKIP_EXTENSION"):
        return [], {}
    _find_cuda_home()
    import torch
    from torch.utils import cpp_extension

    def rel(paths):
        return [os.path.relpath(p, ROOT) for p in sorted(paths)]

    isa_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "isa", "*.cpp")))

    class BuildExtension(cpp_extension.BuildExtension):
        """Keeps objects in ./build/temp (so ``pip install -e .`` rebuilds only what changed), adds
        the OpenMP flags this compiler takes, and compiles csrc/cpu/isa/ once per capability."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join(ROOT, "build", "temp")

        def build_extensions(self):
            cxx = os.environ.get("CXX") or (cpp_extension.get_cxx_compiler()
                                            if hasattr(cpp_extension, "get_cxx_compiler") else "c++")
            cflags, ldflags, desc = _openmp_flags(self.compiler.compiler_type, cxx)
            caps = _capabilities(self.compiler.compiler_type)
            print(f"fastvit_ops: OpenMP: {desc}; CPU capabilities: {', '.join(n for n, _ in caps)}",
                  file=sys.stderr)
            for ext in self.extensions:
                args = ext.extra_compile_args
                (args["cxx"] if isinstance(args, dict) else args).extend(cflags)
                ext.extra_link_args = list(ext.extra_link_args or []) + ldflags
                ext.fastvit_capabilities = caps
            super().build_extensions()

        def build_extension(self, ext):
            # By now torch's build_extensions has added its flags (C++ standard, ABI, extension
            # name) to extra_compile_args and made self.compiler.compile a ninja build.
            args = ext.extra_compile_args
            base = list(args["cxx"] if isinstance(args, dict) else args)
            objects = []
            for index, (name, flags) in enumerate(getattr(ext, "fastvit_capabilities", ())):
                post = base + flags + _capability_defines(index, name)
                objects += self.compiler.compile(
                    isa_sources, output_dir=os.path.join(self.build_temp, "isa", name.lower()),
                    macros=ext.define_macros, include_dirs=ext.include_dirs, debug=self.debug,
                    extra_postargs={"cxx": post, "nvcc": []} if isinstance(args, dict) else post,
                    depends=ext.depends)
            ext.extra_objects = objects  # linked after the baseline objects, in capability order
            super().build_extension(ext)

    sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cxx = ["-O3"]  # the C++ standard comes from torch (C++17 or C++20); OpenMP flags per compiler
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    with_cuda = (not _flag("FASTVIT_OPS_SKIP_CUDA_BUILD") and torch.version.cuda is not None
                 and cpp_extension.CUDA_HOME is not None)
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0+PTX")
        sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
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
        depends=rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "**", "*.h"), recursive=True)),
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="fastvit_ops",
    version=_version(),
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
