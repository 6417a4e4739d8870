"""The low-level Adam and AdamW, and Adam with 8-bit moments
(the checks they share: `kernels.api.calls`)."""

from typing import Literal

import numpy as np

from .. import hyperparameters, rules
from ..steps import int8_blockwise
from .calls import as_flags, compute_dtype, dispatch, one_entry, real_numbers


def adam_step(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    max_exp_avg_sq: np.ndarray | None = None,
    *,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    stream=None,
) -> None:
    """One Adam step (Kingma & Ba), in place on ``param`` and the moment buffers.

    ``step`` is this step's count t ≥ 1 (1 on the first call). With ``g = ±grad``::

        p ← p·(1 − lr·λ)                            if decoupled_weight_decay (AdamW)
        g ← g + λ·p                                 otherwise (L2, Adam)
        m ← β1·m + (1 − β1)·g
        v ← β2·v + (1 − β2)·g²
        v̂ ← max(v̂, v) if amsgrad else v
        p ← p − lr/(1 − β1ᵗ) · m / (√v̂ / √(1 − β2ᵗ) + ε)

    ``max_exp_avg_sq`` is required with ``amsgrad`` and ignored otherwise.
    """
    lr, eps, weight_decay = real_numbers(lr=lr, eps=eps, weight_decay=weight_decay)
    betas = hyperparameters.as_betas(betas)
    amsgrad, maximize, decoupled_weight_decay = as_flags(
        amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=decoupled_weight_decay
    )
    step = hyperparameters.as_step(step)
    rules.adam.check(lr, betas, eps, weight_decay)
    if amsgrad and max_exp_avg_sq is None:
        raise ValueError("max_exp_avg_sq is required when amsgrad=True")
    kernels, arrays, launch = dispatch(
        {
            "param": param,
            "grad": grad,
            "exp_avg": exp_avg,
            "exp_avg_sq": exp_avg_sq,
            "max_exp_avg_sq": max_exp_avg_sq if amsgrad else None,
        },
        stream,
    )
    dtype = compute_dtype(arrays)
    coefficients = rules.adam.coefficients(
        dtype, lr, betas, eps, weight_decay, decoupled_weight_decay, maximize
    )
    step_coefficients = rules.adam.step_coefficients(dtype, step, lr, betas)
    table = one_entry(arrays, step_coefficients)
    kernels.launch(table, rules.adam.STEP, coefficients, (amsgrad,), **launch)


def adamw_step(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    max_exp_avg_sq: np.ndarray | None = None,
    *,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: Literal[True] = True,
    stream=None,
) -> None:
    """One AdamW step (Loshchilov & Hutter): `adam_step` with decoupled weight decay,
    ``p ← p·(1 − lr·λ)`` before the moment update, and ``weight_decay=1e-2`` by default.

    ``decoupled_weight_decay`` may only be True; Adam's L2 weight decay is
    ``adam_step(..., decoupled_weight_decay=False)``.
    """
    if not hyperparameters.as_flag("decoupled_weight_decay", decoupled_weight_decay):
        raise TypeError(
            "adamw_step always decouples weight decay; for Adam's L2 weight decay call "
            "adam_step(..., decoupled_weight_decay=False)"
        )
    adam_step(
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        max_exp_avg_sq,
        step=step,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        decoupled_weight_decay=True,
        stream=stream,
    )


def adam_8bit_step(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg_codes: np.ndarray,
    exp_avg_absmax: np.ndarray,
    exp_avg_sq_codes: np.ndarray,
    exp_avg_sq_absmax: np.ndarray,
    *,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    stream=None,
) -> None:
    """One `adam_step` (no AMSGrad) whose moments are block-wise 8-bit
    (`kernels.quantization`), in place on ``param`` and the four state arrays.

    Each block of 256 elements of ``exp_avg`` (``exp_avg_sq``) is kept as int8 (uint8)
    codes, of ``param``'s shape, and one float32 absmax; ``exp_avg_absmax`` and
    ``exp_avg_sq_absmax`` hold ``ceil(param.size / 256)`` values. The step decodes the
    moments, updates them and ``param`` in float32 as `adam_step` does, and encodes
    them on their blocks' new absmax. Zeros (codes and absmax) are a fresh state;
    `quantization.quantize` and `quantization.dequantize` convert to and from float32.
    ``param`` and ``grad``: float32, float16 or bfloat16.
    """
    lr, eps, weight_decay = real_numbers(lr=lr, eps=eps, weight_decay=weight_decay)
    betas = hyperparameters.as_betas(betas)
    maximize, decoupled_weight_decay = as_flags(
        maximize=maximize, decoupled_weight_decay=decoupled_weight_decay
    )
    step = hyperparameters.as_step(step)
    rules.adam.check(lr, betas, eps, weight_decay)
    kernels, arrays, launch = dispatch(
        {
            "param": param,
            "grad": grad,
            "exp_avg_codes": exp_avg_codes,
            "exp_avg_sq_codes": exp_avg_sq_codes,
            "exp_avg_absmax": exp_avg_absmax,
            "exp_avg_sq_absmax": exp_avg_sq_absmax,
        },
        stream,
        {
            "exp_avg_codes": "signed",
            "exp_avg_sq_codes": "unsigned",
            "exp_avg_absmax": "absmax",
            "exp_avg_sq_absmax": "absmax",
        },
    )
    dtype = np.dtype(np.float32)
    coefficients = rules.adam.coefficients(
        dtype, lr, betas, eps, weight_decay, decoupled_weight_decay, maximize
    )
    step_coefficients = rules.adam.step_coefficients(dtype, step, lr, betas)
    param, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax = arrays
    columns = [param, grad, exp_avg, exp_avg_sq, None, exp_avg_absmax, exp_avg_sq_absmax, None]
    table = one_entry(columns, step_coefficients, codes=True)  # no max_exp_avg_sq
    kernels.launch(table, int8_blockwise(rules.adam.STEP), coefficients, (False,), **launch)
