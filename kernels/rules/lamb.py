"""LAMB (You et al., 2019, "Large Batch Optimization for Deep Learning", Algorithm 2).

A step is two launches over a bucket: `DIRECTION` updates the moments and sums each
tensor's ``‖p‖²`` and ``‖u‖²`` of its Adam direction with decoupled weight decay ``u``
in the same pass (a segmented reduction: per segment in the loop, per tensor on the
host; `specs.KernelSpec.squares`), keeping ``u`` nowhere; `APPLY` computes ``u`` again from
the new moments and moves each tensor by its own trust ratio::

    m ← β1·m + (1 − β1)·g          v ← β2·v + (1 − β2)·g²
    u = (m / c1) / (√(v / c2) + ε) + λ·p     (c1 = 1 − β1ᵗ, c2 = 1 − β2ᵗ; both 1 without
                                              bias correction)
    r = ‖p‖ / ‖u‖, or 1 when either norm is 0
    p ← p − lr·r·u

Both passes compute ``u`` from the moments as stored: with 16-bit state (the flags of
`DIRECTION`) the direction pass rounds the new moments to bfloat16 or float16 before
it computes ``u``, so that the ``‖u‖`` of the trust ratio is that of the ``u`` `APPLY`
reads back and applies (8-bit codes need their block's new absmax, known only after the
block: there the norm is that of ``u`` before encoding). ``p`` is the float32 value the
step moves: the 16-bit parameter, its float32 master copy, or ``p + c`` with Kahan
summation (`kernels.elements`); the new parameter is stored, rounded to nearest,
stochastically or compensated, by `APPLY` alone.

Computing ``u`` twice costs no more time than keeping it (measured: the same within
noise): the second pass reads p, m and v (12 bytes a float32 element) where a kept
``u`` costs its write, the read of its cache line before that write, and its read (12
bytes). It saves a scratch array as large as the parameters (bench/NOTES.md, entry 19).

The variant: the paper's, with bias correction on by default (Algorithm 2 has it), the
trust ratio applied to every tensor (Apex's FusedLAMB skips it for tensors without
weight decay unless ``use_nvlamb``; DeepSpeed's clamps it to [0.01, 10]), no
clipping of the ratio, and no global gradient clipping inside the step (Apex clips by
``max_grad_norm=1.0`` by default; here call ``clip_grad_norm_`` first).
"""

import math
from typing import NamedTuple

import numpy as np
from numba.extending import register_jitable

from .. import hyperparameters
from ..calls import as_flags, carrier_of, compute_dtype, dispatch, one_entry, real_numbers
from ..capturable import same_type
from ..hyperparameters import grad_factor, in_dtype
from ..precision import BFLOAT16_BITS, FLOAT16_BITS, as_bfloat16, as_float16
from ..specs import SIGNED, UNSIGNED, KernelSpec
from . import adam
from .common import lerp


class Coefficients(NamedTuple):
    """`direction`'s coefficients every parameter shares."""

    beta1: float
    beta1_complement: float
    beta2: float
    beta2_complement: float
    eps: float
    grad_factor: float
    weight_decay: float


class StepCoefficients(NamedTuple):
    """A parameter's bias corrections at its step ``t`` (1 without bias correction)."""

    bias_correction1: float
    bias_correction2: float


@register_jitable
def _direction(param, exp_avg, exp_avg_sq, eps, weight_decay, bias_correction1, bias_correction2):
    """``u`` from the new moments (the one expression both passes compute)."""
    denom = math.sqrt(exp_avg_sq / bias_correction2) + eps
    return (exp_avg / bias_correction1) / denom + weight_decay * param


@register_jitable
def as_stored(value, bfloat16_state, float16_state):
    """A new moment as its state array will keep it: rounded to bfloat16 or float16
    (`precision.as_bfloat16`, `precision.as_float16`) when the state is stored so."""
    if bfloat16_state:
        return as_bfloat16(value)
    if float16_state:
        return as_float16(value)
    return value


