"""The shared base of fastmomentum's torch optimizers: param groups stepped in one launch
per bucket.

Subclasses say which state tensors they keep and how one bucket is updated; this class
does the rest as ``torch.optim.Optimizer`` does it: param groups, ``add_param_group``,
``step(closure)`` with torch's hooks, ``zero_grad``, ``state_dict`` and
``load_state_dict`` in torch's format (checks in `checkpoint`, the binding of
``optimizer.state`` to our memory in `binding`).
"""

import sys

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from . import binding, checkpoint
from .bucket import ParamBucket
from .clipping import clip_grad_norm
from .storage import is_dtensor, local
from .validation import check_implementation_options, check_params


class FlatOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose step is one kernel launch per bucket.

    The parameters of every param group are grouped by (device, dtype) into
    `bucket.ParamBucket` objects; each step launches one multi-tensor kernel per bucket
    over its parameters and gradients where they lie. ``self.state[p]`` holds pieces of
    the buckets' state under torch's keys, so user code and ``state_dict`` see exactly
    what ``torch.optim`` shows.
    """

    #: Whether ``state[p]`` carries a ``"step"`` count (Adam) or not (SGD).
    counts_steps = False

    #: ``torch.amp.GradScaler`` protocol of torch's fused optimizers: the scaler sets
    #: ``grad_scale`` (unless the user called ``unscale_``) and ``found_inf`` on the
    #: optimizer; the step skips itself on inf/NaN and unscales inside the kernel.
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults, flat_gradients=False):
        check_implementation_options(defaults)
        self._flat_gradients = flat_gradients
        self.buckets = None  # per param group, its buckets: made once every group is valid
        self._checked = []  # per param group, the settings last found valid
        super().__init__(params, defaults)
        self.buckets = [self._make_buckets(i) for i in range(len(self.param_groups))]
        self._state_seen = (self.state, len(self.state))

    # --- what a subclass says ---------------------------------------------------------

    def state_names(self, group):
        """Names of the per-parameter state tensors ``group`` keeps, in torch's order."""
        raise NotImplementedError

    def settings(self, group):
        """The group's hyperparameters as a tuple of plain numbers and flags, read each step."""
        raise NotImplementedError

    def check_settings(self, settings):
        """Raise ``ValueError`` for invalid hyperparameters (torch's messages)."""
        raise NotImplementedError

    def update(self, group, bucket, settings, plan, grad_scale):
        """Step ``bucket``'s parameters as ``plan`` (a `launches.StepPlan`) lays them out.

        ``grad_scale`` is the AMP loss scale to divide gradients by, or ``None``.
        """
        raise NotImplementedError

    def creates_state(self, settings):
        """Whether a step with these settings gives a parameter state (SGD without
        momentum keeps none, as in torch)."""
        return True

    def check_group(self, group):
        self.check_settings(self.settings(group))

    # --- param groups -----------------------------------------------------------------

    def add_param_group(self, param_group):
        """Add a param group (as ``torch.optim``); its parameters are checked first and
        nothing changes if one is rejected."""
        add = torch.optim.Optimizer.add_param_group
        if "torch._dynamo" not in sys.modules:
            # torch's version imports torch._dynamo on first use (≈1 s here) only to keep
            # torch.compile from tracing it, and nothing compiles before that import.
            add = add.__wrapped__
        add(self, param_group)
        group = self.param_groups[-1]
        try:
            self.check_group(group)
            check_implementation_options(group)
            check_params(group["params"])
        except Exception:
            self.param_groups.pop()
            raise
        self._checked.append(None)
        if self.buckets is not None:  # after construction; the constructor adds them all
            self.buckets.append(self._make_buckets(len(self.param_groups) - 1))

    def _make_buckets(self, group_index):
        """The group's buckets, their parameters adopted where nothing else sees them."""
        members = {}
        for position, param in enumerate(self.param_groups[group_index]["params"]):
            name = f"parameter {position} of param group {group_index}"
            kind = (local(param).device, param.dtype, is_dtensor(param))
            members.setdefault(kind, []).append((param, name))
        flat = self.__dict__.get("_flat_gradients", False)
        buckets = [ParamBucket(*zip(*pairs), flat) for pairs in members.values()]
        with torch.no_grad():
            for bucket in buckets:
                bucket.adopt()
                if flat:
                    bucket.gradients.adopt()
        return buckets

    # --- the step ---------------------------------------------------------------------

    def step(self, closure=None):
        """One optimization step; ``closure`` (optional) reruns the model and returns the loss."""
        if torch.compiler.is_compiling():
            # Inside a function that torch.compile traces: the Numba kernels cannot be
            # traced, so the step runs eagerly, a graph break (torch.compiler.disable).
            return torch.compiler.disable(self._eager_step)(closure)
        return self._eager_step(closure)

    def _eager_step(self, closure):
        if type(self).step is FlatOptimizer.step and self._step_is_observed():
            return self._observed_step(closure)
        return self._step(closure)  # (a subclass's own step is wrapped by torch already)

    # torch.optim wraps every optimizer's ``step`` in a function that runs the step hooks
    # and opens a profiler range: ≈9 µs a step here, as much as our whole step costs on a
    # small model. Marked as hooked, our ``step`` is left alone and takes that same
    # wrapper only when a hook is registered or the profiler is running.
    step.hooked = True

    def _step_is_observed(self):
        return bool(
            self._optimizer_step_pre_hooks
            or self._optimizer_step_post_hooks
            or _global_optimizer_pre_hooks
            or _global_optimizer_post_hooks
            or torch.autograd._profiler_enabled()
        )

    def _step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and found_inf.item():
            return loss  # GradScaler found inf/NaN gradients: nothing moves, as in torch
        grad_scale = getattr(self, "grad_scale", None)
        grad_scale = None if grad_scale is None else float(grad_scale)
        seen_state, seen_size = self._state_seen
        if self.state is not seen_state or len(self.state) != seen_size:
            binding.bind_state(self)  # user code replaced the dict, cleared it or deleted
            # entries (an entry replaced in place, `state[p] = {}`, is not seen yet)
        all_settings = []
        for index, group in enumerate(self.param_groups):
            settings = self.settings(group)
            if settings != self._checked[index]:  # checked once, not every step
                self.check_settings(settings)
                self._checked[index] = settings
            all_settings.append(settings)
        # Every tensor of every bucket is looked at and checked before any update. (No
        # torch op runs here that autograd could record: no_grad only where one does.)
        plans = [[bucket.planner.plan() for bucket in buckets] for buckets in self.buckets]
        for group, settings, buckets, group_plans in zip(
            self.param_groups, all_settings, self.buckets, plans
        ):
            for bucket, plan in zip(buckets, group_plans):
                if plan is not None:
                    plan.commit()
                    self.update(group, bucket, settings, plan, grad_scale)
                    if self.creates_state(settings):
                        binding.expose_new_state(self, group, bucket, plan.rows)
        if grad_scale is not None:
            self._unscale_grads(grad_scale)
        self._state_seen = (self.state, len(self.state))
        return loss

    _observed_step = torch.optim.Optimizer.profile_hook_step(_step)

    @torch.no_grad()
    def _unscale_grads(self, grad_scale):
        """Leave the gradients unscaled after an AMP step, as torch's fused optimizers do."""
        grads = self._grads_to_touch()
        if grads:
            torch._foreach_mul_(grads, 1.0 / grad_scale)

    def _grads_to_touch(self):
        return [g for buckets in self.buckets for b in buckets for g in b.gradients.to_touch()]

    def cached_coefficients(self, bucket, key, compute):
        """``compute()``, the kernel coefficients for ``key`` (settings and loss scale),
        kept per bucket until the key changes."""
        if bucket.coefficients[0] != key:
            bucket.coefficients = (key, compute())
        return bucket.coefficients[1]

    # --- gradients --------------------------------------------------------------------

    def clip_grad_norm_(self, max_norm, norm_type=2.0, error_if_nonfinite=False):
        """``torch.nn.utils.clip_grad_norm_`` over this optimizer's parameters.

        Scales every gradient by ``min(1, max_norm / (total_norm + 1e-6))`` in place and
        returns the total norm. Where a bucket's gradients are all pieces of its flat
        gradient allocation, the norm and the scaling each take one pass over it.
        """
        return clip_grad_norm(self._grads_to_touch(), max_norm, norm_type, error_if_nonfinite)

    def zero_grad(self, set_to_none=True):
        """Reset the gradients: to ``None`` (default) or to zero in place, as ``torch.optim``."""
        with torch.no_grad():
            for buckets in self.buckets:
                for bucket in buckets:
                    bucket.gradients.zero(set_to_none)

    # --- checkpoints ------------------------------------------------------------------

    def state_dict(self):
        """``torch.optim``'s state dict, with copies of the state tensors."""
        return checkpoint.copy_state(super().state_dict())

    def load_state_dict(self, state_dict):
        """Load a ``torch.optim`` or fastmomentum state dict; values are copied into the
        buckets. Everything is checked first: on a mismatch nothing changes."""
        checkpoint.check_loadable(self, state_dict)
        super().load_state_dict(state_dict)
        self._checked = [None] * len(self.param_groups)
        binding.bind_state(self)
        self._state_seen = (self.state, len(self.state))

    def __getstate__(self):
        return {**super().__getstate__(), "_flat_gradients": self._flat_gradients}

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for name, default in self.defaults.items():
                group.setdefault(name, default)
        if "buckets" not in self.__dict__:  # unpickled or deep-copied: rebuild the buckets
            self.buckets = [self._make_buckets(i) for i in range(len(self.param_groups))]
            self._checked = [None] * len(self.param_groups)
            binding.bind_state(self)
            self._state_seen = (self.state, len(self.state))
