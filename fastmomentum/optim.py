"""The torch optimizers (importing this module imports torch)."""

from .adam import Adam, AdamW
from .nadam import NAdam
from .quantized import dequantized_state_dict
from .sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "NAdam", "dequantized_state_dict"]
