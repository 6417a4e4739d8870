"""``fastmomentum.SGD``: drop-in ``torch.optim.SGD``, one fused launch per bucket."""

from typing import Literal, NamedTuple

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT
from torch.optim.sgd import sgd

from fastmomentum.kernels import rules

from . import capture, quantized
from .optimizer import FlatOptimizer
from .validation import check_tensor_hyperparameter, host_float

#: A table's `filled_from` once its entry values say no parameter is at its first step.
_NO_FIRST_STEPS = object()


class Settings(NamedTuple):
    """A group's hyperparameters as one step reads them."""

    lr: float | Tensor  # a tensor only when capturable (`capture.lr_setting`)
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    maximize: bool
    momentum_convention: str
    capturable: bool  # counts on the device: capturable, or fused on CUDA (`capture.on_device`)


class SGD(FlatOptimizer):
    r"""Stochastic gradient descent with optional heavy-ball or Nesterov momentum.

    Same arguments, defaults, state and numbers as ``torch.optim.SGD``; one fused kernel
    launch per (param group, device, dtype) per step, over every parameter and gradient
    where it lies. With ``d = ±∇f(p) + λ·p`` (minus when ``maximize``),
    momentum ``μ``, dampening ``τ``::

        v ← d                     on a parameter's first step
        v ← μ·v + (1 − τ)·d       afterwards
        p ← p − lr·(d + μ·v)      if nesterov, else  p ← p − lr·v

    ``momentum_convention="lr_folded"`` keeps the learning rate inside the velocity, as in
    Polyak's heavy ball, Sutskever et al. (2013) and Keras: ``v ← μ·v + (1 − τ)·lr·d``,
    ``p ← p − v`` (Nesterov: ``p ← p − (lr·d + μ·v)``). The two agree while lr is constant
    and differ when it changes. ``state[p]["momentum_buffer"]`` then holds ``lr·v``.

    ``foreach`` and ``fused`` are accepted for compatibility (the step is always one
    fused launch); ``differentiable=True`` is rejected. ``flat_gradients=True`` lets
    ``zero_grad(set_to_none=False)`` (and construction) replace each ``.grad`` by a piece
    of one gradient allocation of ours instead of zeroing it in place: backward then
    accumulates there, and zeroing and clipping take one pass (a different tensor object
    than torch leaves in ``.grad``; references to the old one see no more updates).

    ``state_dtype=torch.bfloat16`` (float32 parameters only) keeps the momentum buffer in
    bfloat16, computed in float32 and rounded once per step: half the state's bytes.
    ``state_dtype="int8_blockwise"`` keeps it in 8 bits per element plus a float32
    absmax per block of 256 (`fastmomentum.quantized`; ``state[p]`` holds
    ``momentum_buffer_codes`` and ``momentum_buffer_absmax``).

    ``fused_zero_grad=True``: each step zeroes the gradients it reads, in the same pass
    (what ``zero_grad(set_to_none=False)`` right after the step does, without its pass);
    with ``flat_gradients=True`` backward then accumulates into the zeroed allocation.
    A step GradScaler skips zeroes them too. Then the step does write gradients.

    ``master_weights=True`` (bfloat16 and float16 parameters): the step updates a float32
    copy of each parameter, ``state[p]["master_param"]`` (with a float32 momentum buffer),
    from the 16-bit gradient and writes the parameter as that copy rounded, in one pass;
    see `fastmomentum.Adam` for when the copy is taken.

    ``step_in_backward=True`` (every optimizer): ``loss.backward()`` steps each bucket
    as soon as its gradients are accumulated and frees them (`fastmomentum.backward`);
    ``optimizer.no_step()`` accumulates without stepping. Same numbers as the ordinary
    loop; under DDP, see `fastmomentum.ddp`.

    ``capturable=True`` (CUDA parameters; torch's SGD has none): no host read during a
    step, AMP's values and a tensor ``lr`` read by the kernel (`fastmomentum.capture`),
    except at a step where a momentum buffer is made: with GradScaler, that step reads
    ``found_inf`` on the host, since a skipped first step must leave the next one first
    (torch's fused SGD leaves that buffer uninitialised). The groups hold
    ``capturable`` only when it is set, so that state dicts stay torch's.
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
        capturable: bool = False,
        momentum_convention: Literal["pytorch", "lr_folded"] = "pytorch",
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
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
            "momentum_convention": momentum_convention,
            **({"capturable": True} if capturable else {}),  # torch's SGD has none
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

    rule_state = ("momentum_buffer",)

    supports_master_weights = True
    supports_quantized_state = True
    supports_capturable = True

    def state_names(self, group):
        if group["momentum"] == 0:  # state only for its step count or compensation
            return ()
        return quantized.keys(("momentum_buffer",)) if self.quantized else ("momentum_buffer",)

    def settings(self, group):
        convention = group["momentum_convention"]
        if convention not in rules.sgd.CONVENTIONS:
            rules.sgd.check_convention(convention)
        return Settings(
            lr=capture.lr_setting(group),
            momentum=host_float(group["momentum"], "momentum"),
            dampening=host_float(group["dampening"], "dampening"),
            weight_decay=host_float(group["weight_decay"], "weight_decay"),
            nesterov=bool(group["nesterov"]),
            maximize=bool(group["maximize"]),
            momentum_convention=convention,
            capturable=capture.on_device(self, group),
        )

    def state_dict(self):
        """torch's state dict; ``momentum_convention`` is in a group only when it is not
        torch's (a checkpoint without it loads with the default)."""
        state_dict = super().state_dict()
        for group in state_dict["param_groups"]:
            if group.get("momentum_convention") == "pytorch":
                del group["momentum_convention"]
        return state_dict

    def steps_cast_params(self, settings):
        # torch has no lr-folded one; its loop would read AMP's values on the host
        return settings.momentum_convention == "pytorch" and not settings.capturable

    def reads_found_inf_on_host(self):
        """Whether this step reads GradScaler's ``found_inf`` on the host although every
        group is capturable: where a momentum buffer is made (class doc)."""
        buckets = self.buckets or [None] * len(self.param_groups)
        return any(
            group["momentum"] != 0
            and (made is None or not all(bucket.all_initialized for bucket in made))
            for group, made in zip(self.param_groups, buckets)
        )

    def step_cast(self, group, settings, params, grads, state, steps):
        sgd(
            params,
            grads,
            state["momentum_buffer"],
            foreach=False,
            weight_decay=settings.weight_decay,
            momentum=settings.momentum,
            lr=settings.lr,
            dampening=settings.dampening,
            nesterov=settings.nesterov,
            maximize=settings.maximize,
        )

    def creates_state(self, settings):
        """With momentum; with stochastic rounding always (its step count is state)."""
        return settings.momentum != 0 or self._stochastic_rounding

    def check_arguments(self, defaults):
        """``torch.optim.SGD``'s checks, in its order, then ours (a finite dampening, a
        known momentum convention)."""
        check_tensor_hyperparameter(defaults["lr"], "lr")
        rules.sgd.check(
            defaults["lr"],
            defaults["momentum"],
            defaults["dampening"],
            defaults["weight_decay"],
            defaults["nesterov"],
            defaults["momentum_convention"],
        )

    def update(self, group, bucket, settings, plan, grad_scale):
        dtype = bucket.dtype_numpy
        if bucket.counts_on_device:  # capturable: the kernel computes its coefficients
            self._update_live(bucket, settings, plan)
            return
        if settings.momentum == 0:
            coefficients = self.cached_coefficients(
                bucket,
                (settings, grad_scale),
                lambda: rules.sgd.plain_coefficients(
                    dtype, settings.lr, settings.weight_decay, settings.maximize, grad_scale
                ),
            )
            count = self._counted(bucket, None)
            plan.launch((), 0, count, bucket.kernels.launch, rules.sgd.PLAIN, coefficients)
            return
        coefficients = self.cached_coefficients(
            bucket,
            (settings, grad_scale),
            lambda: rules.sgd.momentum_coefficients(
                dtype,
                settings.lr,
                settings.momentum,
                settings.dampening,
                settings.weight_decay,
                settings.maximize,
                settings.momentum_convention,
                grad_scale,
            ),
        )

        spec, columns = quantized.launched(rules.sgd.MOMENTUM, rules.sgd.MOMENTUM.state, bucket)
        kernel = bucket.kernels.launch
        prepare = self._counted(bucket, lambda table: _mark_first_steps(bucket, table))
        plan.launch(columns, 1, prepare, kernel, spec, coefficients, (settings.nesterov,))

    def _update_live(self, bucket, settings, plan):
        """A capturable step: the coefficients computed by the kernel, the entries'
        ``first_step`` by the host (`rules.sgd.live_momentum`)."""
        live_settings = rules.sgd.live_settings(
            settings.momentum, settings.dampening, settings.weight_decay, settings.maximize,
            settings.momentum_convention,
        )  # fmt: skip
        if settings.momentum == 0:
            capture.launch(self, bucket, plan, rules.sgd.PLAIN, (), (), settings.lr,
                           live_settings)  # fmt: skip
            return
        spec = rules.sgd.MOMENTUM
        capture.launch(self, bucket, plan, spec, spec.state, (settings.nesterov,), settings.lr,
                       live_settings, lambda table: _mark_first_steps(bucket, table))  # fmt: skip

    def _counted(self, bucket, prepare):
        """``prepare`` (a table's, or None) that also counts each parameter's steps, with
        stochastic rounding: torch's SGD has no ``step``, but the random bits need one."""
        if not self._stochastic_rounding:
            return prepare

        def count_then_prepare(table):
            bucket.count_steps(table.rows)
            if prepare is not None:
                prepare(table)

        return count_then_prepare


def _mark_first_steps(bucket, table):
    """Entry value 1 for a parameter at its first step (its buffer made by this step)."""
    if not bucket.all_initialized:
        table.entry_values[:, 0] = ~bucket.initialized[table.rows]
        table.filled_from = None
    elif table.filled_from is not _NO_FIRST_STEPS:
        table.entry_values[:] = 0
        table.filled_from = _NO_FIRST_STEPS
