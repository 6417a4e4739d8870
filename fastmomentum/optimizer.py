"""The shared base of fastmomentum's torch optimizers: param groups stepped in one launch
per bucket.

Subclasses say which state tensors they keep and how one bucket is updated; this class
does the rest as ``torch.optim.Optimizer`` does it: ``step(closure)`` with torch's
hooks, AMP's loss scale and skipped steps, ``zero_grad``, clipping, ``state_dict``.
Elsewhere: which parameters make a bucket (`grouping`), ``load_state_dict`` (`loading`,
with the checks and conversions of `checkpoint`), ``optimizer.state`` bound to our
memory (`binding`).
"""

import contextlib
import math
import sys

import numpy as np
import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from . import backward, binding, capture, casts, checkpoint, grouping, launches, loading
from .clipping import clip_grad_norm
from .kernels.tables import KAHAN, NEAREST, STOCHASTIC
from .quantized import INT8_BLOCKWISE, with_code_maps
from .quantized import keys as quantized_keys
from .storage import FirstIteration
from .validation import (
    check_fused_flags,
    check_implementation_options,
    check_master_weights,
    check_params,
    check_rounding_options,
    check_state_dtype,
)

#: The ``param_groups`` key of the seed of stochastic rounding (``rounding_seed``).
ROUNDING_SEED = "rounding_seed"


class FlatOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose step is one kernel launch per bucket.

    The parameters of every param group are grouped by (device, dtype) into
    `bucket.ParamBucket` objects; each step launches one multi-tensor kernel per bucket
    over its parameters and gradients where they lie. ``self.state[p]`` holds pieces of
    the buckets' state under torch's keys, so user code and ``state_dict`` see exactly
    what ``torch.optim`` shows.
    """

    #: Per-parameter scalar state in ``state[p]`` (0-dim CPU tensors, before the state
    #: tensors), name -> initial value: Adam's ``{"step": 0.0}``; none for SGD.
    scalar_state = {}

    @property
    def counts_steps(self):
        """Whether ``state[p]`` carries a ``"step"`` count."""
        return "step" in self.scalar_state

    #: ``torch.amp.GradScaler`` protocol of torch's fused optimizers: the scaler sets
    #: ``grad_scale`` (unless the user called ``unscale_``) and ``found_inf`` on the
    #: optimizer; the step skips itself on inf/NaN and unscales inside the kernel.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params,
        defaults,
        flat_gradients=False,
        state_dtype=None,
        fused_zero_grad=False,
        master_weights=False,
        step_in_backward=False,
        stochastic_rounding=False,
        kahan_sum=False,
        rounding_seed=None,
    ):
        # torch's order: its checks of the hyperparameters, then the parameters read
        # (its errors for them), then its checks of `fused`; ours come after, and all
        # before a parameter is adopted.
        self.check_arguments(defaults)
        check_rounding_options(stochastic_rounding, kahan_sum, master_weights, rounding_seed)
        self._stochastic_rounding, self._kahan_sum = stochastic_rounding, kahan_sum
        if stochastic_rounding:  # a group hyperparameter, so a state dict carries it
            defaults = {**defaults, ROUNDING_SEED: _seed(rounding_seed)}
        self._flat_gradients = flat_gradients
        self._state_dtype = state_dtype
        self._fused_zero_grad = bool(fused_zero_grad)
        self._master_weights = bool(master_weights)
        self._check_backward_options(step_in_backward, flat_gradients, fused_zero_grad)
        # the steps inside backward (`backward`); its buckets follow gradients' order
        self._backward = backward.BackwardSteps(self) if step_in_backward else None
        self.buckets = None  # per param group, its buckets (None: not made yet, see below)
        self._constructing = True  # `add_param_group` leaves its checks to the end
        super().__init__(params, defaults)
        del self._constructing
        self._first_iteration = FirstIteration(self._all_params())  # see storage
        check_fused_flags(defaults)
        self._check_options(state_dtype, master_weights)
        for group in self.param_groups:
            self.check_group(group)
            self.settings(group)  # e.g. a GPU tensor lr, AMSGrad with 8-bit state
        self.buckets = [self._make_buckets(i) for i in range(len(self.param_groups))]
        binding.track(self)
        self._watch_gradients()

    @staticmethod
    def _check_backward_options(step_in_backward, flat_gradients, fused_zero_grad):
        if not isinstance(step_in_backward, bool):
            raise TypeError(f"step_in_backward must be True or False, got {step_in_backward!r}")
        if step_in_backward and (flat_gradients or fused_zero_grad):
            option = "flat_gradients" if flat_gradients else "fused_zero_grad"
            raise ValueError(
                f"step_in_backward=True frees each gradient once its bucket has stepped; "
                f"{option}=True keeps gradients to be zeroed and reused: use one or the other"
            )

    @property
    def steps_in_backward(self):
        """Whether the step runs inside backward (``step_in_backward=True``)."""
        return self.__dict__.get("_backward") is not None

    def no_step(self):
        """A context in which backward passes accumulate gradients without stepping
        (``step_in_backward=True``; as DDP's ``no_sync``). The first backward outside
        it steps with the sum::

            with optimizer.no_step():
                loss_of(first_half).backward()
            loss_of(second_half).backward()  # steps with both halves' gradients

        Without ``step_in_backward`` backward never steps, and this does nothing."""
        if not self.steps_in_backward:
            return contextlib.nullcontext()
        return self._backward.paused()

    def _watch_gradients(self):
        if self.steps_in_backward:
            self._backward.watch(p for group in self.param_groups for p in group["params"])

    def _check_options(self, state_dtype, master_weights):
        """Our own constructor options: implemented for this optimizer, and together."""
        check_state_dtype(state_dtype)
        if master_weights and not self.supports_master_weights:
            raise ValueError(f"master_weights=True is not implemented for {type(self).__name__}")
        if master_weights and state_dtype is not None:
            raise ValueError("master_weights=True keeps float32 state; leave state_dtype None")
        if state_dtype == INT8_BLOCKWISE and not self.supports_quantized_state:
            raise ValueError(
                f"state_dtype={INT8_BLOCKWISE!r} is not implemented for {type(self).__name__}: "
                "its rules declare no 8-bit codes (fastmomentum.kernels.specs.KernelSpec.codes)"
            )

    # --- what a subclass says ---------------------------------------------------------

    #: Whether ``master_weights=True`` is implemented (the subclass exposes MASTER).
    supports_master_weights = False

    #: The parameter dtypes the optimizer steps (``None``: all that fastmomentum steps).
    param_dtypes = None

    #: Whether ``state_dtype="int8_blockwise"`` is implemented (`fastmomentum.quantized`).
    supports_quantized_state = False

    #: Whether ``capturable=True`` is implemented (`fastmomentum.capture`: its rule's
    #: spec has live coefficients, `kernels.capturable`).
    supports_capturable = False

    @property
    def quantized(self):
        """Whether the moments are block-wise 8-bit (``state_dtype="int8_blockwise"``)."""
        return self.__dict__.get("_state_dtype") == INT8_BLOCKWISE

    #: The update rule's per-parameter state tensors, in torch's order (Adam's
    #: ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``).
    rule_state = ()

    #: Those of `rule_state` kept with ``state_dtype="int8_blockwise"`` (``None``: all).
    quantized_rule_state = None

    #: Those of `rule_state` a parameter's state may lack (``max_exp_avg_sq``, kept as
    #: torch keeps it when AMSGrad is switched off, zero when it is switched on).
    optional_rule_state = ()

    @property
    def state_keys(self):
        """Every per-parameter state tensor's key, in torch's order: the rule's state
        (8-bit: every one's codes, then every one's absmax), ``master_param`` where
        master weights are implemented, then the 16-bit parameter's companions."""
        return self._keys(self.rule_state)

    @property
    def optional_state_keys(self):
        """Keys of `state_keys` a parameter's state may lack: `optional_rule_state`, and
        ``master_param`` (it starts as the parameter when a checkpoint has none) and the
        companions."""
        return self._keys(self.optional_rule_state)

    def _keys(self, names):
        if self.quantized:
            kept = self.quantized_rule_state
            names = names if kept is None else tuple(n for n in names if n in kept)
            return (*quantized_keys(names), *self.companion_keys)
        master = (launches.MASTER,) if self.supports_master_weights else ()
        return (*names, *master, *self.companion_keys)

    @property
    def companion_keys(self):
        """State keys of a 16-bit parameter's companion besides ``master_param``:
        ``kahan_comp`` with ``kahan_sum=True`` (`launches.KAHAN_COMP`)."""
        return (launches.KAHAN_COMP,) if self.__dict__.get("_kahan_sum") else ()

    @property
    def required_state_keys(self):
        """The state keys without which a parameter has no state."""
        return tuple(k for k in self.state_keys if k not in self.optional_state_keys)

    def state_names(self, group):
        """Keys of the state tensors a step of ``group`` uses, in torch's order: by
        default every one of `rule_state` (8-bit: their codes, then their absmax)."""
        return quantized_keys(self.rule_state) if self.quantized else self.rule_state

    def settings(self, group):
        """The group's hyperparameters as plain numbers and flags, read each step: the
        binding's ``Settings`` named tuple (fields named as the group's keys)."""
        raise NotImplementedError

    def update(self, group, bucket, settings, plan, grad_scale):
        """Step ``bucket``'s parameters as ``plan`` (a `launches.StepPlan`) lays them out.

        ``grad_scale`` is the AMP loss scale to divide gradients by, or ``None``.
        """
        raise NotImplementedError

    def reads_found_inf_on_host(self):
        """Whether this step reads GradScaler's ``found_inf`` on the host even though
        every group is capturable (`capture.every_group`; SGD where it makes buffers)."""
        return False

    def steps_cast_params(self, settings):
        """Whether torch.optim's for-loop steps a parameter cast to another dtype after its
        first step, its state still of the old dtype (SGD and Adagrad do; Adam's ``lerp``
        refuses the mixed dtypes, part-way through the parameters). Where it does,
        `step_cast` steps such parameters; where not, the step raises before any
        change."""
        return False

    def step_cast(self, group, settings, params, grads, state, steps):
        """Step ``params`` (cast after their first step) as torch.optim's for-loop does:
        ``grads`` their gradients (unscaled), ``state`` name -> their state tensors (the
        old dtype), ``steps`` their step counts (0-dim tensors) or ``None``."""
        raise NotImplementedError

    def fresh_state(self, group, bucket):
        """Fill ``bucket``'s state allocations, just zeroed, with what a parameter's
        state starts from (Adagrad's ``initial_accumulator_value``; zeros by default)."""

    def creates_state(self, settings):
        """Whether a step with these settings gives a parameter state (SGD without
        momentum keeps none, as in torch)."""
        return True

    def check_arguments(self, defaults):
        """Raise for invalid constructor hyperparameters, before the parameters are read:
        for an optimizer with a torch.optim namesake, its checks in its order with its
        messages (Tensor hyperparameters included). Only the constructor's: torch.optim
        steps whatever values a scheduler or user later puts in a param group, and so
        do we."""
        raise NotImplementedError

    # --- param groups -----------------------------------------------------------------

    def add_param_group(self, param_group):
        """Add a param group (as ``torch.optim``, which checks its parameters but not its
        hyperparameter values); nothing changes if a parameter is rejected."""
        add = torch.optim.Optimizer.add_param_group
        if "torch._dynamo" not in sys.modules:
            # torch's version imports torch._dynamo on first use (≈1 s here) only to keep
            # torch.compile from tracing it, and nothing compiles before that import.
            add = add.__wrapped__
        add(self, param_group)
        if self.__dict__.get("_constructing"):
            return  # checked with the others once torch has read them all
        try:
            self.check_group(self.param_groups[-1])
        except Exception:
            self.param_groups.pop()
            raise
        if self.buckets is not None:  # after construction; the constructor adds them all
            self.buckets.append(self._make_buckets(len(self.param_groups) - 1))
            self._watch_gradients()

    def check_appended_group(self, group):
        """Take a group appended to ``param_groups`` directly (not through
        ``add_param_group``), as torch.optim steps one: its parameters as a list, the
        defaults it lacks filled in, and checked as ``add_param_group`` checks them
        (a parameter in an earlier group too is allowed here: torch steps it once per
        group). Raises before anything changes."""
        params = group["params"]
        if isinstance(params, torch.Tensor):
            group["params"] = [params]
        elif not isinstance(params, list):
            group["params"] = list(params)
        for name, default in self.defaults.items():
            group.setdefault(name, default)
        self.check_group(group)

    def check_group(self, group):
        """Raise unless the group's options and parameters are ones we step (torch's
        `add_param_group` checks come first); hyperparameter values are not checked."""
        check_implementation_options(group, self.supports_capturable)
        check_params(group["params"])
        capture.check_group(self, group)
        check_state_dtype(self.__dict__.get("_state_dtype"), group["params"])
        self._check_param_dtypes(group["params"])
        if self.__dict__.get("_master_weights"):
            check_master_weights(group["params"])
        for option in ("stochastic_rounding", "kahan_sum"):
            if self.__dict__.get(f"_{option}"):
                check_master_weights(group["params"], f"{option}=True")
        if self.steps_in_backward:
            backward.check_params(self, group)

    def _check_param_dtypes(self, params):
        if self.param_dtypes is None:
            return
        for position, param in enumerate(params):
            if param.dtype not in self.param_dtypes:
                names = ", ".join(str(d).removeprefix("torch.") for d in self.param_dtypes)
                raise ValueError(
                    f"parameter {position} is {param.dtype}; {type(self).__name__} steps "
                    f"{names} parameters"
                )

    def _make_buckets(self, group_index):
        return grouping.make_buckets(self, group_index)

    def _buckets_now(self, stepping=False):
        return grouping.buckets_now(self, stepping)

    # --- the step ---------------------------------------------------------------------

    def step(self, closure=None):
        """One optimization step; ``closure`` (optional) reruns the model and returns the loss."""
        if torch.compiler.is_compiling():
            # Inside a function that torch.compile traces: the Numba kernels cannot be
            # traced, so the step runs eagerly, a graph break (torch.compiler.disable).
            return torch.compiler.disable(self._eager_step)(closure)
        return self._eager_step(closure)

    def _eager_step(self, closure):
        if self.steps_in_backward:
            return self._step_left(closure)
        if type(self).step is FlatOptimizer.step and self._step_is_observed():
            return self._observed_step(closure)
        return self._step(closure)  # (a subclass's own step is wrapped by torch already)

    # torch.optim wraps every optimizer's ``step`` in a function that runs the step hooks
    # and opens a profiler range: ≈9 µs a step here, as much as our whole step costs on a
    # small model. Marked as hooked, our ``step`` is left alone and takes that same
    # wrapper only when a hook is registered or the profiler is running.
    step.hooked = True

    def _step_left(self, closure):
        """``step()`` with ``step_in_backward``: the backward (the closure's, if given)
        stepped already and freed the gradients, so this steps only gradients left
        over (those accumulated inside `no_step`), with the step hooks, then frees
        them; with none left, it does nothing."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        backward.refuse_scaler(self)
        if any(p.grad is not None for group in self.param_groups for p in group["params"]):
            if self._backward.by_ddp:
                raise RuntimeError(
                    "step() found gradients left after a backward that did not step: with "
                    "fastmomentum.ddp.step_after_all_reduce, those of a backward inside "
                    "DDP's no_sync() are this process's own, never all-reduced. Run the "
                    "next backward outside no_sync() (and optimizer.no_step()): it "
                    "all-reduces the sum and steps it"
                )
            if self._step_is_observed():
                self._observed_step()
            else:
                self._step()
            backward.free_gradients(self)
        return loss

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
        amp_on_device = capture.every_group(self)  # the kernels read found_inf and the scale
        if found_inf is not None and not amp_on_device and found_inf.item():
            if self._fused_zero_grad:  # the step zeroes the gradients even when skipped:
                self._zero_grads_in_place()  # inf would stay in what backward adds to
            return loss  # GradScaler found inf/NaN gradients: nothing moves, as in torch
        grad_scale = getattr(self, "grad_scale", None)
        grad_scale = None if grad_scale is None or amp_on_device else float(grad_scale)
        all_buckets = self._buckets_now(stepping=True)
        if binding.state_changed(self):
            binding.bind_state(self)  # user code replaced, edited or cleared entries
        capture.place_counts(self, lambda group, bucket: binding.expose_again(self, group, bucket))
        all_settings = [self.settings(group) for group in self.param_groups]
        # Every tensor of every bucket is looked at and checked before any update. (No
        # torch op runs here that autograd could record: no_grad only where one does.)
        plans = self._plan_all(all_buckets)
        casts.refuse_unsteppable(self, all_settings, plans)
        for group, settings, group_plans in zip(self.param_groups, all_settings, plans):
            for bucket, bucket_plans in group_plans:
                self._step_bucket(group, settings, bucket, bucket_plans, grad_scale)
        if grad_scale is not None and not self._fused_zero_grad:
            self._unscale_grads(grad_scale)
        elif amp_on_device and not self._fused_zero_grad:
            capture.unscale_grads(self, self._grads_to_touch())
        if self._fused_zero_grad and self._flat_gradients:
            self._adopt_zeroed_grads(all_buckets)
        return loss

    def _step_bucket(self, group, settings, bucket, bucket_plans, grad_scale=None):
        """Carry out the plans of one bucket (checked already, with every other bucket's
        of this step): one launch per plan, then its new state exposed."""
        for plan in bucket_plans:
            if plan is None:
                continue
            plan.commit()
            if plan.rows:
                if self._param_store != NEAREST:
                    self._prepare_rounding(group, bucket)
                if bucket.master:
                    bucket.sync_masters(plan.rows)
                self.update(group, bucket, settings, plan, grad_scale)
                if bucket.master:
                    bucket.note_written(plan.rows)
            if plan.cast_rows:
                casts.step_rows(self, group, bucket, settings, plan.cast_rows, grad_scale)
        first = bucket_plans[0]
        if first is not None and (self.creates_state(settings) or self._kahan_sum):
            binding.expose_new_state(self, group, bucket, first.rows)
        elif first is not None and bucket.master:
            binding.expose_masters(self, bucket, first.rows)
        if not bucket.adopted:
            with torch.no_grad():
                bucket.adopt()
        self._first_iteration.stepped = True  # every way to step comes here (DDP's too)

    def _all_params(self):
        return [param for group in self.param_groups for param in group["params"]]

    @property
    def _param_store(self):
        """How the kernels store new parameters (`kernels.tables`): `STOCHASTIC` with
        ``stochastic_rounding``, `KAHAN` with ``kahan_sum``, else `NEAREST` (master
        weights: the bucket says, `launches.param_store`)."""
        if self.__dict__.get("_stochastic_rounding"):
            return STOCHASTIC
        return KAHAN if self.__dict__.get("_kahan_sum") else NEAREST

    def _prepare_rounding(self, group, bucket):
        """Tell ``bucket`` how its parameters are stored and, for stochastic rounding,
        the group's seed and each parameter's key: its position among all parameters
        of all groups (as a state dict numbers them), so that the random bits do not
        depend on which bucket a parameter is in (``step_in_backward`` makes others)."""
        bucket.param_store = self._param_store
        if bucket.param_store != STOCHASTIC:
            return
        # a torch.optim checkpoint loaded has no seed in its groups: the constructor's
        bucket.rounding_seed = int(group.setdefault(ROUNDING_SEED, self.defaults[ROUNDING_SEED]))
        if bucket.__dict__.get("rounding_keys") is None:
            positions = {}
            for param in (p for g in self.param_groups for p in g["params"]):
                positions.setdefault(param, len(positions))
            bucket.rounding_keys = np.array([positions[p] for p in bucket.params], np.uint64)

    @torch.no_grad()
    def _adopt_zeroed_grads(self, all_buckets):
        """With ``flat_gradients``, gradients that are not yet pieces of our allocation
        (autograd's first ones) become zeroed pieces, as ``zero_grad(set_to_none=False)``
        makes them; once they are, this is one check a step."""
        for buckets in all_buckets:
            for bucket in buckets:
                if not bucket.gradients.all_ours():
                    bucket.gradients.zero(set_to_none=False)

    _observed_step = torch.optim.Optimizer.profile_hook_step(_step)

    def _plan_all(self, all_buckets):
        """Per group, ``(bucket, plans)`` for what it steps (`grouping.stepped_units`); a
        group with a parameter cast, moved or reshaped before it had state
        (``model.double()`` after the optimizer was made) is bucketed again first, as
        torch.optim would simply step it."""
        for _ in range(len(all_buckets) + 1):
            try:
                return [
                    [(bucket, _plan(bucket, passes)) for bucket, passes in units]
                    for units in grouping.stepped_units(all_buckets)
                ]
            except launches.Remake as remake:
                index = next(i for i, b in enumerate(all_buckets) if remake.bucket in b)
                self.buckets[index] = None  # made again, state bound, by `_buckets_now`
                all_buckets = self._buckets_now(stepping=True)
        raise RuntimeError("parameters kept changing while their buckets were made")

    @torch.no_grad()
    def _unscale_grads(self, grad_scale):
        """Leave the gradients unscaled after an AMP step, as torch's fused optimizers do."""
        grads = self._grads_to_touch()
        if grads:
            torch._foreach_mul_(grads, 1.0 / grad_scale)

    @torch.no_grad()
    def _zero_grads_in_place(self):
        for grad in self._grads_to_touch():
            grad.zero_()

    def _grads_to_touch(self, whole=True):
        return [
            grad
            for buckets in self._buckets_now()
            for bucket in buckets
            for grad in bucket.gradients.to_touch(whole)
        ]

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
        if self.steps_in_backward:
            raise RuntimeError(
                "clip_grad_norm_ with step_in_backward=True: the norm over all gradients "
                "exists only once backward is done, and by then every bucket has stepped "
                "and freed its gradients (torch.nn.utils.clip_grad_norm_ would find none). "
                "Use step_in_backward=False to clip by the global norm"
            )
        # The infinity norm of an empty gradient is an error in torch, which a flat
        # allocation would hide: that norm goes gradient by gradient.
        whole = not math.isinf(float(norm_type))
        grads = self._grads_to_touch(whole)
        return clip_grad_norm(grads, max_norm, norm_type, error_if_nonfinite)

    def zero_grad(self, set_to_none=True):
        """Reset the gradients: to ``None`` (default) or to zero in place, as ``torch.optim``."""
        with torch.no_grad():
            for buckets in self._buckets_now():
                for bucket in buckets:
                    bucket.gradients.zero(set_to_none)
                for param in buckets.meta:  # not materialized yet: in no bucket
                    if set_to_none:
                        param.grad = None
                    elif param.grad is not None:
                        param.grad.zero_()
        if set_to_none:
            self._first_iteration.gradients_freed()

    # --- checkpoints ------------------------------------------------------------------

    def state_dict(self):
        """``torch.optim``'s state dict, with copies of the state tensors."""
        self._buckets_now()
        if binding.state_changed(self):
            binding.bind_state(self)  # e.g. an entry cleared since the last step: as in
            # torch, the checkpoint shows what the next step would start from
        saved = checkpoint.copy_state(super().state_dict())
        return with_code_maps(saved) if self.quantized else saved

    def load_state_dict(self, state_dict):
        """Load a ``torch.optim`` or fastmomentum state dict (`loading.load_state_dict`)."""
        loading.load_state_dict(self, state_dict)

    def __getstate__(self):
        return {
            **super().__getstate__(),
            "_flat_gradients": self._flat_gradients,
            "_state_dtype": self._state_dtype,
            "_fused_zero_grad": self._fused_zero_grad,
            "_master_weights": self._master_weights,
            "_step_in_backward": self.steps_in_backward,
            "_stochastic_rounding": self._stochastic_rounding,
            "_kahan_sum": self._kahan_sum,
        }

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for name, default in self.defaults.items():
                group.setdefault(name, default)
        self.__dict__.setdefault("_fused_zero_grad", False)
        self.__dict__.setdefault("_master_weights", False)
        self.__dict__.setdefault("_stochastic_rounding", False)
        self.__dict__.setdefault("_kahan_sum", False)
        self.__dict__.setdefault("_first_iteration", FirstIteration(self._all_params()))
        if "buckets" not in self.__dict__:  # unpickled or deep-copied: rebuild the buckets
            in_backward = self.__dict__.pop("_step_in_backward", False)
            self._backward = backward.BackwardSteps(self) if in_backward else None
            self.buckets = [self._make_buckets(i) for i in range(len(self.param_groups))]
            binding.bind_state(self)
            self._watch_gradients()


def _seed(rounding_seed):
    """The seed of stochastic rounding: ``rounding_seed``, or by default 62 bits drawn
    from torch's default generator (``torch.manual_seed`` makes it reproducible)."""
    if rounding_seed is not None:
        return int(rounding_seed)
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def _plan(bucket, passes):
    """The plans of a step of ``bucket``: one per entry of ``passes``, the rows it steps
    (``None``: every parameter with a gradient). torch's loop steps a parameter listed
    twice twice, the second time from the first's result."""
    return [bucket.planner.plan(rows) for rows in passes]
