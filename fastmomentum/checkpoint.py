"""Checkpoints: a state dict is checked against the optimizer before anything is loaded."""

from collections.abc import Mapping

import torch

from .capture import check_group
from .quantized import expected_shape, to_full_precision, to_quantized
from .validation import check_implementation_options


def copy_state(state_dict):
    """``state_dict`` with copies of the state tensors: the live ones are pieces of the
    buckets' allocations, which a checkpoint must not alias. Values that are not dicts
    (put there by user code or a hook) are kept as they are, as torch keeps them."""
    state_dict["state"] = {
        key: {name: _copy(value) for name, value in entry.items()}
        if isinstance(entry, Mapping)
        else entry
        for key, entry in state_dict["state"].items()
    }
    return state_dict


def check_loadable(optimizer, state_dict):
    """Raise ``ValueError`` unless ``state_dict`` fits ``optimizer``: as many groups and
    parameters, options we honour, and state of the parameters' shapes.

    Hyperparameter values are not checked, as torch does not check them here. State
    under keys that are no parameter id is kept, as torch keeps it.
    """
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"loaded state dict has {len(saved_groups)} parameter groups; "
            f"this optimizer has {len(optimizer.param_groups)}"
        )
    params_by_id = {}
    for index, (saved, group) in enumerate(zip(saved_groups, optimizer.param_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"param group {index} of the loaded state dict has {len(saved['params'])} "
                f"parameters; this optimizer's has {len(group['params'])}"
            )
        options = {**optimizer.defaults, **saved}
        check_implementation_options(options, optimizer.supports_capturable)
        check_group(optimizer, {**options, "params": group["params"]})
        for param_id, param in zip(saved["params"], group["params"]):
            params_by_id[param_id] = param
    for param_id, entry in state_dict["state"].items():
        if param_id in params_by_id:
            _check_entry(optimizer, param_id, params_by_id[param_id], entry)


def _check_entry(optimizer, param_id, param, entry):
    if not isinstance(entry, Mapping):
        raise ValueError(f"loaded state of parameter id {param_id} is {entry!r}, not a dict")
    if all(entry.get(name) is None for name in optimizer.required_state_keys):
        return  # {} or {"momentum_buffer": None}: no state yet
    for name in optimizer.state_keys:
        value = entry.get(name)
        if value is None and name in optimizer.optional_state_keys:
            continue
        wrong = mismatch(value, param, name)
        if wrong is not None:
            raise ValueError(
                f"loaded state {name!r} of parameter id {param_id} has shape {wrong}; "
                f"expected {expected_shape(name, param)} for a parameter of shape "
                f"{tuple(param.shape)}"
            )
    for name in optimizer.scalar_state:
        if name not in entry:
            raise ValueError(f"loaded state of parameter id {param_id} has no {name!r}")


def mismatch(value, param, name=None):
    """What is wrong with state ``name`` for ``param``: the shape (or the value itself,
    if it is no tensor) when it is not a tensor of the shape it must have (the
    parameter's; an 8-bit state's absmax: its blocks); else ``None``."""
    if not torch.is_tensor(value):
        return repr(value)
    return None if tuple(value.shape) == expected_shape(name, param) else tuple(value.shape)


def in_state_format(state_dict, params, quantized):
    """``state_dict`` with its moments in the optimizer's format: quantized block by
    block for an 8-bit optimizer (``quantized``), decoded to float32 for another
    (`fastmomentum.quantized`). ``params``: the optimizer's, in param group order."""
    saved_ids = [param_id for group in state_dict["param_groups"] for param_id in group["params"]]
    if len(saved_ids) != len(params):
        return state_dict  # `check_loadable` says what is wrong
    converted = {}
    for param_id, param in zip(saved_ids, params):
        entry = state_dict["state"].get(param_id)
        if isinstance(entry, Mapping):
            entry = dict(entry)
            if quantized:
                to_quantized(entry, param)
            else:
                to_full_precision(entry)
            converted[param_id] = entry
    return {**state_dict, "state": {**state_dict["state"], **converted}}


def _copy(value):
    return value.clone() if isinstance(value, torch.Tensor) else value
