"""Block-wise 8-bit optimizer state (``state_dtype="int8_blockwise"``), as torch tensors.

Every optimizer can keep its state tensors as codes and per-block absmax
(`kernels.quantization`), stepped by the loops generated from its rules
(`kernels.specs.int8_blockwise`). ``state[p]`` holds, for each state tensor ``<name>``
(``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``momentum_buffer``, ``square_avg``,
``grad_avg``, ``sum``), ``<name>_codes`` (int8 for values of both signs, uint8 for
non-negative ones, as the rules' `KernelSpec.codes` say) laid out like the parameter, and
``<name>_absmax`` (float32, one value per block of 256 elements in the parameter's
memory order). A state dict keeps them as they are, so it round-trips exactly. Between
the formats:

- loading a full-precision checkpoint into an 8-bit optimizer quantizes each state
  tensor block by block, exactly as a step stores it;
- loading an 8-bit checkpoint into a full-precision optimizer (ours) decodes the codes
  to float32, then rounds them to the state's dtype;
- `dequantized_state_dict` gives a torch.optim-loadable state dict of an 8-bit one.

A DTensor parameter (FSDP2) is stepped shard by shard, so its blocks are counted within
each local shard. Its codes are DTensors placed like the parameter. Its absmax is a 1-D
DTensor with one equal piece per shard (``Shard(0)`` on every mesh dimension the
parameter is sharded on, ``Replicate()`` on the others), each piece as long as the
largest local shard's blocks: a shard with fewer elements leaves its last values 0.
Its global length, shards × those blocks, is what a state dict shows; with equal
pieces ``torch.distributed.checkpoint`` saves and loads it as any DTensor, and resumes
bit-identically on the same mesh. The blocks follow the shards, so an 8-bit checkpoint
does not reshard (DCP refuses an absmax of another length); decode it first
(`dequantized_state_dict`, before gathering: a gathered ``full_tensor()`` of codes no
longer knows its shards' blocks).
"""

from collections.abc import Mapping

import numpy as np
import torch

from fastmomentum.kernels import quantization, rules
from fastmomentum.kernels.specs import SIGNED, int8_blockwise

from .storage import dense_strides, is_dense, is_dtensor, local, placed_like, shard_like

#: The ``state_dtype`` of block-wise 8-bit state.
INT8_BLOCKWISE = "int8_blockwise"


def _moments(specs):
    """State name -> (codes key, absmax key, signed), from the rules' `KernelSpec.codes`."""
    moments = {}
    for spec in specs:
        for name, kind in spec.codes:
            entry = (f"{name}_codes", f"{name}_absmax", kind == SIGNED)
            if moments.setdefault(name, entry) != entry:
                raise RuntimeError(f"state {name!r} has codes of two kinds in the rules")
    return moments


#: Per full-precision state tensor that rules keep in 8 bits: its codes' key, its
#: absmax's key, and whether it is signed.
MOMENTS = _moments(rules.SPECS)

_CODE_DTYPES = {
    codes: torch.int8 if signed else torch.uint8 for codes, _, signed in MOMENTS.values()
}
_ABSMAX_KEYS = frozenset(absmax for _, absmax, _ in MOMENTS.values())


#: The param group key under which an 8-bit optimizer's state dict names its code maps
#: (`kernels.quantization`), and their name. State dicts saved before the key existed
#: hold signed codes in a tiny float, which the linear map would misread.
CODE_MAPS_KEY = "int8_code_maps"
CODE_MAPS = "signed linear, unsigned 3-bit-mantissa float"

_SIGNED_CODES = frozenset(codes for codes, _, signed in MOMENTS.values() if signed)


def with_code_maps(state_dict):
    """``state_dict`` (an 8-bit optimizer's, a fresh copy) with its groups naming the
    code maps its codes are in."""
    for group in state_dict["param_groups"]:
        group[CODE_MAPS_KEY] = CODE_MAPS
    return state_dict


def check_code_maps(state_dict):
    """Raise ``ValueError`` for a state dict whose signed 8-bit codes (``exp_avg_codes``,
    ``momentum_buffer_codes``) were saved in other code maps than this version's: the
    tiny float of fastmomentum before the linear map, whose groups do not name theirs."""
    state = state_dict.get("state", {})
    for index, group in enumerate(state_dict.get("param_groups", ())):
        maps = group.get(CODE_MAPS_KEY)
        if maps == CODE_MAPS:
            continue
        for param_id in group.get("params", ()):
            entry = state.get(param_id)
            found = sorted(_SIGNED_CODES & set(entry)) if isinstance(entry, Mapping) else []
            if found:
                saved = repr(maps) if maps else "the tiny float used before the linear map"
                raise ValueError(
                    f"param group {index} has 8-bit state ({found[0]}) in the code maps "
                    f"{saved}; this version reads {CODE_MAPS!r}. Load the checkpoint with "
                    "the version that saved it and save fastmomentum.dequantized_state_dict"
                    "(optimizer.state_dict()) instead, which every version loads"
                )


