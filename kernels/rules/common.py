"""What several rules share: the descent direction, torch's lerp, a NaN-keeping max,
and the first two as torch's fused CPU step computes them for 16-bit parameters."""

import numpy as np
from numba.extending import register_jitable

from ..precision import fused_multiply_add


@register_jitable
def descent_direction(param, grad, grad_factor, weight_decay, unbranched=False):
    """``d = f·g + λ·p``; ``f`` is ±1 (−1 when maximizing), divided by the AMP loss scale
    when the step unscales the gradient itself. L2 decay only if λ ≠ 0, as torch; with
    ``unbranched`` (a constant where compiled) whatever λ, so that no test of λ stays
    inside a vector loop (the 8-bit rules, `specs.KernelSpec.blockwise_rule`: ``0·p`` changes
    only the sign of a zero gradient, and a non-finite ``p``)."""
    direction = grad_factor * grad
    if unbranched or weight_decay != 0:
        direction = direction + weight_decay * param
    return direction


@register_jitable
def lerp(start, end, weight, weight_complement, unbranched=False):
    """``start + w·(end − start)`` for ``w ∈ [0, 1]``, evaluated as torch's ``lerp`` does.

    ``w_c = 1 − w``. Torch picks the formula by ``|w| < 0.5``; for ``w ∈ [0, 1]`` that is
    ``w < w_c``, which compares two values of the arrays' dtype (a 0.5 literal would be
    float64 and cost a double-precision compare per element on a GPU). With
    ``unbranched`` (a constant where compiled) the first formula for every ``w``: no
    test inside a vector loop (the 8-bit rules, `specs.KernelSpec.blockwise_rule`).
    """
    if unbranched or weight < weight_complement:
        return start + weight * (end - start)
    return end - (end - start) * weight_complement


@register_jitable
def fused_descent_direction(param, grad, grad_factor, weight_decay):
    """`descent_direction` as torch's fused CPU step computes it: ``λ·p + f·g`` rounded
    once (its ``grad += param * weight_decay`` compiles to one multiply-add)."""
    direction = grad_factor * grad
    if weight_decay != 0:
        direction = fused_multiply_add(param, weight_decay, direction)
    return direction


@register_jitable
def fused_lerp(start, end, weight, weight_complement):
    """`lerp` as torch's vectorised kernels compute it: ``start + w·(end − start)``
    for ``|w| < 0.5``, else ``end + (w − 1)·(end − start)``, each one multiply-add
    rounded once (``vec::fmadd``). Where the CPU has no vector unit torch uses
    (``ATEN_CPU_CAPABILITY=default``) its kernels round the product first, as `lerp`.
    The two float32 constants are torch's; ``weight_complement`` is unused (kept for
    `lerp`'s signature)."""
    difference = end - start
    if abs(weight) < np.float32(0.5):
        return fused_multiply_add(weight, difference, start)
    return fused_multiply_add(weight - np.float32(1), difference, end)


@register_jitable
def nan_max(a, b):
    """The larger of ``a`` and ``b``, NaN if either is NaN (``torch.maximum``; the CUDA
    target's ``max`` would drop a NaN)."""
    if a > b or a != a:
        return a
    return b
