"""The low-level NAdam
(the checks they share: `kernels.api.calls`)."""

import numpy as np

from .. import hyperparameters, rules
from .calls import as_flags, compute_dtype, dispatch, one_entry, real_numbers


def nadam_step(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    *,
    step: int,
    mu_product: float = 1.0,
    lr: float = 2e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum_decay: float = 4e-3,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    stream=None,
) -> float:
    """One NAdam step (Dozat, 2016), in place on ``param`` and the moment buffers;
    returns the new ``mu_product`` to pass to the next call.

    ``step`` is this step's count t ≥ 1, ``mu_product`` the product of the earlier
    steps' momentum coefficients (1.0 before the first). With ``g = ±grad`` and
    ``μ_t = β1·(1 − ½·0.96^(t·ψ))`` (``ψ = momentum_decay``)::

        p ← p·(1 − lr·λ)                 if decoupled_weight_decay
        g ← g + λ·p                      otherwise
        Π ← Π·μ_t                        (the returned mu_product)
        m ← β1·m + (1 − β1)·g
        v ← β2·v + (1 − β2)·g²
        d = √(v / (1 − β2ᵗ)) + ε
        p ← p − lr·(1 − μ_t)/(1 − Π) · g/d − lr·μ_{t+1}/(1 − Π·μ_{t+1}) · m/d

    ``Π`` is kept in float32 for float32 (and 16-bit) arrays, as torch keeps it.
    """
    lr, eps, weight_decay, momentum_decay, mu_product = real_numbers(
        lr=lr, eps=eps, weight_decay=weight_decay, momentum_decay=momentum_decay,
        mu_product=mu_product,
    )  # fmt: skip
    betas = hyperparameters.as_betas(betas)
    decoupled_weight_decay, maximize = as_flags(
        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize
    )
    step = hyperparameters.as_step(step)
    rules.nadam.check(lr, betas, eps, weight_decay, momentum_decay)
    kernels, arrays, launch = dispatch(
        {"param": param, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}, stream
    )
    dtype = compute_dtype(arrays)
    coefficients = rules.nadam.coefficients(
        dtype, lr, betas, eps, weight_decay, decoupled_weight_decay, maximize
    )
    product, step_coefficients = rules.nadam.step_coefficients(
        dtype, step, mu_product, lr, betas, momentum_decay, dtype
    )
    table = one_entry(arrays, step_coefficients)
    kernels.launch(table, rules.nadam.STEP, coefficients, **launch)
    return product
