"""A bucket's gradients: ``zero_grad`` as torch does it, and ``flat_gradients``.

With ``flat_gradients=True`` gradients laid out like their parameter's state become
pieces of one allocation of ours (each a storage of its own) at construction and at
``zero_grad(set_to_none=False)``; backward then accumulates into them, and zeroing,
clipping and unscaling each take one pass over that allocation. A step never replaces
a gradient: it reads each where it lies (`launches.StepPlanner`).
"""

import torch

from .storage import Allocation


class Gradients:
    """The gradients of ``bucket``'s parameters."""

    def __init__(self, bucket, flat):
        self.bucket = bucket
        self.flat = flat and not bucket.distributed  # FSDP owns a DTensor's gradient
        self.allocation = None  # made when a gradient first becomes a piece of it

    def address(self, index):
        """Where parameter ``index``'s piece of the allocation lies (0 while there is none)."""
        if self.allocation is None:
            return 0
        return self.allocation.address_of(self.bucket.offsets[index])

    def all_ours(self):
        """Whether every gradient is its piece of our allocation."""
        if self.allocation is None:
            return False
        bucket = self.bucket
        for index, param in enumerate(bucket.params):
            grad = param.grad
            if grad is None or grad.layout != torch.strided:
                return False
            if grad.numel() == 0 and bucket.numels[index] == 0:
                continue  # torch gives an empty tensor the address 0, not its piece's
            if grad.data_ptr() != self.address(index) or grad.stride() != bucket.strides[index]:
                return False
        return True

    def to_touch(self, whole=True):
        """Every gradient once: the whole allocation if all gradients are its pieces (and
        ``whole``), else the gradients themselves."""
        if whole and self.all_ours() and self.bucket.size:
            return [self.allocation.flat]
        return [param.grad for param in self.bucket.params if param.grad is not None]

    def adopt(self):
        """Make each existing gradient laid out like its parameter's state a piece of the
        allocation (values copied)."""
        for index, param in enumerate(self.bucket.params):
            grad = param.grad
            if grad is not None and self._replaceable(index, grad):
                piece = self._piece(index)
                piece.copy_(grad)
                param.grad = piece

    def zero(self, set_to_none):
        """``zero_grad`` for these parameters, as ``torch.optim`` does it.

        With ``set_to_none=False`` gradients are zeroed in place; with ``flat`` those laid
        out like the parameter's state are instead replaced by zeroed pieces of the
        allocation (one pass), so backward accumulates there.
        """
        params = self.bucket.params
        if set_to_none:
            for param in params:
                param.grad = None
            return
        if all(param.grad is None for param in params):
            return
        if self.flat:
            self._allocation().flat.zero_()
            for index, param in enumerate(params):
                if param.grad is not None and self._replaceable(index, param.grad):
                    param.grad = self._piece(index)
        for index, param in enumerate(params):
            grad = param.grad
            if grad is None:
                continue
            if self.allocation is not None and grad.data_ptr() == self.address(index):
                continue  # a piece of the allocation, zeroed with it above
            if grad.grad_fn is not None:
                grad.detach_()
            else:
                grad.requires_grad_(False)
            grad.zero_()

    def _replaceable(self, index, grad):
        """Whether ``grad`` may become its piece of the allocation: laid out and typed
        like it (a parameter cast after construction keeps its own gradient)."""
        bucket = self.bucket
        return (
            self.flat
            and grad.layout == torch.strided
            and grad.dtype == bucket.dtype
            and grad.device == bucket.device
            and grad.shape == bucket.shapes[index]
            and grad.stride() == bucket.strides[index]
            and grad.data_ptr() != self.address(index)
        )

    def _allocation(self):
        if self.allocation is None:
            bucket = self.bucket
            self.allocation = Allocation(bucket.size, bucket.dtype, bucket.device)
        return self.allocation

    def _piece(self, index):
        bucket = self.bucket
        return self._allocation().piece(
            bucket.offsets[index], bucket.shapes[index], bucket.strides[index]
        )
