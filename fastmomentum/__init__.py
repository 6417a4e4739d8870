"""fastmomentum: fused, in-place momentum-family optimizer steps, one launch per bucket.

``fastmomentum.SGD``, ``Adam`` and ``AdamW`` are drop-in replacements for their
``torch.optim`` namesakes; ``fastmomentum.kernels`` is the torch-free kernel library.
torch is imported only when an optimizer is first asked for, so
``import fastmomentum.kernels`` works on a machine with NumPy and Numba alone.
"""

__all__ = ["SGD", "Adam", "AdamW"]
__version__ = "0.1.0"


def __getattr__(name):
    if name in __all__:
        from . import optim

        return getattr(optim, name)
    raise AttributeError(f"module 'fastmomentum' has no attribute {name!r}")
