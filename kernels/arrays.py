"""Checks on the arrays handed to the low-level API, made before anything is written."""

import numpy as np

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def flat_views(arrays, read_only=("grad",)):
    """Check the arrays of one step and return 1-D views of them, in the order given.

    ``arrays`` maps argument names to arrays; ``None`` entries are passed through as
    ``None``. Arrays not named in ``read_only`` are updated in place and must be
    writeable. All must be NumPy arrays of one float dtype and one shape, C-contiguous,
    and no two may overlap in memory. Raises ``TypeError`` for the wrong kind of array
    or dtype and ``ValueError`` for the rest.
    """
    present = {name: array for name, array in arrays.items() if array is not None}
    for name, array in present.items():
        if not isinstance(array, np.ndarray):
            kind = f"{type(array).__module__}.{type(array).__qualname__}"
            raise TypeError(f"{name} must be a NumPy array, got {kind}")
    (first_name, first), *others = present.items()
    if first.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{first_name} has dtype {first.dtype}; expected float32 or float64")
    for name, array in others:
        if array.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {array.dtype} but {first_name} has {first.dtype}")
        if array.shape != first.shape:
            raise ValueError(f"{name} has shape {array.shape} but {first_name} has {first.shape}")
    for name, array in present.items():
        if not array.flags.c_contiguous:
            raise ValueError(f"{name} is not C-contiguous; pass np.ascontiguousarray({name})")
        if name not in read_only and not array.flags.writeable:
            raise ValueError(f"{name} is read-only but is updated in place")
    names = list(present)
    for i, name in enumerate(names):
        for other in names[i + 1 :]:
            if np.may_share_memory(present[name], present[other]):
                raise ValueError(f"{name} and {other} overlap in memory")
    return [None if array is None else array.reshape(-1) for array in arrays.values()]
