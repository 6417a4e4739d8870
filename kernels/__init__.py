"""fastmomentum.kernels: fused, in-place momentum-family optimizer steps on flat arrays.

Needs only NumPy and Numba (no torch)::

    from fastmomentum.kernels import sgd_step, adam_step, adamw_step
"""

from .api import adam_step, adamw_step, sgd_step
from .hyperparameters import MOMENTUM_CONVENTIONS

__all__ = ["MOMENTUM_CONVENTIONS", "adam_step", "adamw_step", "sgd_step"]
