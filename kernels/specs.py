"""What the kernels need to know of an update rule to apply it over arrays.

A `KernelSpec` describes one rule of `kernels.rules` by its argument order, which every rule
follows::

    rule(param, grad, *state, *coefficients, *entry, *flags, *entry_flags)
        -> new param                     (a rule without state)
        -> (new param, *new state, *computed)

(without ``new param`` for a rule that does not update the parameter, and without the
states it only reads; a single value is returned bare, not as a 1-tuple).

From a `KernelSpec` alone the element step (`kernels.elements.element`), the CPU loops
(`kernels.cpu`) and the CUDA kernels (`kernels.cuda`) are generated, and launched
through one function each (`cpu.launch`, `cuda.launch`): adding a rule adds no loop,
kernel or launcher. So are those over block-wise 8-bit state (`int8_blockwise`), from
the `KernelSpec.codes` it declares.
"""

import functools
from typing import NamedTuple

#: The kinds of 8-bit codes a state array may be kept in (`kernels.quantization`):
#: int8 for values of both signs, uint8 for non-negative ones.
SIGNED, UNSIGNED = "signed", "unsigned"


class KernelSpec(NamedTuple):
    """A rule and the arrays and values it takes.

    - ``rule``: the per-element function (``register_jitable``);
    - ``state``: the names of its state arrays, in its argument order (also the launch
      table's columns after param and grad);
    - ``coefficients``: the ``NamedTuple`` of the coefficients every entry shares;
    - ``entry``: the ``NamedTuple`` of the coefficients of each entry (a launch table's
      first entry values), or ``None``;
    - ``flags``: compile-time flags, one compiled loop per value (``nesterov``);
    - ``entry_flags``: flags of each entry (the entry values after ``entry``), for
      which each loop is written once per value so that every case vectorises;
    - ``optional``: ``(state array, flag)`` pairs: the flag without which that array is
      neither read nor written (and its column may be 0);
    - ``fastmath``: LLVM fast-math flags for the CPU loop;
    - ``updates_param``: whether the rule returns a new parameter (False: a first pass
      of a step in several, such as LAMB's direction);
    - ``read_only``: state arrays the rule reads but returns no new value for;
    - ``reads_grad``: False for a rule that ignores its ``grad`` (a later pass of a step
      in several, such as LAMB's update): its loops then never zero the gradient, which
      the first pass did;
    - ``computed``: names of values the rule returns after its new state that no array
      keeps (LAMB's direction ``update``, whose squares a launch sums);
    - ``squares``: values (``"param"``, state or ``computed`` names) whose sums of
      squares after the step each launch returns per entry, in float64 (LAMB's norms,
      in the same pass);
    - ``fused_rule``: the rule as torch's fused CPU step computes 16-bit parameters
      (where it rounds some multiply-adds once), with ``rule``'s arguments; the element
      step calls it instead of ``rule`` when the param array holds bfloat16 or float16
      (`precision.stored_in_16_bits`, a compile-time constant), not for a float32 master
      copy or float32 params with 16-bit state. ``None``: ``rule`` for every format.
    - ``blockwise_rule``: the rule as the 8-bit loops compute it (`int8_blockwise`
      makes it the rule), with ``rule``'s arguments: where no torch bits are to be
      matched, a division by a loop invariant may become a multiply by its reciprocal,
      and tests of coefficients (which LLVM leaves inside a vector loop) arithmetic.
      ``None``: ``rule``.
    - ``codes``: how each state array may be kept in 8 bits, ``(state array, kind)``
      pairs, kind `SIGNED` (a moment of both signs: ``exp_avg``) or `UNSIGNED` (a
      non-negative one: ``exp_avg_sq``); every state array or none;
    - ``blockwise``: the state arrays hold block-wise 8-bit codes, each with its array
      of absmax after them (the variant `int8_blockwise` makes).
    - ``live``: the rule's coefficients as the GPU computes them when no host value may
      change from one step to the next (``capturable=True``, `kernels.capturable`), a
      ``register_jitable`` function ``live(scalars, lr, inverse_scale, settings) ->
      (coefficients, entry, new scalars)`` in float64 (``entry``: the entry
      coefficients, then the entry flags as 0 or 1, unless ``live_entry_flags`` is
      False); ``None``: not capturable.
    - ``live_entry_flags``: whether ``live`` computes the entry flags; False: a capturable
      kernel reads them from the launch table, where the host sets them (SGD's
      ``first_step``, which depends on no count the device keeps).
    - ``live_settings``: the ``NamedTuple`` of the host's settings ``live`` takes;
    - ``scalars``: the per-entry scalar state ``live`` reads and advances (``"step"``,
      NAdam's ``"mu_product"``), one float each at an address of the launch table,
      after the state columns.
    - ``capturable``: the variant `kernels.capturable.capturable` makes, whose kernel
      computes its coefficients with ``live`` (CUDA only).
    - ``from_sums``: on CUDA, each segment's entry values are ``from_sums(values, sums,
      entry)``, from the per-entry sums of squares an earlier launch kept on the GPU
      (LAMB's trust ratio, `kernels.sums`); ``None``: the table's entry values.
    """

    name: str
    rule: object
    state: tuple = ()
    coefficients: type = None
    entry: type = None
    flags: tuple = ()
    entry_flags: tuple = ()
    optional: tuple = ()
    fastmath: frozenset = frozenset()
    updates_param: bool = True
    read_only: tuple = ()
    reads_grad: bool = True
    computed: tuple = ()
    squares: tuple = ()
    fused_rule: object = None
    blockwise_rule: object = None
    codes: tuple = ()
    blockwise: bool = False
    live: object = None
    live_settings: type = None
    live_entry_flags: bool = True
    scalars: tuple = ()
    capturable: bool = False
    from_sums: object = None

    def optional_flag(self, name):
        """The flag state array ``name`` needs, or ``None`` if it is always used."""
        return dict(self.optional).get(name)

    @property
    def entry_coefficient_count(self):
        """How many of an entry's values are `entry` coefficients (before entry flags)."""
        return len(self.entry._fields) if self.entry else 0

    @property
    def live_entry_width(self):
        """How many entry values ``live`` returns (`entry_width`, or only the
        coefficients without `live_entry_flags`)."""
        return self.entry_width if self.live_entry_flags else self.entry_coefficient_count

    @property
    def entry_width(self):
        """Values per entry in a launch table: the entry coefficients, then entry flags."""
        return self.entry_coefficient_count + len(self.entry_flags)

    def code_kind(self, name):
        """`SIGNED` or `UNSIGNED`: the codes state array ``name`` is kept in (8 bits)."""
        return dict(self.codes)[name]

    @property
    def written(self):
        """The state arrays the rule returns new values for (those it does not only read)."""
        return tuple(name for name in self.state if name not in self.read_only)


