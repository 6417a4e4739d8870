"""Side-by-side demo: fastmomentum vs torch.optim on the same training run.

    python -m bench.demo            # about half a minute on 2 cores

1. Trains a 784-256-10 MLP on random data with ``fastmomentum.SGD`` and with
   ``torch.optim.SGD`` from the same start, and prints that the losses agree and the
   median ``step()`` times of ours and of torch's for-loop, foreach and fused steps.
2. Times one step on a single 16M-parameter tensor for SGD (momentum) and Adam, ours vs
   torch fused (median of repeated steps, same run).
3. Times the first step of a fresh process with an empty and with a warm Numba cache.
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

import fastmomentum

from . import cli


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))


def train(make_optimizer, steps, batch=64):
    """Train the MLP to mimic a random linear teacher; returns (losses, median step() seconds)."""
    model = mlp()
    optimizer = make_optimizer(model.parameters())
    generator = torch.Generator().manual_seed(1)
    teacher = torch.randn(784, 10, generator=generator)  # labels a model can learn
    losses, step_times = [], []
    for _ in range(steps):
        inputs = torch.randn(batch, 784, generator=generator)
        labels = (inputs @ teacher).argmax(dim=1)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        start = time.perf_counter()
        optimizer.step()
        step_times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return losses, statistics.median(step_times[5:] or step_times)  # warm-up left out


def median_step_time(optimizer, param, repeats):
    """Median seconds of ``optimizer.step()`` on one big parameter (after a warm-up)."""
    generator = torch.Generator().manual_seed(2)
    param.grad = torch.randn(param.shape, generator=generator)
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:] or times)  # warm-up left out


def big_tensor_times(numel, repeats):
    rows = []
    for name, options in [("SGD", {"lr": 1e-3, "momentum": 0.9}), ("Adam", {"lr": 1e-3})]:
        times = {}
        for label, factory in [
            ("fastmomentum", getattr(fastmomentum, name)),
            ("torch fused", lambda p, _n=name, **o: getattr(torch.optim, _n)(p, fused=True, **o)),
        ]:
            param = nn.Parameter(torch.randn(numel, generator=torch.Generator().manual_seed(3)))
            times[label] = median_step_time(factory([param], **options), param, repeats)
        rows.append((name, times["fastmomentum"], times["torch fused"]))
    return rows


FIRST_STEP = """
import sys, time
import torch, fastmomentum
param = torch.nn.Parameter(torch.randn(1000))
start = time.perf_counter()
library = torch.optim if sys.argv[1] == "torch" else fastmomentum
optimizer = library.Adam([param])
param.grad = torch.randn(1000)
optimizer.step()
print(time.perf_counter() - start)
"""


def first_step_times():
    """Seconds to build an Adam and take its first step, in a new process (after import).

    Returns torch.optim's time, then ours with an empty and with a warm Numba cache.
    torch.optim pays for importing ``torch._dynamo`` on the first ``add_param_group``
    (≈1 s here); we pay it too, so the difference to torch is the kernels' load.
    """
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}

        def seconds(library):
            command = [sys.executable, "-c", FIRST_STEP, library]
            result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            return float(result.stdout)

        return seconds("torch"), seconds("fastmomentum"), seconds("fastmomentum")


def main(argv=None):
    parser = cli.parser("bench.demo", __doc__)
    parser.add_argument(
        "--steps", type=cli.positive_int, default=200, help="training steps per run"
    )
    parser.add_argument(
        "--numel", type=cli.positive_int, default=16 * 2**20, help="size of the big tensor"
    )
    parser.add_argument(
        "--repeats", type=cli.positive_int, default=15, help="timed steps on the big tensor"
    )
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")

    options = {"lr": 0.05, "momentum": 0.9, "nesterov": True}
    ours, ours_time = train(lambda p: fastmomentum.SGD(p, **options), args.steps)
    print(f"MLP 784-256-10, {args.steps} steps of SGD (momentum 0.9, Nesterov), float32")
    reference_time = {}
    for label, extra in [
        ("for-loop", {"foreach": False}),
        ("foreach", {"foreach": True}),
        ("fused", {"fused": True}),
    ]:
        theirs, reference_time[label] = train(
            lambda p, _e=extra: torch.optim.SGD(p, **options, **_e), args.steps
        )
        if label == "for-loop":
            worst = max(abs(a - b) / abs(b) for a, b in zip(ours, theirs))
            print(
                f"  loss {ours[0]:.4f} -> {ours[-1]:.4f} (fastmomentum), "
                f"{theirs[0]:.4f} -> {theirs[-1]:.4f} (torch.optim)"
            )
            agree = "agree" if worst < 1e-4 else "DISAGREE"
            print(f"  losses {agree}: largest relative difference {worst:.2e}")
    print(f"  median step(): fastmomentum {ours_time * 1e6:8.1f} us")
    for label, seconds in reference_time.items():
        print(
            f"                 torch {label:8} {seconds * 1e6:8.1f} us "
            f"(ours / theirs = {ours_time / seconds:.2f})"
        )

    print(
        f"\nOne tensor of {args.numel / 2**20:.0f}M float32 parameters, "
        f"median of {args.repeats} steps"
    )
    for name, mine, fused in big_tensor_times(args.numel, args.repeats):
        print(
            f"  {name:5} fastmomentum {mine * 1e3:7.2f} ms   torch fused {fused * 1e3:7.2f} ms   "
            f"ratio {mine / fused:.2f}"
        )

    reference, cold, warm = first_step_times()
    print(
        "\nNew process, Adam built and first step taken (after import): "
        f"torch.optim {reference:.2f} s; fastmomentum {cold:.2f} s with an empty Numba cache, "
        f"{warm:.2f} s with a warm one"
    )


if __name__ == "__main__":
    main()
