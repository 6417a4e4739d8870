"""``optimizer.state`` as torch shows it, bound to the buckets' memory both ways.

After a parameter's first step its ``optimizer.state[p]`` entry holds pieces of the
bucket's allocations under torch's keys (`expose_new_state`). After a load, an
unpickling, or any edit of ``optimizer.state`` by user code (a `tracked.StateMap`
notes each one), the buckets are made to hold what ``optimizer.state`` says
(`bind_state`): a parameter whose entry was cleared, replaced or emptied starts afresh,
as in torch.

A state key is *required* (without it a parameter has no state: Adam's ``exp_avg``) or
*optional* (Adam's ``max_exp_avg_sq``, which torch keeps when AMSGrad is switched off
and which starts at zero when it is switched on).
"""

from collections.abc import Mapping

import numpy as np
import torch

from .capture import on_device
from .checkpoint import mismatch
from .launches import KAHAN_COMP, MASTER
from .tracked import StateEntry, StateMap

#: State of a 16-bit parameter that goes with its value rather than with the rule: its
#: float32 master copy, or its Kahan compensation. Either may be the only state.
COMPANIONS = (MASTER, KAHAN_COMP)


def row_names(optimizer, used, bucket, index):
    """The state keys ``state[p]`` shows for ``bucket``'s parameter ``index``: the
    required keys (those the group's step ``used``, or the bucket keeps), the optional
    keys that parameter holds (``max_exp_avg_sq`` only where AMSGrad stepped it, as in
    torch) and its companions (master copy, compensation) the bucket keeps."""
    optional = optimizer.optional_state_keys
    return tuple(
        name
        for name in optimizer.state_keys
        if (
            bucket.holds_optional(name)[index]
            if name in optional and name not in COMPANIONS
            else name in used or bucket.has_state(name)
        )
    )


def expose_new_state(optimizer, group, bucket, rows):
    """`expose_state` for the parameters ``rows`` just stepped that had no state, or
    that gained optional state at this step (AMSGrad switched on). Marks ``rows`` as
    having state."""
    used = optimizer.state_names(group)
    kept = bucket.state_kept()  # a master copy made at the first step shows from then on
    if bucket.settled_for == (used, kept):
        return  # the common case, every step: nothing new to show (≈3 µs less a step)
    optional = [name for name in used if name in optimizer.optional_state_keys]
    gained = bucket.gain_optional(optional, rows) if optional else ()
    rows = np.asarray(rows, np.int64)
    targets = set(rows[~bucket.initialized[rows]].tolist()).union(gained)
    if bucket.exposed_kept != kept:  # e.g. a master copy since: every entry again
        targets.update(bucket.initialized.nonzero()[0].tolist())
        bucket.exposed_kept = kept
    bucket.initialized[rows] = True
    for index in sorted(targets):
        expose_state(optimizer, bucket, index, row_names(optimizer, used, bucket, index))
    bucket.all_initialized = bool(bucket.initialized.all())
    if bucket.all_initialized and all(bucket.holds_optional(name).all() for name in optional):
        bucket.settled_for = (used, kept)  # every parameter has state, all `used` names


def expose_state(optimizer, bucket, index, names):
    """Make ``optimizer.state[p]`` of ``bucket``'s parameter ``index`` pieces of its state.

    An empty entry of ours that user code already holds (read before the first step)
    is filled in place, as torch fills it; keys that are not state of ours (user
    bookkeeping, a checkpoint's extras) stay in the entry."""
    values = {name: bucket.scalar_piece(name, index) for name in optimizer.scalar_state}
    for name in names:
        values[name] = bucket.state_piece(name, index)
    state, param = optimizer.state, bucket.params[index]
    entry = dict.get(state, param)
    if isinstance(entry, Mapping):  # keys of the user's own are kept, as torch keeps them
        ours = (*optimizer.scalar_state, *optimizer.state_keys)
        values.update((key, value) for key, value in entry.items() if key not in ours)
    if type(entry) is StateEntry and entry._owner is state and not entry:
        dict.update(entry, values)
    elif type(state) is StateMap:
        state.put(param, StateEntry(state, values))
    else:
        state[param] = values


def expose_again(optimizer, group, bucket):
    """Show ``bucket``'s state anew in ``state[p]`` of every parameter that has state
    (its scalar state moved: `bucket.ParamBucket.place_scalars`)."""
    used = optimizer.state_names(group)
    for index in bucket.initialized.nonzero()[0].tolist():
        expose_state(optimizer, bucket, index, row_names(optimizer, used, bucket, index))


def expose_masters(optimizer, bucket, rows, name=MASTER):
    """``state[p]`` of the parameters of ``rows`` that have no other state: their
    companion ``name`` alone (SGD without momentum: a master copy, or a compensation
    loaded). Marks nothing as having state."""
    state = optimizer.state
    for row in rows:
        if bucket.initialized[row]:
            continue
        param, master = bucket.params[row], bucket.state_piece(name, row)
        entry = dict.get(state, param)
        if type(entry) is StateEntry and entry._owner is state:
            dict.__setitem__(entry, name, master)
        elif type(state) is StateMap:
            state.put(param, StateEntry(state, {name: master}))
        else:
            state[param] = {name: master}