def keys(names):
    """The 8-bit state keys of the state tensors ``names``: every one's codes, then
    every one's absmax (the columns of `specs.int8_blockwise`; a ``None`` name, a
    column not used, gives ``None`` in both places)."""
    codes = [MOMENTS[name][0] if name else None for name in names]
    return (*codes, *(MOMENTS[name][1] if name else None for name in names))


def launched(spec, columns, bucket):
    """The `KernelSpec` to launch over ``bucket`` and its table's state ``columns``:
    ``spec`` and ``columns`` themselves, or for 8-bit state its block-wise variant and
    the codes' and absmax's keys (`keys`)."""
    if not bucket.quantized:
        return spec, columns
    return int8_blockwise(spec), keys(columns)


def fill(state, name, value):
    """Make every element of 8-bit state ``name`` the float32 ``value`` (Adagrad's
    ``initial_accumulator_value``), block by block as a step stores it: the top code
    (0 for 0) and ``value`` as each block's absmax. ``state(key)``: its allocation
    (`bucket.ParamBucket.state`)."""
    codes_key, absmax_key, signed = MOMENTS[name]
    code, absmax = quantization.quantize(np.full(1, value, np.float32), signed)
    state(codes_key).flat.fill_(int(code[0]))
    state(absmax_key).flat.fill_(float(absmax[0]))


def is_absmax(name):
    """Whether state ``name`` is a per-block absmax (one float32 per block)."""
    return name in _ABSMAX_KEYS


def allocation_dtype(name, state_dtype):
    """The dtype of state ``name`` in a bucket whose other state is ``state_dtype``."""
    if name in _CODE_DTYPES:
        return _CODE_DTYPES[name]
    return torch.float32 if is_absmax(name) else state_dtype


def expected_shape(name, param):
    """The shape state ``name`` of ``param`` has: ``(blocks,)`` for an absmax (a
    DTensor's: its global length, see the module doc)."""
    if is_absmax(name):
        return (_shards(param) * absmax_length(param),)
    return tuple(param.shape)


# --- DTensor parameters: blocks within each local shard -------------------------------


def check_dtensor(param, name):
    """Raise ``ValueError`` unless 8-bit state can follow the shards of the DTensor
    ``param`` (``name`` in the message): placed as ``Shard`` or ``Replicate`` on each
    mesh dimension, so that its shards are torch.chunk's, the first the largest (not
    ``_StridedShard``, FSDP2 over tensor parallelism)."""
    from torch.distributed.tensor import Replicate, Shard

    for placement in param.placements:
        if type(placement) not in (Shard, Replicate):
            raise ValueError(
                f"{name} is a DTensor placed as {placement!r}; state_dtype={INT8_BLOCKWISE!r} "
                "is implemented for DTensors placed as Shard and Replicate"
            )


