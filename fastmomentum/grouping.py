"""Param groups into buckets: which parameters step together, made when a group is added
(through ``add_param_group`` or appended to ``param_groups`` directly) and again
whenever its parameter list changes.

A group's parameters are bucketed by (device, dtype, DTensor or not); a parameter
listed twice is stepped twice (`ParamBucket.repeats`), as torch's loop steps it. A
parameter that an earlier group holds too (``param_groups.extend(param_groups)``) keeps
its state in that group's bucket and is stepped again there with this group's
hyperparameters (`GroupBuckets.borrowed`): torch steps it once per group, on one state.
A parameter on the ``meta`` device is left out of its group's buckets
(`GroupBuckets.meta`) until it is materialized (``to_empty``): the group is made again
then, and its other parameters step meanwhile, as in torch.
"""

from collections.abc import Mapping

import torch

from . import backward, binding
from .bucket import ParamBucket
from .capture import on_device
from .storage import is_dtensor, local
from .validation import SUPPORTED_DTYPES


def make_buckets(optimizer, group_index):
    """The group's buckets (each adopts its parameters after its first step,
    `bucket.ParamBucket.adopt`); parameters still on the ``meta`` device are left out
    (made at the first step or state dict after ``to_empty``, see `buckets_now`)."""
    group = optimizer.param_groups[group_index]
    params = group["params"]
    earlier = {id(p) for g in optimizer.param_groups[:group_index] for p in g["params"]}
    members, listed, borrowed, meta = {}, {}, [], []
    for position, param in enumerate(params):
        if local(param).is_meta:
            meta.append(param)
            continue
        if id(param) in earlier:
            borrowed.append(param)  # its state lives in an earlier group's bucket
            continue
        listed[id(param)] = listed.get(id(param), 0) + 1
        if listed[id(param)] > 1:
            continue  # listed twice (torch warns): a step steps it twice, see `repeats`
        name = f"parameter {position} of param group {group_index}"
        dtype = _kept_state_dtype(optimizer, param) or param.dtype
        kind = (local(param).device, dtype, is_dtensor(param))
        members.setdefault(kind, []).append((param, name))
    flat = optimizer.__dict__.get("_flat_gradients", False)
    state_dtype = optimizer.__dict__.get("_state_dtype")
    clear_grads = optimizer.__dict__.get("_fused_zero_grad", False)
    master = optimizer.__dict__.get("_master_weights", False)
    scalars = optimizer.scalar_state
    buckets = GroupBuckets(
        ParamBucket(*zip(*chunk), flat, state_dtype, clear_grads, master, scalars, kind[1])
        for kind, pairs in members.items()
        for chunk in _in_buckets(optimizer, pairs)
    )
    with torch.no_grad():
        for bucket in buckets:
            if flat:
                bucket.gradients.adopt()
            times = [listed[id(param)] for param in bucket.params]
            bucket.repeats = [
                [row for row, n in enumerate(times) if n >= k] for k in range(2, max(times) + 1)
            ]
    for bucket in buckets:
        bucket.place_scalars(on_device(optimizer, group))  # step counts on the GPU (`capture`)
        optimizer.fresh_state(group, bucket)
    buckets.made_from(group, borrowed, meta)
    return buckets


def _in_buckets(optimizer, pairs):
    """``(param, name)`` pairs of one kind as the pairs of each of their buckets: one
    bucket, or (``step_in_backward``) buckets in the order gradients arrive, each
    bounded in bytes (`backward.split_in_order`)."""
    params = [param for param, _ in pairs]
    return [[pairs[i] for i in chunk] for chunk in backward.split_in_order(optimizer, params)]


def _kept_state_dtype(optimizer, param):
    """The dtype of ``param``'s state when it differs from the parameter's (cast after
    its first step: the state keeps its dtype, as torch's does), where the state is in
    the parameters' own dtype (no ``state_dtype``, no master copy); else ``None``."""
    if optimizer.__dict__.get("_state_dtype") is not None or optimizer.__dict__.get(
        "_master_weights"
    ):
        return None
    entry = optimizer.state.get(param)
    if not isinstance(entry, Mapping):
        return None
    for name in optimizer.required_state_keys:
        value = entry.get(name)
        if torch.is_tensor(value) and value.dtype != param.dtype:
            return value.dtype if value.dtype in SUPPORTED_DTYPES else None
    return None


