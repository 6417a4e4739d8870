"""Block-wise 8-bit optimizer state (``state_dtype="int8_blockwise"``), as torch tensors.

Adam's moments and SGD's momentum buffer are kept as codes and per-block absmax
(`kernels.quantization`): ``state[p]`` holds, for each of them (``exp_avg``,
``exp_avg_sq``, ``momentum_buffer``), ``<name>_codes`` (uint8 for ``exp_avg_sq``,
int8 otherwise) laid out like the parameter, and ``<name>_absmax`` (float32, one value
per block of 256 elements in the parameter's memory order). A state dict keeps them as
they are, so it round-trips exactly. Between the formats:

- loading a full-precision checkpoint (``exp_avg`` and ``exp_avg_sq``, or
  ``momentum_buffer``) into an 8-bit optimizer quantizes each block by block, exactly
  as a step stores it;
- loading an 8-bit checkpoint into a full-precision optimizer (ours) decodes the codes
  to float32, then rounds them to the state's dtype;
- `dequantized_state_dict` gives a torch.optim-loadable state dict of an 8-bit one.
"""

import numpy as np
import torch

from fastmomentum.kernels import quantization

from .storage import dense_strides, is_dense

#: The ``state_dtype`` of block-wise 8-bit state.
INT8_BLOCKWISE = "int8_blockwise"

#: Per full-precision state tensor: its codes' key, its absmax's key, and whether it is
#: signed.
MOMENTS = {
    "exp_avg": ("exp_avg_codes", "exp_avg_absmax", True),
    "exp_avg_sq": ("exp_avg_sq_codes", "exp_avg_sq_absmax", False),
    "momentum_buffer": ("momentum_buffer_codes", "momentum_buffer_absmax", True),
}

#: The state keys of an 8-bit Adam, in its kernel's order: codes, then absmax.
STATE_KEYS = ("exp_avg_codes", "exp_avg_sq_codes", "exp_avg_absmax", "exp_avg_sq_absmax")

#: The state keys of an 8-bit SGD with momentum, in its kernel's order.
SGD_STATE_KEYS = ("momentum_buffer_codes", "momentum_buffer_absmax")

_CODE_DTYPES = {
    codes: torch.int8 if signed else torch.uint8 for codes, _, signed in MOMENTS.values()
}
_ABSMAX_KEYS = tuple(absmax for _, absmax, _ in MOMENTS.values())


def is_absmax(name):
    """Whether state ``name`` is a per-block absmax (one float32 per block)."""
    return name in _ABSMAX_KEYS


def allocation_dtype(name, state_dtype):
    """The dtype of state ``name`` in a bucket whose other state is ``state_dtype``."""
    if name in _CODE_DTYPES:
        return _CODE_DTYPES[name]
    return torch.float32 if is_absmax(name) else state_dtype


def expected_shape(name, param):
    """The shape state ``name`` of ``param`` has: ``(blocks,)`` for an absmax."""
    if is_absmax(name):
        return (quantization.blocks(param.numel()),)
    return tuple(param.shape)


def _memory_order(tensor):
    """The elements of dense ``tensor`` in the order they lie in memory, as a 1-D view."""
    dims = sorted(range(tensor.dim()), key=lambda d: (-tensor.stride(d), -tensor.size(d)))
    return tensor.permute(dims).reshape(-1)


def quantize_moment(value, strides, signed):
    """``(codes, absmax)`` of one moment tensor, its blocks taken in the memory order of
    ``strides`` (the layout its state has in the bucket; the codes get that layout)."""
    laid_out = torch.empty_strided(value.shape, strides, dtype=torch.float32)
    laid_out.copy_(value.detach())
    codes, absmax = quantization.quantize(_memory_order(laid_out).numpy(), signed)
    dtype = torch.int8 if signed else torch.uint8
    result = torch.empty_strided(value.shape, strides, dtype=dtype)
    _memory_order(result).copy_(torch.from_numpy(codes))
    return result, torch.from_numpy(absmax)


def dequantize_moment(codes, absmax):
    """The float32 values of a moment's ``codes`` and ``absmax`` (CPU tensors), laid
    out as the codes are."""
    codes = codes.detach().cpu()
    if not is_dense(codes):
        codes = codes.contiguous()
    values = quantization.dequantize(_memory_order(codes).numpy(), absmax.detach().cpu().numpy())
    result = torch.empty_strided(codes.shape, codes.stride(), dtype=torch.float32)
    _memory_order(result).copy_(torch.from_numpy(values))
    return result


def to_quantized(entry, param):
    """Replace an entry's full-precision state tensors by codes and absmax (in place);
    Adam's moments only as a pair, which drops ``max_exp_avg_sq`` (no 8-bit AMSGrad)."""
    names = [
        name
        for name, (codes, _, _) in MOMENTS.items()
        if torch.is_tensor(entry.get(name)) and codes not in entry
    ]
    if ("exp_avg" in names) != ("exp_avg_sq" in names):
        return  # half a pair: left for the checks to report
    for name in names:
        if entry[name].shape != param.shape:
            raise ValueError(
                f"loaded state {name!r} has shape {tuple(entry[name].shape)}; the parameter "
                f"has shape {tuple(param.shape)}"
            )
    strides = dense_strides(param)
    for name in names:
        codes_key, absmax_key, signed = MOMENTS[name]
        codes, absmax = quantize_moment(entry.pop(name), strides, signed)
        entry[codes_key], entry[absmax_key] = codes.to(param.device), absmax.to(param.device)
    if "exp_avg" in names:
        entry.pop("max_exp_avg_sq", None)


def to_full_precision(entry, dtype=torch.float32):
    """Replace an entry's codes and absmax by full-precision state tensors of ``dtype``."""
    for name, (codes_key, absmax_key, _) in MOMENTS.items():
        codes, absmax = entry.get(codes_key), entry.get(absmax_key)
        if not (torch.is_tensor(codes) and torch.is_tensor(absmax)) or name in entry:
            continue
        del entry[codes_key], entry[absmax_key]
        entry[name] = dequantize_moment(codes, absmax).to(device=codes.device, dtype=dtype)


def dequantized_state_dict(state_dict):
    """A copy of an ``int8_blockwise`` optimizer's ``state_dict`` with float32
    ``exp_avg`` and ``exp_avg_sq`` (or ``momentum_buffer``) in place of codes and
    absmax: what ``torch.optim.Adam`` (``SGD``) or a full-precision fastmomentum
    optimizer loads.

    Example::

        torch_adam.load_state_dict(fastmomentum.dequantized_state_dict(adam8.state_dict()))
    """
    converted = {key: value for key, value in state_dict.items() if key != "state"}
    converted["state"] = {}
    for param_id, entry in state_dict["state"].items():
        if isinstance(entry, dict):
            entry = dict(entry)
            to_full_precision(entry)
        converted["state"][param_id] = entry
    return converted


def block_counts(numels):
    """Per parameter, its blocks; and where each parameter's first block is."""
    counts = [quantization.blocks(n) for n in numels]
    return counts, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64).tolist()
