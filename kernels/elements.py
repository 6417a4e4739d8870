"""One element of a step, read from and written back to memory: the rules of
`kernels.rules` applied at index ``i`` of the step's arrays.

The CPU loops and the CUDA kernels differ only in which indices a thread takes; each
calls these for every index it takes. `element` generates the function for a rule
from its `specs.KernelSpec`. The arrays are whatever indexes elements: typed pointers
(`kernels.pointers`) in compiled code, NumPy views in the CUDA simulator.
Elements are read as the coefficients' type and written back in their own format
(`kernels.precision`: bfloat16 and float16 arrays compute in float32, one rounding per
stored value). With ``clear_grad`` the gradient element is zeroed once read (zero is
all-zero bits in every format), in the same pass as the update. ``param_store`` (a
`kernels.tables` constant) says how the new parameter is stored and what ``companion``
and ``key`` are: `MIRRORED`, the param array is a float32 master copy and each new
value is also stored, rounded, into ``companion`` (the 16-bit parameter itself: master
weights); `KAHAN`, the rule computes on ``p + c`` (``c``: the element of the
compensation array ``companion``) and stores ``p ← round(y)``, ``c ← round(y − p)``;
`STOCHASTIC`, the new value is rounded stochastically with the random bits of element
``i`` under the entry's ``key`` (`precision.random_bits`). Block-wise 8-bit state
(`kernels.quantization`) is decoded here and returned, not stored: its codes need the
new absmax of their whole block.
"""

import functools

from numba.extending import register_jitable

from . import generated
from .precision import (
    as_stored,
    load,
    random_bits,
    stochastic_bits,
    store,
    store_stochastically,
    stored_in_16_bits,
)
from .quantization import decode_signed, decode_unsigned
from .tables import KAHAN, MIRRORED, STOCHASTIC
from .vectors import added, by_element, vector_load, vector_store, vector_store_bits


@register_jitable
def load_param(param, companion, i, like, param_store):
    """The parameter's value at ``i``: with `KAHAN`, ``p + c`` in the compute type."""
    if param_store == KAHAN:
        return load(param, i, like) + load(companion, i, like)
    return load(param, i, like)


@register_jitable
def vector_load_param(param, companion, i, count, param_store):
    """`load_param` of elements ``i`` to ``i + count − 1`` (`vectors.vector_load`)."""
    if param_store == KAHAN:
        return added(vector_load(param, i, count), vector_load(companion, i, count))
    return vector_load(param, i, count)


@register_jitable
def store_param(param, companion, i, value, param_store, key):
    """Store the new parameter ``value`` at ``i`` as ``param_store`` says (module doc)."""
    if param_store == STOCHASTIC:
        store_stochastically(param, i, value, random_bits(key, i))
    else:
        store(param, i, value)
    if param_store == MIRRORED:
        store(companion, i, value)
    elif param_store == KAHAN:  # what rounding p lost, itself rounded
        store(companion, i, value - load(param, i, value))


def element(spec):
    """The element step of ``spec`` (a `specs.KernelSpec`), generated from it once::

        <name>_at(i, param, grad, *state, coefficients, entry, *flags, *entry_flags,
                  clear_grad, companion, param_store, key)

    loads element ``i`` of param, grad and each state array, calls the rule with them,
    the coefficients, the entry's values (a tuple) and the flags, and stores what it
    returns. A state array that is ``optional`` on a flag is read and written only
    when that flag is set (the rule then gets another state value it ignores).

    Over block-wise 8-bit state (`specs.int8_blockwise`) it takes, after the state
    arrays' codes, the absmax of element ``i``'s block in each (``<state>_absmax``,
    values), decodes the state from them, and returns the new value of each state the
    rule writes (then those `specs.KernelSpec.squares` sums, as below) for the caller to
    encode on its block's new absmax.
    """
    return _generated(spec)


@functools.cache
def _generated(spec):
    namespace = _namespace(spec)
    generated.compile_into(namespace, "element", spec, element_source(spec))
    return namespace[f"{spec.name}_at"]


