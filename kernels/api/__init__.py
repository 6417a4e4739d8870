"""The low-level API: one optimizer step on NumPy or GPU arrays, validated, then dispatched,
one module per family (as `kernels.rules`; the shared checks in `calls`).

The arrays decide where the step runs: NumPy arrays on the CPU kernels, GPU arrays (Numba
device arrays, ``__cuda_array_interface__`` objects such as torch CUDA tensors) on the
CUDA kernels on the arrays' GPU, queued on ``stream`` (a Numba stream, a raw
``cudaStream_t`` as an int, or an object with a ``cuda_stream`` attribute such as
``torch.cuda.Stream``; by default the stream the arrays' producer names: torch's current
stream for torch tensors, the array interface's ``stream`` otherwise, else the default
stream). Nothing is written unless every array and hyperparameter passes its
check, so a rejected call leaves all arrays as they were: ``TypeError`` names an
argument of the wrong type (hyperparameters are real numbers, flags are bools),
``ValueError`` one with an invalid value, with ``torch.optim``'s messages.
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
