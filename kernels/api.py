"""The low-level API: one optimizer step on NumPy or GPU arrays, validated, then dispatched.

The arrays decide where the step runs: NumPy arrays on the CPU kernels, GPU arrays (Numba
device arrays, ``__cuda_array_interface__`` objects such as torch CUDA tensors) on the
CUDA kernels on the arrays' GPU, queued on ``stream`` (a Numba stream, a raw
``cudaStream_t`` as an int, or an object with a ``cuda_stream`` attribute such as
``torch.cuda.Stream``; by default the stream the arrays' producer names: torch's current
stream for torch tensors, the array interface's ``stream`` otherwise, else the default
stream). Nothing is written unless every array and hyperparameter passes its
check, so a rejected call leaves all arrays as they were: ``TypeError`` names an
argument of the wrong type (hyperparameters are real numbers, flags are bools),
``ValueError`` one with an invalid value, with ``torch.optim``'s messages.
"""

import numbers
from typing import Literal

import numpy as np

from . import cpu, hyperparameters, rules
from .arrays import address_of, device_views, flat_views, is_bfloat16, locate, placement
from .precision import BFLOAT16_BITS, FLOAT16_BITS
from .tables import TensorTable


def sgd_step(
    param: np.ndarray,
    grad: np.ndarray,
    momentum_buffer: np.ndarray | None = None,
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    first_step: bool = False,
    momentum_convention: Literal["pytorch", "lr_folded"] = "pytorch",
    stream=None,
) -> None:
    """One SGD step, in place on ``param`` (and ``momentum_buffer`` when momentum > 0).

    With ``d = ±g + λ·p`` (minus when ``maximize``), in PyTorch's convention::

        v ← d on the first step, else μ·v + (1 − τ)·d
        p ← p − lr·(d + μ·v)   (nesterov)   or   p ← p − lr·v

    and in the lr-folded convention (Polyak, Sutskever et al., Keras)::

        v ← lr·d on the first step, else μ·v + (1 − τ)·lr·d
        p ← p − (lr·d + μ·v)   (nesterov)   or   p ← p − v

    ``first_step=True`` initialises the buffer from ``d`` (torch's first step); with
    ``False`` the buffer's current contents are used. ``momentum_buffer`` is required when
    ``momentum > 0`` and ignored otherwise. The arrays are NumPy arrays (plain
    ``np.ndarray`` or ``np.memmap``) or GPU arrays, C-contiguous, of one shape and one
    float dtype, not overlapping; those updated in place must be writeable.

    Example::

        >>> p, g, v = np.ones(3, np.float32), np.full(3, 0.5, np.float32), np.zeros(3, np.float32)
        >>> sgd_step(p, g, v, lr=0.1, momentum=0.9, first_step=True)
        >>> p
        array([0.95, 0.95, 0.95], dtype=float32)
    """
    lr, momentum, dampening, weight_decay = _real_numbers(
        lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay
    )
    nesterov, maximize, first_step = _flags(
        nesterov=nesterov, maximize=maximize, first_step=first_step
    )
    rules.sgd.check(lr, momentum, dampening, weight_decay, nesterov, momentum_convention)
    if momentum == 0:
        kernels, arrays, launch = _dispatch({"param": param, "grad": grad}, stream)
        coefficients = rules.sgd.plain_coefficients(
            _compute_dtype(arrays), lr, weight_decay, maximize
        )
        kernels.launch(_one_entry(arrays), rules.sgd.PLAIN, coefficients, **launch)
        return
    if momentum_buffer is None:
        raise ValueError("momentum_buffer is required when momentum > 0")
    kernels, arrays, launch = _dispatch(
        {"param": param, "grad": grad, "momentum_buffer": momentum_buffer}, stream
    )
    coefficients = rules.sgd.momentum_coefficients(
        _compute_dtype(arrays), lr, momentum, dampening, weight_decay, maximize, momentum_convention
    )
    table = _one_entry(arrays, [1.0 if first_step else 0.0])
    kernels.launch(table, rules.sgd.MOMENTUM, coefficients, (nesterov,), **launch)


