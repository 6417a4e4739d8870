"""``fastmomentum.RAdam``: drop-in ``torch.optim.RAdam``, one fused launch per bucket."""

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
    decoupled_weight_decay: bool
    maximize: bool


class RAdam(FlatOptimizer):
    r"""RAdam (Liu et al., 2020): Adam with its adaptive step rectified.

    Same arguments, defaults, state (``step``, ``exp_avg``, ``exp_avg_sq``) and numbers
    as ``torch.optim.RAdam``; one fused kernel launch per (param group, device, dtype)
    per step. For a parameter at its step ``t``, with ``g = ±∇f(p)``,
    ``ρ_∞ = 2/(1 − β2) − 1`` and ``ρ_t = ρ_∞ − 2t·β2ᵗ/(1 − β2ᵗ)``::

        p ← p·(1 − lr·λ)                 if decoupled_weight_decay
        g ← g + λ·p                      otherwise
        m ← β1·m + (1 − β1)·g
        v ← β2·v + (1 − β2)·g²
        m̂ = m / (1 − β1ᵗ)
        p ← p − lr·m̂·r_t·√(1 − β2ᵗ)/(√v + ε)    if ρ_t > 5
        p ← p − lr·m̂                             otherwise (the variance is intractable)

    with ``r_t = √((ρ_t − 4)(ρ_t − 2)ρ_∞ / ((ρ_∞ − 4)(ρ_∞ − 2)ρ_t))``. ``ρ_t``, ``r_t``
    and the choice are computed per parameter on the host, as torch computes them.

    ``foreach`` is accepted for compatibility; ``differentiable=True`` is rejected.
    ``capturable=True`` (CUDA parameters): ``step`` lies on the parameters' device,
    where the kernel computes ``ρ_t`` and what follows (`fastmomentum.capture`).
    ``flat_gradients``, ``fused_zero_grad`` and ``state_dtype``: as in `fastmomentum.SGD`
    (``"int8_blockwise"``: ``exp_avg`` and ``exp_avg_sq`` as codes and absmax,
    `fastmomentum.quantized`).
    ``master_weights=True`` (bfloat16 and float16 parameters): the step updates a
    float32 copy of each parameter, ``state[p]["master_param"]``, with float32 state,
    and writes the parameter as that copy rounded, in one pass (as `fastmomentum.Adam`).
    """

    scalar_state = {"step": 0.0}
    supports_master_weights = True
    supports_quantized_state = True
    supports_capturable = True

    rule_state = rules.radam.SPEC.state

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
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
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "decoupled_weight_decay": decoupled_weight_decay,
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
            decoupled_weight_decay=bool(group["decoupled_weight_decay"]),
            maximize=bool(group["maximize"]),
        )

    def check_arguments(self, defaults):
        """``torch.optim.RAdam``'s checks, in its order."""
        check_tensor_hyperparameter(defaults["lr"], "lr")
        rules.radam.check(
            defaults["lr"], defaults["betas"], defaults["eps"], defaults["weight_decay"]
        )

    def update(self, group, bucket, settings, plan, grad_scale):
        dtype = bucket.dtype_numpy
        if bucket.counts_on_device:  # capturable: the kernel computes its coefficients
            live_settings = rules.radam.live_settings(
                settings.betas, settings.eps, settings.weight_decay,
                settings.decoupled_weight_decay, settings.maximize,
            )  # fmt: skip
            spec = rules.radam.SPEC
            capture.launch(self, bucket, plan, spec, spec.state, (), settings.lr, live_settings)
            return
        coefficients = self.cached_coefficients(
            bucket,
            (settings, grad_scale),
            lambda: rules.radam.coefficients(
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

        def count_step(table):  # each parameter's t, its ρ_t and what follows from it
            step = bucket.count_steps(table.rows)
            if step is None or table.filled_from != (step, settings.lr, settings.betas):
                table.entry_values[:] = rules.radam.step_values(
                    bucket.step_counts[table.rows], settings.lr, settings.betas
                )
                table.filled_from = None if step is None else (step, settings.lr, settings.betas)

        spec, columns = quantized.launched(rules.radam.SPEC, rules.radam.SPEC.state, bucket)
        plan.launch(
            columns, spec.entry_width, count_step, bucket.kernels.launch, spec, coefficients
        )
