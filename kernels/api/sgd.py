"""The low-level SGD, plain or with momentum, and with an 8-bit momentum buffer
(the checks they share: `kernels.api.calls`)."""

from typing import Literal

import numpy as np

from .. import rules
from ..steps import int8_blockwise
from .calls import as_flags, compute_dtype, dispatch, one_entry, real_numbers


def sgd_step(
    param: np.ndarray,
    grad: np.ndarray,
    momentum_buffer: np.ndarray | None = None,
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    first_step: bool = False,
    momentum_convention: Literal["pytorch", "lr_folded"] = "pytorch",
    stream=None,
) -> None:
    """One SGD step, in place on ``param`` (and ``momentum_buffer`` when momentum > 0).

    With ``d = ±g + λ·p`` (minus when ``maximize``), in PyTorch's convention::

        v ← d on the first step, else μ·v + (1 − τ)·d
        p ← p − lr·(d + μ·v)   (nesterov)   or   p ← p − lr·v

    and in the lr-folded convention (Polyak, Sutskever et al., Keras)::

        v ← lr·d on the first step, else μ·v + (1 − τ)·lr·d
        p ← p − (lr·d + μ·v)   (nesterov)   or   p ← p − v

    ``first_step=True`` initialises the buffer from ``d`` (torch's first step); with
    ``False`` the buffer's current contents are used. ``momentum_buffer`` is required when
    ``momentum > 0`` and ignored otherwise. The arrays are NumPy arrays (plain
    ``np.ndarray`` or ``np.memmap``) or GPU arrays, C-contiguous, of one shape and one
    float dtype, not overlapping; those updated in place must be writeable.

    Example::

        >>> p, g, v = np.ones(3, np.float32), np.full(3, 0.5, np.float32), np.zeros(3, np.float32)
        >>> sgd_step(p, g, v, lr=0.1, momentum=0.9, first_step=True)
        >>> p
        array([0.95, 0.95, 0.95], dtype=float32)
    """
    lr, momentum, dampening, weight_decay = real_numbers(
        lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay
    )
    nesterov, maximize, first_step = as_flags(
        nesterov=nesterov, maximize=maximize, first_step=first_step
    )
    rules.sgd.check(lr, momentum, dampening, weight_decay, nesterov, momentum_convention)
    if momentum == 0:
        kernels, arrays, launch = dispatch({"param": param, "grad": grad}, stream)
        coefficients = rules.sgd.plain_coefficients(
            compute_dtype(arrays), lr, weight_decay, maximize
        )
        kernels.launch(one_entry(arrays), rules.sgd.PLAIN, coefficients, **launch)
        return
    if momentum_buffer is None:
        raise ValueError("momentum_buffer is required when momentum > 0")
    kernels, arrays, launch = dispatch(
        {"param": param, "grad": grad, "momentum_buffer": momentum_buffer}, stream
    )
    coefficients = rules.sgd.momentum_coefficients(
        compute_dtype(arrays), lr, momentum, dampening, weight_decay, maximize, momentum_convention
    )
    table = one_entry(arrays, [1.0 if first_step else 0.0])
    kernels.launch(table, rules.sgd.MOMENTUM, coefficients, (nesterov,), **launch)


def sgd_8bit_step(
    param: np.ndarray,
    grad: np.ndarray,
    momentum_buffer_codes: np.ndarray,
    momentum_buffer_absmax: np.ndarray,
    *,
    lr: float,
    momentum: float,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    first_step: bool = False,
    momentum_convention: Literal["pytorch", "lr_folded"] = "pytorch",
    stream=None,
) -> None:
    """One `sgd_step` with momentum whose buffer is block-wise 8-bit: int8 codes of
    ``param``'s shape and one float32 absmax per block of 256 elements (see
    `adam_8bit_step`). ``momentum`` must be positive."""
    lr, momentum, dampening, weight_decay = real_numbers(
        lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay
    )
    nesterov, maximize, first_step = as_flags(
        nesterov=nesterov, maximize=maximize, first_step=first_step
    )
    rules.sgd.check(lr, momentum, dampening, weight_decay, nesterov, momentum_convention)
    if momentum == 0:
        raise ValueError("sgd_8bit_step needs momentum > 0 (without it there is no buffer)")
    kernels, arrays, launch = dispatch(
        {
            "param": param,
            "grad": grad,
            "momentum_buffer_codes": momentum_buffer_codes,
            "momentum_buffer_absmax": momentum_buffer_absmax,
        },
        stream,
        {"momentum_buffer_codes": "signed", "momentum_buffer_absmax": "absmax"},
    )
    coefficients = rules.sgd.momentum_coefficients(
        np.dtype(np.float32), lr, momentum, dampening, weight_decay, maximize, momentum_convention
    )
    table = one_entry(arrays, [1.0 if first_step else 0.0], codes=True)
    kernels.launch(table, int8_blockwise(rules.sgd.MOMENTUM), coefficients, (nesterov,), **launch)