def adam_step(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    max_exp_avg_sq: np.ndarray | None = None,
    *,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    stream=None,
) -> None:
    """One Adam step (Kingma & Ba), in place on ``param`` and the moment buffers.

    ``step`` is this step's count t ≥ 1 (1 on the first call). With ``g = ±grad``::

        p ← p·(1 − lr·λ)                            if decoupled_weight_decay (AdamW)
        g ← g + λ·p                                 otherwise (L2, Adam)
        m ← β1·m + (1 − β1)·g
        v ← β2·v + (1 − β2)·g²
        v̂ ← max(v̂, v) if amsgrad else v
        p ← p − lr/(1 − β1ᵗ) · m / (√v̂ / √(1 − β2ᵗ) + ε)

    ``max_exp_avg_sq`` is required with ``amsgrad`` and ignored otherwise.
    """
    lr, eps, weight_decay = _real_numbers(lr=lr, eps=eps, weight_decay=weight_decay)
    betas = hyperparameters.as_betas(betas)
    amsgrad, maximize, decoupled_weight_decay = _flags(
        amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=decoupled_weight_decay
    )
    step = hyperparameters.as_step(step)
    rules.adam.check(lr, betas, eps, weight_decay)
    if amsgrad and max_exp_avg_sq is None:
        raise ValueError("max_exp_avg_sq is required when amsgrad=True")
    kernels, arrays, launch = _dispatch(
        {
            "param": param,
            "grad": grad,
            "exp_avg": exp_avg,
            "exp_avg_sq": exp_avg_sq,
            "max_exp_avg_sq": max_exp_avg_sq if amsgrad else None,
        },
        stream,
    )
    dtype = _compute_dtype(arrays)
    coefficients = rules.adam.coefficients(
        dtype, lr, betas, eps, weight_decay, decoupled_weight_decay, maximize
    )
    step_coefficients = rules.adam.step_coefficients(dtype, step, lr, betas)
    table = _one_entry(arrays, step_coefficients)
    kernels.launch(table, rules.adam.STEP, coefficients, (amsgrad,), **launch)


def adamw_step(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    max_exp_avg_sq: np.ndarray | None = None,
    *,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: Literal[True] = True,
    stream=None,
) -> None:
    """One AdamW step (Loshchilov & Hutter): `adam_step` with decoupled weight decay,
    ``p ← p·(1 − lr·λ)`` before the moment update, and ``weight_decay=1e-2`` by default.

    ``decoupled_weight_decay`` may only be True; Adam's L2 weight decay is
    ``adam_step(..., decoupled_weight_decay=False)``.
    """
    if not hyperparameters.as_flag("decoupled_weight_decay", decoupled_weight_decay):
        raise TypeError(
            "adamw_step always decouples weight decay; for Adam's L2 weight decay call "
            "adam_step(..., decoupled_weight_decay=False)"
        )
    adam_step(
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        max_exp_avg_sq,
        step=step,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        decoupled_weight_decay=True,
        stream=stream,
    )


def nadam_step(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    *,
    step: int,
    mu_product: float = 1.0,
    lr: float = 2e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum_decay: float = 4e-3,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    stream=None,
) -> float:
    """One NAdam step (Dozat, 2016), in place on ``param`` and the moment buffers;
    returns the new ``mu_product`` to pass to the next call.

    ``step`` is this step's count t ≥ 1, ``mu_product`` the product of the earlier
    steps' momentum coefficients (1.0 before the first). With ``g = ±grad`` and
    ``μ_t = β1·(1 − ½·0.96^(t·ψ))`` (``ψ = momentum_decay``)::

        p ← p·(1 − lr·λ)                 if decoupled_weight_decay
        g ← g + λ·p                      otherwise
        Π ← Π·μ_t                        (the returned mu_product)
        m ← β1·m + (1 − β1)·g
        v ← β2·v + (1 − β2)·g²
        d = √(v / (1 − β2ᵗ)) + ε
        p ← p − lr·(1 − μ_t)/(1 − Π) · g/d − lr·μ_{t+1}/(1 − Π·μ_{t+1}) · m/d

    ``Π`` is kept in float32 for float32 (and 16-bit) arrays, as torch keeps it.
    """
    lr, eps, weight_decay, momentum_decay, mu_product = _real_numbers(
        lr=lr, eps=eps, weight_decay=weight_decay, momentum_decay=momentum_decay,
        mu_product=mu_product,
    )  # fmt: skip
    betas = hyperparameters.as_betas(betas)
    decoupled_weight_decay, maximize = _flags(
        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize
    )
    step = hyperparameters.as_step(step)
    rules.nadam.check(lr, betas, eps, weight_decay, momentum_decay)
    kernels, arrays, launch = _dispatch(
        {"param": param, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}, stream
    )
    dtype = _compute_dtype(arrays)
    coefficients = rules.nadam.coefficients(
        dtype, lr, betas, eps, weight_decay, decoupled_weight_decay, maximize
    )
    product, step_coefficients = rules.nadam.step_coefficients(
        dtype, step, mu_product, lr, betas, momentum_decay, dtype
    )
    table = _one_entry(arrays, step_coefficients)
    kernels.launch(table, rules.nadam.STEP, coefficients, **launch)
    return product


