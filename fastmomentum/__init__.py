"""fastmomentum: fused, in-place momentum-family optimizer steps, one launch per bucket.

``fastmomentum.SGD``, ``Adam`` and ``AdamW`` are drop-in replacements for their
``torch.optim`` namesakes; ``fastmomentum.kernels`` is the torch-free kernel library.
torch is imported only when an optimizer is first asked for, so
``import fastmomentum.kernels`` works on a machine with NumPy and Numba alone.
"""

from typing import TYPE_CHECKING

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "NAdam",
    "RMSprop",
    "Adagrad",
    "LAMB",
    "dequantized_state_dict",
]
__version__ = "0.1.0"

if TYPE_CHECKING:  # what type checkers see; at run time the names load on first use
    from .optim import LAMB, SGD, Adagrad, Adam, AdamW, NAdam, RMSprop, dequantized_state_dict


def __getattr__(name):
    if name in ("kernels", "ddp"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    if name in __all__:
        try:
            from . import optim
        except ModuleNotFoundError as error:
            if error.name != "torch":
                raise
            raise ModuleNotFoundError(
                f"fastmomentum.{name} needs PyTorch, which is not installed: install torch "
                "(on a CPU-only machine: pip install torch==2.13.0) or the extra, "
                "pip install 'fastmomentum[torch]'. The kernels in fastmomentum.kernels "
                "work without it.",
                name="torch",
            ) from error
        return getattr(optim, name)
    raise AttributeError(f"module 'fastmomentum' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *__all__, "kernels", "ddp"})
