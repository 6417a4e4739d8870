"""The optimizer configurations the tests share: one table of the optimizers, their
capabilities and their cases (as torch's ``OptimizerInfo`` / ``optim_db`` drive its
tests), and the cases of the low-level steps.

A suite that must hold for every optimizer parametrizes over the table with
`every_optimizer` (optionally only those having a capability), so a new optimizer's row
reaches every such suite; a test that needs particular cases takes them by id
(`torch_cases`); ``CASES[id]`` is ``(class name, options)``. The table is plain data
plus properties that read what the classes themselves declare, so that it can move into
the library (issue 21) as it is.
"""

import dataclasses
import inspect

import numpy as np
import pytest

from fastmomentum.capabilities import CAPABILITIES


@dataclasses.dataclass(frozen=True)
class OptimizerInfo:
    """One optimizer: its names, its cases and, read from the classes, its capabilities."""

    #: The ``fastmomentum`` class name.
    name: str
    #: Case id -> constructor options, every case of this optimizer a test may name.
    cases: dict
    #: The ids of the cases that between them run each of its update rules: what a
    #: suite that must hold for every optimizer runs (default: the first case).
    rules: tuple = ()
    #: The ``fastmomentum.kernels`` low-level function (None: it has none) and the
    #: options a test of it on its own passes.
    kernel: str | None = None
    kernel_options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not self.rules:
            object.__setattr__(self, "rules", (next(iter(self.cases)),))
        assert set(self.rules) <= set(self.cases), f"{self.name}: rules not among its cases"

    # --- capabilities, as the classes declare them (imported on use: the kernel tests
    # --- import this module without torch) --------------------------------------------

    @property
    def cls(self):
        import fastmomentum

        return getattr(fastmomentum, self.name)

    @property
    def torch_peer(self):
        """The ``torch.optim`` class name it is a drop-in for (None: torch has none), from
        the library's capability table."""
        return CAPABILITIES[self.name].torch_peer

    @property
    def peer(self):
        """The ``torch.optim`` class, or None."""
        import torch

        return None if self.torch_peer is None else getattr(torch.optim, self.torch_peer)

    @property
    def peer_has_fused(self):
        """Whether torch's peer has a fused implementation (``fused=True``)."""
        return self.peer is not None and "fused" in inspect.signature(self.peer).parameters

    @property
    def param_dtypes(self):
        """The parameter dtypes it steps (None: every dtype fastmomentum steps)."""
        return self.cls.param_dtypes

    def steps(self, dtype):
        """Whether it steps parameters of ``dtype``."""
        return self.param_dtypes is None or dtype in self.param_dtypes

    @property
    def supports_master_weights(self):
        return self.cls.supports_master_weights

    @property
    def supports_quantized_state(self):
        return self.cls.supports_quantized_state

    @property
    def matrices_only(self):
        """Whether it steps 2-D parameters only (Muon, as torch's)."""
        return getattr(self.cls, "matrices_only", False)

    def shape(self, shape):
        """A parameter shape it steps like ``shape``: ``shape`` itself, or for one that
        steps matrices only its first dimension by the others' product."""
        if not self.matrices_only or len(shape) == 2:
            return tuple(shape)
        rows = shape[0] if shape else 1
        return (rows, int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1)

    @property
    def scalar_state(self):
        """Per-parameter scalar state, name -> initial value (``step``, ``mu_product``)."""
        return self.cls.scalar_state