@register_jitable
def direction(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    beta1,
    beta1_complement,
    beta2,
    beta2_complement,
    eps,
    grad_factor,
    weight_decay,
    bias_correction1,
    bias_correction2,
    bfloat16_state,
    float16_state,
):
    """The moments and the update direction ``u`` of one element (see the module doc);
    returns ``(m, v, u)``, the parameter unchanged. With 16-bit state (the flags) the
    moments are rounded as they will be stored before ``u`` is computed from them, so
    that ``u`` is the one `apply` computes from the stored moments."""
    grad = grad_factor * grad
    exp_avg = lerp(exp_avg, grad, beta1_complement, beta1)
    exp_avg_sq = exp_avg_sq * beta2 + beta2_complement * grad * grad
    exp_avg = as_stored(exp_avg, bfloat16_state, float16_state)
    exp_avg_sq = as_stored(exp_avg_sq, bfloat16_state, float16_state)
    update = _direction(
        param, exp_avg, exp_avg_sq, eps, weight_decay, bias_correction1, bias_correction2
    )
    return exp_avg, exp_avg_sq, update


class LiveSettings(NamedTuple):
    """What the live functions take from the host (``capturable=True``): every
    hyperparameter but lr."""

    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    bias_correction: float  # 1.0 or 0.0
    sign: float  # −1.0 with ``maximize``, else 1.0


@register_jitable
def _live_corrections(step, settings):
    """`StepCoefficients` at ``step`` in float64, as `bias_corrections` computes them."""
    if settings[4] == 0.0:
        return 1.0, 1.0
    return 1.0 - settings[0] ** step, 1.0 - settings[1] ** step


@register_jitable
def live_direction(scalars, lr, inverse_scale, settings):
    """`DIRECTION`'s `Coefficients` and `StepCoefficients` of the next step on the device
    (`kernels.capturable`), in float64 as `coefficients` and `bias_corrections` compute
    them from Python floats, and the step count they advance to: ``scalars`` is
    ``(t − 1,)``, ``settings`` is `live_settings`."""
    beta1, beta2, eps, weight_decay = settings[0], settings[1], settings[2], settings[3]
    step = scalars[0] + 1.0
    shared = (
        beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, settings[5] * inverse_scale, weight_decay
    )  # fmt: skip
    return shared, _live_corrections(step, settings), (step,)


@register_jitable
def live_apply(scalars, lr, inverse_scale, settings):
    """`APPLY_ON_DEVICE`'s coefficients and entry values on the device: the bias
    corrections at the count the direction pass has advanced to (``scalars``:
    ``(t,)``, left as it is) and −lr, which `trust_step` then multiplies by the
    tensor's trust ratio."""
    corrections = _live_corrections(scalars[0], settings)
    entry = (corrections[0], corrections[1], -lr)
    return (settings[2], settings[3]), entry, (scalars[0],)


def live_settings(betas, eps, weight_decay, bias_correction, maximize):
    """`LiveSettings`, as the plain tuple of floats kernels take."""
    named = LiveSettings(*betas, eps, weight_decay, float(bias_correction),
                         -1.0 if maximize else 1.0)  # fmt: skip
    return tuple(float(value) for value in named)


#: 8-bit state (`specs.int8_blockwise`): both passes read the codes the first writes.
MOMENT_CODES = (("exp_avg", SIGNED), ("exp_avg_sq", UNSIGNED))

DIRECTION = KernelSpec(
    "lamb_direction",
    direction,
    ("exp_avg", "exp_avg_sq"),
    Coefficients,
    StepCoefficients,
    flags=("bfloat16_state", "float16_state"),
    # reassociation lets the sums of squares vectorise; arcp turns the divisions by
    # the bias corrections into products
    fastmath=frozenset({"reassoc", "nsz", "arcp"}),
    updates_param=False,
    computed=("update",),
    squares=("param", "update"),
    codes=MOMENT_CODES,
    live=live_direction,
    live_settings=LiveSettings,
    scalars=("step",),
)


class ApplyCoefficients(NamedTuple):
    """`apply`'s coefficients every parameter shares."""

    eps: float
    weight_decay: float


class ApplyStepCoefficients(NamedTuple):
    """A tensor's bias corrections at its step and its ``−lr·r``."""

    bias_correction1: float
    bias_correction2: float
    neg_step_size: float


