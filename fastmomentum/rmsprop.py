"""``fastmomentum.RMSprop``: drop-in ``torch.optim.RMSprop``, one fused launch per bucket."""

from typing import NamedTuple

from torch import Tensor
from torch.optim.optimizer import ParamsT
from torch.optim.rmsprop import rmsprop

from fastmomentum.kernels import rules

from . import capture, quantized
from .optimizer import FlatOptimizer
from .validation import check_tensor_hyperparameter, host_float


class Settings(NamedTuple):
    """A group's hyperparameters as one step reads them."""

    lr: float | Tensor  # a capturable group's tensor is read on the device
    alpha: float
    eps: float
    weight_decay: float
    momentum: float
    centered: bool
    maximize: bool
    capturable: bool  # counts on the device: capturable, or fused on CUDA (`capture.on_device`)


class RMSprop(FlatOptimizer):
    r"""RMSprop, optionally centered and with momentum.

    Same arguments, defaults, state (``step``, ``square_avg``, ``momentum_buffer`` with
    momentum, ``grad_avg`` when centered) and numbers as ``torch.optim.RMSprop``; one
    fused kernel launch per (param group, device, dtype) per step. With
    ``g = ±∇f(p) + λ·p``::

        s ← α·s + (1 − α)·g²
        ḡ ← α·ḡ + (1 − α)·g                 (centered)
        a = √(s − ḡ²) + ε   if centered,   else   √s + ε
        b ← μ·b + g/a;  p ← p − lr·b        (momentum μ > 0)
        p ← p − lr·g/a                      (otherwise)

    ``momentum_buffer`` and ``grad_avg`` are kept once made, and start at zero for a
    parameter with state when momentum or centering is switched on later (torch
    raises ``KeyError`` there). ``foreach`` is accepted for compatibility;
    ``differentiable=True`` is rejected. ``capturable=True`` (CUDA parameters): ``step``
    lies on the parameters' device, where the kernel advances it (`fastmomentum.capture`).
    ``flat_gradients``,
    ``fused_zero_grad`` and ``state_dtype``: as in `fastmomentum.SGD`
    (``"int8_blockwise"``: ``square_avg`` and ``momentum_buffer`` as codes and absmax,
    `fastmomentum.quantized`; not centered: 8-bit ``square_avg`` and ``grad_avg`` leave
    their difference, the variance, too imprecise).
    ``master_weights=True`` (bfloat16 and float16 parameters): the step updates a
    float32 copy of each parameter, ``state[p]["master_param"]``, with float32 state,
    and writes the parameter as that copy rounded, in one pass (as `fastmomentum.Adam`).
    """

    scalar_state = {"step": 0.0}
    supports_master_weights = True
    supports_quantized_state = True
    supports_capturable = True

    rule_state = rules.rmsprop.SPEC.state
    quantized_rule_state = ("square_avg", "momentum_buffer")  # not centered: no grad_avg
    optional_rule_state = ("momentum_buffer", "grad_avg")

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        flat_gradients: bool = False,
        state_dtype=None,
        fused_zero_grad: bool = False,
        master_weights: bool = False,
        step_in_backward: bool = False,
        stochastic_rounding: bool = False,
        kahan_sum: bool = False,
        rounding_seed: int | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "alpha": alpha,
            "eps": eps,
            "centered": centered,
            "weight_decay": weight_decay,
            "capturable": capturable,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
        }
        super().__init__(
            params,
            defaults,
            flat_gradients,
            state_dtype,
            fused_zero_grad,
            master_weights,
            step_in_backward,
            stochastic_rounding=stochastic_rounding,
            kahan_sum=kahan_sum,
            rounding_seed=rounding_seed,
        )

    def state_names(self, group):
        settings = self.settings(group)
        names = ["square_avg"]
        if settings.momentum > 0:
            names.append("momentum_buffer")
        if settings.centered:
            names.append("grad_avg")
        return quantized.keys(names) if self.quantized else tuple(names)

    def settings(self, group):
        if group["centered"] and self.quantized:
            raise ValueError(
                f"centered=True is not implemented with state_dtype={quantized.INT8_BLOCKWISE!r}: "
                "square_avg s is kept within 1/16 of its value and grad_avg g within 1/254 "
                "of its block's largest magnitude, so the variance s - g^2 can be off by more "
                "than itself where it is small, negative (NaN)"
            )
        return Settings(
            lr=capture.lr_setting(group),
            alpha=host_float(group["alpha"], "alpha"),
            eps=host_float(group["eps"], "eps"),
            weight_decay=host_float(group["weight_decay"], "weight_decay"),
            momentum=host_float(group["momentum"], "momentum"),
            centered=bool(group["centered"]),
            maximize=bool(group["maximize"]),
            capturable=capture.on_device(self, group),
        )

    def check_arguments(self, defaults):
        """``torch.optim.RMSprop``'s checks, in its order."""
        check_tensor_hyperparameter(defaults["lr"], "lr")
        rules.rmsprop.check(
            defaults["lr"],
            defaults["alpha"],
            defaults["eps"],
            defaults["weight_decay"],
            defaults["momentum"],
        )

    def steps_cast_params(self, settings):
        # torch's lerp of grad_avg refuses mixed dtypes; torch's loop (`step_cast`) would
        # read AMP's values and the step count on the host
        return not (settings.centered or settings.capturable)

    def step_cast(self, group, settings, params, grads, state, steps):
        rmsprop(
            params,
            grads,
            state["square_avg"],
            [],
            state.get("momentum_buffer", []),
            steps,
            foreach=False,
            maximize=settings.maximize,
            lr=settings.lr,
            alpha=settings.alpha,
            eps=settings.eps,
            weight_decay=settings.weight_decay,
            momentum=settings.momentum,
            centered=settings.centered,
        )

    def update(self, group, bucket, settings, plan, grad_scale):
        dtype = bucket.dtype_numpy
        momentum, centered = settings.momentum, settings.centered
        columns = (
            "square_avg",
            "momentum_buffer" if momentum > 0 else None,
            "grad_avg" if centered else None,
        )
        flags = (momentum > 0, centered)
        if bucket.counts_on_device:  # capturable: the kernel computes its coefficients
            live_settings = rules.rmsprop.live_settings(
                settings.alpha, settings.eps, settings.weight_decay, momentum, settings.maximize
            )
            capture.launch(self, bucket, plan, rules.rmsprop.SPEC, columns, flags, settings.lr,
                           live_settings)  # fmt: skip
            return
        coefficients = self.cached_coefficients(
            bucket,
            (settings, grad_scale),
            lambda: rules.rmsprop.coefficients(
                dtype,
                settings.lr,
                settings.alpha,
                settings.eps,
                settings.weight_decay,
                momentum,
                settings.maximize,
                grad_scale,
            ),
        )
        spec, columns = quantized.launched(rules.rmsprop.SPEC, columns, bucket)
        plan.launch(
            columns,
            spec.entry_width,
            lambda table: bucket.count_steps(table.rows),
            bucket.kernels.launch,
            spec,
            coefficients,
            flags,
        )
