"""Gradient clipping over an optimizer's parameters, one pass per flat gradient buffer."""

import torch


@torch.no_grad()
def clip_grad_norm(grads, max_norm, norm_type=2.0, error_if_nonfinite=False):
    """``torch.nn.utils.clip_grad_norm_`` over ``grads`` (a bucket's flat gradient
    tensor counts as one): scales every gradient by ``min(1, max_norm / (total_norm +
    1e-6))`` in place and returns the total norm."""
    if not grads:
        return torch.tensor(0.0)
    norms = [torch.linalg.vector_norm(grad, norm_type) for grad in grads]
    first_device = norms[0].device
    total = torch.linalg.vector_norm(
        torch.stack([norm.to(first_device) for norm in norms]), norm_type
    )
    if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is "
            "non-finite, so it cannot be clipped. To disable this error and scale the "
            "gradients by the non-finite norm anyway, set `error_if_nonfinite=False`"
        )
    clip_coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for grad in grads:
        grad.mul_(clip_coefficient.to(grad.device))
    return total
