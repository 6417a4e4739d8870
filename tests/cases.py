"""The optimizer configurations the tests share: one table for the torch optimizers and
one for the low-level steps, each case under an id.

A test takes its cases by id (`torch_cases`), so a new optimizer's cases are added here
once and reach every test that lists them; ``CASES[id]`` is ``(class name, options)``.
"""

import numpy as np
import pytest

#: id -> (``fastmomentum`` / ``torch.optim`` class name, constructor options).
CASES = {
    "sgd": ("SGD", {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2}),
    "sgd-plain": ("SGD", {"lr": 0.05}),
    "sgd-dampened": ("SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-2}),
    "nesterov": ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    "nesterov-decay": (
        "SGD",
        {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    ),
    "nesterov-maximize": ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "maximize": True}),
    "adam-amsgrad": ("Adam", {"lr": 1e-2, "amsgrad": True}),
    "adam-amsgrad-decay": ("Adam", {"lr": 1e-2, "amsgrad": True, "weight_decay": 1e-2}),
    "adam-amsgrad-small-decay": ("Adam", {"lr": 1e-2, "amsgrad": True, "weight_decay": 1e-3}),
    "adamw": ("AdamW", {"lr": 1e-2}),
    "nadam": ("NAdam", {"lr": 1e-2, "weight_decay": 1e-2}),
    "rmsprop": ("RMSprop", {"lr": 1e-3, "momentum": 0.9, "centered": True}),
    "adagrad": ("Adagrad", {"lr": 1e-2, "lr_decay": 1e-3, "initial_accumulator_value": 0.1}),
}


#: A case of every update rule (heavy ball, Nesterov, Adam with AMSGrad, AdamW, NAdam,
#: RMSprop, Adagrad): what a test that must hold for every optimizer runs. A new
#: optimizer's case goes here.
EVERY_RULE = ("sgd", "nesterov", "adam-amsgrad", "adamw", "nadam", "rmsprop", "adagrad")


def torch_cases(*ids):
    """``pytest.mark.parametrize`` over the cases ``ids`` as ``(name, options)``."""
    return pytest.mark.parametrize(("name", "options"), [CASES[i] for i in ids], ids=list(ids))


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
