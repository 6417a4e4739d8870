"""The low-level RMSprop
(the checks they share: `kernels.api.calls`)."""

import numpy as np

from .. import rules
from .calls import as_flags, compute_dtype, dispatch, one_entry, real_numbers


def rmsprop_step(
    param: np.ndarray,
    grad: np.ndarray,
    square_avg: np.ndarray,
    momentum_buffer: np.ndarray | None = None,
    grad_avg: np.ndarray | None = None,
    *,
    lr: float = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    maximize: bool = False,
    stream=None,
) -> None:
    """One RMSprop step, in place on ``param`` and its state arrays. With
    ``g = ±grad + λ·p``::

        s ← α·s + (1 − α)·g²
        ḡ ← α·ḡ + (1 − α)·g                 (centered: grad_avg)
        a = √(s − ḡ²) + ε   if centered,   else   √s + ε
        b ← μ·b + g/a;  p ← p − lr·b        (momentum > 0: momentum_buffer)
        p ← p − lr·g/a                      (otherwise)

    ``momentum_buffer`` is required when ``momentum > 0`` and ``grad_avg`` when
    ``centered``; each is ignored otherwise.
    """
    lr, alpha, eps, weight_decay, momentum = real_numbers(
        lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum
    )
    centered, maximize = as_flags(centered=centered, maximize=maximize)
    rules.rmsprop.check(lr, alpha, eps, weight_decay, momentum)
    has_momentum = momentum > 0
    if has_momentum and momentum_buffer is None:
        raise ValueError("momentum_buffer is required when momentum > 0")
    if centered and grad_avg is None:
        raise ValueError("grad_avg is required when centered=True")
    kernels, arrays, launch = dispatch(
        {
            "param": param,
            "grad": grad,
            "square_avg": square_avg,
            "momentum_buffer": momentum_buffer if has_momentum else None,
            "grad_avg": grad_avg if centered else None,
        },
        stream,
    )
    coefficients = rules.rmsprop.coefficients(
        compute_dtype(arrays), lr, alpha, eps, weight_decay, momentum, maximize
    )
    flags = (has_momentum, centered)
    kernels.launch(one_entry(arrays), rules.rmsprop.STEP, coefficients, flags, **launch)
