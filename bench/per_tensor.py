"""What one more tensor costs: the same 2^20 parameters as 1 to 4096 tensors.

    python -m bench.per_tensor [--repeats 41] [--threads N]

SGD with momentum, float32. For each split, interleaved (`bench.measure.time_cases`):

- ``kernel``: the multi-tensor kernel alone over a table of that many entries on one
  allocation (the flat loop is the table of one entry);
- ``fastmomentum``: a whole ``step()`` in the default mode, gradients in tensors of
  their own: the per-step look at every parameter and gradient, then one launch;
- ``torch fused``: ``torch.optim.SGD(fused=True)``.

Prints medians and, per provider, the cost per tensor: (time at k tensors − time at one
tensor) / (k − 1).
"""

import os

from . import cli

SPLITS = [1, 16, 256, 4096]
TOTAL = 2**20


def kernel_case(tensors):
    import numpy as np

    from fastmomentum.kernels import cpu, rules
    from fastmomentum.kernels.tables import TensorTable

    from .measure import Case

    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(TOTAL).astype(np.float32) for _ in range(3)]
    length = TOTAL // tensors
    table = TensorTable([length] * tensors, 3, np.float32, 1)
    offsets = np.arange(tensors, dtype=np.int64) * length * 4
    for column, array in enumerate(arrays):
        table.addresses[:, column] = array.ctypes.data + offsets
    coefficients = rules.sgd.momentum_coefficients(
        np.float32, 1e-3, 0.9, 0.0, 0.0, False, "pytorch"
    )
    start = arrays[0].copy()

    def reset():
        arrays[0][:] = start

    def step():
        cpu.launch(table, rules.sgd.MOMENTUM, coefficients, (False,))

    return Case(step, reset, TOTAL, tensors, 0)


def main(argv=None):
    parser = cli.parser("bench.per_tensor", __doc__)
    parser.add_argument("--repeats", type=cli.positive_int, default=41, help="timed steps per case")
    cli.add_threads(parser, os.cpu_count())
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import numba
    import torch

    from .measure import median, optimizer_case, time_cases

    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    medians = {}
    for tensors in SPLITS:
        shapes = [(TOTAL // tensors,)] * tensors
        cases = {
            "kernel": kernel_case(tensors),
            "fastmomentum": optimizer_case("SGD momentum", "fastmomentum", shapes, torch.float32),
            "torch fused": optimizer_case("SGD momentum", "torch fused", shapes, torch.float32),
        }
        times = time_cases(cases, args.repeats)
        medians[tensors] = {provider: median(t) for provider, t in times.items()}
        print(
            f"{tensors:5} tensors: "
            + "  ".join(f"{p} {s * 1e6:9.1f} us" for p, s in medians[tensors].items()),
            flush=True,
        )
    print("\ncost per tensor, (t(k) - t(1)) / (k - 1):")
    for provider in medians[1]:
        costs = [(medians[k][provider] - medians[1][provider]) / (k - 1) * 1e6 for k in SPLITS[1:]]
        print(
            f"  {provider:13} "
            + "  ".join(f"k={k}: {c:5.2f} us" for k, c in zip(SPLITS[1:], costs))
        )


if __name__ == "__main__":
    main()
