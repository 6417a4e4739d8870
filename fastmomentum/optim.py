"""The torch optimizers, all imported (importing this module imports torch): every class
of the registry (`fastmomentum.capabilities`) and `dequantized_state_dict`."""

import fastmomentum as _package

__all__ = list(_package.__all__)
globals().update({name: getattr(_package, name) for name in __all__})