@register_jitable
def apply(
    param, grad, exp_avg, exp_avg_sq, eps, weight_decay, bias_correction1, bias_correction2,
    neg_step_size,
):  # fmt: skip
    """``p ← p − lr·r·u`` (``neg_step_size`` is ``−lr·r``), ``u`` from the new moments."""
    update = _direction(
        param, exp_avg, exp_avg_sq, eps, weight_decay, bias_correction1, bias_correction2
    )
    return param + neg_step_size * update


APPLY = KernelSpec(
    "lamb_apply",
    apply,
    ("exp_avg", "exp_avg_sq"),
    ApplyCoefficients,
    ApplyStepCoefficients,
    fastmath=frozenset({"arcp"}),
    read_only=("exp_avg", "exp_avg_sq"),
    reads_grad=False,
    codes=MOMENT_CODES,
)


@register_jitable
def trust_ratio(param_squares, update_squares):
    """``r = ‖p‖ / ‖u‖`` from the sums of squares, or 1 when either is 0 (a NaN sum gives
    1, and its NaN update moves the parameter to NaN; inf over inf is NaN)."""
    if param_squares > 0.0 and update_squares > 0.0:
        return math.sqrt(param_squares) / math.sqrt(update_squares)
    return 1.0


@register_jitable
def trust_step(values, sums, entry):
    """`ApplyStepCoefficients` of ``entry`` on the GPU (`APPLY_ON_DEVICE`): its bias
    corrections, and ``values[2]`` (−lr) times its `trust_ratio`, from the sums of
    squares the direction pass left on the device (float64, rounded once)."""
    ratio = trust_ratio(sums[entry, 0], sums[entry, 1])
    return values[0], values[1], same_type(float(values[2]) * ratio, values[2])


#: `APPLY` reading each tensor's norms from the device (CUDA: `kernels.sums`): its
#: third entry value is −lr, and the kernel multiplies it by the trust ratio.
APPLY_ON_DEVICE = APPLY._replace(
    name="lamb_apply_on_device",
    from_sums=trust_step,
    live=live_apply,
    live_settings=LiveSettings,
    scalars=("step",),
)


def state_flags(state_format):
    """`DIRECTION`'s flags for state kept as ``state_format`` (the type of its elements
    in a launch table, `kernels.tables`): whether it is bfloat16, whether float16."""
    kind = np.dtype(state_format)
    return kind == np.dtype(BFLOAT16_BITS), kind == np.dtype(FLOAT16_BITS)


def apply_coefficients(dtype, eps, weight_decay):
    """`ApplyCoefficients` in ``dtype``."""
    return in_dtype(dtype, ApplyCoefficients(eps=eps, weight_decay=weight_decay))


def check(lr, betas, eps, weight_decay):
    """Raise ``ValueError`` for invalid LAMB settings (Adam's messages)."""
    adam.check(lr, betas, eps, weight_decay)


def coefficients(dtype, betas, eps, weight_decay, maximize, grad_scale=None):
    """`Coefficients` in ``dtype``."""
    beta1, beta2 = betas
    named = Coefficients(
        beta1=beta1,
        beta1_complement=1.0 - beta1,
        beta2=beta2,
        beta2_complement=1.0 - beta2,
        eps=eps,
        grad_factor=grad_factor(maximize, grad_scale),
        weight_decay=weight_decay,
    )
    return in_dtype(dtype, named)


def bias_corrections(dtype, steps, betas, bias_correction):
    """Rows of `StepCoefficients` for parameters at steps ``steps`` (≥ 1; one number:
    one row, for every parameter)."""
    if not bias_correction:
        return np.ones((np.size(steps), 2), dtype)
    beta1, beta2 = betas
    if np.ndim(steps) == 0:  # every parameter at one step: one row for all
        return np.array([[1.0 - beta1**steps, 1.0 - beta2**steps]], dtype)
    steps = np.asarray(steps, np.float64).reshape(-1)
    return np.stack([1.0 - beta1**steps, 1.0 - beta2**steps], axis=1).astype(dtype)