def absmax_length(param):
    """The absmax values of ``param``'s state here: its blocks; for a DTensor (see
    `check_dtensor`), those of its largest shard, the first (every shard's absmax is as
    long)."""
    if not is_dtensor(param):
        return quantization.blocks(param.numel())
    from torch.distributed.tensor import Shard

    shape = list(param.shape)
    for mesh_dim, placement in enumerate(param.placements):
        if isinstance(placement, Shard):  # torch.chunk: the first piece is the largest
            size = param.device_mesh.size(mesh_dim)
            shape[placement.dim] = -(-shape[placement.dim] // size)
    return quantization.blocks(int(np.prod(shape, dtype=np.int64)))


def _shards(param):
    """Into how many pieces ``param``'s placements cut it (1 for a plain tensor)."""
    if not is_dtensor(param):
        return 1
    from torch.distributed.tensor import Shard

    mesh = param.device_mesh
    pieces = [mesh.size(d) for d, p in enumerate(param.placements) if isinstance(p, Shard)]
    return int(np.prod(pieces, dtype=np.int64))


def _absmax_placements(param):
    from torch.distributed.tensor import Replicate, Shard

    return [Shard(0) if isinstance(p, Shard) else Replicate() for p in param.placements]


def absmax_placed_like(absmax, param):
    """This rank's ``absmax`` (`absmax_length` values) of the DTensor ``param``'s state
    as a DTensor of one equal piece per shard (see the module doc); no communication."""
    length = absmax.numel() * _shards(param)
    return type(param).from_local(
        absmax,
        param.device_mesh,
        _absmax_placements(param),
        run_check=False,
        shape=torch.Size([length]),
        stride=(1,),
    )


def absmax_shard_like(value, param):
    """This rank's piece of an absmax of the DTensor ``param``'s state: a DTensor's
    local piece, or the slice of a full one (``full_tensor()``) that is this rank's."""
    if is_dtensor(value):
        return local(value)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    (size,), (offset,) = compute_local_shape_and_global_offset(
        value.shape, param.device_mesh, _absmax_placements(param)
    )
    return value[offset : offset + size]


def _padded(absmax, length):
    """``absmax`` with zeros after it up to ``length`` values (a smaller shard's)."""
    padded = torch.zeros(length, dtype=torch.float32)
    padded[: absmax.numel()] = absmax
    return padded


# --- conversions ----------------------------------------------------------------------


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
    out as the codes are. DTensors (a DTensor parameter's state) are decoded shard by
    shard, into a DTensor placed like the codes."""
    if is_dtensor(codes):
        here = local(codes)
        pieces = absmax_shard_like(absmax, codes)[: quantization.blocks(here.numel())]
        return placed_like(dequantize_moment(here, pieces), codes)
    codes = codes.detach().cpu()
    if not is_dense(codes):
        codes = codes.contiguous()
    values = quantization.dequantize(_memory_order(codes).numpy(), absmax.detach().cpu().numpy())
    result = torch.empty_strided(codes.shape, codes.stride(), dtype=torch.float32)
    _memory_order(result).copy_(torch.from_numpy(values))
    return result


def _quantize_state(value, param, signed):
    """``(codes, absmax)`` of state ``value`` of ``param``, laid out as the bucket keeps
    it; for a DTensor ``param``, its local shard's, as DTensors (see the module doc)."""
    if not is_dtensor(param):
        codes, absmax = quantize_moment(value, dense_strides(param), signed)
        return codes.to(param.device), absmax.to(param.device)
    shard = local(param)
    codes, absmax = quantize_moment(shard_like(value, param), dense_strides(shard), signed)
    absmax = _padded(absmax, absmax_length(param))
    device = shard.device
    return placed_like(codes.to(device), param), absmax_placed_like(absmax.to(device), param)


def to_quantized(entry, param):
    """Replace an entry's full-precision state tensors by codes and absmax (in place)."""
    names = [
        name
        for name, (codes, _, _) in MOMENTS.items()
        if torch.is_tensor(entry.get(name)) and codes not in entry
    ]
    for name in names:
        if entry[name].shape != param.shape:
            raise ValueError(
                f"loaded state {name!r} has shape {tuple(entry[name].shape)}; the parameter "
                f"has shape {tuple(param.shape)}"
            )
    for name in names:
        codes_key, absmax_key, signed = MOMENTS[name]
        entry[codes_key], entry[absmax_key] = _quantize_state(entry.pop(name), param, signed)


def to_full_precision(entry, dtype=torch.float32):
    """Replace an entry's codes and absmax by full-precision state tensors of ``dtype``."""
    for name, (codes_key, absmax_key, _) in MOMENTS.items():
        codes, absmax = entry.get(codes_key), entry.get(absmax_key)
        if not (torch.is_tensor(codes) and torch.is_tensor(absmax)) or name in entry:
            continue
        del entry[codes_key], entry[absmax_key]
        entry[name] = dequantize_moment(codes, absmax).to(device=codes.device, dtype=dtype)


def dequantized_state_dict(state_dict):
    """A copy of an ``int8_blockwise`` optimizer's ``state_dict`` with float32 state
    tensors (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``, …) in place of codes and
    absmax: what the ``torch.optim`` optimizer of the same name or a full-precision
    fastmomentum optimizer loads.

    Example::

        torch_adam.load_state_dict(fastmomentum.dequantized_state_dict(adam8.state_dict()))
    """
    check_code_maps(state_dict)
    converted = {key: value for key, value in state_dict.items() if key != "state"}
    converted["state"] = {}
    for param_id, entry in state_dict["state"].items():
        if isinstance(entry, dict):
            entry = dict(entry)
            to_full_precision(entry)
        converted["state"][param_id] = entry
    return converted


def block_counts(numels, params=None):
    """Per parameter, its absmax values (its blocks, from ``numels``; with 8-bit state,
    ``params``, for a DTensor: `absmax_length`); and where each parameter's first is."""
    counts = [quantization.blocks(n) for n in numels]
    if params is not None:
        counts = [absmax_length(p) if is_dtensor(p) else count for p, count in zip(params, counts)]
    return counts, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64).tolist()
