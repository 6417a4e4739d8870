"""``fastmomentum.LAMB``: layer-wise adaptive moments (You et al., 2019), two launches
per bucket."""

from typing import NamedTuple

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from fastmomentum.kernels import cpu, rules

from . import capture, quantized
from .collectives import summed_on_device, summed_over_shards
from .optimizer import FlatOptimizer
from .validation import check_tensor_hyperparameter, host_float


class Settings(NamedTuple):
    """A group's hyperparameters as one step reads them."""

    lr: float | Tensor  # a tensor only when capturable (`capture.lr_setting`)
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    bias_correction: bool
    maximize: bool


class LAMB(FlatOptimizer):
    r"""LAMB (You et al., 2019, "Large Batch Optimization for Deep Learning"): Adam's
    direction with decoupled weight decay, scaled per parameter tensor by a trust ratio.

    For each tensor at its step ``t``, with ``g = ±∇f(p)``::

        m ← β1·m + (1 − β1)·g          v ← β2·v + (1 − β2)·g²
        u = (m / (1 − β1ᵗ)) / (√(v / (1 − β2ᵗ)) + ε) + λ·p
        r = ‖p‖ / ‖u‖, or 1 when either norm is 0
        p ← p − lr·r·u

    ``bias_correction=False`` drops the ``1 − βᵗ`` factors. State per parameter:
    ``step``, ``exp_avg``, ``exp_avg_sq``. torch has no LAMB; the variant (the paper's,
    trust ratio on every tensor, no clipping of it, no gradient clipping inside the
    step) and how it differs from Apex's FusedLAMB and DeepSpeed's are in
    `fastmomentum.kernels.rules.lamb`. A step is two launches per bucket: the moments
    and the per-tensor norms (a segmented reduction in the same pass), then the update
    (``u`` computed again from the new moments as stored). A DTensor (FSDP2)
    parameter's norms are its whole tensor's (its shards' sums of squares added up
    across ranks, one ``all_reduce`` per mesh a step).

    Parameters: float32, float64, bfloat16 and float16; 16-bit ones compute in float32,
    each stored value rounded once, their state in their own dtype by default, as
    `fastmomentum.Adam`'s. ``state_dtype``: ``torch.bfloat16`` (float32 parameters) or
    ``"int8_blockwise"`` (float32 and 16-bit parameters; codes and absmax in place of
    the moments, `fastmomentum.quantized`). ``master_weights=True`` (16-bit
    parameters): the step moves a float32 copy, ``state[p]["master_param"]``, with
    float32 state, and writes the parameter as the copy rounded.
    ``stochastic_rounding=True`` or ``kahan_sum=True`` (16-bit parameters): the update
    pass stores the parameter rounded stochastically (random bits keyed on
    ``rounding_seed``, the parameter's step count and the element's index, as every
    optimizer's) or as ``p + c`` compensated (``state[p]["kahan_comp"]``); the
    direction pass stores nothing of the parameter.

    What the trust ratio measures: ``‖p‖`` is that of the float32 value the step
    moves (the 16-bit parameter, its master copy, or ``p + c`` with Kahan summation, of
    which ``c`` holds what ``p`` lost to rounding); ``‖u‖`` is that of the ``u`` the
    update applies: with 16-bit state the direction pass rounds the new moments as they
    are stored before it computes ``u`` (float16 state would otherwise mislead: a
    second moment that underflows float16 turns ``u`` into ``m/ε`` in the update pass
    only, hundreds of times the ``u`` measured). With 8-bit state ``‖u‖`` is that of
    ``u`` from the new moments before they are encoded (their block's absmax is known
    only once the block is done), the update applies ``u`` from the codes: the norm of
    the latter measured 0.97-1.04× the former (float32 and bfloat16 parameters, 30
    steps; tests/test_lamb.py bounds it).

    ``capturable=True`` (CUDA parameters): no host read during a step, as torch's
    capturable optimizers: the step counts lie on the device, both passes compute their
    coefficients there, reading a tensor ``lr`` and AMP's values there, and the trust
    ratios never leave it (`fastmomentum.capture`).
    """

    scalar_state = {"step": 0.0}
    supports_master_weights = True
    supports_quantized_state = True
    supports_capturable = True

    rule_state = rules.lamb.DIRECTION.state

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        bias_correction: bool = True,
        *,
        maximize: bool = False,
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
            "eps": eps,
            "weight_decay": weight_decay,
            "bias_correction": bias_correction,
            "maximize": maximize,
            "capturable": capturable,
            # what torch.optim.Optimizer gives a loaded optimizer's defaults (and so
            # our groups): here from the start, so that a resumed run's groups are equal
            "differentiable": False,
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
            bias_correction=bool(group["bias_correction"]),
            maximize=bool(group["maximize"]),
        )

    def check_arguments(self, defaults):
        """Adam's checks (torch has no LAMB), in torch.optim.Adam's order."""
        check_tensor_hyperparameter(defaults["lr"], "lr")
        betas = defaults["betas"]
        rules.lamb.check(defaults["lr"], betas, defaults["eps"], defaults["weight_decay"])

    def update(self, group, bucket, settings, plan, grad_scale):
        lr, betas = settings.lr, settings.betas
        eps, weight_decay = settings.eps, settings.weight_decay
        dtype = bucket.dtype_numpy
        if bucket.counts_on_device:  # capturable: the kernels compute their coefficients
            _update_on_device(self, bucket, settings, plan)
            return
        coefficients, apply_coefficients, flags = self.cached_coefficients(
            bucket,
            (settings, grad_scale),
            lambda: (
                rules.lamb.coefficients(
                    dtype, betas, eps, weight_decay, settings.maximize, grad_scale
                ),
                rules.lamb.apply_coefficients(dtype, eps, weight_decay),
                # the moments' format: the direction pass measures u as they are stored
                rules.lamb.state_flags(bucket.formats[2] if bucket.formats else dtype),
            ),
        )
        measured = _Measured(bucket)  # from the direction pass to the update pass of a wave

        def count_step(table):  # each parameter's t, and its bias corrections
            step = bucket.count_steps(table.rows)  # None unless all are at one step
            steps = bucket.step_counts[table.rows] if step is None else step
            table.entry_values[:] = rules.lamb.bias_corrections(
                dtype, steps, betas, settings.bias_correction
            )

        on_gpu = measured.on_gpu

        def trust(table):
            if on_gpu:  # −lr, which the kernel multiplies by the tensor's trust ratio
                table.entry_values[:] = rules.lamb.apply_step_coefficients_on_device(
                    dtype, measured.corrections, lr
                )
            else:
                table.entry_values[:] = rules.lamb.apply_step_coefficients(
                    dtype, measured.corrections, measured.norms, lr
                )

        moments = rules.lamb.DIRECTION.state  # the update pass reads what the first wrote
        direction, columns = quantized.launched(rules.lamb.DIRECTION, moments, bucket)
        apply_spec = rules.lamb.APPLY_ON_DEVICE if on_gpu else rules.lamb.APPLY
        apply, _ = quantized.launched(apply_spec, moments, bucket)
        plan.launch_passes(
            [
                (
                    columns,
                    direction.entry_width,
                    count_step,
                    measured.direction_and_norms,
                    (direction, coefficients, flags),
                ),
                (
                    columns,
                    apply.entry_width,
                    trust,
                    measured.apply_with_norms if on_gpu else bucket.kernels.launch,
                    (apply, apply_coefficients),
                ),
            ]
        )


