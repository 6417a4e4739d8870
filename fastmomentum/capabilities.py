"""The registry of optimizers: one row per optimizer, what it is and what it supports.

A row names the module of `fastmomentum` that defines the class (its binding; the rule
it launches is its own module of `fastmomentum.kernels.rules`, found there), the torch
class it is a drop-in for, how it is benchmarked, and its capabilities. What lists
optimizers is derived from it: ``fastmomentum``'s exports (``__all__``, the lazy
imports, and the imports type checkers read, written by ``python -m
fastmomentum.derived``), the shared test suites (tests/cases.py), the benchmark rows
(bench/providers.py) and the README's support matrix.

The README's support matrix is generated from this table (``python -m
fastmomentum.capabilities`` prints it) and `tests/test_capabilities.py` holds every cell
to the code: each combination a row claims constructs and steps, each one it does not
claim is refused before anything changes, the README shows `support_matrix()`, and the
distributed, simulator and step-in-backward suites run every optimizer that claims them.
"""

from typing import NamedTuple

#: Parameter dtypes, in the matrix's order.
PARAM_DTYPES = ("float32", "float64", "bfloat16", "float16")
#: State kinds: ``"param"`` the parameters' dtype (the default), ``"bfloat16"``
#: (``state_dtype=torch.bfloat16`` on float32 parameters), ``"int8_blockwise"``.
STATE_DTYPES = ("param", "bfloat16", "int8_blockwise")
#: Options of 16-bit parameters: a float32 copy, or rounding that needs none.
SIXTEEN_BIT_OPTIONS = ("master_weights", "stochastic_rounding", "kahan_sum")


class Capabilities(NamedTuple):
    """One optimizer's row: where it is, what it steps, how it keeps state, where it runs."""

    #: The module of `fastmomentum` that defines the class (``"adam"``: fastmomentum/adam.py).
    module: str
    #: The ``torch.optim`` class it is a drop-in for (None: torch has none).
    torch_peer: str | None
    #: Its benchmark rows: benchmark name -> hyperparameters (bench/providers.py);
    #: default one row, its class name, at ``lr=1e-3``.
    benchmarks: dict | None = None
    #: The parameter dtypes it steps (of `PARAM_DTYPES`; default all).
    param_dtypes: tuple = PARAM_DTYPES
    #: How it can keep its state (of `STATE_DTYPES`; default all).
    state_dtypes: tuple = STATE_DTYPES
    #: Options for 16-bit parameters it implements (of `SIXTEEN_BIT_OPTIONS`; default all).
    sixteen_bit_options: tuple = SIXTEEN_BIT_OPTIONS
    #: ``step_in_backward=True``.
    step_in_backward: bool = True
    #: Under DistributedDataParallel (its step in backward as DDP's communication hook).
    ddp: bool = True
    #: Under FSDP2 (``fully_shard``: DTensor parameters stepped through their shards).
    fsdp2: bool = True
    #: CUDA tensors (kernels checked in Numba's simulator; run once on an H200:
    #: bench/results/gpu_check_h200.md).
    cuda: bool = True
    #: ``capturable=True``: no host read during a step, CUDA-graph capturable
    #: (`fastmomentum.capture`; simulator-checked; on an H200 a captured step replays
    #: bit for bit the steps launched one by one).
    capturable: bool = False
    #: What the cells do not say (a limit of one option).
    note: str = ""


#: Class name -> `Capabilities`, in the order of the README's matrix; a row names only
#: what it lacks.
CAPABILITIES = {
    "SGD": Capabilities(
        "sgd",
        "SGD",
        benchmarks={
            "SGD momentum": {"lr": 1e-3, "momentum": 0.9},
            "SGD Nesterov": {"lr": 1e-3, "momentum": 0.9, "nesterov": True},
        },
        capturable=True,
    ),
    "Adam": Capabilities("adam", "Adam", capturable=True),
    "AdamW": Capabilities(
        "adam", "AdamW", benchmarks={"AdamW": {"lr": 1e-3, "weight_decay": 1e-2}}, capturable=True
    ),
    "NAdam": Capabilities("nadam", "NAdam", capturable=True),
    "RAdam": Capabilities("radam", "RAdam", capturable=True),
    "Adamax": Capabilities("adamax", "Adamax", capturable=True),
    "RMSprop": Capabilities(
        "rmsprop",
        "RMSprop",
        benchmarks={"RMSprop": {"lr": 1e-3}, "RMSprop momentum": {"lr": 1e-3, "momentum": 0.9}},
        capturable=True,
        note="8-bit state not with `centered=True`",
    ),
    "Adagrad": Capabilities(
        "adagrad", "Adagrad", benchmarks={"Adagrad": {"lr": 1e-2}}, capturable=True
    ),
    "LAMB": Capabilities(
        "lamb", None, benchmarks={"LAMB": {"lr": 1e-3, "weight_decay": 1e-2}}, capturable=True
    ),
    "Lion": Capabilities(
        "lion", None, benchmarks={"Lion": {"lr": 1e-4, "weight_decay": 1e-2}}, capturable=True
    ),
    "Muon": Capabilities(
        "muon",
        "Muon",
        state_dtypes=("param", "bfloat16"),
        capturable=True,
        note="2-D parameters only, as torch; no 8-bit state (its Nesterov update needs an "
        "array the 8-bit loops do not write)",
    ),
}


def benchmarks():
    """Benchmark name -> (class name, hyperparameters), every optimizer's rows in order."""
    rows = {}
    for name, row in CAPABILITIES.items():
        for benchmark, options in (row.benchmarks or {name: {"lr": 1e-3}}).items():
            rows[benchmark] = (name, options)
    return rows


_SHORT = {
    "float32": "fp32",
    "float64": "fp64",
    "bfloat16": "bf16",
    "float16": "fp16",
    "param": "as params",
    "int8_blockwise": "int8",
    "master_weights": "master",
    "stochastic_rounding": "SR",
    "kahan_sum": "Kahan",
}


def _cell(claimed):
    return "✓" if claimed else "–"


def support_matrix():
    """The README's support matrix (markdown), from `CAPABILITIES`."""
    head = (
        "| optimizer | drop-in for | parameters | state | 16-bit options | "
        "step in backward | DDP | FSDP2 | CUDA¹ | capturable¹ | limits |"
    )
    lines = [head, "| --- | --- | --- | --- | --- | :-: | :-: | :-: | :-: | :-: | --- |"]
    for name, row in CAPABILITIES.items():
        peer = f"`torch.optim.{row.torch_peer}`" if row.torch_peer else "– (torch has none)"
        cells = [
            f"`{name}`",
            peer,
            " ".join(_SHORT[d] for d in row.param_dtypes),
            ", ".join(_SHORT[s] for s in row.state_dtypes),
            ", ".join(_SHORT[o] for o in row.sixteen_bit_options) or "–",
            _cell(row.step_in_backward),
            _cell(row.ddp),
            _cell(row.fsdp2),
            _cell(row.cuda),
            _cell(row.capturable),
            row.note or "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(support_matrix(), end="")
