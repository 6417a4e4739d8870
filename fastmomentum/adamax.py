"""``fastmomentum.Adamax``: drop-in ``torch.optim.Adamax``, one fused launch per bucket."""

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
    maximize: bool


class Adamax(FlatOptimizer):
    r"""Adamax (Kingma & Ba, 2015, section 7.1): Adam with the infinity norm.

    Same arguments, defaults, state (``step``, ``exp_avg``, ``exp_inf``) and numbers as
    ``torch.optim.Adamax``; one fused kernel launch per (param group, device, dtype)
    per step. For a parameter at its step ``t``, with ``g = ±∇f(p) + λ·p``::

        m ← β1·m + (1 − β1)·g
        u ← max(β2·u, |g| + ε)
        p ← p − lr/(1 − β1ᵗ) · m / u

    ``foreach`` is accepted for compatibility; ``differentiable=True`` is rejected.
    ``capturable=True`` (CUDA parameters): ``step`` lies on the parameters' device,
    where the kernel computes the step size (`fastmomentum.capture`).
    ``flat_gradients``, ``fused_zero_grad`` and ``state_dtype``: as in `fastmomentum.SGD`
    (``"int8_blockwise"``: ``exp_avg`` and ``exp_inf`` as codes and absmax,
    `fastmomentum.quantized`).
    ``master_weights=True`` (bfloat16 and float16 parameters): the step updates a
    float32 copy of each parameter, ``state[p]["master_param"]``, with float32 state,
    and writes the parameter as that copy rounded, in one pass (as `fastmomentum.Adam`).
    """

    scalar_state = {"step": 0.0}
    supports_master_weights = True
    supports_quantized_state = True
    supports_capturable = True

    rule_state = rules.adamax.SPEC.state

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
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
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "capturable": capturable,
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
            maximize=bool(group["maximize"]),
        )

    def check_arguments(self, defaults):
        """``torch.optim.Adamax``'s checks, in its order."""
        check_tensor_hyperparameter(defaults["lr"], "lr")
        rules.adamax.check(
            defaults["lr"], defaults["betas"], defaults["eps"], defaults["weight_decay"]
        )

    def update(self, group, bucket, settings, plan, grad_scale):
        dtype = bucket.dtype_numpy
        if bucket.counts_on_device:  # capturable: the kernel computes its coefficients
            live_settings = rules.adamax.live_settings(
                settings.betas, settings.eps, settings.weight_decay, settings.maximize
            )
            spec = rules.adamax.SPEC
            capture.launch(self, bucket, plan, spec, spec.state, (), settings.lr, live_settings)
            return
        coefficients = self.cached_coefficients(
            bucket,
            (settings, grad_scale),
            lambda: rules.adamax.coefficients(
                dtype,
                settings.betas,
                settings.eps,
                settings.weight_decay,
                settings.maximize,
                grad_scale,
            ),
        )

        def count_step(table):  # each parameter's t, and its step size
            step = bucket.count_steps(table.rows)
            if step is None or table.filled_from != (step, settings.lr, settings.betas):
                table.entry_values[:] = rules.adamax.step_coefficients_per_entry(
                    dtype, bucket.step_counts[table.rows], settings.lr, settings.betas
                )
                table.filled_from = None if step is None else (step, settings.lr, settings.betas)

        spec, columns = quantized.launched(rules.adamax.SPEC, rules.adamax.SPEC.state, bucket)
        plan.launch(
            columns, spec.entry_width, count_step, bucket.kernels.launch, spec, coefficients
        )
