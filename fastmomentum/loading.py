"""``load_state_dict``: a torch.optim or fastmomentum state dict into an optimizer's
buckets, in torch's order (pre-hooks, checks, load, post-hooks), changing nothing when
anything is wrong."""

from collections import OrderedDict
from collections.abc import Mapping

import torch

from . import binding, checkpoint, grouping, quantized


def load_state_dict(optimizer, state_dict):
    """Load a ``torch.optim`` or fastmomentum state dict; values are copied into the
    buckets. As in torch, the load pre-hooks run first; then everything is checked,
    and on a mismatch nothing changes; the post-hooks run last."""
    optimizer._buckets_now()
    state_dict = state_dict.copy()
    for hook in optimizer._optimizer_load_state_dict_pre_hooks.values():
        result = hook(optimizer, state_dict)
        if result is not None:
            state_dict = result
    quantized.check_code_maps(state_dict)  # before the codes are read
    params = [param for group in optimizer.param_groups for param in group["params"]]
    state_dict = checkpoint.in_state_format(state_dict, params, optimizer.quantized)
    checkpoint.check_loadable(optimizer, state_dict)
    before = (optimizer.state, optimizer.param_groups, list(optimizer.buckets))
    hooks = (
        optimizer._optimizer_load_state_dict_pre_hooks,
        optimizer._optimizer_load_state_dict_post_hooks,
    )
    optimizer._optimizer_load_state_dict_pre_hooks = OrderedDict()  # run above, and
    optimizer._optimizer_load_state_dict_post_hooks = OrderedDict()  # below, once bound
    try:
        torch.optim.Optimizer.load_state_dict(optimizer, state_dict)
        _restore_saved_state(optimizer, state_dict)
        for group in optimizer.param_groups:
            optimizer.settings(group)  # raises for a setting the state cannot go with
        # torch's load gave the state each parameter's dtype: a parameter cast since its
        # bucket was made is bucketed again, its state in that dtype
        grouping.forget_changed(optimizer)
        optimizer._buckets_now()
        binding.bind_state(optimizer)
    except BaseException:
        optimizer.state, optimizer.param_groups, optimizer.buckets = before
        raise
    finally:
        pre, post = hooks
        optimizer._optimizer_load_state_dict_pre_hooks = pre
        optimizer._optimizer_load_state_dict_post_hooks = post
    for hook in post.values():
        hook(optimizer)


def _restore_saved_state(optimizer, state_dict):
    """Put back the state values torch's load cast to the parameters' dtype: with
    master weights the state (and the master copy) of a 16-bit parameter is float32,
    and rounding it to 16 bits would lose what the master copy is for; 8-bit codes
    and their float32 absmax are not the parameters' dtype either; nor are scalar
    states other than ``step`` (NAdam's ``mu_product``: rounded to bfloat16, a resume
    would no longer be exact)."""
    keys = [name for name in optimizer.scalar_state if name != "step"]
    if optimizer._master_weights or optimizer.quantized:
        keys += optimizer.state_keys
    if not keys:
        return
    saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for param_id, param in zip(saved_ids, params):
        saved = state_dict["state"].get(param_id)
        entry = optimizer.state.get(param)
        if not isinstance(saved, Mapping) or not isinstance(entry, Mapping):
            continue
        for key in keys:
            if torch.is_tensor(saved.get(key)):
                entry[key] = saved[key]
