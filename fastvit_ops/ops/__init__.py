"""The fused ops: one file per hot path (custom op + fake + autograd + validation + the op's
entries in the dispatch registry, :mod:`fastvit_ops.ops.dispatch`)."""
from .dispatch import BACKENDS, backend, backend_available, get_backend  # noqa: F401

#: Backends beyond reference, cpu, cuda and triton: each is one module that registers itself
#: (``dispatch.register_backend``) and its kernels (``dispatch.register_kernels``) when imported;
#: adding one is adding its module name here (CONTRIBUTING.md). Imported after the ops.
EXTRA_BACKENDS: tuple = ()
