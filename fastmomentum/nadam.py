"""``fastmomentum.NAdam``: drop-in ``torch.optim.NAdam``, one fused launch per bucket."""

from typing import NamedTuple

from torch import Tensor
from torch.optim.optimizer import ParamsT

from fastmomentum.kernels import rules

from . import capture, quantized
from .optimizer import FlatOptimizer
from .validation import check_tensor_hyperparameter, host_float


class Settings(NamedTuple):
    """A group's hyperparameters as one step reads them."""

    lr: float | Tensor  # a capturable group's tensor is read on the device
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    momentum_decay: float
    decoupled_weight_decay: bool
    maximize: bool


class NAdam(FlatOptimizer):
    r"""NAdam (Dozat, 2016): Adam with Nesterov momentum.

    Same arguments, defaults, state (``step``, ``mu_product``, ``exp_avg``,
    ``exp_avg_sq``) and numbers as ``torch.optim.NAdam``; one fused kernel launch per
    (param group, device, dtype) per step. For a parameter at its step ``t``, with
    ``g = ±∇f(p)`` and ``μ_t = β1·(1 − ½·0.96^(t·ψ))`` (``ψ``: ``momentum_decay``)::

        p ← p·(1 − lr·λ)                 if decoupled_weight_decay
        g ← g + λ·p                      otherwise
        Π ← Π·μ_t                        (state["mu_product"], float32 as torch keeps it)
        m ← β1·m + (1 − β1)·g
        v ← β2·v + (1 − β2)·g²
        d = √(v / (1 − β2ᵗ)) + ε
        p ← p − lr·(1 − μ_t)/(1 − Π) · g/d − lr·μ_{t+1}/(1 − Π·μ_{t+1}) · m/d

    ``foreach`` is accepted for compatibility; ``differentiable=True`` is rejected.
    ``capturable=True`` (CUDA parameters): ``step`` and ``mu_product`` lie on the
    parameters' device and the kernel advances them (`fastmomentum.capture`).
    ``flat_gradients``, ``fused_zero_grad`` and ``state_dtype``: as in `fastmomentum.SGD`
    (``"int8_blockwise"``: ``exp_avg`` and ``exp_avg_sq`` as codes and absmax,
    `fastmomentum.quantized`).
    ``master_weights=True`` (bfloat16 and float16 parameters): the step updates a
    float32 copy of each parameter, ``state[p]["master_param"]``, with float32 state,
    and writes the parameter as that copy rounded, in one pass (as `fastmomentum.Adam`).
    """

    scalar_state = {"step": 0.0, "mu_product": 1.0}
    supports_master_weights = True
    supports_quantized_state = True
    supports_capturable = True

    rule_state = rules.nadam.SPEC.state

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum_decay: float = 4e-3,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        flat_gradients: bool = False,
        state_dtype=None,
        fused_zero_grad: bool = False,
        master_weights: bool = False,
        step_in_backward: bool = False,
        stochastic_rounding: bool = False,
        kahan_sum: bool = False,
        rounding_seed: int | None = None,
    ) -> None:
        if isinstance(betas, list):
            betas = tuple(betas)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "momentum_decay": momentum_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
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

    def settings(self, group):
        beta1, beta2 = group["betas"]
        return Settings(
            lr=capture.lr_setting(group),
            betas=(host_float(beta1, "betas[0]"), host_float(beta2, "betas[1]")),
            eps=host_float(group["eps"], "eps"),
            weight_decay=host_float(group["weight_decay"], "weight_decay"),
            momentum_decay=host_float(group["momentum_decay"], "momentum_decay"),
            decoupled_weight_decay=bool(group["decoupled_weight_decay"]),
            maximize=bool(group["maximize"]),
        )

    def check_arguments(self, defaults):
        """``torch.optim.NAdam``'s checks, in its order."""
        check_tensor_hyperparameter(defaults["lr"], "lr")
        rules.nadam.check(
            defaults["lr"],
            defaults["betas"],
            defaults["eps"],
            defaults["weight_decay"],
            defaults["momentum_decay"],
        )

    def update(self, group, bucket, settings, plan, grad_scale):
        dtype = bucket.dtype_numpy
        if bucket.counts_on_device:  # capturable: the kernel computes its coefficients
            products = bucket.scalar_values("mu_product")
            live_settings = rules.nadam.live_settings(
                settings.betas, settings.eps, settings.weight_decay,
                settings.decoupled_weight_decay, settings.maximize,
                settings.momentum_decay, str(products.dtype).removeprefix("torch."),
            )  # fmt: skip
            spec = rules.nadam.SPEC
            capture.launch(self, bucket, plan, spec, spec.state, (), settings.lr, live_settings)
            return
        coefficients = self.cached_coefficients(
            bucket,
            (settings, grad_scale),
            lambda: rules.nadam.coefficients(
                dtype,
                settings.lr,
                settings.betas,
                settings.eps,
                settings.weight_decay,
                settings.decoupled_weight_decay,
                settings.maximize,
                grad_scale,
            ),
        )
        products = bucket.scalar_values("mu_product")

        def count_step(table):  # each parameter's t, its mu_product, its step sizes
            rows = table.rows
            bucket.count_steps(rows)
            new, values = rules.nadam.step_values(
                bucket.step_counts[rows], products[rows], settings.lr, settings.betas,
                settings.momentum_decay, products.dtype,
            )  # fmt: skip
            products[rows] = new
            table.entry_values[:] = values
            table.filled_from = None

        spec, columns = quantized.launched(rules.nadam.SPEC, rules.nadam.SPEC.state, bucket)
        plan.launch(
            columns, spec.entry_width, count_step, bucket.kernels.launch, spec, coefficients
        )