#: Class name -> `OptimizerInfo`: every optimizer of the library. A new optimizer is a
#: row here, and every suite parametrized with `every_optimizer` runs it.
OPTIMIZERS = {
    info.name: info
    for info in (
        OptimizerInfo(
            "SGD",
            cases={
                "sgd": {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2},
                "nesterov": {"lr": 0.05, "momentum": 0.9, "nesterov": True},
                "sgd-plain": {"lr": 0.05},
                "sgd-dampened": {
                    "lr": 0.05,
                    "momentum": 0.9,
                    "dampening": 0.1,
                    "weight_decay": 1e-2,
                },
                "nesterov-decay": {
                    "lr": 0.05,
                    "momentum": 0.9,
                    "nesterov": True,
                    "weight_decay": 0.01,
                },
                "nesterov-maximize": {
                    "lr": 0.05,
                    "momentum": 0.9,
                    "nesterov": True,
                    "maximize": True,
                },
            },
            rules=("sgd", "nesterov"),
            kernel="sgd_step",
            kernel_options={"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2},
        ),
        OptimizerInfo(
            "Adam",
            cases={
                "adam-amsgrad": {"lr": 1e-2, "amsgrad": True},
                "adam-amsgrad-decay": {"lr": 1e-2, "amsgrad": True, "weight_decay": 1e-2},
                "adam-amsgrad-small-decay": {"lr": 1e-2, "amsgrad": True, "weight_decay": 1e-3},
            },
            kernel="adam_step",
            kernel_options={"lr": 1e-2, "amsgrad": True},
        ),
        OptimizerInfo(
            "AdamW",
            cases={"adamw": {"lr": 1e-2}},
            kernel="adamw_step",
            kernel_options={"lr": 1e-2},
        ),
        OptimizerInfo(
            "NAdam",
            cases={"nadam": {"lr": 1e-2, "weight_decay": 1e-2}},
            kernel="nadam_step",
            kernel_options={"lr": 1e-2, "weight_decay": 1e-2},
        ),
        OptimizerInfo(
            "RAdam",
            cases={
                "radam": {"lr": 1e-2, "weight_decay": 1e-2},
                "radam-decoupled": {
                    "lr": 1e-2,
                    "weight_decay": 0.1,
                    "decoupled_weight_decay": True,
                },
            },
            kernel="radam_step",
            kernel_options={"lr": 1e-2, "weight_decay": 1e-2},
        ),
        OptimizerInfo(
            "Adamax",
            cases={"adamax": {"lr": 1e-2, "weight_decay": 1e-2}},
            kernel="adamax_step",
            kernel_options={"lr": 1e-2, "weight_decay": 1e-2},
        ),
        OptimizerInfo(
            "RMSprop",
            cases={
                "rmsprop": {"lr": 1e-3, "momentum": 0.9, "centered": True},
                "rmsprop-momentum": {"lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-2},
            },
            kernel="rmsprop_step",
            kernel_options={"lr": 1e-3, "momentum": 0.9, "centered": True},
        ),
        OptimizerInfo(
            "Adagrad",
            cases={"adagrad": {"lr": 1e-2, "lr_decay": 1e-3, "initial_accumulator_value": 0.1}},
            kernel="adagrad_step",
            kernel_options={"lr": 1e-2, "lr_decay": 1e-3, "weight_decay": 1e-2},
        ),
        OptimizerInfo(
            "LAMB",
            cases={"lamb": {"lr": 1e-2, "weight_decay": 1e-2}},
            kernel="lamb_step",
            kernel_options={"lr": 1e-2, "weight_decay": 1e-2},
        ),
        OptimizerInfo(
            "Lion",
            # lr 10x smaller than the Adam family's cases, as Chen et al. advise (a sign
            # step is larger than Adam's)
            cases={"lion": {"lr": 1e-3, "weight_decay": 1e-2}},
            kernel="lion_step",
            kernel_options={"lr": 1e-3, "weight_decay": 1e-2},
        ),
        OptimizerInfo(
            "Muon",
            cases={
                "muon": {"lr": 2e-2, "weight_decay": 0.1},
                "muon-heavy-ball": {"lr": 2e-2, "nesterov": False, "momentum": 0.9},
                "muon-match-rms-adamw": {"lr": 1e-2, "adjust_lr_fn": "match_rms_adamw"},
            },
            rules=("muon", "muon-heavy-ball"),
        ),
    )
}

#: id -> (``fastmomentum`` / ``torch.optim`` class name, constructor options).
CASES = {
    case: (info.name, options)
    for info in OPTIMIZERS.values()
    for case, options in info.cases.items()
}
assert len(CASES) == sum(len(info.cases) for info in OPTIMIZERS.values()), "a case id twice"


def has_torch_peer(info):
    return info.torch_peer is not None


def every_rule_of(where=None, cases=None, matrices=False):
    """The ids of the `OptimizerInfo.rules` cases of every optimizer ``where`` accepts
    (all without it), or of the cases ``cases[name]`` names for optimizer ``name``.
    An optimizer of matrices only (Muon) is left out unless ``matrices``: the shared
    suites step `models.SmallNet`, whose norms, biases and convolution are not 2-D
    (tests/test_muon.py runs those suites' checks for it on matrices)."""
    cases = cases or {}
    assert set(cases) <= set(OPTIMIZERS), f"not optimizers: {set(cases) - set(OPTIMIZERS)}"
    return tuple(
        case
        for info in OPTIMIZERS.values()
        if (where is None or where(info)) and (matrices or not info.matrices_only)
        for case in cases.get(info.name, info.rules)
    )


#: A case of every update rule of every optimizer torch has too (heavy ball, Nesterov,
#: Adam with AMSGrad, AdamW, NAdam, RAdam, Adamax, RMSprop, Adagrad): what a test comparing with
#: torch.optim that must hold for every optimizer runs.
EVERY_RULE = every_rule_of(has_torch_peer)


def torch_cases(*ids):
    """``pytest.mark.parametrize`` over the cases ``ids`` as ``(name, options)``."""
    return pytest.mark.parametrize(("name", "options"), [CASES[i] for i in ids], ids=list(ids))


def every_optimizer(where=None, *, cases=None, dtypes=None):
    """``pytest.mark.parametrize`` as ``(name, options)`` over the `OptimizerInfo.rules`
    cases of every optimizer ``where`` accepts (all without it), test ids the case ids:
    ``every_optimizer(has_torch_peer)``, ``every_optimizer(lambda info: info.kernel)``.

    ``cases`` (class name -> case ids) runs other cases of the optimizers it names (a
    suite's variants); every other optimizer, a new one too, still runs its rules. With
    ``dtypes``, as ``(name, options, dtype)`` over those cases and each of ``dtypes`` the
    optimizer steps (its ``param_dtypes``).
    """
    ids = every_rule_of(where, cases)
    if dtypes is None:
        return torch_cases(*ids)
    values, names = [], []
    for case in ids:
        name, options = CASES[case]
        for dtype in dtypes:
            if OPTIMIZERS[name].steps(dtype):
                values.append((name, options, dtype))
                names.append(f"{case}-{str(dtype).removeprefix('torch.')}")
    return pytest.mark.parametrize(("name", "options", "dtype"), values, ids=names)


def every_kernel():
    """``pytest.mark.parametrize`` as ``(kernel, options)`` over the low-level function
    (`OptimizerInfo.kernel`) of every optimizer that has one, with its
    `OptimizerInfo.kernel_options`; test ids the function names."""
    infos = [info for info in OPTIMIZERS.values() if info.kernel is not None]
    return pytest.mark.parametrize(
        ("kernel", "options"),
        [(info.kernel, info.kernel_options) for info in infos],
        ids=[info.kernel for info in infos],
    )


#: The low-level `sgd_step` options the kernel tests run (unspecified: defaults).
SGD_CASES = [
    {"momentum": 0.0},
    {"momentum": 0.0, "weight_decay": 0.1, "maximize": True},
    {"momentum": 0.9},
    {"momentum": 0.9, "dampening": 0.3},
    {"momentum": 0.9, "nesterov": True},
    {"momentum": 0.7, "weight_decay": 0.05, "nesterov": True, "maximize": True},
]

#: The low-level `adam_step` options the kernel tests run.
ADAM_CASES = [
    {},
    {"weight_decay": 0.1},
    {"weight_decay": 0.1, "decoupled_weight_decay": True},
    {"amsgrad": True},
    {"maximize": True, "amsgrad": True, "weight_decay": 0.01},
    {"betas": (0.3, 0.6)},  # 1 − β1 ≥ 0.5: the other branch of torch's lerp
]


def sgd_options(case):
    """A `SGD_CASES` entry with every unspecified option at its default."""
    return {"dampening": 0.0, "weight_decay": 0.0, "nesterov": False, "maximize": False, **case}


def adam_options(case):
    """An `ADAM_CASES` entry as (options for `adam_step`, decoupled weight decay or not)."""
    options = {
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "amsgrad": False,
        "maximize": False,
        **case,
    }
    return options, options.pop("decoupled_weight_decay", False)


def learning_rate(step):
    """A learning rate that changes every step, so the two conventions are told apart."""
    return 0.05 * (1.0 + 0.5 * np.sin(step))
