"""The low-level LAMB, one array as one layer
(the checks they share: `kernels.api.calls`)."""

import numpy as np

from .. import hyperparameters, rules
from .calls import as_flags, carrier_of, compute_dtype, dispatch, one_entry, real_numbers


def lamb_step(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    *,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    bias_correction: bool = True,
    maximize: bool = False,
    stream=None,
) -> float:
    """One LAMB step (You et al., 2019) treating ``param`` as one layer, in place on
    ``param`` and the moments. Returns the trust ratio used. With ``g = ±grad``::

        m ← β1·m + (1 − β1)·g          v ← β2·v + (1 − β2)·g²
        u = (m / (1 − β1ᵗ)) / (√(v / (1 − β2ᵗ)) + ε) + λ·p   (no corrections without
                                                             bias_correction)
        r = ‖p‖ / ‖u‖, or 1 when either norm is 0
        p ← p − lr·r·u

    float32 and float64 arrays, and float16 and bfloat16 (ml_dtypes) ones computed in
    float32, each stored value rounded once (see `kernels.rules.lamb` for the variant).
    """
    lr, eps, weight_decay = real_numbers(lr=lr, eps=eps, weight_decay=weight_decay)
    betas = hyperparameters.as_betas(betas)
    bias_correction, maximize = as_flags(bias_correction=bias_correction, maximize=maximize)
    step = hyperparameters.as_step(step)
    rules.lamb.check(lr, betas, eps, weight_decay)
    kernels, arrays, launch = dispatch(
        {
            "param": param,
            "grad": grad,
            "exp_avg": exp_avg,
            "exp_avg_sq": exp_avg_sq,
        },
        stream,
    )
    dtype = compute_dtype(arrays)
    coefficients = rules.lamb.coefficients(dtype, betas, eps, weight_decay, maximize)
    corrections = rules.lamb.bias_corrections(dtype, [step], betas, bias_correction)[0]
    flags = rules.lamb.state_flags(carrier_of(arrays[2].dtype))
    norms = kernels.launch(
        one_entry(arrays, tuple(corrections)), rules.lamb.DIRECTION, coefficients, flags, **launch
    )
    entry = rules.lamb.apply_step_coefficients(dtype, corrections, norms, lr)[0]
    kernels.launch(
        one_entry(arrays, tuple(entry)),
        rules.lamb.APPLY,
        rules.lamb.apply_coefficients(dtype, eps, weight_decay),
        **launch,
    )
    return float(entry[2]) / -lr if lr else 1.0