def buckets_now(optimizer, stepping=False):
    """Every group's buckets, made anew for a group appended to ``param_groups``
    directly (checked and given the defaults as ``add_param_group`` would), a group
    whose parameter list changed (a parameter appended, as torch.optim allows) or whose
    parameters left the meta device, and for the groups after one remade that step
    parameters of an earlier group; with the state ``optimizer.state`` holds for them
    bound in. A parameter still on meta is in no bucket (stepping: an error if it has a
    gradient). Every group to be made is checked before any is."""
    groups, all_buckets = optimizer.param_groups, optimizer.buckets
    del all_buckets[len(groups) :]  # groups deleted from param_groups directly
    all_buckets.extend([None] * (len(groups) - len(all_buckets)))
    to_make = []
    for index, group in enumerate(groups):
        buckets = all_buckets[index]
        if buckets is not None and buckets.still_match(group):
            if not to_make or _borrows_as_made(buckets, groups[:index]):
                continue
        if buckets is None or buckets.group is not group:
            optimizer.check_appended_group(group)
        else:
            optimizer.check_group(group)
        to_make.append(index)
    for index in to_make:
        group = groups[index]
        made = all_buckets[index] = make_buckets(optimizer, index)
        binding.bind_state(optimizer, [(group, bucket) for bucket in made])
    if stepping:
        for index, buckets in enumerate(all_buckets):
            if buckets.meta:
                refuse_meta_gradients(index, groups[index]["params"])
    return all_buckets


def _borrows_as_made(buckets, earlier_groups):
    """Whether the group's parameters that earlier groups hold are still those it was
    made with (an earlier group remade may have gained or lost one)."""
    earlier = {id(param) for group in earlier_groups for param in group["params"]}
    held = [param for param in buckets.group["params"] if id(param) in earlier]
    return len(held) == len(buckets.borrowed) and all(
        a is b for a, b in zip(held, buckets.borrowed)
    )


def forget_changed(optimizer):
    """Drop the buckets of every group with a parameter cast, moved or reshaped since
    they were made (`buckets_now` makes them again)."""
    for index, buckets in enumerate(optimizer.buckets):
        if buckets and any(bucket.changed_params() for bucket in buckets):
            optimizer.buckets[index] = None


def stepped_units(all_buckets):
    """Per group, what its step launches: ``(bucket, rows)`` pairs, ``rows`` the
    parameters of ``bucket`` to step (``None``: every one with a gradient) once per
    entry. A group's own buckets step their parameters once and those listed again
    (`ParamBucket.repeats`) again; parameters an earlier group holds step in that
    group's bucket, once per listing here."""
    units = []
    owners = None
    for buckets in all_buckets:
        group_units = [(bucket, [None, *bucket.repeats]) for bucket in buckets]
        if buckets.borrowed:
            owners = owners if owners is not None else _owners(all_buckets)
            group_units.extend(_borrowed_units(buckets.borrowed, owners))
        units.append(group_units)
    return units


def _owners(all_buckets):
    """id(param) -> (bucket, row) over every group's own buckets."""
    return {
        id(param): (bucket, row)
        for buckets in all_buckets
        for bucket in buckets
        for row, param in enumerate(bucket.params)
    }


def _borrowed_units(borrowed, owners):
    rows_by_bucket, listed = {}, {}
    for param in borrowed:
        if id(param) not in owners:
            continue  # still on meta: `refuse_meta_gradients`
        bucket, row = owners[id(param)]
        times = listed[id(param)] = listed.get(id(param), 0) + 1
        passes = rows_by_bucket.setdefault(bucket, [])
        if len(passes) < times:
            passes.append([])
        passes[times - 1].append(row)
    return list(rows_by_bucket.items())


class GroupBuckets(list):
    """A param group's buckets, the group and parameter list they were made from, the
    parameters of the group that an earlier group holds (``borrowed``) and those that
    were on the ``meta`` device (``meta``), in no bucket."""

    def made_from(self, group, borrowed, meta):
        self.group, self.borrowed, self.meta = group, borrowed, meta
        self._params, self._count = group["params"], len(group["params"])

    def still_match(self, group):
        """Whether ``group`` is still that group, with that parameter list, of that length
        (an appended parameter or a replaced list remakes the buckets), and none of its
        parameters left the meta device."""
        params = group["params"]
        if group is not self.group or params is not self._params or len(params) != self._count:
            return False
        return not self.meta or all(local(param).is_meta for param in self.meta)


def refuse_meta_gradients(group_index, params):
    for position, param in enumerate(params):
        if local(param).is_meta and param.grad is not None:
            raise RuntimeError(
                f"parameter {position} of param group {group_index} is on the meta device; "
                "materialize the model (e.g. model.to_empty(device=...)) and load its "
                "weights before the first step"
            )
