"""``fastmomentum.Adam`` and ``AdamW``: drop-in ``torch.optim`` replacements, one fused
launch per bucket."""

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from fastmomentum.kernels import rules

from . import capture, quantized
from .optimizer import FlatOptimizer
from .validation import check_tensor_hyperparameter, host_float


class Settings(NamedTuple):
    """A group's hyperparameters as one step reads them (lr and betas as torch computes
    them: `_as_torch_computes`)."""

    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    decoupled_weight_decay: bool
    maximize: bool
    amsgrad: bool


class Adam(FlatOptimizer):
    r"""Adam (Kingma & Ba, 2015), optionally AMSGrad, with L2 or decoupled weight decay.

    Same arguments, defaults, state and numbers as ``torch.optim.Adam``; one fused kernel
    launch per (param group, device, dtype) per step. For a parameter at its step ``t`` (counted per
    parameter), with ``g = ±∇f(p)``::

        p ← p·(1 − lr·λ)                       if decoupled_weight_decay (AdamW)
        g ← g + λ·p                            otherwise
        m ← β1·m + (1 − β1)·g
        v ← β2·v + (1 − β2)·g²
        v̂ ← max(v̂, v) if amsgrad else v
        p ← p − lr/(1 − β1ᵗ) · m / (√v̂ / √(1 − β2ᵗ) + ε)

    ``foreach`` and ``fused`` are accepted for compatibility (the step is always one
    fused launch); ``differentiable=True`` is rejected. ``capturable=True`` (CUDA
    parameters): step counts on the GPU, an lr tensor and AMP's values read there, so
    that no step reads the GPU from the host (`fastmomentum.capture`).
    ``flat_gradients``, ``fused_zero_grad`` and ``state_dtype``: as in `fastmomentum.SGD`
    (bfloat16 ``exp_avg``, ``exp_avg_sq`` and ``max_exp_avg_sq`` for float32 parameters).

    ``state_dtype="int8_blockwise"`` (float32, bfloat16 and float16 parameters): the
    moments are kept in 8 bits per element plus a float32 absmax per block of 256
    (`fastmomentum.quantized`), decoded, updated in float32 and encoded again in the
    same pass; ``state[p]`` holds ``exp_avg_codes``, ``exp_avg_sq_codes``,
    ``exp_avg_absmax`` and ``exp_avg_sq_absmax`` in place of the moments (with AMSGrad
    ``max_exp_avg_sq_codes`` and ``max_exp_avg_sq_absmax`` too).

    ``master_weights=True`` (bfloat16 and float16 parameters): the step updates a
    float32 copy of each parameter, ``state[p]["master_param"]``, with float32 state,
    from the 16-bit gradient, and writes the parameter as that copy rounded, in one
    pass. The copy is taken from the parameter at its first step, and again whenever
    something else wrote the parameter (``load_state_dict`` of the model, an in-place
    edit: torch's version counter tells).
    """

    scalar_state = {"step": 0.0}

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        flat_gradients: bool = False,
        state_dtype: torch.dtype | str | None = None,
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
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
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

    rule_state = rules.adam.SPEC.state
    #: ``max_exp_avg_sq`` (8-bit: its codes and absmax) starts at zero for a parameter
    #: with state when AMSGrad is switched on, where torch raises KeyError.
    optional_rule_state = ("max_exp_avg_sq",)

    supports_master_weights = True
    supports_quantized_state = True
    supports_capturable = True

    def state_names(self, group):
        names = rules.adam.SPEC.state if group["amsgrad"] else rules.adam.SPEC.state[:2]
        return quantized.keys(names) if self.quantized else names

    def settings(self, group):
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        if capture.is_capturable(group):  # a tensor's value is read on the GPU
            lr = capture.live_lr(lr)
        else:
            lr = _as_torch_computes(lr, "lr")
        return Settings(
            lr=lr,
            betas=(_as_torch_computes(beta1, "betas[0]"), _as_torch_computes(beta2, "betas[1]")),
            eps=host_float(group["eps"], "eps"),
            weight_decay=host_float(group["weight_decay"], "weight_decay"),
            decoupled_weight_decay=bool(group["decoupled_weight_decay"]),
            maximize=bool(group["maximize"]),
            amsgrad=bool(group["amsgrad"]),
        )

    def check_arguments(self, defaults):
        """``torch.optim.Adam``'s checks, in its order; its betas become a tuple of
        0-dim tensors or numbers, as torch makes them."""
        lr, betas = defaults["lr"], defaults["betas"]
        refuse_tensors = bool(defaults["foreach"]) and not defaults["capturable"]
        check_tensor_hyperparameter(lr, "lr", refuse_tensors)
        rules.adam.check(lr, betas, defaults["eps"], defaults["weight_decay"])
        if not (
            (isinstance(betas[0], float) and isinstance(betas[1], float))
            or (isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor))
        ):
            raise ValueError("betas must be either both floats or both Tensors")
        for index in (0, 1):
            check_tensor_hyperparameter(betas[index], f"betas[{index}]", refuse_tensors)
        defaults["betas"] = tuple(
            b.squeeze() if isinstance(b, Tensor) and b.dim() != 0 else b for b in betas
        )

    def update(self, group, bucket, settings, plan, grad_scale):
        lr, betas, amsgrad = settings.lr, settings.betas, settings.amsgrad
        dtype = bucket.dtype_numpy
        columns = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq" if amsgrad else None)
        if bucket.counts_on_device:  # capturable: the kernel computes its coefficients
            live_settings = rules.adam.live_settings(
                betas, settings.eps, settings.weight_decay,
                settings.decoupled_weight_decay, settings.maximize,
            )  # fmt: skip
            capture.launch(self, bucket, plan, rules.adam.SPEC, columns, (amsgrad,), lr,
                           live_settings)  # fmt: skip
            return
        steps = bucket.step_counts
        coefficients = self.cached_coefficients(
            bucket,
            (settings, grad_scale),
            lambda: rules.adam.coefficients(
                dtype,
                lr,
                betas,
                settings.eps,
                settings.weight_decay,
                settings.decoupled_weight_decay,
                settings.maximize,
                grad_scale,
            ),
        )
        spec, columns = quantized.launched(rules.adam.SPEC, columns, bucket)

        def count_step(table):  # each parameter's step count, and its bias corrections
            step = bucket.count_steps(table.rows)
            if step is None:  # parameters at different steps: a row each
                table.entry_values[:] = rules.adam.step_coefficients_per_entry(
                    dtype, steps[table.rows], lr, betas
                )
                table.filled_from = None
            elif table.filled_from != (step, lr, betas):  # one row for all
                table.filled_from = (step, lr, betas)
                table.entry_values[:] = rules.adam.step_coefficients(dtype, step, lr, betas)

        kernel = bucket.kernels.launch
        plan.launch(columns, spec.entry_width, count_step, kernel, spec, coefficients, (amsgrad,))


