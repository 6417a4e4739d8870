"""``fastmomentum.Muon``: drop-in ``torch.optim.Muon``, two launches per bucket with
torch's Newton–Schulz iteration between them."""

from typing import NamedTuple

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from fastmomentum.kernels import rules

from . import capture
from .devices import kernel_array
from .kernels.tables import NEAREST
from .launches import param_store
from .optimizer import FlatOptimizer
from .storage import is_dtensor, placed_like, shard_like
from .validation import check_tensor_hyperparameter, host_float

#: torch's defaults (Keller Jordan's): the quintic's coefficients, its steps, its ε.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
EPS = 1e-7


class Settings(NamedTuple):
    """A group's hyperparameters as one step reads them."""

    lr: float | Tensor  # a tensor only when capturable (`capture.lr_setting`)
    weight_decay: float
    momentum: float
    nesterov: bool
    ns_coefficients: tuple[float, float, float]
    eps: float
    ns_steps: int
    adjust_lr_fn: str | None


class Muon(FlatOptimizer):
    r"""Muon (Jordan et al., 2024): momentum orthogonalised by a Newton–Schulz iteration,
    for 2-D parameters (the hidden layers' matrices; others go to e.g. AdamW).

    Same arguments, defaults, state (``momentum_buffer``), errors and numbers as
    ``torch.optim.Muon``. For an ``A × B`` parameter with gradient ``g``::

        B ← μ·B + (1 − μ)·g
        U = (1 − μ)·g + μ·B    if nesterov, else  U = B
        O = NS(U)              (bfloat16; a, b, c, ε and k steps as torch's)
        p ← p·(1 − lr·λ) − lr'·O

    with ``lr' = lr·√max(1, A/B)`` (``adjust_lr_fn`` ``None`` or ``"original"``) or
    ``0.2·lr·√max(A, B)`` (``"match_rms_adamw"``). A step is two launches per bucket
    with the matrix products between them (`fastmomentum.kernels.rules.muon`): the
    momentum pass writes every ``U`` into a scratch array of the step, torch
    orthogonalises each (as ``torch.optim.Muon`` does, in bfloat16: bit for bit its
    numbers), the update pass decays and moves every parameter. A parameter that is not
    2-D is refused with torch's ``ValueError`` (at construction, and by
    ``add_param_group``, where torch would fail at the step).

    Under FSDP2 each DTensor parameter's ``U`` is gathered whole (``full_tensor``: one
    all-gather per matrix), every rank orthogonalises it, and each keeps its shard of
    ``O``: the numbers of one process, at the cost of every rank computing every
    matrix's iteration.

    Parameters: float32, float64, bfloat16 and float16; 16-bit ones compute in float32,
    each stored value rounded where torch's 16-bit tensors round it (unlike torch, with
    ``nesterov=False`` a bfloat16 momentum buffer is not divided by its norm: torch's
    iteration divides its input in place, there the buffer itself). ``state_dtype``:
    ``torch.bfloat16`` (float32 parameters); no 8-bit state. ``master_weights``,
    ``stochastic_rounding``, ``kahan_sum``, ``flat_gradients``, ``fused_zero_grad`` and
    ``step_in_backward`` as in `fastmomentum.SGD`.

    ``capturable=True`` (CUDA parameters; torch's Muon has no such argument): no host
    read during a step, so that it can be captured in a CUDA graph. Both launches read
    AMP's values and a tensor ``lr`` on the device (`fastmomentum.capture`), and each
    parameter's ``−lr'`` is computed there between them, in float64 as the host
    computes it (`rules.muon.APPLY_ON_DEVICE`): the ordinary step's numbers, bit for bit.
    """

    supports_master_weights = True
    supports_capturable = True
    supports_quantized_state = False
    #: Only 2-D parameters (the Newton–Schulz iteration orthogonalises matrices).
    matrices_only = True

    rule_state = ("momentum_buffer",)

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = EPS,
        ns_steps: int = NS_STEPS,
        adjust_lr_fn: str | None = None,
        *,
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
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": ns_coefficients,
            "eps": eps,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
        }
        if capturable:  # not torch's argument: in the groups only when asked for
            defaults["capturable"] = True
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
        settings = Settings(
            lr=capture.lr_setting(group),
            weight_decay=host_float(group["weight_decay"], "weight_decay"),
            momentum=host_float(group["momentum"], "momentum"),
            nesterov=bool(group["nesterov"]),
            ns_coefficients=tuple(float(c) for c in group["ns_coefficients"]),
            eps=float(group["eps"]),
            ns_steps=int(group["ns_steps"]),
            adjust_lr_fn=group["adjust_lr_fn"],
        )
        rules.muon.check_orthogonalization(settings.ns_coefficients, settings.ns_steps)
        return settings

    def check_arguments(self, defaults):
        """``torch.optim.Muon``'s checks, in its order (the 2-D check: `check_group`)."""
        lr = defaults["lr"]
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        check_tensor_hyperparameter(lr, "lr")
        rules.muon.check(
            lr, defaults["momentum"], defaults["weight_decay"], defaults["adjust_lr_fn"]
        )

    def check_group(self, group):
        super().check_group(group)
        for param in group["params"]:
            if param.ndim != 2:
                raise ValueError(
                    "Muon only supports 2D parameters whereas we found a parameter with "
                    f"size: {param.size()}"
                )

    def update(self, group, bucket, settings, plan, grad_scale):
        if bucket.counts_on_device:  # capturable: the kernels compute their coefficients
            _update_on_device(self, bucket, settings, plan)
            return
        dtype = bucket.dtype_numpy
        coefficients, apply_coefficients, state_flags, param_flags = self.cached_coefficients(
            bucket,
            (settings, grad_scale),
            lambda: (
                rules.muon.momentum_coefficients(dtype, settings.momentum, grad_scale),
                rules.muon.apply_coefficients(dtype, settings.lr, settings.weight_decay),
                rules.muon.rounded_to(bucket.formats[2] if bucket.formats else dtype),
                _param_flags(bucket),
            ),
        )
        step = _Step(
            bucket, settings, self.counts_steps
        )  # what a wave's first pass hands its second
        plan.launch_passes(
            [
                (
                    ("momentum_buffer", None),
                    0,
                    step.momentum_pass,
                    bucket.kernels.launch,
                    (rules.muon.MOMENTUM, coefficients, (settings.nesterov, *state_flags)),
                ),
                (
                    (None,),
                    1,
                    step.orthogonalize,
                    bucket.kernels.launch,
                    (rules.muon.APPLY, apply_coefficients, param_flags),
                ),
            ]
        )


