"""The low-level API: one optimizer step on NumPy or GPU arrays, validated, then dispatched,
one module per family (as `kernels.rules`). Where a step runs, which stream it is queued
on, and the checks made before anything is written: `calls`.
"""

from .adagrad import adagrad_step
from .adam import adam_8bit_step, adam_step, adamw_step
from .calls import as_stream, cuda_kernels
from .lamb import lamb_step
from .nadam import nadam_step
from .rmsprop import rmsprop_step
from .sgd import sgd_8bit_step, sgd_step

__all__ = [
    "adagrad_step",
    "adam_8bit_step",
    "adam_step",
    "adamw_step",
    "as_stream",
    "cuda_kernels",
    "lamb_step",
    "nadam_step",
    "rmsprop_step",
    "sgd_8bit_step",
    "sgd_step",
]
