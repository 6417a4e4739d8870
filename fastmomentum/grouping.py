"""Param groups into buckets: which parameters step together, made when a group is added
and again whenever its parameter list changes.

A group's parameters are bucketed by (device, dtype, DTensor or not); a parameter
listed twice is stepped twice (`ParamBucket.repeats`), as torch's loop steps it. A
group with a parameter on the ``meta`` device has no buckets until ``to_empty``.
"""

import torch

from . import binding
from .bucket import ParamBucket
from .storage import is_dtensor, local
from .validation import check_params


def make_buckets(optimizer, group_index):
    """The group's buckets, their parameters adopted where nothing else sees them;
    ``None`` while a parameter is on the ``meta`` device (made at the first step
    after ``to_empty``, see `buckets_now`)."""
    params = optimizer.param_groups[group_index]["params"]
    if any(local(param).is_meta for param in params):
        return None
    members, listed = {}, {}
    for position, param in enumerate(params):
        listed[id(param)] = listed.get(id(param), 0) + 1
        if listed[id(param)] > 1:
            continue  # listed twice (torch warns): a step steps it twice, see `repeats`
        name = f"parameter {position} of param group {group_index}"
        kind = (local(param).device, param.dtype, is_dtensor(param))
        members.setdefault(kind, []).append((param, name))
    flat = optimizer.__dict__.get("_flat_gradients", False)
    state_dtype = optimizer.__dict__.get("_state_dtype")
    clear_grads = optimizer.__dict__.get("_fused_zero_grad", False)
    master = optimizer.__dict__.get("_master_weights", False)
    buckets = GroupBuckets(
        ParamBucket(*zip(*pairs), flat, state_dtype, clear_grads, master, optimizer.scalar_state)
        for pairs in members.values()
    )
    with torch.no_grad():
        for bucket in buckets:
            bucket.adopt()
            if flat:
                bucket.gradients.adopt()
            times = [listed[id(param)] for param in bucket.params]
            bucket.repeats = [
                [row for row, n in enumerate(times) if n >= k] for k in range(2, max(times) + 1)
            ]
    for bucket in buckets:
        optimizer.fresh_state(optimizer.param_groups[group_index], bucket)
    buckets.made_from(params)
    return buckets


def buckets_now(optimizer, stepping=False):
    """Every group's buckets, made anew for a group whose parameter list changed
    (a parameter appended, as torch.optim allows) or whose parameters left the meta
    device, with the state ``optimizer.state`` holds for them bound in. While a
    parameter is still on meta, its group has none (stepping: an error if one of
    them has a gradient)."""
    for index, group in enumerate(optimizer.param_groups):
        buckets, params = optimizer.buckets[index], group["params"]
        if buckets is not None and buckets.still_match(params):
            continue
        check_params(params)
        made = make_buckets(optimizer, index)
        if made is None:
            if stepping:
                refuse_meta_gradients(index, params)
            continue
        optimizer.buckets[index] = made
        binding.bind_state(optimizer, [(group, bucket) for bucket in made])
    return optimizer.buckets


class GroupBuckets(list):
    """A param group's buckets, and the parameter list they were made from."""

    def made_from(self, params):
        self._params, self._count = params, len(params)

    def still_match(self, params):
        """Whether ``params`` is still that list, of that length (an appended parameter
        or a replaced list remakes the buckets)."""
        return params is self._params and len(params) == self._count


def refuse_meta_gradients(group_index, params):
    for position, param in enumerate(params):
        if local(param).is_meta and param.grad is not None:
            raise RuntimeError(
                f"parameter {position} of param group {group_index} is on the meta device; "
                "materialize the model (e.g. model.to_empty(device=...)) and load its "
                "weights before the first step"
            )