def _update_on_device(optimizer, bucket, settings, plan):
    """A capturable step of ``bucket`` (`capture.launch_pass`): both passes compute
    their coefficients on the device, and the update pass reads each parameter's
    ``−lr'``, which `_Step.orthogonalize` computes there."""
    state_format = bucket.formats[2] if bucket.formats else bucket.dtype_numpy
    step = _Step(bucket, settings, counts_steps=False, on_device=True)
    momentum = (settings.nesterov, *rules.muon.rounded_to(state_format))
    plan.launch_passes(
        [
            capture.launch_pass(
                optimizer, bucket, rules.muon.MOMENTUM, ("momentum_buffer", None), momentum,
                settings.lr, rules.muon.momentum_live_settings(settings.momentum),
                step.momentum_pass,
            ),
            capture.launch_pass(
                optimizer, bucket, rules.muon.APPLY_ON_DEVICE, (None,), _param_flags(bucket),
                settings.lr, rules.muon.apply_live_settings(settings.weight_decay),
                step.orthogonalize, step.apply,
            ),
        ]
    )  # fmt: skip


def _param_flags(bucket):
    """`rules.muon.APPLY`'s flags: a 16-bit parameter stored to nearest (no master copy,
    Kahan or stochastic rounding) has its decayed value rounded as torch's ``mul_``."""
    if param_store(bucket) != NEAREST:
        return False, False
    return bucket.dtype == torch.bfloat16, bucket.dtype == torch.float16


