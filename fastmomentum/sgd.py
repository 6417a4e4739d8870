"""``fastmomentum.SGD``: drop-in ``torch.optim.SGD`` on flat buffers."""

from typing import Literal

from torch import Tensor
from torch.optim.optimizer import ParamsT

from fastmomentum.kernels import cpu, hyperparameters

from .optimizer import FlatOptimizer


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
    fused kernel per buffer); ``differentiable=True`` is rejected.
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
        super().__init__(params, defaults)

    def state_names(self, group):
        return ("momentum_buffer",)

    def check_group(self, group):
        hyperparameters.check_sgd(
            float(group["lr"]),
            group["momentum"],
            group["dampening"],
            group["weight_decay"],
            group["nesterov"],
            group["momentum_convention"],
        )

    def update(self, group, buffer, active):
        lr, momentum = float(group["lr"]), group["momentum"]
        param, grad = buffer.array("values"), buffer.array("grads")
        if momentum == 0:
            coefficients = hyperparameters.sgd_plain_coefficients(
                param.dtype, lr, group["weight_decay"], group["maximize"]
            )
            for start, end, _ in buffer.runs(active, active):
                cpu.sgd_plain(param[start:end], grad[start:end], coefficients)
            return
        velocity = buffer.array("momentum_buffer")
        coefficients = hyperparameters.sgd_momentum_coefficients(
            param.dtype,
            lr,
            momentum,
            group["dampening"],
            group["weight_decay"],
            group["maximize"],
            group["momentum_convention"],
        )
        first_step = [not initialized for initialized in buffer.initialized]
        nesterov = bool(group["nesterov"])
        for start, end, first in buffer.runs(active, first_step):
            cpu.sgd_momentum(
                param[start:end],
                grad[start:end],
                velocity[start:end],
                coefficients,
                nesterov,
                first,
            )
        for index, (is_active, first) in enumerate(zip(active, first_step)):
            if is_active and first:
                self.expose_state(group, buffer, index)
