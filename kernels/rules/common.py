"""What several rules share: the descent direction, torch's lerp, a NaN-keeping max."""

from numba.extending import register_jitable


@register_jitable
def descent_direction(param, grad, grad_factor, weight_decay):
    """``d = f·g + λ·p``; ``f`` is ±1 (−1 when maximizing), divided by the AMP loss scale
    when the step unscales the gradient itself. L2 decay only if λ ≠ 0."""
    direction = grad_factor * grad
    if weight_decay != 0:
        direction = direction + weight_decay * param
    return direction


@register_jitable
def lerp(start, end, weight, weight_complement):
    """``start + w·(end − start)`` for ``w ∈ [0, 1]``, evaluated as torch's ``lerp`` does.

    ``w_c = 1 − w``. Torch picks the formula by ``|w| < 0.5``; for ``w ∈ [0, 1]`` that is
    ``w < w_c``, which compares two values of the arrays' dtype (a 0.5 literal would be
    float64 and cost a double-precision compare per element on a GPU).
    """
    if weight < weight_complement:
        return start + weight * (end - start)
    return end - (end - start) * weight_complement


@register_jitable
def nan_max(a, b):
    """The larger of ``a`` and ``b``, NaN if either is NaN (``torch.maximum``; the CUDA
    target's ``max`` would drop a NaN)."""
    if a > b or a != a:
        return a
    return b