class _Step:
    """One step of a bucket, wave by wave: the scratch array of a wave's ``U`` (then its
    ``O``), which the momentum pass writes and `orthogonalize` reads; ``on_device``
    (capturable), each parameter's ``−lr'`` computed on the device (``steps``)."""

    __slots__ = ("bucket", "settings", "counts_steps", "scratch", "on_device", "steps")

    def __init__(self, bucket, settings, counts_steps, on_device=False):
        self.bucket, self.settings, self.scratch = bucket, settings, None
        self.counts_steps = counts_steps  # stochastic rounding: its bits need a count
        self.on_device, self.steps = on_device, None

    def momentum_pass(self, table):
        """Before the momentum pass: a scratch array for the wave, laid out like the
        state (dropped after the step: torch too makes a new ``U`` per parameter; kept
        with the table ``on_device``, so that a steady step's table keeps its
        addresses, as a CUDA graph's replays do, and is not copied to the GPU again)."""
        bucket = self.bucket
        if self.counts_steps:
            bucket.count_steps(table.rows)
        scratch = table.__dict__.get("muon_scratch") if self.on_device else None
        if scratch is None or scratch.dtype != bucket.state_dtype:
            scratch = torch.empty(table.size, dtype=bucket.state_dtype, device=bucket.device)
            if self.on_device:
                table.__dict__["muon_scratch"] = scratch
        self.scratch = scratch
        table.addresses[:, 3] = self._addresses(table)

    def orthogonalize(self, table):
        """Between the passes: each parameter's ``U`` orthogonalised into ``O``, in
        place, and its ``−lr'`` as the entry value of the update pass."""
        bucket, settings = self.bucket, self.settings
        with torch.no_grad():
            for entry, row in enumerate(table.rows.tolist()):
                start = int(table.starts[entry])
                piece = self.scratch.as_strided(bucket.shapes[row], bucket.strides[row], start)
                param = bucket.params[row]
                if is_dtensor(param):  # a shard: the iteration needs the whole matrix
                    whole = placed_like(piece, param).full_tensor()
                    piece.copy_(shard_like(orthogonalized(whole, settings), param))
                else:
                    piece.copy_(orthogonalized(piece, settings))
                if not self.on_device:
                    table.entry_values[entry, 0] = -self._adjusted_lr(param.shape)
            if self.on_device:
                self.steps = self._steps_on_device(table)
        table.addresses[:, 2] = self._addresses(table)

    def apply(self, table, *arguments):
        """The capturable update pass, reading the ``−lr'`` of `_steps_on_device`."""
        self.bucket.kernels.launch(table, *arguments, sums=kernel_array(self.steps))

    def _steps_on_device(self, table):
        """Each entry's ``−lr'`` (float64, one row each) computed on the bucket's device
        from the live lr, as `_adjusted_lr` computes it on the host: lr times the shape's
        factor (`rules.muon.adjusted_lr_factor`, kept with the table), in bfloat16 where
        torch's bfloat16 ``add_`` takes it so."""
        bucket, settings = self.bucket, self.settings
        key = f"muon_factors_{settings.adjust_lr_fn}"
        factors = table.__dict__.get(key)
        if factors is None:  # once per layout (and before a graph is captured)
            values = [
                rules.muon.adjusted_lr_factor(settings.adjust_lr_fn, bucket.params[row].shape)
                for row in table.rows.tolist()
            ]
            factors = torch.tensor(values, dtype=torch.float64).to(bucket.device)
            table.__dict__[key] = factors
        lr = settings.lr
        if isinstance(lr, Tensor) and lr.device == factors.device:
            steps = factors * lr.to(torch.float64)
        else:  # a float, or a CPU tensor: no wait
            steps = factors * float(lr)
        steps = steps.neg_()
        if _param_flags(bucket)[0]:
            steps = steps.to(torch.bfloat16).to(torch.float64)
        return steps.reshape(-1, 1)

    def _adjusted_lr(self, shape):
        settings = self.settings
        value = rules.muon.adjusted_lr(settings.lr, settings.adjust_lr_fn, shape)
        if _param_flags(self.bucket)[0]:  # torch's bfloat16 add_ takes alpha in bfloat16
            value = torch.tensor(value, dtype=torch.bfloat16).item()
        return value

    def _addresses(self, table):
        return self.scratch.data_ptr() + table.starts[:-1] * self.scratch.element_size()


def orthogonalized(update, settings):
    """torch's Newton–Schulz iteration of ``update`` (a 2-D tensor; returns bfloat16),
    its operations in its order, so its bits: ``X = U`` in bfloat16 (transposed when it
    has more rows than columns) divided by ``max(‖X‖_F, ε)``, then ``ns_steps`` times
    ``A = X·Xᵀ``, ``X ← a·X + (b·A + c·A·A)·X``."""
    a, b, c = settings.ns_coefficients
    tall = update.size(0) > update.size(1)
    ortho = update.bfloat16()  # a bfloat16 scratch itself: divided in place, as torch's
    if tall:
        ortho = ortho.T
    ortho.div_(ortho.norm().clamp(min=settings.eps))
    for _ in range(settings.ns_steps):
        gram = ortho @ ortho.T
        gram_update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        ortho = torch.addmm(ortho, gram_update, ortho, beta=a)
    return ortho.T if tall else ortho
