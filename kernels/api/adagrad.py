"""The low-level Adagrad
(the checks they share: `kernels.api.calls`)."""

import numpy as np

from .. import hyperparameters, rules
from .calls import as_flags, compute_dtype, dispatch, one_entry, real_numbers


def adagrad_step(
    param: np.ndarray,
    grad: np.ndarray,
    state_sum: np.ndarray,
    *,
    step: int,
    lr: float = 1e-2,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    eps: float = 1e-10,
    maximize: bool = False,
    stream=None,
) -> None:
    """One Adagrad step, in place on ``param`` and ``state_sum`` (torch's ``sum``: start
    it at ``initial_accumulator_value``). ``step`` is this step's count t ≥ 1. With
    ``g = ±grad + λ·p``::

        s ← s + g²
        p ← p − lr_t · g / (√s + ε),   lr_t = lr / (1 + (t − 1)·lr_decay)
    """
    lr, lr_decay, weight_decay, eps = real_numbers(
        lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps
    )
    (maximize,) = as_flags(maximize=maximize)
    step = hyperparameters.as_step(step)
    rules.adagrad.check(lr, lr_decay, weight_decay, 0.0, eps)
    kernels, arrays, launch = dispatch(
        {"param": param, "grad": grad, "state_sum": state_sum}, stream
    )
    dtype = compute_dtype(arrays)
    coefficients = rules.adagrad.coefficients(dtype, eps, weight_decay, maximize)
    step_size = rules.adagrad.step_coefficients_per_entry(dtype, [step], lr, lr_decay)[0]
    table = one_entry(arrays, tuple(step_size))
    kernels.launch(table, rules.adagrad.STEP, coefficients, **launch)
