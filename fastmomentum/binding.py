"""``optimizer.state`` as torch shows it, bound to the buckets' memory both ways.

After a parameter's first step its ``optimizer.state[p]`` entry holds pieces of the
bucket's allocations under torch's keys (`expose_new_state`); after a load, an
unpickling, or user code replacing, clearing or deleting entries, the buckets are made
to hold what ``optimizer.state`` says (`bind_state`).
"""

import torch


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

    A parameter without (complete) state in ``optimizer.state`` starts afresh.
    """
    for group, buckets in zip(optimizer.param_groups, optimizer.buckets):
        for bucket in buckets:
            _bind_bucket(optimizer, group, bucket)


def _bind_bucket(optimizer, group, bucket):
    names = optimizer.state_names(group)
    saved = []
    for param in bucket.params:  # copies first: the entries may be pieces of the bucket
        entry = optimizer.state.pop(param, {})
        if not entry or any(entry.get(name) is None for name in names):
            saved.append(None)
            continue
        step = float(entry["step"]) if optimizer.counts_steps else None
        saved.append((step, {name: entry[name].detach().clone() for name in names}))
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
    bucket.uniform_steps = bool((bucket.step_counts == bucket.step_counts[:1]).all())
    bucket.coefficients = (None, None)
