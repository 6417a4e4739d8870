"""``optimizer.state`` as torch shows it, bound to the buckets' memory both ways.

After a parameter's first step its ``optimizer.state[p]`` entry holds pieces of the
bucket's allocations under torch's keys (`expose_new_state`); after a load, an
unpickling, or user code replacing ``optimizer.state``, clearing it or deleting entries,
the buckets are made to hold what ``optimizer.state`` says (`bind_state`).
"""

import torch

from .checkpoint import mismatch


def expose_new_state(optimizer, group, bucket, rows):
    """`expose_state` for the parameters ``rows`` just stepped that had no state, and
    again for every parameter with state if the group's state names changed (amsgrad
    switched on). Marks ``rows`` as having state."""
    names = optimizer.state_names(group)
    renamed = bucket.exposed_names != names
    if not renamed and bucket.all_initialized:
        return
    if renamed:
        bucket.initialized[rows] = True
        targets = bucket.initialized.nonzero()[0].tolist()
    else:
        targets = [row for row in rows if not bucket.initialized[row]]
        bucket.initialized[targets] = True
    for index in targets:
        expose_state(optimizer, bucket, index, names)
    bucket.exposed_names = names
    bucket.all_initialized = bool(bucket.initialized.all())


def expose_state(optimizer, bucket, index, names):
    """Make ``optimizer.state[p]`` of ``bucket``'s parameter ``index`` pieces of its state."""
    entry = {}
    if optimizer.counts_steps:
        entry["step"] = bucket.step_piece(index)
    for name in names:
        entry[name] = bucket.state_piece(name, index)
    optimizer.state[bucket.params[index]] = entry


@torch.no_grad()
def bind_state(optimizer):
    """Copy what ``optimizer.state`` holds into the buckets and expose it again.

    A parameter without (complete) state in ``optimizer.state`` starts afresh. Every
    entry is read and checked first: if one cannot be used, this raises and nothing
    has changed.
    """
    pairs = [
        (group, bucket)
        for group, buckets in zip(optimizer.param_groups, optimizer.buckets)
        for bucket in buckets
    ]
    saved = [_read_bucket(optimizer, group, bucket) for group, bucket in pairs]
    for (group, bucket), entries in zip(pairs, saved):
        _write_bucket(optimizer, group, bucket, entries)


def _read_bucket(optimizer, group, bucket):
    """Per parameter ``(step, {name: copy})`` of its complete state, or ``None`` (copies:
    the entries may be pieces of the bucket itself)."""
    names = optimizer.state_names(group)
    saved = []
    for index, param in enumerate(bucket.params):
        entry = optimizer.state.get(param, {})
        if not entry or any(entry.get(name) is None for name in names):
            saved.append(None)
            continue
        for name in names:
            wrong = mismatch(entry[name], param)
            if wrong is not None:
                raise RuntimeError(
                    f"state {name!r} of {bucket.names[index]} is {wrong}; the parameter "
                    f"has shape {tuple(param.shape)}"
                )
        step = float(entry["step"]) if optimizer.counts_steps else None
        saved.append((step, {name: entry[name].detach().clone() for name in names}))
    return saved


def _write_bucket(optimizer, group, bucket, saved):
    names = optimizer.state_names(group)
    for param in bucket.params:
        optimizer.state.pop(param, None)
    bucket.step_counts[:] = 0
    for name in names:
        bucket.state(name).flat.zero_()
    bucket.initialized[:] = False
    for index, entry in enumerate(saved):
        if entry is None:
            continue
        step, values = entry
        for name, value in values.items():
            bucket.load_state_value(name, index, value)
        if optimizer.counts_steps:
            bucket.step_counts[index] = step
        bucket.initialized[index] = True
        expose_state(optimizer, bucket, index, names)
    bucket.exposed_names = names
    bucket.all_initialized = bool(bucket.initialized.all())
    bucket.coefficients = (None, None)
