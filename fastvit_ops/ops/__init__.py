"""The fused ops: one file per hot path (custom op + fake + autograd + validation + dispatch)."""
from .dispatch import BACKENDS, backend, backend_available, get_backend  # noqa: F401