def segment_source(spec, indent, uniform=False):
    """The lines a generated CPU loop or CUDA kernel (`kernels.cpu.loop_source`,
    `kernels.cuda.kernel_source`) runs per segment before its elements, at ``indent``:
    a typed pointer per array of the entry (8-bit state: its codes, then its absmax as
    ``<state>_absmax``), the entry's values as ``values`` and its entry flags, and a
    zero per sum of squares (``sum0``, …). With ``uniform`` (CUDA), ``values`` is the
    argument ``uniform_values`` where the argument ``uniform`` is set: every entry's."""
    width = spec.entry_coefficient_count
    values = "".join(f"entry_values[entry, {k}], " for k in range(width))
    if uniform and width:
        values = f"uniform_values if uniform else ({values})"
    lines = [
        "param = pointer_to(addresses[entry, 0], stored_param)",
        "grad = pointer_to(addresses[entry, 1], stored_grad)",
    ]
    for column, name in enumerate(spec.state, start=2):
        kind = f"{spec.code_kind(name).upper()}_CODE_ZERO" if spec.blockwise else "stored_state"
        lines.append(f"{name} = pointer_to(addresses[entry, {column}], {kind})")
    if spec.blockwise:  # each state's absmax, after every state's codes
        for column, name in enumerate(spec.state, start=2 + len(spec.state)):
            lines.append(f"{name}_absmax = pointer_to(addresses[entry, {column}], ABSMAX_ZERO)")
    lines.append("companion = pointer_to(addresses[entry, last], stored_companion)")
    lines.append("key = addresses[entry, last]  # the random key, when STOCHASTIC")
    lines.append(f"values = ({values})")
    for offset, flag in enumerate(spec.entry_flags, start=width):
        lines.append(f"{flag} = entry_values[entry, {offset}] != 0")
    lines += [f"sum{k} = 0.0" for k in range(len(spec.squares))]
    return [indent + line for line in lines]


def element_source(spec):
    """The source of `element` (readable: ``print(element_source(rules.adam.SPEC))``)."""
    arguments = ["i", "param", "grad", *spec.state]
    arguments += [f"{name}_absmax" for name in spec.state if spec.blockwise]
    arguments += ["coefficients", "entry", *spec.flags, *spec.entry_flags]
    arguments += ["clear_grad", "companion", "param_store", "key"]
    lines = [
        "@register_jitable",
        f"def {spec.name}_at({', '.join(arguments)}):",
        "    like = coefficients[0]",
    ]
    read, values = _loads(spec)
    current = "load_param(param, companion, i, like, param_store)"
    return "\n".join(lines + read + _update(spec, values, current) + [""])


def split(spec, counts=(2, 4, 8)):
    """`element` of a spec that is not block-wise, in generated functions::

        <name>_loads(i, param, grad, *state, coefficients, *flags, companion, param_store)
        <name>_vector_loads(i, count, param, grad, *state, coefficients, *flags,
                            companion, param_store)
        <name>_update(i, loaded, param, grad, *state, coefficients, entry, *flags,
                      *entry_flags, clear_grad, companion, param_store, key)
        <name>_vector_update<count>(i, loaded, <the arguments of _update after it>)

    ``_loads`` returns the values element ``i`` of each array holds (a tuple), and
    ``_update`` computes the rule on them and stores what it returns, as `element`
    does: a CUDA thread loads several elements before it stores the first
    (`kernels.cuda.kernel_source`). ``_vector_loads`` returns what ``_loads`` returns
    for each of the elements ``i`` to ``i + count − 1`` (a tuple of them), read with
    one vector load per array (`vectors.vector_load`: ``count`` a literal, each array
    aligned to ``count`` elements at ``i``), and ``_vector_update<count>``, one for
    each of ``counts``, computes the rule on each of them and stores the new values
    of each array with one vector store (`vectors.vector_store`; every array it
    stores aligned as for the loads, the companion too where it is stored: mirrored
    or Kahan; a stochastically rounded param's bits by `vectors.vector_store_bits`). It
    returns, where the spec sums squares, the values `_update` returns, a tuple per
    element. The values summed (`specs.KernelSpec.squares`) of a param the step does
    not update are those loaded. Each array's elements are rounded and stored as
    `_update` stores them, so the two give the same bits."""
    return _generated_split(spec, tuple(counts))


@functools.cache
def _generated_split(spec, counts):
    namespace = _namespace(spec)
    generated.compile_into(namespace, "element_split", spec, split_source(spec, counts))
    names = ("loads", "vector_loads", "update")
    functions = tuple(namespace[f"{spec.name}_{name}"] for name in names)
    return (*functions, {count: namespace[f"{spec.name}_vector_update{count}"] for count in counts})


