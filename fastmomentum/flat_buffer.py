"""Flat buffers: the parameters of one (param group, device, dtype) in one storage.

Each ``Parameter``'s ``.data`` is re-pointed to a view into ``values`` with its shape
and dense strides kept (a ``channels_last`` weight stays ``channels_last``). Gradients
and every optimizer state get the same layout, so one kernel call updates every
parameter of the buffer in one pass over memory.
"""

import torch

from .dlpack import as_array


def step_dtype():
    """The dtype of ``state["step"]``, as ``torch.optim`` picks it (non-fused)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def dense_strides(tensor):
    """Strides of a dense tensor laid out like ``tensor`` (``preserve_format``)."""
    return torch.empty_like(tensor, device="meta", memory_format=torch.preserve_format).stride()


class FlatBuffer:
    """Values, gradients and state of some parameters, each in one contiguous tensor.

    ``offsets[i]`` is where parameter ``i`` starts in every flat tensor. Gradients live
    in ``grads``; after a step each parameter's ``.grad`` is a view into it, so autograd
    accumulates there in place. A gradient that user code (or ``zero_grad``) replaced is
    copied in at the next step.
    """

    def __init__(self, params, names):
        first = params[0]
        self.params = list(params)
        self.names = list(names)  # "parameter 3 of param group 0", for error messages
        self.initialized = [False] * len(self.params)  # has optimizer state (torch's ``state[p]``)
        self.all_initialized = False
        self.coefficients = (None, None)  # (hyperparameters, kernel coefficients) of last step
        self.device, self.dtype = first.device, first.dtype
        self.numels = [p.numel() for p in self.params]
        self.offsets = [0]
        for numel in self.numels:
            self.offsets.append(self.offsets[-1] + numel)
        self.size = total = self.offsets.pop()
        self.values = torch.empty(total, dtype=self.dtype, device=self.device)
        self.grads = torch.zeros_like(self.values)
        self.grad_views = [self.view_of(self.grads, i) for i in range(len(self.params))]
        self.steps = torch.zeros(len(self.params), dtype=step_dtype())  # per-parameter t
        self._state = {}
        self._arrays = {}
        self._data_ptrs = [0] * len(self.params)
        with torch.no_grad():
            for index in range(len(self.params)):
                self.adopt_param(index)
                if self.params[index].grad is not None:
                    self.adopt_grad(index)

    def view_of(self, flat, index):
        """Parameter ``index``'s view into the flat tensor ``flat``."""
        param = self.params[index]
        return flat.as_strided(param.shape, dense_strides(param), self.offsets[index])

    def adopt_param(self, index):
        """Copy parameter ``index`` into ``values`` and re-point its ``.data`` there."""
        param = self.params[index]
        view = self.view_of(self.values, index)
        view.copy_(param.data)
        param.data = view
        self._data_ptrs[index] = param.data_ptr()

    def adopt_grad(self, index):
        """Copy parameter ``index``'s gradient into ``grads`` and make ``.grad`` a view there."""
        param, view = self.params[index], self.grad_views[index]
        view.copy_(param.grad)
        param.grad = view

    def bound(self):
        """Whether every parameter's data and ``.grad`` are still views into this buffer.

        Then a step needs no checks and no copies: the fast path.
        """
        for param, grad_view, data_ptr in zip(self.params, self.grad_views, self._data_ptrs):
            if param.grad is not grad_view or param.data_ptr() != data_ptr:
                return False
        return True

    def check(self):
        """Raise before a step if a parameter or gradient can no longer be used."""
        for index, param in enumerate(self.params):
            expected = (self.dtype, self.device, self.grad_views[index].shape)
            if (param.dtype, param.device, param.shape) != expected:
                raise RuntimeError(
                    f"{self.names[index]} changed from {self.dtype} {tuple(expected[2])} on "
                    f"{self.device} to {param.dtype} {tuple(param.shape)} on {param.device} "
                    "after the optimizer was created; create the optimizer after moving or "
                    "casting the model"
                )
            grad = param.grad
            if grad is None or grad is self.grad_views[index]:
                continue
            if grad.is_sparse or grad.layout != torch.strided:
                raise TypeError(
                    f"{self.names[index]} has a sparse gradient; fastmomentum needs dense gradients"
                )
            if grad.dtype != self.dtype or grad.device != self.device or grad.shape != param.shape:
                raise ValueError(
                    f"{self.names[index]} has a gradient of {grad.dtype} {tuple(grad.shape)} on "
                    f"{grad.device}; expected {self.dtype} {tuple(param.shape)} on {self.device}"
                )

    def gather_grads(self):
        """Bring every parameter's data and gradient into the flat tensors (after `check`).

        Returns, per parameter, whether it has a gradient (parameters without one are
        skipped by the step, as in ``torch.optim``).
        """
        active = []
        for index, param in enumerate(self.params):
            if param.data_ptr() != self._data_ptrs[index]:
                self.adopt_param(
                    index
                )  # ``p.data`` was reassigned, e.g. load_state_dict(assign=True)
            grad = param.grad
            if grad is None:
                active.append(False)
                continue
            if grad is not self.grad_views[index]:
                self.adopt_grad(index)
            active.append(True)
        return active

    def zero_grads(self, set_to_none):
        """``zero_grad`` for these parameters, with ``torch.optim``'s semantics."""
        if set_to_none:
            for param in self.params:
                param.grad = None
            return
        own = False
        for index, param in enumerate(self.params):
            grad = param.grad
            if grad is None:
                continue
            if grad is self.grad_views[index]:
                own = True
                continue
            if grad.grad_fn is not None:
                grad.detach_()
            else:
                grad.requires_grad_(False)
            grad.zero_()
        if own:
            self.grads.zero_()  # one pass instead of one call per parameter

    def state(self, name):
        """The flat state tensor ``name`` (e.g. ``"exp_avg"``), zero-filled on first use."""
        if name not in self._state:
            self._state[name] = torch.zeros_like(self.values)
        return self._state[name]

    def array(self, name):
        """A NumPy view (zero-copy, DLPack) of ``values``, ``grads``, ``steps`` or a state."""
        if name not in self._arrays:
            flat = getattr(self, name) if name in ("values", "grads", "steps") else self.state(name)
            self._arrays[name] = as_array(flat)
        return self._arrays[name]

    def runs(self, active=None, keys=None):
        """Maximal ``(start, end, key)`` element ranges of adjacent active params sharing a key.

        ``active=None`` means every parameter, ``keys=None`` one key for all (given as
        None): then, the common case, the whole buffer is one range and one kernel call.
        """
        if active is None and keys is None:
            return [(0, self.size, None)] if self.size else []
        active = [True] * len(self.params) if active is None else active
        keys = [None] * len(self.params) if keys is None else keys
        runs = []
        for index, (is_active, key) in enumerate(zip(active, keys)):
            if not is_active:
                continue
            start = self.offsets[index]
            end = start + self.numels[index]
            if runs and runs[-1][2] == key and runs[-1][1] == start:
                runs[-1][1] = end
            else:
                runs.append([start, end, key])
        return [(start, end, key) for start, end, key in runs if end > start]
