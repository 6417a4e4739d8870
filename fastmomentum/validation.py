"""Checks on what users hand an optimizer: parameters, options, hyperparameter values."""

import torch

from .devices import cuda_unavailable_reason
from .quantized import INT8_BLOCKWISE, check_dtensor
from .storage import is_dtensor, local

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def host_float(value, name):
    """A hyperparameter as a Python float; a GPU tensor is refused, since reading it every
    step would make the host wait for the GPU."""
    if type(value) is float:  # the common case, read every step
        return value
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")
        if value.device.type != "cpu":
            raise ValueError(
                f"{name} is a tensor on {value.device}; pass a float or a CPU tensor (reading "
                "a GPU value would synchronise every step)"
            )
    return float(value)


def check_tensor_hyperparameter(value, name, foreach=False):
    """torch's checks of a hyperparameter given as a Tensor (``lr``, a beta), with its
    messages: refused with ``foreach`` (Adam's, unless capturable), one element."""
    if isinstance(value, torch.Tensor):
        if foreach:
            raise ValueError(
                f"{name} as a Tensor is not supported for capturable=False and foreach=True"
            )
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")


def check_fused_flags(options):
    """torch's checks of ``fused`` against the other switches (SGD, Adam, Adagrad), which
    its constructors make after reading the parameters."""
    if options.get("fused"):
        if options.get("differentiable"):
            raise RuntimeError("`fused` does not support `differentiable`")
        if options.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


def check_implementation_options(options, capturable=False):
    """Accept torch's implementation switches only with values we honour (torch's own
    refusals first); ``capturable``: whether the optimizer implements it."""
    check_fused_flags(options)
    if options.get("differentiable"):
        raise ValueError("fastmomentum does not support differentiable=True")
    if options.get("capturable") and not capturable:
        raise ValueError("fastmomentum does not support capturable=True (CUDA graph capture)")


def check_params(params):
    """Raise for parameters the kernels cannot step, before any of them is touched.

    Parameters may share memory (tied through ``.data``, views of one tensor, in
    different groups): they are stepped in turn, as ``torch.optim`` steps them. One whose
    own elements overlap (an expanded tensor) is refused at a step that would write it.
    Parameters on the ``meta`` device are accepted: their group is bound at the first
    step after they are materialized.
    """
    for position, param in enumerate(params):
        name = f"parameter {position}"
        if param.is_complex():
            raise TypeError(f"{name} is complex ({param.dtype}); fastmomentum supports real params")
        if param.layout != torch.strided:
            raise TypeError(f"{name} has layout {param.layout}; fastmomentum needs dense params")
        if param.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{name} has dtype {param.dtype}; fastmomentum supports float32, float64, "
                "bfloat16 and float16"
            )
        if is_dtensor(param):
            _check_placements(name, param)
        device = local(param).device
        if device.type == "cuda":
            reason = cuda_unavailable_reason()
            if reason:
                raise ValueError(f"{name} is on {device}: {reason}")
        elif device.type not in ("cpu", "meta"):
            raise ValueError(f"{name} is on {device}; fastmomentum runs on CPU and CUDA")


#: What ``state_dtype`` may be: the parameters' own dtype (``None``), bfloat16 state for
#: float32 parameters (half the state's bytes, computed in float32), or block-wise 8-bit
#: state (`fastmomentum.quantized`).
STATE_DTYPES = (None, torch.bfloat16, INT8_BLOCKWISE)

#: The parameter dtypes each low-precision state format goes with.
_STATE_PARAMS = {
    torch.bfloat16: (torch.float32,),
    INT8_BLOCKWISE: (torch.float32, torch.bfloat16, torch.float16),
}


def check_state_dtype(state_dtype, params=()):
    """Raise ``ValueError`` for a ``state_dtype`` we do not implement, or for parameters
    it cannot go with (bfloat16 state is for float32 parameters; 8-bit state for
    float32, bfloat16 and float16 parameters, DTensors placed as Shard and Replicate)."""
    if not any(state_dtype is kind or state_dtype == kind for kind in STATE_DTYPES):
        raise ValueError(
            "state_dtype must be None (the parameters' dtype), torch.bfloat16 or "
            f"{INT8_BLOCKWISE!r}, got {state_dtype!r}"
        )
    if state_dtype is None:
        return
    allowed = _STATE_PARAMS[state_dtype]
    for position, param in enumerate(params):
        if param.dtype not in allowed:
            names = ", ".join(str(dtype).removeprefix("torch.") for dtype in allowed)
            raise ValueError(
                f"parameter {position} is {param.dtype}; state_dtype={state_dtype!r} is for "
                f"{names} parameters"
            )
        if state_dtype == INT8_BLOCKWISE and is_dtensor(param):
            check_dtensor(param, f"parameter {position}")


def check_master_weights(params, option="master_weights=True"):
    """Raise ``ValueError`` unless every parameter is 16-bit: ``option``
    (``master_weights=True``, ``stochastic_rounding=True``, ``kahan_sum=True``) is for
    bfloat16 and float16 parameters, which lose small updates to rounding."""
    for position, param in enumerate(params):
        if param.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(
                f"parameter {position} is {param.dtype}; {option} is for "
                "bfloat16 and float16 parameters"
            )


def check_rounding_options(stochastic_rounding, kahan_sum, master_weights, rounding_seed):
    """Raise for ``stochastic_rounding`` / ``kahan_sum`` / ``rounding_seed`` values that
    are not ours, or that make no sense together: each is another answer to what
    ``master_weights`` answers (16-bit parameters that lose small updates), so at most
    one of the three; ``rounding_seed`` is for stochastic rounding."""
    for name, value in (("stochastic_rounding", stochastic_rounding), ("kahan_sum", kahan_sum)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    chosen = [
        name
        for name, value in (
            ("master_weights", master_weights),
            ("stochastic_rounding", stochastic_rounding),
            ("kahan_sum", kahan_sum),
        )
        if value
    ]
    if len(chosen) > 1:
        raise ValueError(
            f"{' and '.join(f'{name}=True' for name in chosen)}: each keeps 16-bit "
            "parameters from losing small updates in its own way (a float32 copy, "
            "unbiased rounding, a compensation buffer); choose one"
        )
    if rounding_seed is not None:
        if not stochastic_rounding:
            raise ValueError("rounding_seed is the seed of stochastic_rounding=True")
        if isinstance(rounding_seed, bool) or not isinstance(rounding_seed, int):
            raise TypeError(f"rounding_seed must be an int, got {rounding_seed!r}")
        if not 0 <= rounding_seed < 2**64:
            raise ValueError(f"rounding_seed must be in [0, 2**64), got {rounding_seed}")


def _check_placements(name, param):
    """A DTensor steps shard by shard: every shard must hold whole values of the
    parameter (``Shard``, ``Replicate``), not partial sums (``Partial``)."""
    from torch.distributed.tensor import Replicate, Shard

    for placement in param.placements:
        if not isinstance(placement, (Shard, Replicate)):
            raise ValueError(
                f"{name} is a DTensor placed as {placement!r}; fastmomentum steps DTensors "
                "that are sharded or replicated, not partial"
            )
