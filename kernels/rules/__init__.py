"""Per-element update rules, written once as plain Python, one module per family.

Every rule works on scalars and returns the new values. ``register_jitable`` leaves
each one an ordinary Python function (usable as a float64 reference) that Numba
compiles inline wherever a kernel calls it: the CPU loops of `kernels.cpu` and the CUDA
kernels alike. Scalars arrive already in the arrays' dtype (`hyperparameters.in_dtype`);
the rules contain no Python float literals (a float64 would widen float32 arithmetic);
the two constants of `common.fused_lerp` are NumPy float32 ones, torch's.

Beside each rule, in its module: a ``NamedTuple`` that names its coefficients in the
rule's argument order (those after the per-element values; tests/test_kernels.py
checks each against its rule's signature), a `specs.KernelSpec` from which its loops and
kernels are generated, torch.optim's checks of its hyperparameters, and the functions
that build its coefficients from them by name. Kernels take coefficients as plain
tuples: Numba 0.68 cannot unpack ``*coefficients`` from a named tuple, and typing one
costs 0.4 µs a call more than a tuple. Last, its low-level function: the rule on NumPy
or CUDA arrays, its arguments checked before anything is written.

Each module is discovered (`MODULES`): besides the above it declares ``SPECS``, the
`specs.KernelSpec` of each of its rules, optionally ``DEVICE_SPECS``, those only the
CUDA kernels launch (LAMB's update reading its norms on the GPU), and ``FUNCTIONS``,
the low-level functions `fastmomentum.kernels` exports. A new rule is a new module
here; nothing lists it.
"""

import importlib
import pkgutil

#: Every rule module, by name, in alphabetical order (``common``: what they share).
MODULES = {
    info.name: importlib.import_module(f"{__name__}.{info.name}")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name)
}

#: Every rule's `specs.KernelSpec`.
SPECS = tuple(spec for module in MODULES.values() for spec in getattr(module, "SPECS", ()))

#: The specs only CUDA kernels launch (`specs.KernelSpec.from_sums`).
DEVICE_SPECS = tuple(
    spec for module in MODULES.values() for spec in getattr(module, "DEVICE_SPECS", ())
)

#: Every low-level function, by name (`fastmomentum.kernels` exports them).
FUNCTIONS = {
    function.__name__: function
    for module in MODULES.values()
    for function in getattr(module, "FUNCTIONS", ())
}

globals().update(MODULES)  # rules.adam, rules.sgd, ...
__all__ = ["DEVICE_SPECS", "FUNCTIONS", "MODULES", "SPECS", *MODULES]