def rmsprop_step(
    param: np.ndarray,
    grad: np.ndarray,
    square_avg: np.ndarray,
    momentum_buffer: np.ndarray | None = None,
    grad_avg: np.ndarray | None = None,
    *,
    lr: float = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    maximize: bool = False,
    stream=None,
) -> None:
    """One RMSprop step, in place on ``param`` and its state arrays. With
    ``g = ±grad + λ·p``::

        s ← α·s + (1 − α)·g²
        ḡ ← α·ḡ + (1 − α)·g                 (centered: grad_avg)
        a = √(s − ḡ²) + ε   if centered,   else   √s + ε
        b ← μ·b + g/a;  p ← p − lr·b        (momentum > 0: momentum_buffer)
        p ← p − lr·g/a                      (otherwise)

    ``momentum_buffer`` is required when ``momentum > 0`` and ``grad_avg`` when
    ``centered``; each is ignored otherwise.
    """
    lr, alpha, eps, weight_decay, momentum = _real_numbers(
        lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum
    )
    centered, maximize = _flags(centered=centered, maximize=maximize)
    rules.rmsprop.check(lr, alpha, eps, weight_decay, momentum)
    has_momentum = momentum > 0
    if has_momentum and momentum_buffer is None:
        raise ValueError("momentum_buffer is required when momentum > 0")
    if centered and grad_avg is None:
        raise ValueError("grad_avg is required when centered=True")
    kernels, arrays, launch = _dispatch(
        {
            "param": param,
            "grad": grad,
            "square_avg": square_avg,
            "momentum_buffer": momentum_buffer if has_momentum else None,
            "grad_avg": grad_avg if centered else None,
        },
        stream,
    )
    coefficients = rules.rmsprop.coefficients(
        _compute_dtype(arrays), lr, alpha, eps, weight_decay, momentum, maximize
    )
    flags = (has_momentum, centered)
    kernels.launch(_one_entry(arrays), rules.rmsprop.STEP, coefficients, flags, **launch)


def adagrad_step(
    param: np.ndarray,
    grad: np.ndarray,
    state_sum: np.ndarray,
    *,
    step: int,
    lr: float = 1e-2,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    eps: float = 1e-10,
    maximize: bool = False,
    stream=None,
) -> None:
    """One Adagrad step, in place on ``param`` and ``state_sum`` (torch's ``sum``: start
    it at ``initial_accumulator_value``). ``step`` is this step's count t ≥ 1. With
    ``g = ±grad + λ·p``::

        s ← s + g²
        p ← p − lr_t · g / (√s + ε),   lr_t = lr / (1 + (t − 1)·lr_decay)
    """
    lr, lr_decay, weight_decay, eps = _real_numbers(
        lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps
    )
    (maximize,) = _flags(maximize=maximize)
    step = hyperparameters.as_step(step)
    rules.adagrad.check(lr, lr_decay, weight_decay, 0.0, eps)
    kernels, arrays, launch = _dispatch(
        {"param": param, "grad": grad, "state_sum": state_sum}, stream
    )
    dtype = _compute_dtype(arrays)
    coefficients = rules.adagrad.coefficients(dtype, eps, weight_decay, maximize)
    step_size = rules.adagrad.step_coefficients_per_entry(dtype, [step], lr, lr_decay)[0]
    table = _one_entry(arrays, tuple(step_size))
    kernels.launch(table, rules.adagrad.STEP, coefficients, **launch)


