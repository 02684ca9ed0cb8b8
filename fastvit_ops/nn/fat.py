"""Fused FAT layers: drop-ins for ``fastvit_ops.reference.fat`` (same constructor and state_dict)."""
from __future__ import annotations

from torch import Tensor

from ..ops.cross_modulation import sigmoid_cross_modulation
from ..reference import fat as ref


class FASA(ref.FASA):
    """``reference.fat.FASA`` with the SiLU·SiLU gate fused into one kernel (SPEC §1.4 mode "silu").

    Same constructor ``FASA(dim, kernel_size, num_heads, window_size)``, parameters and state_dict
    keys as the authors' FASA, so their checkpoints load unchanged.
    """

    def modulate(self, local: Tensor, global_: Tensor) -> Tensor:
        return sigmoid_cross_modulation(local, global_, "silu")
