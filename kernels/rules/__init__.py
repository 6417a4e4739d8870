"""Per-element update rules, written once as plain Python, one module per family.

Every rule works on scalars and returns the new values. ``register_jitable`` leaves
each one an ordinary Python function (usable as a float64 reference) that Numba
compiles inline wherever a kernel calls it: the CPU loops of `kernels.cpu` and the CUDA
kernels alike. Scalars arrive already in the arrays' dtype (`hyperparameters.in_dtype`);
the rules contain no Python float literals (a float64 would widen float32 arithmetic);
the two constants of `common.fused_lerp` are NumPy float32 ones, torch's.

Beside each rule, in its module: a ``NamedTuple`` that names its coefficients in the
rule's argument order (those after the per-element values; tests/test_kernels.py
checks each against its rule's signature), a `steps.Step` from which its loops and
kernels are generated, torch.optim's checks of its hyperparameters, and the functions
that build its coefficients from them by name. Kernels take coefficients as plain
tuples: Numba 0.68 cannot unpack ``*coefficients`` from a named tuple, and typing one
costs 0.4 µs a call more than a tuple.
"""

from . import adagrad, adam, common, lamb, nadam, rmsprop, sgd

#: Every rule's `steps.Step`.
STEPS = (
    sgd.PLAIN,
    sgd.MOMENTUM,
    adam.STEP,
    nadam.STEP,
    rmsprop.STEP,
    adagrad.STEP,
    lamb.DIRECTION,
    lamb.APPLY,
)

__all__ = ["STEPS", "adagrad", "adam", "common", "lamb", "nadam", "rmsprop", "sgd"]
