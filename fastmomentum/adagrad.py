"""``fastmomentum.Adagrad``: drop-in ``torch.optim.Adagrad``, one fused launch per bucket."""

from typing import NamedTuple

from torch import Tensor
from torch.optim.adagrad import adagrad
from torch.optim.optimizer import ParamsT

from fastmomentum.kernels import rules

from . import binding, capture, quantized
from .optimizer import FlatOptimizer
from .validation import check_tensor_hyperparameter, host_float


class Settings(NamedTuple):
    """A group's hyperparameters as one step reads them."""

    lr: float | Tensor  # a tensor only when capturable (`capture.lr_setting`)
    lr_decay: float
    weight_decay: float
    initial_accumulator_value: float
    eps: float
    maximize: bool
    capturable: bool  # counts on the device: capturable, or fused on CUDA (`capture.on_device`)


class Adagrad(FlatOptimizer):
    r"""Adagrad (Duchi et al., 2011).

    Same arguments, defaults, state (``step``, ``sum``) and numbers as
    ``torch.optim.Adagrad``; one fused kernel launch per (param group, device, dtype)
    per step. With ``g = ±∇f(p) + λ·p`` at a parameter's step ``t``::

        s ← s + g²
        p ← p − lr_t · g / (√s + ε),   lr_t = lr / (1 + (t − 1)·lr_decay)

    As in torch, every parameter has its state from construction (``sum`` filled with
    the constructor's ``initial_accumulator_value``, ``step`` 0), and a parameter of a
    group added later (or whose entry user code cleared) gets it at its first step.
    ``foreach`` and ``fused`` are accepted (the step is always one fused launch);
    ``differentiable=True`` is rejected. ``flat_gradients``, ``fused_zero_grad`` and
    ``state_dtype``: as in `fastmomentum.SGD` (``"int8_blockwise"``: ``sum`` as codes
    and absmax, `fastmomentum.quantized`, starting as every element
    ``initial_accumulator_value`` in float32: each block's absmax, and the top code).
    ``master_weights=True`` (bfloat16 and float16 parameters): the step updates a
    float32 copy of each parameter, ``state[p]["master_param"]``, with float32 state,
    and writes the parameter as that copy rounded, in one pass (as `fastmomentum.Adam`).
    ``capturable=True`` (CUDA parameters; torch's Adagrad has none): ``step`` lies on the
    parameters' device, where the kernel advances it, as in `fastmomentum.Adam`
    (`fastmomentum.capture`); the groups hold ``capturable`` only when it is set, so
    that state dicts stay torch's.
    """

    scalar_state = {"step": 0.0}
    supports_master_weights = True
    supports_quantized_state = True
    supports_capturable = True

    rule_state = rules.adagrad.SPEC.state

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
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
            "lr_decay": lr_decay,
            "eps": eps,
            "weight_decay": weight_decay,
            "initial_accumulator_value": initial_accumulator_value,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "fused": fused,
            **({"capturable": True} if capturable else {}),  # torch's Adagrad has none
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
        for group, buckets in zip(self.param_groups, self.buckets):
            for bucket in buckets:
                binding.expose_new_state(self, group, bucket, list(range(len(bucket.params))))

    def fresh_state(self, group, bucket):
        # torch starts every sum from the constructor's value, whatever a group says
        value = host_float(self.defaults["initial_accumulator_value"], "initial_accumulator_value")
        if bucket.quantized:
            quantized.fill(bucket.state, "sum", value)
        else:
            bucket.state("sum").flat.fill_(value)

    def settings(self, group):
        return Settings(
            lr=capture.lr_setting(group),
            lr_decay=host_float(group["lr_decay"], "lr_decay"),
            weight_decay=host_float(group["weight_decay"], "weight_decay"),
            initial_accumulator_value=host_float(
                group["initial_accumulator_value"], "initial_accumulator_value"
            ),
            eps=host_float(group["eps"], "eps"),
            maximize=bool(group["maximize"]),
            capturable=capture.on_device(self, group),
        )

    def check_arguments(self, defaults):
        """``torch.optim.Adagrad``'s checks, in its order."""
        check_tensor_hyperparameter(defaults["lr"], "lr")
        rules.adagrad.check(
            defaults["lr"],
            defaults["lr_decay"],
            defaults["weight_decay"],
            defaults["initial_accumulator_value"],
            defaults["eps"],
        )

    def steps_cast_params(self, settings):
        return not settings.capturable  # torch's loop would read the counts and AMP's values

    def step_cast(self, group, settings, params, grads, state, steps):
        adagrad(
            params,
            grads,
            state["sum"],
            steps,
            foreach=False,
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            lr_decay=settings.lr_decay,
            eps=settings.eps,
            maximize=settings.maximize,
        )

    def update(self, group, bucket, settings, plan, grad_scale):
        dtype = bucket.dtype_numpy
        if bucket.counts_on_device:  # capturable: the kernel computes its coefficients
            live_settings = rules.adagrad.live_settings(
                settings.eps, settings.weight_decay, settings.lr_decay, settings.maximize
            )
            spec = rules.adagrad.SPEC
            capture.launch(self, bucket, plan, spec, spec.state, (), settings.lr, live_settings)
            return
        coefficients = self.cached_coefficients(
            bucket,
            (settings, grad_scale),
            lambda: rules.adagrad.coefficients(
                dtype, settings.eps, settings.weight_decay, settings.maximize, grad_scale
            ),
        )

        def count_step(table):  # each parameter's t, and its step size
            bucket.count_steps(table.rows)
            table.entry_values[:] = rules.adagrad.step_coefficients_per_entry(
                dtype, bucket.step_counts[table.rows], settings.lr, settings.lr_decay
            )

        spec, columns = quantized.launched(rules.adagrad.SPEC, rules.adagrad.SPEC.state, bucket)
        plan.launch(
            columns, spec.entry_width, count_step, bucket.kernels.launch, spec, coefficients
        )