@functools.cache
def int8_blockwise(spec):
    """``spec`` over block-wise 8-bit state (`kernels.quantization`): a launch table's
    columns are param, grad, the codes of each state array (int8 or uint8, laid out
    like the parameter, as `KernelSpec.codes` says), then the absmax of each (float32, one
    per block of 256 elements counted from the entry's first element). A block is one
    thread's: it decodes each element's state, calls the rule, and encodes the new
    values on the block's new absmax. The rule is `KernelSpec.blockwise_rule` (else ``rule``)
    for every parameter format (no `KernelSpec.fused_rule`: torch has no 8-bit state to
    agree with). One object per ``spec`` (cached), so that launches find their variant by identity.
    Raises ``ValueError`` for a step whose codes do not cover its state, or whose
    optional state hangs on an entry flag (the loops leave a state out at compile
    time)."""
    kinds = dict(spec.codes)
    if not spec.state or set(kinds) != set(spec.state):
        raise ValueError(f"{spec.name}: codes {spec.codes} do not cover its state {spec.state}")
    if set(kinds.values()) - {SIGNED, UNSIGNED}:
        raise ValueError(f"{spec.name}: codes are {SIGNED!r} or {UNSIGNED!r}, got {spec.codes}")
    if any(flag not in spec.flags for _, flag in spec.optional):  # the loops branch on it
        raise ValueError(f"{spec.name}: 8-bit optional state needs flags, not entry flags")
    rule = spec.blockwise_rule or spec.rule
    return spec._replace(name=f"{spec.name}_int8", rule=rule, blockwise=True, fused_rule=None)