def split_source(spec, counts=(2, 4, 8)):
    """The source of `split` (readable: ``print(split_source(rules.adam.SPEC))``)."""
    if spec.blockwise:
        raise ValueError(f"{spec.name}: block-wise state is not split")
    arrays = ["i", "param", "grad", *spec.state]
    loads = [*arrays, "coefficients", *spec.flags, "companion", "param_store"]
    read, values = _loads(spec)
    vector_read, vector_values = _loads(spec, vector=True)
    names = [f"loaded{k}" for k in range(len(values))]
    update = [arrays[0], "loaded", *arrays[1:], "coefficients", "entry", *spec.flags]
    update += [*spec.entry_flags, "clear_grad", "companion", "param_store", "key"]
    lines = [
        "@register_jitable",
        f"def {spec.name}_loads({', '.join(loads)}):",
        "    like = coefficients[0]",
        *read,
        f"    return ({', '.join(values)},)",
        "",
        "",
        "@register_jitable",
        f"def {spec.name}_vector_loads({', '.join([arrays[0], 'count', *loads[1:]])}):",
        *vector_read,
        f"    return by_element(({', '.join(vector_values)},))",
        "",
        "",
        "@register_jitable",
        f"def {spec.name}_update({', '.join(update)}):",
        f"    {', '.join(names)}, = loaded",
        *_update(spec, names, names[0]),
    ]
    for count in counts:
        lines += ["", "", *_vector_update(spec, count, update)]
    return "\n".join(lines + [""])


def _namespace(spec):
    """What the generated element steps refer to."""
    namespace = {"__name__": __name__, "RULE": spec.rule, "FUSED_RULE": spec.fused_rule}
    namespace.update(register_jitable=register_jitable, load=load, store=store)
    namespace.update(stored_in_16_bits=stored_in_16_bits)
    namespace.update(load_param=load_param, store_param=store_param)
    namespace.update(vector_load=vector_load, vector_load_param=vector_load_param)
    namespace.update(by_element=by_element, vector_store=vector_store, as_stored=as_stored)
    namespace.update(vector_store_bits=vector_store_bits, stochastic_bits=stochastic_bits)
    namespace.update(random_bits=random_bits)
    namespace.update(STOCHASTIC=STOCHASTIC, MIRRORED=MIRRORED, KAHAN=KAHAN)
    namespace.update(decode_signed=decode_signed, decode_unsigned=decode_unsigned)
    return namespace


def _loads(spec, vector=False):
    """The lines that read element ``i`` before the rule (optional and 8-bit state), and
    the expressions of the values the rule takes after them, one per array; with
    ``vector``, of the elements ``i`` to ``i + count − 1``, a tuple per array."""
    lines = []
    if vector:
        current, load = "vector_load_param(param, companion, i, count, param_store)", _vector_load
    else:
        current, load = "load_param(param, companion, i, like, param_store)", _load
    values = [current, load("grad")]
    for position, name in enumerate(spec.state):
        flag = spec.optional_flag(name)
        if flag:  # when the flag is off, the rule gets (and ignores) a state always read
            required = [n for n in spec.state[:position] if spec.optional_flag(n) is None]
            lines.append(f"    {name}_value = {_optional_value(spec, name, flag, required, load)}")
            values.append(f"{name}_value")
        elif spec.blockwise:
            lines.append(f"    {name}_value = {_decoded(spec, name)}")
            values.append(f"{name}_value")
        else:
            values.append(load(name))
    return lines, values


def _load(array):
    """The expression of element ``i`` of ``array`` (a name or expression)."""
    return f"load({array}, i, like)"


def _vector_load(array):
    """The expression of elements ``i`` to ``i + count − 1`` of ``array``."""
    return f"vector_load({array}, i, count)"


def _rule_call(spec, values, suffix=""):
    """The lines that call the rule on ``values`` (`_loads`) into ``new_<name><suffix>``,
    one per value it returns (param, written state, computed values)."""
    lines = []
    values = [
        *values,
        "*coefficients",
        *(f"entry[{k}]" for k in range(spec.entry_coefficient_count)),
    ]
    values += [*spec.flags, *spec.entry_flags]
    results = (["new_param"] if spec.updates_param else []) + [f"new_{n}" for n in spec.written]
    results += [f"new_{name}" for name in spec.computed]
    results = [result + suffix for result in results]
    call = f"{', '.join(results)} = {{}}({', '.join(values)})"  # one: returned bare
    if spec.fused_rule is None:
        lines.append("    " + call.format("RULE"))
    else:  # a constant condition where compiled: one of the two calls is left
        lines += ["    if stored_in_16_bits(param):", "        " + call.format("FUSED_RULE")]
        lines += ["    else:", "        " + call.format("RULE")]
    return lines


