"""``capturable=True``: a step during which the host reads nothing from the GPU.

As in torch's capturable optimizers, ``state[p]["step"]`` lies on the parameter's device
and the step's kernel advances it; an ``lr`` tensor on that device is read there, and so
are GradScaler's ``grad_scale`` and ``found_inf`` (a step with inf or NaN gradients
changes nothing there, its counts included). The kernels compute every coefficient from
these (`kernels.capturable`), so the host never waits for the GPU, uploads nothing in a
steady step, and a whole step can be captured in a CUDA graph and replayed: warm up (one
step or more) before capturing, as torch asks, so that the launch tables exist and hold
the addresses the graph will use.

``fused=True`` on CUDA takes the same path (`on_device`), as torch's fused optimizers
keep their counts on the device. Otherwise the step counts are CPU tensors, as torch
keeps them, and ``found_inf`` is read on the host; so it is on either path at a step
where SGD makes momentum buffers (`fastmomentum.SGD`: a skipped first step must leave
the next one first). Lion and SGD keep no count; their kernels read the lr and AMP's
values all the same. tests/test_capturable.py runs it in Numba's CUDA simulator, where a
CUDA graph cannot be captured; on an H200, bench.gpu_check captured and replayed a step of
each capturable optimizer, bit for bit the steps launched one by one (docs/gpu.md).
"""

import numpy as np
import torch

from fastmomentum.kernels.capturable import LiveInputs, capturable, placeholder_coefficients

from .devices import steps_on_gpu
from .validation import host_float


def is_capturable(group):
    """Whether ``group`` steps with ``capturable=True``."""
    return bool(group.get("capturable", False))


def on_device(optimizer, group):
    """Whether ``group`` steps with its counts on its device, the kernels computing
    their coefficients there: ``capturable=True``, or ``fused=True`` on CUDA, where
    torch's fused optimizers keep their counts on the device too and read GradScaler's
    values there, wherever our device path is written (`check_group`'s conditions; a
    fused group that misses one steps as an ordinary one, with CPU counts)."""
    if is_capturable(group):
        return True
    if not group.get("fused") or not optimizer.supports_capturable or _refused(optimizer):
        return False
    return all(steps_on_gpu(param.device) for param in group["params"])


def every_group(optimizer):
    """Whether every group steps `on_device` and the step needs no host read of AMP's
    ``found_inf`` (`FlatOptimizer.reads_found_inf_on_host`): AMP's values are then
    read on the device only."""
    return all(on_device(optimizer, group) for group in optimizer.param_groups) and not (
        optimizer.reads_found_inf_on_host()
    )


def check_group(optimizer, group):
    """Raise ``ValueError`` (before anything changes) for a capturable group we cannot
    step so: an optimizer without live coefficients, a parameter the CPU loops step, or
    an option whose host work needs the step counts."""
    if not is_capturable(group):
        return
    name = type(optimizer).__name__
    if not optimizer.supports_capturable:
        raise ValueError(f"fastmomentum does not support capturable=True for {name}")
    for position, param in enumerate(group["params"]):
        if not steps_on_gpu(param.device):
            raise ValueError(
                f"capturable=True steps parameters on a CUDA device (its step counts lie "
                f"there); parameter {position} is on {param.device}"
            )
    for option, why in _refused(optimizer).items():
        raise ValueError(f"capturable=True with {option}: {why}")


def _refused(optimizer):
    """The options chosen for ``optimizer`` whose host work needs the step counts there,
    each with why."""
    refused = {
        "stochastic_rounding": "its random keys are drawn from the step counts on the host",
        "state_dtype": "capturable 8-bit kernels are not written",
        "step_in_backward": "not implemented together",
    }
    chosen = {
        "stochastic_rounding": optimizer.__dict__.get("_stochastic_rounding"),
        "state_dtype": optimizer.quantized,
        "step_in_backward": optimizer.steps_in_backward,
    }
    return {option: why for option, why in refused.items() if chosen[option]}


def place_counts(optimizer, expose):
    """Keep each bucket's scalar state where its group's ``capturable`` says (a state
    dict or user code may switch it); ``expose(group, bucket)`` shows moved ones."""
    for group, buckets in zip(optimizer.param_groups, optimizer.buckets):
        wanted = bool(buckets) and on_device(optimizer, group)
        for bucket in buckets or ():
            if bucket.place_scalars(wanted):
                expose(group, bucket)


