"""Parameters cast to another dtype after their first step (``model.double()``,
``model.half()`` and back, mid-run).

Their state keeps the dtype it had, as torch's does (`launches.CAST`; the bucket is
that of the state's dtype). torch.optim's for-loop steps such a parameter where its ops
take mixed dtypes (SGD, Adagrad, RMSprop without ``centered``): we call that same loop
on our state (`FlatOptimizer.step_cast`). Where it cannot (Adam's ``lerp``), it fails
part-way through the parameters; we refuse before anything changes.
"""

import torch


def refuse_unsteppable(optimizer, all_settings, plans):
    """Raise, before anything changes, for a cast parameter with a gradient that
    torch.optim's for-loop could not step either (``plans`` as `FlatOptimizer._plan_all`
    gives them, per group)."""
    for settings, group_plans in zip(all_settings, plans):
        for bucket, bucket_plans in group_plans:
            for plan in bucket_plans:
                if plan is None or not plan.cast_rows or optimizer.steps_cast_params(settings):
                    continue
                row = plan.cast_rows[0]
                raise RuntimeError(
                    f"{bucket.names[row]} was cast to {bucket.local_params()[row].dtype} "
                    f"after its first step; its state is still {bucket.dtype}. "
                    f"torch.optim.{type(optimizer).__name__} fails part-way through the "
                    "parameters there; fastmomentum refuses before any change. Cast the "
                    "model before its first step, load a state dict after the cast "
                    "(load_state_dict converts the state to each parameter's dtype), or "
                    "clear the parameter's state"
                )


@torch.no_grad()
def step_rows(optimizer, group, bucket, settings, rows, grad_scale):
    """Step the cast parameters ``rows`` of ``bucket`` with the optimizer's `step_cast`,
    on their state in the dtype it kept; ``grad_scale``: the AMP loss scale, divided out
    of copies of the gradients (the gradients themselves are unscaled after the step)."""
    params = [bucket.params[row] for row in rows]
    grads = [param.grad for param in params]
    if grad_scale is not None:
        grads = [grad * (1.0 / grad_scale) for grad in grads]
    state = {
        name: [bucket.state_piece(name, row) for row in rows]
        for name in optimizer.state_names(group)
    }
    steps = [bucket.scalar_piece("step", row) for row in rows] if optimizer.counts_steps else None
    optimizer.step_cast(group, settings, params, grads, state, steps)
    if bucket.clear_grads:
        for param in params:
            param.grad.zero_()
