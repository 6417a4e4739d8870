"""``fastmomentum.Lion``: Lion (Chen et al., 2023), one fused launch per bucket."""

from typing import NamedTuple

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from fastmomentum.kernels import rules

from . import capture, quantized
from .optimizer import FlatOptimizer
from .validation import check_tensor_hyperparameter, host_float


class Settings(NamedTuple):
    """A group's hyperparameters as one step reads them."""

    lr: float | Tensor  # a tensor only when capturable (`capture.lr_setting`)
    betas: tuple[float, float]
    weight_decay: float
    maximize: bool


class Lion(FlatOptimizer):
    r"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms"): the
    sign of an interpolation of momentum and gradient, with decoupled weight decay.

    torch has none; arguments and defaults are those of lucidrains' lion-pytorch, the
    widely used implementation (``lr=1e-4``, ``betas=(0.9, 0.99)``, ``weight_decay=0``;
    its ``decoupled_weight_decay`` and ``use_triton`` are not taken), the numbers the
    paper's update (tests: a float64 reference). With ``g = ±∇f(p)``::

        p ← p·(1 − lr·λ)
        u = sign(β1·m + (1 − β1)·g)        (sign(0) = 0)
        p ← p − lr·u
        m ← β2·m + (1 − β2)·g

    One state tensor per parameter, ``exp_avg`` (from zeros), no step count (as
    lion-pytorch), except with ``stochastic_rounding=True``, whose random bits are keyed
    on one (``state[p]["step"]``, as `fastmomentum.SGD`'s). A step moves 20 bytes a
    float32 parameter, as SGD with momentum. A NaN gradient makes the parameter NaN
    (torch's ``sign`` gives 0 for NaN, so lion-pytorch leaves the parameter still, its
    momentum NaN, from then on).

    ``foreach`` and ``fused`` are accepted as torch's optimizers accept them (the step
    is always one fused launch). ``flat_gradients``, ``fused_zero_grad``,
    ``state_dtype`` (``torch.bfloat16``, or ``"int8_blockwise"``: ``exp_avg_codes`` and
    ``exp_avg_absmax``, `fastmomentum.quantized`), ``master_weights``,
    ``stochastic_rounding``, ``kahan_sum`` and ``step_in_backward``: as in
    `fastmomentum.SGD`. ``capturable=True`` (CUDA parameters): no host read during a
    step, AMP's values and a tensor ``lr`` read by the kernel (`fastmomentum.capture`).
    """

    supports_master_weights = True
    supports_quantized_state = True
    supports_capturable = True

    rule_state = rules.lion.SPEC.state

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        flat_gradients: bool = False,
        state_dtype: torch.dtype | str | None = None,
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
            "weight_decay": weight_decay,
            "maximize": maximize,
            "foreach": foreach,
            "fused": fused,
            "capturable": capturable,
            # what torch.optim.Optimizer gives a loaded optimizer's defaults (and so
            # our groups): here from the start, so that a resumed run's groups are equal
            "differentiable": False,
        }
        if stochastic_rounding:  # the count that keys each step's random bits
            self.scalar_state = {"step": 0.0}
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
            weight_decay=host_float(group["weight_decay"], "weight_decay"),
            maximize=bool(group["maximize"]),
        )

    def check_arguments(self, defaults):
        """torch's checks of lr, betas and weight_decay, with its messages."""
        check_tensor_hyperparameter(defaults["lr"], "lr")
        rules.lion.check(defaults["lr"], defaults["betas"], defaults["weight_decay"])

    def update(self, group, bucket, settings, plan, grad_scale):
        dtype = bucket.dtype_numpy
        if bucket.counts_on_device:  # capturable: the kernel computes its coefficients
            live_settings = rules.lion.live_settings(
                settings.betas, settings.weight_decay, settings.maximize
            )
            spec = rules.lion.SPEC
            capture.launch(self, bucket, plan, spec, spec.state, (), settings.lr, live_settings)
            return
        coefficients = self.cached_coefficients(
            bucket,
            (settings, grad_scale),
            lambda: rules.lion.coefficients(
                dtype,
                settings.lr,
                settings.betas,
                settings.weight_decay,
                settings.maximize,
                grad_scale,
            ),
        )
        count = None
        if self._stochastic_rounding:  # lion has no step count; the random bits need one

            def count(table):
                bucket.count_steps(table.rows)

        spec, columns = quantized.launched(rules.lion.SPEC, rules.lion.SPEC.state, bucket)
        plan.launch(columns, spec.entry_width, count, bucket.kernels.launch, spec, coefficients)
