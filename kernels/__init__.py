"""Triton kernels (installed as ``fastvit_ops.kernels``): one file per hot path, kernels and launchers only.

Importing a module here imports Triton; ``fastvit_ops.ops`` imports them lazily so the package
works without Triton.
"""