def apply_step_coefficients(dtype, corrections, squared_norms, lr):
    """Rows of `ApplyStepCoefficients` from each tensor's bias corrections (rows of
    `StepCoefficients`) and ``(‖p‖², ‖u‖²)``: ``−lr·r`` with ``r = ‖p‖/‖u‖``, or
    ``−lr`` when either norm is 0. −lr is rounded to ``dtype`` before the product (in
    float64, rounded to ``dtype``), as the GPU's `trust_step` reads it from its table
    (and as Apex's FusedLAMB takes lr, a float32 argument): the same bits on either."""
    param_norm, update_norm = np.sqrt(squared_norms[:, 0]), np.sqrt(squared_norms[:, 1])
    ratio = np.ones(len(param_norm))  # `trust_ratio`, over arrays
    with np.errstate(invalid="ignore"):  # inf / inf: NaN, as the norms are
        np.divide(param_norm, update_norm, out=ratio, where=(param_norm > 0) & (update_norm > 0))
    rows = np.empty((len(ratio), 3), dtype)
    rows[:, :2] = corrections
    rows[:, 2] = np.float64(np.asarray(-lr, dtype)) * ratio
    return rows


def apply_step_coefficients_on_device(dtype, corrections, lr):
    """Rows of `ApplyStepCoefficients` for `APPLY_ON_DEVICE`: the bias corrections and
    −lr, which the kernel multiplies by each tensor's trust ratio."""
    rows = np.empty((len(corrections), 3), dtype)
    rows[:, :2] = corrections
    rows[:, 2] = -lr
    return rows


# --- the low-level function (`fastmomentum.kernels`) ----------------------------------


def lamb_step(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    *,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    bias_correction: bool = True,
    maximize: bool = False,
    stream=None,
) -> float:
    """One LAMB step (You et al., 2019) treating ``param`` as one layer, in place on
    ``param`` and the moments. Returns the trust ratio used. With ``g = ±grad``::

        m ← β1·m + (1 − β1)·g          v ← β2·v + (1 − β2)·g²
        u = (m / (1 − β1ᵗ)) / (√(v / (1 − β2ᵗ)) + ε) + λ·p   (no corrections without
                                                             bias_correction)
        r = ‖p‖ / ‖u‖, or 1 when either norm is 0
        p ← p − lr·r·u

    float32 and float64 arrays, and float16 and bfloat16 (ml_dtypes) ones computed in
    float32, each stored value rounded once (see `kernels.rules.lamb` for the variant).
    """
    lr, eps, weight_decay = real_numbers(lr=lr, eps=eps, weight_decay=weight_decay)
    betas = hyperparameters.as_betas(betas)
    bias_correction, maximize = as_flags(bias_correction=bias_correction, maximize=maximize)
    step = hyperparameters.as_step(step)
    check(lr, betas, eps, weight_decay)
    kernels, arrays, launch = dispatch(
        {
            "param": param,
            "grad": grad,
            "exp_avg": exp_avg,
            "exp_avg_sq": exp_avg_sq,
        },
        stream,
    )
    dtype = compute_dtype(arrays)
    shared = coefficients(dtype, betas, eps, weight_decay, maximize)
    corrections = bias_corrections(dtype, [step], betas, bias_correction)[0]
    flags = state_flags(carrier_of(arrays[2].dtype))
    norms = kernels.launch(
        one_entry(arrays, tuple(corrections)), DIRECTION, shared, flags, **launch
    )
    entry = apply_step_coefficients(dtype, corrections, norms, lr)[0]
    kernels.launch(
        one_entry(arrays, tuple(entry)),
        APPLY,
        apply_coefficients(dtype, eps, weight_decay),
        **launch,
    )
    return float(entry[2]) / -lr if lr else 1.0


#: The specs of this module's rules (`rules.SPECS`).
SPECS = (DIRECTION, APPLY)

#: The spec only the CUDA kernels launch (`rules.DEVICE_SPECS`).
DEVICE_SPECS = (APPLY_ON_DEVICE,)

#: What `fastmomentum.kernels` exports of this module (`rules.FUNCTIONS`).
FUNCTIONS = (lamb_step,)
