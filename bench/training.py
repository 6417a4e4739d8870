"""Whole training iterations: zero_grad + forward + backward + step, ours against torch fused.

    python -m bench.training [--repeats 41] [--threads N] [--output bench/results]

A microbenchmark times the step alone on warm data; in a training loop backward leaves
the step's data out of cache and the step's gradients are fresh autograd tensors, so
this times what a user pays. Two small models (an MLP 784-1024-1024-10, a CNN on 32×32
images), SGD with momentum and Adam, three providers each with its own copy of the
model: torch fused, fastmomentum in its default mode (torch's ``zero_grad()``), and
fastmomentum with ``flat_gradients=True`` and ``zero_grad(set_to_none=False)``. The
providers take turns (`bench.measure.time_cases`); medians of whole iterations and of
the ``step()`` inside them. Writes ``training.{json,md}`` to ``bench/out/`` (untracked)
or to the ``--output`` folder; the committed run is in ``bench/results/``.
"""

import json
import os
import time

from . import cli

OPTIMIZERS = {
    "SGD momentum": ("SGD", {"lr": 1e-2, "momentum": 0.9}),
    "Adam": ("Adam", {"lr": 1e-3}),
}


def mlp():
    from torch import nn

    return nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )


def cnn():
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 256), nn.ReLU(), nn.Linear(256, 10),
    )  # fmt: skip


MODELS = {"MLP 784-1024-1024-10": (mlp, (64, 784)), "CNN 32x32": (cnn, (32, 3, 32, 32))}


def iteration_case(model_name, optimizer_name, provider):
    """A `bench.measure.Case` whose step is one training iteration; ``step_times`` gets
    the seconds of each ``optimizer.step()``."""
    import torch
    from torch import nn

    import fastmomentum

    from .measure import Case

    make, input_shape = MODELS[model_name]
    torch.manual_seed(0)
    model = make()
    name, options = OPTIMIZERS[optimizer_name]
    if provider == "torch fused":
        optimizer = getattr(torch.optim, name)(model.parameters(), fused=True, **options)
    else:
        flat = provider == "fastmomentum flat"
        optimizer = getattr(fastmomentum, name)(model.parameters(), flat_gradients=flat, **options)
    set_to_none = provider != "fastmomentum flat"
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(input_shape, generator=generator)
    labels = torch.randint(0, 10, (input_shape[0],), generator=generator)
    step_times = []

    def iterate():
        optimizer.zero_grad(set_to_none=set_to_none)
        nn.functional.cross_entropy(model(inputs), labels).backward()
        start = time.perf_counter()
        optimizer.step()
        step_times.append(time.perf_counter() - start)

    numel = sum(p.numel() for p in model.parameters())
    case = Case(iterate, lambda: None, numel, len(list(model.parameters())), 0)
    case.step_times = step_times
    return case


def main(argv=None):
    parser = cli.parser("bench.training", __doc__)
    parser.add_argument(
        "--repeats", type=cli.positive_int, default=41, help="timed iterations per case"
    )
    cli.add_threads(parser, os.cpu_count())
    cli.add_output(parser, "JSON and markdown")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import numba
    import torch

    from .measure import median, time_cases
    from .report import machine_facts

    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    providers = ["torch fused", "fastmomentum", "fastmomentum flat"]
    rows = []
    for model_name in MODELS:
        for optimizer_name in OPTIMIZERS:
            cases = {p: iteration_case(model_name, optimizer_name, p) for p in providers}
            times = time_cases(cases, args.repeats)
            fused = median(times["torch fused"])
            # every step after the warm-up (timed and untimed iterations alike)
            fused_step = median(cases["torch fused"].step_times[3:])
            for provider, case in cases.items():
                step = median(case.step_times[3:])
                rows.append(
                    {
                        "model": model_name,
                        "optimizer": optimizer_name,
                        "provider": provider,
                        "tensors": case.tensors,
                        "numel": case.numel,
                        "iteration_median_s": median(times[provider]),
                        "step_median_s": step,
                        "iteration_vs_torch_fused": median(times[provider]) / fused,
                        "step_vs_torch_fused": step / fused_step,
                    }
                )
                print(
                    f"{model_name:22} {optimizer_name:13} {provider:18} iteration "
                    f"{rows[-1]['iteration_median_s'] * 1e3:7.3f} ms "
                    f"({rows[-1]['iteration_vs_torch_fused']:.2f}x fused)  step "
                    f"{step * 1e3:7.3f} ms ({rows[-1]['step_vs_torch_fused']:.2f}x)",
                    flush=True,
                )
    report = {**machine_facts(args.threads), "repeats": args.repeats, "results": rows}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "training.json").write_text(json.dumps(report, indent=1))
    lines = [
        "| model | optimizer | provider | iteration ms | x torch fused | step ms | x torch fused |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['optimizer']} | {row['provider']} "
            f"| {row['iteration_median_s'] * 1e3:.3f} | {row['iteration_vs_torch_fused']:.2f} "
            f"| {row['step_median_s'] * 1e3:.3f} | {row['step_vs_torch_fused']:.2f} |"
        )
    (args.output / "training.md").write_text("\n".join(lines) + "\n")
    print(f"\nresults in {args.output}")


if __name__ == "__main__":
    main()