def _squared(spec, current, suffix=""):
    """The expressions of the values whose squares the loop sums, after the step;
    ``current`` is the param's value if not updated."""
    after = {"param": f"new_param{suffix}" if spec.updates_param else current}
    after.update((name, f"new_{name}{suffix}") for name in (*spec.written, *spec.computed))
    return [after[name] for name in spec.squares]


def _vector_update(spec, count, arguments):
    """The lines of ``<name>_vector_update<count>`` (`split`), taking ``arguments``:
    element ``k``'s loaded values are ``<array>_<k>``, its new ones ``new_<name>_<k>``."""
    arrays = ["param", "grad", *spec.state]
    lines = ["@register_jitable", f"def {spec.name}_vector_update{count}({', '.join(arguments)}):"]
    for k in range(count):
        values = [f"{array}_{k}" for array in arrays]
        lines.append(f"    {', '.join(values)}, = loaded[{k}]")
        lines += _rule_call(spec, values, f"_{k}")

    def each(template):
        return "(" + ", ".join(template.format(k=k) for k in range(count)) + ",)"

    if spec.updates_param:
        rounded = "stochastic_bits(param, new_param_{k}, random_bits(key, i + {k}))"
        compensation = "new_param_{k} - as_stored(param, new_param_{k})"
        lines += [
            "    if param_store == STOCHASTIC:",
            f"        vector_store_bits(param, i, {each(rounded)})",
            "    else:",
            f"        vector_store(param, i, {each('new_param_{k}')})",
            "        if param_store == MIRRORED:",
            f"            vector_store(companion, i, {each('new_param_{k}')})",
            "        elif param_store == KAHAN:  # what rounding p lost, itself rounded",
            f"            vector_store(companion, i, {each(compensation)})",
        ]
    lines += _state_stores(
        spec, lambda name: f"vector_store({name}, i, {each(f'new_{name}_{{k}}')})"
    )
    if spec.reads_grad:
        lines += ["    if clear_grad:", f"        vector_store(grad, i, {each('0')})"]
    if spec.squares:
        squared = [f"({', '.join(_squared(spec, f'param_{k}', f'_{k}'))},)" for k in range(count)]
        lines.append(f"    return ({', '.join(squared)},)")
    return lines


def _state_stores(spec, stored):
    """The lines that store each state array the rule writes, ``stored(name)`` the
    statement; an optional one only when its flag is set."""
    lines = []
    for name in spec.written:
        flag = spec.optional_flag(name)
        if flag:
            lines += [f"    if {flag}:", f"        {stored(name)}"]
        else:
            lines.append(f"    {stored(name)}")
    return lines


def _update(spec, values, current):
    """The lines that call the rule on ``values`` (`_loads`), store what it returns and
    return the values to square; ``current`` is the param's value if not updated."""
    lines = _rule_call(spec, values)
    if spec.updates_param:
        lines.append("    store_param(param, companion, i, new_param, param_store, key)")
    if not spec.blockwise:  # 8-bit state is encoded by the caller, block by block
        lines += _state_stores(spec, lambda name: f"store({name}, i, new_{name})")
    if spec.reads_grad:
        lines += ["    if clear_grad:", "        grad[i] = 0"]
    returned = [f"new_{name}" for name in spec.written] if spec.blockwise else []
    returned += _squared(spec, current)  # the values the loop sums the squares of
    if returned:
        lines.append(f"    return ({', '.join(returned)},)")
    return lines


def _decoded(spec, name):
    """The value of 8-bit state ``name`` at element ``i``, from its code and absmax."""
    return f"decode_{spec.code_kind(name)}({name}[i], {name}_absmax)"


def _optional_value(spec, name, flag, required, load=_load):
    """The value of optional state ``name`` at element ``i`` (read by ``load``: `_load`
    or `_vector_load`): with ``flag`` off, that of the last ``required`` state (or the
    param), which is always there."""
    if spec.blockwise:
        fallback = f"{required[-1]}_value" if required else "load(param, i, like)"
        return f"{_decoded(spec, name)} if {flag} else {fallback}"
    fallback = required[-1] if required else "param"
    return load(f"{name} if {flag} else {fallback}")