def _as_torch_computes(value, name):
    """A hyperparameter as the step uses it: a float, or for a float32 tensor (lr,
    betas) a NumPy float32, so that ``1 − β2``, the bias corrections, the step size and
    AdamW's decay factor round in float32, as torch's step computes them from such a
    tensor."""
    if isinstance(value, Tensor) and value.dtype == torch.float32:
        return np.float32(host_float(value, name))
    return host_float(value, name)


class AdamW(Adam):
    r"""AdamW (Loshchilov & Hutter, 2019): Adam with decoupled weight decay.

    Same arguments, defaults (``weight_decay=1e-2``), state and numbers as
    ``torch.optim.AdamW``; the update is `Adam`'s with ``p ← p·(1 − lr·λ)`` applied
    before the moment update instead of adding ``λ·p`` to the gradient.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        flat_gradients: bool = False,
        state_dtype: torch.dtype | str | None = None,
        fused_zero_grad: bool = False,
        master_weights: bool = False,
        step_in_backward: bool = False,
        stochastic_rounding: bool = False,
        kahan_sum: bool = False,
        rounding_seed: int | None = None,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            flat_gradients=flat_gradients,
            state_dtype=state_dtype,
            fused_zero_grad=fused_zero_grad,
            master_weights=master_weights,
            step_in_backward=step_in_backward,
            stochastic_rounding=stochastic_rounding,
            kahan_sum=kahan_sum,
            rounding_seed=rounding_seed,
        )

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
