"""Microbenchmarks of one optimizer step: ``pytest bench/ --benchmark-only``.

One case per optimizer × provider × layout, grouped so that each group shows
fastmomentum beside torch.optim's for-loop, foreach and fused steps, DeepSpeedCPUAdam
(for Adam and AdamW, when deepspeed is installed) and the traffic twin, the memory
limit. Timing rules are `bench.measure`'s: fixed random gradients, warm-up rounds
untimed, parameters restored before every round outside the timed region.
"""

import pytest
import torch

from .layouts import LAYOUTS, numel, single
from .measure import optimizer_case, twin_case
from .providers import OPTIMIZERS, PROVIDERS, deepspeed_status

ROUNDS = 15
LAYOUT_CASES = [(name, torch.float32) for name in LAYOUTS] + [("2^22 tensor", torch.float64)]


def shapes_of(layout):
    return single(2**22) if layout == "2^22 tensor" else LAYOUTS[layout]()


def run(benchmark, case, group):
    benchmark.group = group
    benchmark.extra_info.update(
        numel=case.numel, tensors=case.tensors, bytes_per_step=case.bytes_per_step
    )
    benchmark.pedantic(case.step, setup=case.reset, rounds=ROUNDS, warmup_rounds=3, iterations=1)


@pytest.mark.parametrize(
    ("layout", "dtype"), LAYOUT_CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in LAYOUT_CASES]
)
@pytest.mark.parametrize("provider", [*PROVIDERS, "traffic twin"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_step(benchmark, optimizer, provider, layout, dtype):
    if dtype == torch.float64 and provider == "torch for-loop":
        pytest.skip("float64 is timed against the fast providers only")
    shapes = shapes_of(layout)
    if provider == "traffic twin":
        case = twin_case(optimizer, numel(shapes), dtype)
    else:
        if provider == "DeepSpeedCPUAdam" and not deepspeed_status()[0]:
            pytest.skip(f"DeepSpeedCPUAdam not measured: {deepspeed_status()[1]}")
        case = optimizer_case(optimizer, provider, shapes, dtype)
        if case is None:
            pytest.skip(f"{provider} does not run {optimizer} on {str(dtype)[6:]}")
    run(benchmark, case, f"{optimizer} | {layout} | {str(dtype)[6:]}")