def state_changed(optimizer):
    """Whether ``optimizer.state`` was replaced or edited since the buckets last matched it."""
    state = optimizer.state
    return type(state) is not StateMap or state.changed


def track(optimizer):
    """From now on, note edits of ``optimizer.state`` (a `StateMap` holding its items)."""
    state = optimizer.state
    if type(state) is not StateMap:
        state = StateMap(state)
        for key, entry in state.items():
            if type(entry) is dict:
                dict.__setitem__(state, key, StateEntry(state, entry))
        optimizer.state = state
    else:
        for key, entry in state.items():
            if type(entry) is dict or (type(entry) is StateEntry and entry._owner is not state):
                dict.__setitem__(state, key, StateEntry(state, entry))
    state.changed = False


@torch.no_grad()
def bind_state(optimizer, pairs=None):
    """Copy what ``optimizer.state`` holds into the buckets and expose it again.

    ``pairs``: the (param group, bucket) pairs to bind; every bucket by default. A
    parameter without complete state in ``optimizer.state`` starts afresh. Every entry
    is read and checked first: if one cannot be used, this raises and nothing has
    changed.
    """
    if pairs is None:
        pairs = [
            (group, bucket)
            for group, buckets in zip(optimizer.param_groups, optimizer.buckets)
            for bucket in buckets
        ]
    saved = [_read_bucket(optimizer, bucket) for _, bucket in pairs]
    for (group, bucket), entries in zip(pairs, saved):
        _write_bucket(optimizer, group, bucket, entries)
    track(optimizer)


def _read_bucket(optimizer, bucket):
    """Per parameter ``(scalars, {name: copy}, complete)``, or ``None`` when it has no
    state (copies: the entries may be pieces of the bucket itself). An incomplete entry
    keeps only its companions (SGD without momentum keeps no other state), and with
    stochastic rounding its step count (the random bits' key)."""
    required = optimizer.required_state_keys
    kept = {MASTER: bucket.master, KAHAN_COMP: optimizer._kahan_sum}
    counted = optimizer._stochastic_rounding
    saved = []
    for index, param in enumerate(bucket.params):
        entry = optimizer.state.get(param, {})
        if not isinstance(entry, Mapping):
            raise TypeError(
                f"optimizer.state of {bucket.names[index]} is {entry!r}; expected a dict"
            )
        complete = all(entry.get(name) is not None for name in required)
        present = [
            name
            for name in (optimizer.state_keys if complete else COMPANIONS)
            if entry.get(name) is not None and kept.get(name, True)
        ]  # a companion is kept only with its option (else: dropped)
        scalars = {}
        if complete or counted:  # a checkpoint of torch's SGD has no step: 0
            scalars = {name: float(entry[name]) for name in optimizer.scalar_state if name in entry}
        if not present and not complete and not scalars:
            saved.append(None)
            continue
        for name in present:
            wrong = mismatch(entry[name], param, name)
            if wrong is not None:
                raise RuntimeError(
                    f"state {name!r} of {bucket.names[index]} is {wrong}; the parameter "
                    f"has shape {tuple(param.shape)}"
                )
        copies = {name: entry[name].detach().clone() for name in present}
        saved.append((scalars, copies, complete))
    return saved


def _write_bucket(optimizer, group, bucket, saved):
    # Entries of parameters without (complete) state stay as they are ({} after
    # ``state[p].clear()``), as torch keeps them; the others are exposed anew.
    bucket.place_scalars(on_device(optimizer, group))  # a checkpoint may switch ``capturable``
    bucket.reset_scalars()
    for name in bucket.state_kept():
        bucket.state(name).flat.zero_()
    optimizer.fresh_state(group, bucket)
    bucket.initialized[:] = False
    bucket.master_ready[:] = False  # a master copy not in the state is taken from p
    bucket.forget_optional()
    optional = set(optimizer.optional_state_keys) - set(COMPANIONS)
    for index, entry in enumerate(saved):
        if entry is None:
            continue
        scalars, values, complete = entry
        for name, value in values.items():
            bucket.load_state_value(name, index, value)
            if name in optional:
                bucket.holds_optional(name)[index] = True
        for name, value in scalars.items():
            bucket.scalar_values(name)[index] = value
        if complete:
            bucket.initialized[index] = True
    used = optimizer.state_names(group)
    for index in bucket.initialized.nonzero()[0].tolist():
        expose_state(optimizer, bucket, index, row_names(optimizer, used, bucket, index))
    if bucket.master:
        expose_masters(optimizer, bucket, bucket.master_ready.nonzero()[0].tolist())
    if optimizer._kahan_sum:  # a compensation loaded for a parameter without other state
        compensated = [i for i, entry in enumerate(saved) if entry and KAHAN_COMP in entry[1]]
        expose_masters(optimizer, bucket, compensated, KAHAN_COMP)
    bucket.all_initialized = bool(bucket.initialized.all())
    bucket.settled_for, bucket.exposed_kept = None, bucket.state_kept()
    bucket.coefficients = (None, None)
