"""Checkpoints: a state dict is checked against the optimizer before anything is loaded."""

import torch

from .validation import check_implementation_options


def copy_state(state_dict):
    """``state_dict`` with copies of the state tensors: the live ones are pieces of the
    buckets' allocations, which a checkpoint must not alias."""
    state_dict["state"] = {
        index: {key: _copy(value) for key, value in entry.items()}
        for index, entry in state_dict["state"].items()
    }
    return state_dict


def check_loadable(optimizer, state_dict):
    """Raise ``ValueError`` unless ``state_dict`` fits ``optimizer``: as many groups and
    parameters, valid hyperparameters, and state of the parameters' shapes."""
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
        merged = {**optimizer.defaults, **saved, "params": group["params"]}
        optimizer.check_group(merged)
        check_implementation_options(merged)
        for param_id, param in zip(saved["params"], group["params"]):
            params_by_id[param_id] = (param, merged)
    for param_id, entry in state_dict["state"].items():
        if param_id not in params_by_id:
            raise ValueError(f"loaded state dict has state for unknown parameter id {param_id}")
        param, group = params_by_id[param_id]
        _check_entry(optimizer, param_id, param, group, entry)


def _check_entry(optimizer, param_id, param, group, entry):
    names = optimizer.state_names(group)
    if all(entry.get(name) is None for name in names):
        return  # {} or {"momentum_buffer": None}: no state yet
    for name in names:
        wrong = mismatch(entry.get(name), param)
        if wrong is not None:
            raise ValueError(
                f"loaded state {name!r} of parameter id {param_id} has shape {wrong}; "
                f"the parameter has shape {tuple(param.shape)}"
            )
    if optimizer.counts_steps and "step" not in entry:
        raise ValueError(f"loaded state of parameter id {param_id} has no 'step'")


def mismatch(value, param):
    """What is wrong with a state value for ``param``: the shape (or the value itself,
    if it is no tensor) when it is not a tensor of the parameter's shape; else ``None``."""
    if not torch.is_tensor(value):
        return repr(value)
    return None if value.shape == param.shape else tuple(value.shape)


def _copy(value):
    return value.clone() if isinstance(value, torch.Tensor) else value