def live_lr(lr):
    """A capturable group's ``lr`` as its step reads it: a tensor as it is (read on the
    GPU, `live_inputs`), checked here, before any bucket steps; else a float."""
    if not isinstance(lr, torch.Tensor):
        return float(lr)
    if lr.numel() != 1 or lr.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"lr is a {lr.dtype} tensor of {lr.numel()} elements; a capturable step reads "
            "one float32 or float64 value"
        )
    return lr


def lr_setting(group):
    """``group``'s lr as a step reads it: a capturable group's `live_lr`, else a float."""
    lr = group["lr"]
    return live_lr(lr) if is_capturable(group) else host_float(lr, "lr")


def live_inputs(optimizer, bucket, lr, settings):
    """The `kernels.capturable.LiveInputs` of a capturable launch over ``bucket``: the
    host's fixed ``settings`` (the rule's `live_settings`), ``lr`` (a tensor on the
    bucket's device is read there, any other value is a float) and AMP's values."""
    lr_at, lr_value = 0, lr
    if isinstance(lr, torch.Tensor):
        if lr.device == bucket.device:
            lr_at = lr.data_ptr()
            lr_value = np.float32(0) if lr.dtype == torch.float32 else np.float64(0)
        else:
            lr_value = float(lr)  # a CPU tensor: no wait
    else:
        lr_value = np.float64(lr)
    counts = bucket.scalar_values("step")
    scalar_like = np.float32(0) if str(counts.dtype).endswith("float32") else np.float64(0)
    return LiveInputs(
        settings,
        lr_value,
        lr_at,
        _address(optimizer, "grad_scale", bucket),
        _address(optimizer, "found_inf", bucket),
        scalar_like,
    )


def launch(optimizer, bucket, plan, spec, columns, flags, lr, settings, prepare=None):
    """Step ``plan`` (of ``bucket``) with ``spec``'s capturable kernel: ``columns`` its
    state columns (the scalar state's follow), ``flags`` its flags, ``lr`` the group's
    (`live_lr`), ``settings`` the rule's ``live_settings``; the kernel computes every
    coefficient (the host's are only zeros of the dtype it types on), and every entry
    flag unless ``prepare(table)`` sets them (`kernels.specs.KernelSpec.live_entry_flags`)."""
    columns, width, prepare, launcher, args = launch_pass(
        optimizer, bucket, spec, columns, flags, lr, settings, prepare
    )
    plan.launch(columns, width, prepare, launcher, *args)


def launch_pass(
    optimizer, bucket, spec, columns, flags, lr, settings, prepare=None, launcher=None
):  # fmt: skip
    """`launch`'s pass as `launches.StepPlan.launch_passes` takes it (LAMB's two):
    ``launcher(table, *arguments)`` runs it (default: the bucket's kernels' launch)."""
    variant = capturable(spec)
    live = live_inputs(optimizer, bucket, lr, settings)
    shared = placeholder_coefficients(variant, bucket.dtype_numpy)
    launcher = launcher or bucket.kernels.launch
    columns = (*columns, *variant.scalars)
    return columns, variant.entry_width, prepare, launcher, (variant, shared, flags, live)


def _address(optimizer, name, bucket):
    """Where AMP's ``name`` (``grad_scale``, ``found_inf``) lies as a float32 on
    ``bucket``'s device (a copy on that device if the scaler keeps it elsewhere); 0: none."""
    value = optimizer.__dict__.get(name)
    if value is None:
        return 0
    if value.device != bucket.device or value.dtype != torch.float32:
        value = value.to(bucket.device, torch.float32, non_blocking=True)
        # kept until the bucket's next step: the launch reading it is queued by then
        bucket.__dict__.setdefault("amp_copies", {})[name] = value
    return value.data_ptr()


@torch.no_grad()
def unscale_grads(optimizer, grads):
    """Leave ``grads`` unscaled after an AMP step, as torch's fused optimizers do, but
    only where the step was taken (``found_inf`` zero): all on the device."""
    scale = optimizer.__dict__.get("grad_scale")
    if scale is None or not grads:
        return
    factor = scale.double().reciprocal().float()
    found_inf = optimizer.__dict__.get("found_inf")
    if found_inf is not None:
        factor = torch.where(found_inf.to(factor.device) != 0, torch.ones_like(factor), factor)
    by_device = {}
    for grad in grads:
        by_device.setdefault(grad.device, []).append(grad)
    for device, group in by_device.items():
        torch._foreach_mul_(group, factor.to(device, non_blocking=True))