def _update_on_device(optimizer, bucket, settings, plan):
    """A capturable step of ``bucket`` (`capture.launch_pass`): the direction pass
    advances the counts and keeps the norms on the device; the update pass computes its
    bias corrections from the advanced counts, and its −lr·r from the norms."""
    live_settings = rules.lamb.live_settings(
        settings.betas, settings.eps, settings.weight_decay, settings.bias_correction,
        settings.maximize,
    )  # fmt: skip
    flags = rules.lamb.state_flags(bucket.formats[2] if bucket.formats else bucket.dtype_numpy)
    measured = _Measured(bucket)
    moments, lr = rules.lamb.DIRECTION.state, settings.lr
    passes = [
        (rules.lamb.DIRECTION, flags, measured.direction_and_norms),
        (rules.lamb.APPLY_ON_DEVICE, (), measured.apply_with_norms),
    ]
    plan.launch_passes(
        [
            capture.launch_pass(optimizer, bucket, spec, moments, flags, lr, live_settings,
                                launcher=launcher)
            for spec, flags, launcher in passes
        ]
    )  # fmt: skip


class _Measured:
    """What a wave's direction pass hands its update pass (`launches.StepPlan.launch_passes`
    runs them in turn over one wave): the bias corrections of its parameters (rows of
    `rules.lamb.StepCoefficients`) and each tensor's ``(‖p‖², ‖u‖²)``, kept on the GPU
    where the kernels run there (`kernels.sums`). Its two launchers run the passes of
    the ordinary step and of the capturable one (`_update_on_device`)."""

    __slots__ = ("bucket", "on_gpu", "corrections", "norms")

    def __init__(self, bucket):
        self.bucket, self.on_gpu = bucket, bucket.kernels is not cpu

    def direction_and_norms(self, table, *arguments):
        """The direction pass: its norms (a shard's summed into the whole tensor's, on
        whichever side they are) and its table's bias corrections, kept."""
        bucket = self.bucket
        options = {"keep_sums": True} if self.on_gpu else {}
        norms = bucket.kernels.launch(table, *arguments, **options)
        if bucket.distributed:  # a shard's sums: the trust ratio is the whole tensor's
            params = [bucket.params[row] for row in table.rows]
            summed = summed_on_device if self.on_gpu else summed_over_shards
            norms = summed(params, norms)
        self.corrections, self.norms = table.entry_values.copy(), norms

    def apply_with_norms(self, table, *arguments):
        """The update pass on the GPU, reading the norms the direction pass kept there."""
        self.bucket.kernels.launch(table, *arguments, sums=self.norms)
