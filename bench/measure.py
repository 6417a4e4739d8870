"""Setting up one benchmark case and timing its steps.

Timing rules (shared by the report and the pytest-benchmark suite):
- gradients are fixed standard-normal values (never zeros), the same for every provider;
- warm-up steps run first and are not timed (Numba compiles, or loads its cache, there);
- before every timed step the parameters are restored to their starting values, outside
  the timed region, so nothing drifts towards overflow or denormals however long it runs;
- cases compared with each other take turns (`time_cases`), each turn an untimed step
  and then a timed one, and each case reports the median over its timed steps.
"""

import statistics
import time
from dataclasses import dataclass

import torch

from . import twin
from .providers import OPTIMIZERS, PROVIDERS, arrays_moved


@dataclass
class Case:
    """A ready-to-time case: ``step()`` is what is timed, ``reset()`` runs before it."""

    step: object
    reset: object
    numel: int
    tensors: int
    bytes_per_step: int


def make_params(shapes, dtype, seed=0):
    """Parameters of ``shapes`` with standard-normal values and gradients."""
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        param = torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype))
        param.grad = torch.randn(shape, generator=generator, dtype=dtype)
        params.append(param)
    return params


def optimizer_case(benchmark, provider, shapes, dtype):
    """The step of ``provider``'s optimizer, or ``None`` where it has none."""
    name, options = OPTIMIZERS[benchmark]
    params = make_params(shapes, dtype)
    optimizer = PROVIDERS[provider](name, params, options)
    if optimizer is None:
        return None
    start = [param.detach().clone() for param in params]

    @torch.no_grad()
    def reset():
        for param, value in zip(params, start):
            param.copy_(value)

    numel = sum(param.numel() for param in params)
    moved = arrays_moved(benchmark) * numel * params[0].element_size()
    return Case(optimizer.step, reset, numel, len(params), moved)


def twin_case(benchmark, numel, dtype):
    """The traffic twin of ``benchmark`` over one flat buffer of ``numel`` parameters.

    Its arrays are torch tensors seen through NumPy and its reset is the same torch
    ``copy_`` the optimizer cases do, so it starts each step from the same cache state.
    """
    kernel, count = _TWINS[arrays_moved(benchmark)]
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(numel, generator=generator, dtype=dtype) for _ in range(count)]
    arrays = [tensor.numpy() for tensor in tensors]
    start = tensors[0].clone()

    def reset():
        tensors[0].copy_(start)

    moved = arrays_moved(benchmark) * numel * tensors[0].element_size()
    return Case(lambda: kernel(*arrays), reset, numel, 1, moved)


#: The twin kernel and its array count for each step's arrays moved.
_TWINS = {
    5: (twin.sgd_momentum_twin, 3),
    7: (twin.adam_twin, 4),
    9: (twin.muon_twin, 4),
    10: (twin.lamb_twin, 4),
}


def time_cases(cases, repeats, warmup=3):
    """Seconds of each timed step of every case in ``cases`` (a dict), interleaved.

    The cases take turns, so a change in the machine's load during the measurement (it
    is shared and has 2 cores) hits every provider alike. In its turn a case takes one
    untimed step and then the timed one, so each timed step finds its own data as warm
    as the step before left it, not evicted by the other providers' steps.
    """
    for _ in range(warmup):
        for case in cases.values():
            case.reset()
            case.step()
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, case in cases.items():
            case.reset()
            case.step()
            case.reset()
            start = time.perf_counter()
            case.step()
            times[name].append(time.perf_counter() - start)
    return times


def median(times):
    return statistics.median(times)
