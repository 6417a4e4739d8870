"""The optimizer implementations a benchmark compares, behind one signature.

Each provider takes (optimizer name, params, hyperparameters) and returns an object with
``step()``; `None` means it does not implement that optimizer here.
"""

import functools
import inspect
import os

import torch

import fastmomentum
from fastmomentum.capabilities import benchmarks

#: Benchmark name -> (optimizer class name, hyperparameters): the registry's rows
#: (`fastmomentum.capabilities`). Small lr: values stay O(1).
OPTIMIZERS = benchmarks()


@functools.cache
def arrays_moved(benchmark):
    """Arrays read plus arrays written per parameter by one step of ``benchmark`` (see
    bench/twin.py), from the kernel specs its step launches, recorded on a small
    parameter: each pass reads param, grad (unless it ignores it) and the state it uses,
    and writes param (if it updates it) and the state it writes. 5 for one state array
    (p, g, s read; p, s written), 7 for two, 10 for LAMB's two passes."""
    from fastmomentum.kernels import cpu

    name, options = OPTIMIZERS[benchmark]
    launched, launch = [], cpu.launch

    def recording(table, spec, coefficients, flags=()):
        launched.append((spec, dict(zip(spec.flags, flags))))
        return launch(table, spec, coefficients, flags)

    param = torch.nn.Parameter(torch.randn(8, 8))  # 2-D: Muon steps matrices only
    optimizer = getattr(fastmomentum, name)([param], **options)
    param.grad = torch.randn(8, 8)
    cpu.launch = recording
    try:
        optimizer.step()
    finally:
        cpu.launch = launch
    moved = 0
    for spec, flags in launched:
        used = [s for s in spec.state if flags.get(spec.optional_flag(s), True)]
        written = [s for s in used if s not in spec.read_only]
        moved += 1 + spec.reads_grad + len(used) + spec.updates_param + len(written)
    return moved


#: The optimizers torch has a fused step for (``fused=True``; on the CPU too).
TORCH_FUSED = tuple(
    name
    for name in dict(OPTIMIZERS.values())
    if hasattr(torch.optim, name)
    and "fused" in inspect.signature(getattr(torch.optim, name)).parameters
)


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
    if not _has_foreach(name):  # Muon: its for-loop is its only step
        return getattr(torch.optim, name)(params, **options)
    return getattr(torch.optim, name)(params, foreach=False, **options)


def torch_foreach(name, params, options):
    if not hasattr(torch.optim, name) or not _has_foreach(name):
        return None
    return getattr(torch.optim, name)(params, foreach=True, **options)


def _has_foreach(name):
    return "foreach" in inspect.signature(getattr(torch.optim, name)).parameters


def torch_fused(name, params, options):
    if name not in TORCH_FUSED:
        return None
    return getattr(torch.optim, name)(params, fused=True, **options)


#: The one command that adds the DeepSpeed peer (the ``bench`` extra has deepspeed).
DEEPSPEED_INSTALL = "pip install -e '.[bench]' (or pip install deepspeed beside your torch)"


def deepspeed_applies(name, dtype):
    """Whether DeepSpeedCPUAdam has a step for optimizer class ``name`` on ``dtype`` (a
    torch dtype or its name): Adam and AdamW (it has no SGD), not float64 ("not supported
    on current hardware")."""
    return name in ("Adam", "AdamW") and str(dtype).removeprefix("torch.") != "float64"


def _deepspeed_adam_class():
    # DeepSpeed picks an accelerator at import; this report times CPU steps, so its CPU
    # one (no CUDA toolkit needed, and no warning that none was found).
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam


def deepspeed_cpu_adam(name, params, options):
    """DeepSpeed's AVX C++ Adam (ZeRO-Offload's), when deepspeed is installed.

    Its defaults are torch's (betas, eps, ``bias_correction=True``); ``adamw_mode``
    picks decoupled decay (``p *= 1 - lr·wd``, AdamW) or L2 added to the gradient
    (Adam), as torch's two classes do. bench/NOTES.md, entry 20, compares its values.
    """
    if not deepspeed_applies(name, params[0].dtype):
        return None
    return _deepspeed_adam_class()(params, adamw_mode=name == "AdamW", **options)


@functools.cache
def deepspeed_status():
    """``(True, None)`` when DeepSpeedCPUAdam steps here, else ``(False, why)``.

    Its C++ op is compiled on first use (torch's cpp_extension, with ninja and the C++
    compiler; minutes on 2 cores) and cached under ``TORCH_EXTENSIONS_DIR`` (default
    ``~/.cache/torch_extensions``); this builds it, so do it before anything is timed.
    """
    try:
        adam = _deepspeed_adam_class()
    except ImportError as error:
        if (error.name or "").split(".")[0] == "deepspeed":
            return False, f"deepspeed is not installed ({error})"
        return False, f"import deepspeed.ops.adam failed: {_reason(error)}"
    except Exception as error:  # installed, but its import fails here
        return False, f"import deepspeed.ops.adam failed: {_reason(error)}"
    try:
        param = torch.nn.Parameter(torch.ones(64))
        param.grad = torch.ones(64)
        adam([param], lr=1e-3).step()
    except Exception as error:  # no C++ compiler, a failed build...
        return False, f"its cpu_adam op did not build or step: {_reason(error)}"
    if not torch.isfinite(param).all() or bool((param == 1).any()):
        return False, "its cpu_adam op built but its step did not update the parameter"
    return True, None


def _reason(error):
    """The error's message and its cause's (DeepSpeed wraps the build error)."""
    parts = []
    while error is not None and len(parts) < 3:
        text = str(error).strip().splitlines()
        parts.append(f"{type(error).__name__}: {text[-1] if text else ''}")
        error = error.__cause__
    return "; caused by ".join(parts)


PROVIDERS = {
    "fastmomentum": ours_default,
    "fastmomentum flat": ours_flat,
    "our Adam": our_adam,
    "torch for-loop": torch_for_loop,
    "torch foreach": torch_foreach,
    "torch fused": torch_fused,
    "DeepSpeedCPUAdam": deepspeed_cpu_adam,
}