def lamb_step(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    update: np.ndarray,
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
    ``param`` and the moments; ``update`` is scratch of the same shape and dtype (it
    holds ``u`` after the call). Returns the trust ratio used. With ``g = ±grad``::

        m ← β1·m + (1 − β1)·g          v ← β2·v + (1 − β2)·g²
        u = (m / (1 − β1ᵗ)) / (√(v / (1 − β2ᵗ)) + ε) + λ·p   (no corrections without
                                                             bias_correction)
        r = ‖p‖ / ‖u‖, or 1 when either norm is 0
        p ← p − lr·r·u

    float32 and float64 arrays (see `kernels.rules.lamb` for the variant).
    """
    lr, eps, weight_decay = _real_numbers(lr=lr, eps=eps, weight_decay=weight_decay)
    betas = hyperparameters.as_betas(betas)
    bias_correction, maximize = _flags(bias_correction=bias_correction, maximize=maximize)
    step = hyperparameters.as_step(step)
    rules.lamb.check(lr, betas, eps, weight_decay)
    kernels, arrays, launch = _dispatch(
        {
            "param": param,
            "grad": grad,
            "exp_avg": exp_avg,
            "exp_avg_sq": exp_avg_sq,
            "update": update,
        },
        stream,
    )
    dtype = np.dtype(arrays[0].dtype)
    if dtype.itemsize == 2:
        raise TypeError(f"lamb_step takes float32 and float64 arrays, got {dtype}")
    coefficients = rules.lamb.coefficients(dtype, betas, eps, weight_decay, maximize)
    corrections = rules.lamb.bias_corrections(dtype, [step], betas, bias_correction)[0]
    norms = kernels.launch(
        _one_entry(arrays, tuple(corrections)), rules.lamb.DIRECTION, coefficients, **launch
    )
    param_and_update = [arrays[0], arrays[1], arrays[4]]
    step_size = rules.lamb.trust_step_sizes(dtype, norms, lr)[0]
    table = _one_entry(param_and_update, tuple(step_size))
    kernels.launch(table, rules.lamb.APPLY, rules.lamb.apply_coefficients(dtype), **launch)
    return float(step_size[0]) / -lr if lr else 1.0


def adam_8bit_step(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg_codes: np.ndarray,
    exp_avg_absmax: np.ndarray,
    exp_avg_sq_codes: np.ndarray,
    exp_avg_sq_absmax: np.ndarray,
    *,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    stream=None,
) -> None:
    """One `adam_step` (no AMSGrad) whose moments are block-wise 8-bit
    (`kernels.quantization`), in place on ``param`` and the four state arrays.

    Each block of 256 elements of ``exp_avg`` (``exp_avg_sq``) is kept as int8 (uint8)
    codes, of ``param``'s shape, and one float32 absmax; ``exp_avg_absmax`` and
    ``exp_avg_sq_absmax`` hold ``ceil(param.size / 256)`` values. The step decodes the
    moments, updates them and ``param`` in float32 as `adam_step` does, and encodes
    them on their blocks' new absmax. Zeros (codes and absmax) are a fresh state;
    `quantization.quantize` and `quantization.dequantize` convert to and from float32.
    ``param`` and ``grad``: float32, float16 or bfloat16.
    """
    lr, eps, weight_decay = _real_numbers(lr=lr, eps=eps, weight_decay=weight_decay)
    betas = hyperparameters.as_betas(betas)
    maximize, decoupled_weight_decay = _flags(
        maximize=maximize, decoupled_weight_decay=decoupled_weight_decay
    )
    step = hyperparameters.as_step(step)
    rules.adam.check(lr, betas, eps, weight_decay)
    kernels, arrays, launch = _dispatch(
        {
            "param": param,
            "grad": grad,
            "exp_avg_codes": exp_avg_codes,
            "exp_avg_sq_codes": exp_avg_sq_codes,
            "exp_avg_absmax": exp_avg_absmax,
            "exp_avg_sq_absmax": exp_avg_sq_absmax,
        },
        stream,
        {
            "exp_avg_codes": "signed",
            "exp_avg_sq_codes": "unsigned",
            "exp_avg_absmax": "absmax",
            "exp_avg_sq_absmax": "absmax",
        },
    )
    dtype = np.dtype(np.float32)
    coefficients = rules.adam.coefficients(
        dtype, lr, betas, eps, weight_decay, decoupled_weight_decay, maximize
    )
    step_coefficients = rules.adam.step_coefficients(dtype, step, lr, betas)
    kernels.adam_blockwise(
        _one_entry(arrays, step_coefficients, codes=True), coefficients, **launch
    )


def sgd_8bit_step(
    param: np.ndarray,
    grad: np.ndarray,
    momentum_buffer_codes: np.ndarray,
    momentum_buffer_absmax: np.ndarray,
    *,
    lr: float,
    momentum: float,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    first_step: bool = False,
    momentum_convention: Literal["pytorch", "lr_folded"] = "pytorch",
    stream=None,
) -> None:
    """One `sgd_step` with momentum whose buffer is block-wise 8-bit: int8 codes of
    ``param``'s shape and one float32 absmax per block of 256 elements (see
    `adam_8bit_step`). ``momentum`` must be positive."""
    lr, momentum, dampening, weight_decay = _real_numbers(
        lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay
    )
    nesterov, maximize, first_step = _flags(
        nesterov=nesterov, maximize=maximize, first_step=first_step
    )
    rules.sgd.check(lr, momentum, dampening, weight_decay, nesterov, momentum_convention)
    if momentum == 0:
        raise ValueError("sgd_8bit_step needs momentum > 0 (without it there is no buffer)")
    kernels, arrays, launch = _dispatch(
        {
            "param": param,
            "grad": grad,
            "momentum_buffer_codes": momentum_buffer_codes,
            "momentum_buffer_absmax": momentum_buffer_absmax,
        },
        stream,
        {"momentum_buffer_codes": "signed", "momentum_buffer_absmax": "absmax"},
    )
    coefficients = rules.sgd.momentum_coefficients(
        np.dtype(np.float32), lr, momentum, dampening, weight_decay, maximize, momentum_convention
    )
    table = _one_entry(arrays, [1.0 if first_step else 0.0], codes=True)
    kernels.sgd_momentum_blockwise(table, coefficients, nesterov, **launch)


def _real_numbers(**values):
    """The named hyperparameters as floats, in order (`hyperparameters.as_real`)."""
    return [hyperparameters.as_real(name, value) for name, value in values.items()]


def _flags(**values):
    """The named flags as bools, in order (`hyperparameters.as_flag`)."""
    return [hyperparameters.as_flag(name, value) for name, value in values.items()]


def _one_entry(arrays, entry_values=(), codes=False):
    """A launch table of one entry: the checked 1-D ``arrays`` (``None``: not used);
    with ``codes``, the state is block-wise 8-bit (its absmax float32)."""
    addresses = [0 if array is None else address_of(array) for array in arrays]
    param = np.dtype(arrays[0].dtype)
    if codes:
        carrier = _carrier(param)
        formats = (carrier, carrier, np.dtype(np.float32), carrier)
        return TensorTable.single(arrays[0].size, addresses, np.float32, entry_values, formats)
    states = [np.dtype(array.dtype) for array in arrays[2:] if array is not None]
    state = states[0] if states else param
    formats = None
    if _carrier(param) != param or state != param:
        formats = (_carrier(param), _carrier(param), _carrier(state), _carrier(param))
    return TensorTable.single(
        arrays[0].size, addresses, _compute_dtype(arrays), entry_values, formats
    )


def _carrier(dtype):
    """The type whose elements carry ``dtype``'s in the kernels (`kernels.precision`)."""
    if dtype == np.float16:
        return np.dtype(FLOAT16_BITS)
    if is_bfloat16(dtype):
        return np.dtype(BFLOAT16_BITS)
    return dtype


