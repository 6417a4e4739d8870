"""The optimizer implementations a benchmark compares, behind one signature.

Each provider takes (optimizer name, params, hyperparameters) and returns an object with
``step()``; `None` means it does not implement that optimizer here.
"""

import torch

import fastmomentum

#: Benchmark name -> (optimizer class name, hyperparameters). Small lr: values stay O(1).
OPTIMIZERS = {
    "SGD momentum": ("SGD", {"lr": 1e-3, "momentum": 0.9}),
    "SGD Nesterov": ("SGD", {"lr": 1e-3, "momentum": 0.9, "nesterov": True}),
    "Adam": ("Adam", {"lr": 1e-3}),
    "AdamW": ("AdamW", {"lr": 1e-3, "weight_decay": 1e-2}),
    "NAdam": ("NAdam", {"lr": 1e-3}),
    "RMSprop": ("RMSprop", {"lr": 1e-3}),
    "RMSprop momentum": ("RMSprop", {"lr": 1e-3, "momentum": 0.9}),
    "Adagrad": ("Adagrad", {"lr": 1e-2}),
    "LAMB": ("LAMB", {"lr": 1e-3, "weight_decay": 1e-2}),
}

#: Arrays read plus arrays written per parameter by one step (see bench/twin.py): 5 for
#: one state array (p, g, s read; p, s written), 7 for two, 10 for LAMB's two passes.
ARRAYS_MOVED = {
    "SGD momentum": 5,
    "SGD Nesterov": 5,
    "Adam": 7,
    "AdamW": 7,
    "NAdam": 7,
    "RMSprop": 5,
    "RMSprop momentum": 7,
    "Adagrad": 5,
    "LAMB": 10,
}

#: The optimizers torch has a fused CPU step for.
TORCH_FUSED = ("SGD", "Adam", "AdamW", "Adagrad")


def ours_default(name, params, options):
    """Default mode: each gradient read where autograd (here: the case) put it; one
    multi-tensor launch per step."""
    return getattr(fastmomentum, name)(params, **options)


def ours_flat(name, params, options):
    """``flat_gradients=True``: gradients are pieces of our flat gradient allocation
    (what ``zero_grad(set_to_none=False)`` makes them); one launch per step."""
    return getattr(fastmomentum, name)(params, flat_gradients=True, **options)


def our_adam(name, params, options):
    """LAMB's peer: our Adam on the same parameters (LAMB's speed target is a multiple
    of its time)."""
    if name != "LAMB":
        return None
    return fastmomentum.Adam(params, lr=options["lr"])


def torch_for_loop(name, params, options):
    if not hasattr(torch.optim, name):
        return None  # LAMB
    return getattr(torch.optim, name)(params, foreach=False, **options)


def torch_foreach(name, params, options):
    if not hasattr(torch.optim, name):
        return None
    return getattr(torch.optim, name)(params, foreach=True, **options)


def torch_fused(name, params, options):
    if name not in TORCH_FUSED:
        return None
    return getattr(torch.optim, name)(params, fused=True, **options)


def deepspeed_cpu_adam(name, params, options):
    """DeepSpeed's AVX C++ Adam (ZeRO-Offload's), when deepspeed is installed."""
    if name not in ("Adam", "AdamW") or params[0].dtype == torch.float64:
        return None  # it has no SGD, and no float64 ("not supported on current hardware")
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(params, adamw_mode=name == "AdamW", **options)


def deepspeed_available():
    try:
        import deepspeed.ops.adam  # noqa: F401
    except Exception:  # not installed, or its CPU op cannot build here
        return False
    return True


PROVIDERS = {
    "fastmomentum": ours_default,
    "fastmomentum flat": ours_flat,
    "our Adam": our_adam,
    "torch for-loop": torch_for_loop,
    "torch foreach": torch_foreach,
    "torch fused": torch_fused,
    "DeepSpeedCPUAdam": deepspeed_cpu_adam,
}
