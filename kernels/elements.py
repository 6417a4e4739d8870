"""One element of a step, read from and written back to memory: the rules of
`kernels.rules` applied at index ``i`` of the step's arrays.

The CPU loops and the CUDA kernels differ only in which indices a thread takes; each
calls these for every index it takes. `element` generates the function for a rule
from its `steps.Step`; the 8-bit ones below are written out. The arrays are whatever
indexes elements: typed pointers (`kernels.pointers`) in compiled code, NumPy views in
the CUDA simulator.
Elements are read as the coefficients' type and written back in their own format
(`kernels.precision`: bfloat16 and float16 arrays compute in float32, one rounding per
stored value). With ``clear_grad`` the gradient element is zeroed once read (zero is
all-zero bits in every format), in the same pass as the update. With ``mirrored`` the
param array is a float32 master copy and each new value is also stored, rounded, into
``mirror`` (the 16-bit parameter itself: master weights). Block-wise 8-bit state
(`kernels.quantization`) is decoded here and returned, not stored: its codes need the
new absmax of their whole block.
"""

import functools

from numba.extending import register_jitable

from . import rules
from .precision import load, store, stored_in_16_bits
from .quantization import decode_signed, decode_unsigned


@register_jitable
def _store_param(param, mirror, i, value, mirrored):
    store(param, i, value)
    if mirrored:
        store(mirror, i, value)


def element(step):
    """The element step of ``step`` (a `steps.Step`), generated from it once::

        <name>_at(i, param, grad, *state, coefficients, entry, *flags, *entry_flags,
                  clear_grad, mirror, mirrored)

    loads element ``i`` of param, grad and each state array, calls the rule with them,
    the coefficients, the entry's values (a tuple) and the flags, and stores what it
    returns. A state array that is ``optional`` on a flag is read and written only
    when that flag is set (the rule then gets another state value it ignores).
    """
    return _generated(step)


@functools.cache
def _generated(step):
    namespace = {"__name__": __name__, "RULE": step.rule, "FUSED_RULE": step.fused_rule}
    namespace.update(register_jitable=register_jitable, load=load, store=store)
    namespace.update(stored_in_16_bits=stored_in_16_bits)
    namespace.update(store_param=_store_param)
    exec(compile(element_source(step), __file__, "exec"), namespace)
    return namespace[f"{step.name}_at"]


def segment_source(step, indent):
    """The lines a generated CPU loop or CUDA kernel (`kernels.cpu.loop_source`,
    `kernels.cuda.kernel_source`) runs per segment before its elements, at ``indent``:
    a typed pointer per array of the entry, the entry's values as ``values`` and its
    entry flags, and a zero per sum of squares (``sum0``, …)."""
    width = step.entry_coefficient_count
    values = "".join(f"entry_values[entry, {k}], " for k in range(width))
    lines = [
        "param = pointer_to(addresses[entry, 0], stored_param)",
        "grad = pointer_to(addresses[entry, 1], stored_grad)",
    ]
    for column, name in enumerate(step.state, start=2):
        lines.append(f"{name} = pointer_to(addresses[entry, {column}], stored_state)")
    lines.append("mirror = pointer_to(addresses[entry, last], stored_mirror)")
    lines.append(f"values = ({values})")
    for offset, flag in enumerate(step.entry_flags, start=width):
        lines.append(f"{flag} = entry_values[entry, {offset}] != 0")
    lines += [f"sum{k} = 0.0" for k in range(len(step.squares))]
    return [indent + line for line in lines]


def element_source(step):
    """The source of `element` (readable: ``print(element_source(rules.adam.STEP))``)."""
    entry = step.entry_coefficient_count
    arguments = ["i", "param", "grad", *step.state, "coefficients", "entry"]
    arguments += [*step.flags, *step.entry_flags, "clear_grad", "mirror", "mirrored"]
    lines = [
        "@register_jitable",
        f"def {step.name}_at({', '.join(arguments)}):",
        "    like = coefficients[0]",
    ]
    values = ["load(param, i, like)", "load(grad, i, like)"]
    for position, name in enumerate(step.state):
        flag = step.optional_flag(name)
        if flag:  # when the flag is off, the rule gets (and ignores) a state always read
            required = [n for n in step.state[:position] if step.optional_flag(n) is None]
            fallback = required[-1] if required else "param"
            lines.append(f"    {name}_value = load({name} if {flag} else {fallback}, i, like)")
            values.append(f"{name}_value")
        else:
            values.append(f"load({name}, i, like)")
    values += ["*coefficients", *(f"entry[{k}]" for k in range(entry))]
    values += [*step.flags, *step.entry_flags]
    written = [name for name in step.state if name not in step.read_only]
    results = (["new_param"] if step.updates_param else []) + [f"new_{n}" for n in written]
    results += [f"new_{name}" for name in step.computed]
    call = f"{', '.join(results)} = {{}}({', '.join(values)})"  # one: returned bare
    if step.fused_rule is None:
        lines.append("    " + call.format("RULE"))
    else:  # a constant condition where compiled: one of the two calls is left
        lines += ["    if stored_in_16_bits(param):", "        " + call.format("FUSED_RULE")]
        lines += ["    else:", "        " + call.format("RULE")]
    if step.updates_param:
        lines.append("    store_param(param, mirror, i, new_param, mirrored)")
    for name in written:
        flag = step.optional_flag(name)
        indent = "    "
        if flag:
            lines.append(f"    if {flag}:")
            indent = "        "
        lines.append(f"{indent}store({name}, i, new_{name})")
    if step.reads_grad:
        lines += ["    if clear_grad:", "        grad[i] = 0"]
    if step.squares:  # the values the loop sums the squares of, after the step
        after = {"param": "new_param" if step.updates_param else "load(param, i, like)"}
        after.update((name, f"new_{name}") for name in (*written, *step.computed))
        lines.append(f"    return ({', '.join(after[name] for name in step.squares)},)")
    lines.append("")
    return "\n".join(lines)


@register_jitable
def adam_blockwise_at(
    i, param, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, coefficients,
    entry, clear_grad,
):  # fmt: skip
    """`adam_at` with 8-bit ``exp_avg`` and ``exp_avg_sq`` codes (`kernels.quantization`)
    of blocks with these absmax: stores the new param and returns the new
    ``(exp_avg, exp_avg_sq)`` for the caller to encode."""
    like = coefficients[0]
    second_moment = decode_unsigned(exp_avg_sq[i], exp_avg_sq_absmax)
    new_param, new_exp_avg, new_exp_avg_sq, _ = rules.adam.update(
        load(param, i, like),
        load(grad, i, like),
        decode_signed(exp_avg[i], exp_avg_absmax),
        second_moment,
        second_moment,
        *coefficients,
        entry[0],
        entry[1],
        False,
    )
    store(param, i, new_param)
    if clear_grad:
        grad[i] = 0
    return new_exp_avg, new_exp_avg_sq


@register_jitable
def sgd_momentum_blockwise_at(
    i, param, grad, velocity, velocity_absmax, coefficients, nesterov, first_step, clear_grad
):
    """`sgd_momentum_at` with an 8-bit momentum buffer (`kernels.quantization`) of a
    block with this absmax: stores the new param and returns the new buffer value for
    the caller to encode."""
    like = coefficients[0]
    new_param, new_velocity = rules.sgd.momentum(
        load(param, i, like),
        load(grad, i, like),
        decode_signed(velocity[i], velocity_absmax),
        *coefficients,
        nesterov,
        first_step,
    )
    store(param, i, new_param)
    if clear_grad:
        grad[i] = 0
    return new_velocity