def _compute_dtype(arrays):
    """The dtype a step computes in: 16-bit arrays in float32, each stored value rounded
    once (`kernels.precision`), as torch's fused optimizers do."""
    dtype = np.dtype(arrays[0].dtype)
    return np.dtype(np.float32) if dtype.itemsize == 2 else dtype


def _dispatch(arrays, stream, codes=None):
    """Check ``arrays`` (``codes``: which are 8-bit state, see `arrays.flat_views`);
    return (kernel module, 1-D views, launch options) for their place."""
    if locate(arrays) == "cpu":
        if stream is not None:
            raise ValueError("stream applies to CUDA arrays; these are NumPy arrays")
        return cpu, flat_views(arrays, codes=codes), {}
    kernels = cuda_kernels()
    device, producer_stream = placement(arrays)
    views = device_views(arrays, codes=codes)
    stream = producer_stream if stream is None else as_stream(stream)
    return kernels, views, {"stream": stream, "device": device}


def cuda_kernels():
    """The CUDA kernel module, or an error that says what is missing for it."""
    try:
        from numba import cuda

        from . import cuda as kernels
    except ImportError as error:
        raise ImportError(
            "CUDA arrays need the CUDA target of Numba: pip install 'fastmomentum[cuda]' "
            f"(numba-cuda) ({error})"
        ) from error
    if not cuda.is_available():
        raise RuntimeError(
            "CUDA arrays were given but Numba finds no usable CUDA driver and GPU "
            "(numba.cuda.is_available() is False; numba.cuda.detect() says why)"
        )
    return kernels


def as_stream(stream):
    """A raw stream handle (int) or Numba stream from what the caller passed as ``stream``."""
    if hasattr(stream, "cuda_stream"):  # torch.cuda.Stream and alike
        return stream.cuda_stream
    if isinstance(stream, numbers.Integral) and not isinstance(stream, bool):
        return int(stream)
    if hasattr(stream, "synchronize"):  # a Numba stream (or the simulator's)
        return stream
    raise TypeError(
        "stream must be a Numba stream, a raw cudaStream_t (int) or an object with a "
        f"cuda_stream attribute such as torch.cuda.Stream, got {type(stream).__name__}"
    )
