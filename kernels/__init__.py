"""fastmomentum.kernels: fused, in-place momentum-family optimizer steps on flat arrays.

Needs only NumPy and Numba (no torch)::

    from fastmomentum.kernels import sgd_step, adam_step, adamw_step

``adam_8bit_step`` and ``sgd_8bit_step`` step block-wise 8-bit state
(`fastmomentum.kernels.quantization`).
"""

from .api import (
    adagrad_step,
    adam_8bit_step,
    adam_step,
    adamw_step,
    lamb_step,
    nadam_step,
    rmsprop_step,
    sgd_8bit_step,
    sgd_step,
)
from .rules.sgd import CONVENTIONS as MOMENTUM_CONVENTIONS

__all__ = [
    "MOMENTUM_CONVENTIONS",
    "adagrad_step",
    "adam_8bit_step",
    "adam_step",
    "adamw_step",
    "lamb_step",
    "nadam_step",
    "rmsprop_step",
    "sgd_8bit_step",
    "sgd_step",
]
