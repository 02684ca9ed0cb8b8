"""Pure-PyTorch reference layers and models, state_dict-identical to the authors' released code.

These are the oracle every fused path is tested against (docs/ states what each computes). Nothing here imports a
kernel. Every model class takes ``layers``: a mapping from a layer name (``"FASA"``,
``"ConvFFN"``, ``"GlobalContext"``, ...) to the class to build for it; ``None`` builds the
reference classes. ``fastvit_ops.models`` passes the fused drop-ins from ``fastvit_ops.nn``, which
subclass these layers and keep their parameters and state_dict keys.
"""
