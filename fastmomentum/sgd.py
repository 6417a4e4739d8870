"""``fastmomentum.SGD``: drop-in ``torch.optim.SGD`` on flat buffers."""

from typing import Literal

from torch import Tensor
from torch.optim.optimizer import ParamsT

from fastmomentum.kernels import hyperparameters

from .optimizer import FlatOptimizer, host_float


class SGD(FlatOptimizer):
    r"""Stochastic gradient descent with optional heavy-ball or Nesterov momentum.

    Same arguments, defaults, state and numbers as ``torch.optim.SGD``; one fused kernel
    call per flat buffer per step. With ``d = ±∇f(p) + λ·p`` (minus when ``maximize``),
    momentum ``μ``, dampening ``τ``::

        v ← d                     on a parameter's first step
        v ← μ·v + (1 − τ)·d       afterwards
        p ← p − lr·(d + μ·v)      if nesterov, else  p ← p − lr·v

    ``momentum_convention="lr_folded"`` keeps the learning rate inside the velocity, as in
    Polyak's heavy ball, Sutskever et al. (2013) and Keras: ``v ← μ·v + (1 − τ)·lr·d``,
    ``p ← p − v`` (Nesterov: ``p ← p − (lr·d + μ·v)``). The two agree while lr is constant
    and differ when it changes. ``state[p]["momentum_buffer"]`` then holds ``lr·v``.

    ``foreach`` and ``fused`` are accepted for compatibility (the step is always one
    fused kernel per buffer); ``differentiable=True`` is rejected. ``flat_gradients=True``
    lets ``zero_grad(set_to_none=False)`` (and construction) replace each ``.grad`` by a
    view into the flat gradient buffer instead of zeroing it in place: backward then
    accumulates there and the step is one kernel call (a different tensor object than
    torch leaves in ``.grad``; references to the old one see no more updates).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        momentum_convention: Literal["pytorch", "lr_folded"] = "pytorch",
        flat_gradients: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
            "momentum_convention": momentum_convention,
        }
        self.check_group(defaults)
        super().__init__(params, defaults, flat_gradients)

    def state_names(self, group):
        return ("momentum_buffer",)

    def settings(self, group):
        return (
            host_float(group["lr"], "lr"),
            host_float(group["momentum"], "momentum"),
            host_float(group["dampening"], "dampening"),
            host_float(group["weight_decay"], "weight_decay"),
            bool(group["nesterov"]),
            bool(group["maximize"]),
            group["momentum_convention"],
        )

    def check_settings(self, settings):
        lr, momentum, dampening, weight_decay, nesterov, _, convention = settings
        hyperparameters.check_sgd(lr, momentum, dampening, weight_decay, nesterov, convention)

    def update(self, group, buffer, settings, sources, grad_scale):
        lr, momentum, dampening, weight_decay, nesterov, maximize, convention = settings
        param = buffer.array("values")
        if momentum == 0:
            coefficients = _cached(
                buffer,
                (settings, grad_scale),
                lambda: hyperparameters.sgd_plain_coefficients(
                    param.dtype, lr, weight_decay, maximize, grad_scale
                ),
            )
            for start, end, _, grad in buffer.segments(sources):
                buffer.kernels.sgd_plain(param[start:end], grad, coefficients)
            return
        velocity = buffer.array("momentum_buffer")
        coefficients = _cached(
            buffer,
            (settings, grad_scale),
            lambda: hyperparameters.sgd_momentum_coefficients(
                param.dtype, lr, momentum, dampening, weight_decay, maximize, convention, grad_scale
            ),
        )
        first_steps = None if buffer.all_initialized else [not x for x in buffer.initialized]
        for start, end, first, grad in buffer.segments(sources, first_steps):
            part = slice(start, end)
            buffer.kernels.sgd_momentum(
                param[part], grad, velocity[part], coefficients, nesterov, bool(first)
            )
        if first_steps is not None:
            self.expose_new_state(group, buffer, sources)


def _cached(buffer, key, compute):
    """The buffer's kernel coefficients for ``key`` (settings and loss scale), computed
    when it changes."""
    if buffer.coefficients[0] != key:
        buffer.coefficients = (key, compute())
    return buffer.coefficients[1]
