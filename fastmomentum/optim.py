"""The torch optimizers (importing this module imports torch)."""

from .adagrad import Adagrad
from .adam import Adam, AdamW
from .lamb import LAMB
from .nadam import NAdam
from .quantized import dequantized_state_dict
from .rmsprop import RMSprop
from .sgd import SGD

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
