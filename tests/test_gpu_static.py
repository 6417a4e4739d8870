"""bench.gpu_static without its tools: what can be checked with no NVVM and no ptxas.

The variants it compiles are every spec in every format a launch makes; occupancy,
the ptxas report and the PTX analyses are checked on known numbers and small samples.
Compiling and assembling run in CI's own step (.ci/run), with the ``cuda-dev`` extra.
"""

import numpy as np
import pytest
import torch

from bench import gpu_static
from fastmomentum import capabilities
from fastmomentum.bucket import compute_dtype_and_formats
from fastmomentum.quantized import INT8_BLOCKWISE
from fastmomentum.validation import check_state_dtype
from kernels import cuda, rules
from kernels.capturable import capturable
from kernels.specs import int8_blockwise

SM80, SM90 = gpu_static.ARCHS

# ptxas 12.9's report on an 8-bit kernel (its mangled name cut short).
PTXAS_REPORT = """\
ptxas info    : 200 bytes gmem
ptxas info    : Compiling entry function '_ZN7kernels4cuda10_adam_int8B2v1' for 'sm_90'
ptxas info    : Function properties for _ZN7kernels4cuda10_adam_int8B2v1
    24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 3072 bytes smem
ptxas info    : Compile time = 200.714 ms
"""


def test_variants_cover_every_spec_in_every_format():
    found = {(variant.spec.name, variant.format.name) for variant in gpu_static.variants()}
    for spec in rules.DEVICE_SPECS:
        assert {(spec.name, f.name) for f in gpu_static.FORMATS} <= found
    for spec in rules.SPECS:
        assert {(spec.name, f.name) for f in gpu_static.FORMATS} <= found
        if spec.live is not None:
            named = capturable(spec).name
            assert {(named, f.name) for f in gpu_static.FORMATS} <= found
        try:
            name = int8_blockwise(spec).name
        except ValueError:
            continue
        assert {(name, f.name) for f in gpu_static.INT8_FORMATS} <= found
    assert len(found) == len({(v.spec.name, v.format.name) for v in gpu_static.variants()})


def test_variants_take_every_path_flag_and_the_type_flags_of_their_format():
    found = {(v.name, v.format.name): v.flags for v in gpu_static.variants()}
    assert len(found) == len(gpu_static.variants())
    for name in ("rmsprop", "rmsprop+centered", "rmsprop+has_momentum+centered"):
        assert (name, "bf16") in found
    assert found[("rmsprop+has_momentum", "fp32")] == (True, False)
    assert found[("adam_capturable+amsgrad", "fp32, bf16 state")] == (True,)
    assert found[("adam_int8+amsgrad", "fp16, int8 state")] == (True,)
    # a flag that names an element type follows the format, as the binding sets it
    lamb = rules.lamb.DIRECTION.name
    assert found[(lamb, "fp32, bf16 state")] == rules.lamb.state_flags(np.uint16)
    assert found[(lamb, "fp16")] == rules.lamb.state_flags(np.int16) == (False, True)
    assert found[(lamb, "fp32")] == (False, False)
    muon = rules.muon.MOMENTUM.name
    assert found[(muon + "+nesterov", "bf16")] == (True, True, False)
    assert found[(rules.muon.APPLY.name, "fp16")] == (False, True)
    assert found[(rules.muon.APPLY.name, "fp16, master")] == (False, False)


def _launched_formats():
    """(compute dtype, formats) of every bucket the capability table lets one build, as
    `fastmomentum.bucket.ParamBucket` makes them (master weights: a float32 param column)."""
    dtypes = {name: getattr(torch, name) for name in capabilities.PARAM_DTYPES}
    states = {"param": None, "bfloat16": torch.bfloat16, "int8_blockwise": INT8_BLOCKWISE}
    made = set()
    for row in capabilities.CAPABILITIES.values():
        for param in row.param_dtypes:
            for state in row.state_dtypes:
                state_dtype = states[state]
                try:  # the combinations the constructors refuse are never launched
                    check_state_dtype(state_dtype, [torch.empty(0, dtype=dtypes[param])])
                except ValueError:
                    continue
                compute, formats = compute_dtype_and_formats(
                    dtypes[param], state_dtype or dtypes[param]
                )
                made.add((state == "int8_blockwise", _named(compute, formats)))
            if param in ("bfloat16", "float16") and "master_weights" in row.sixteen_bit_options:
                compute, formats = compute_dtype_and_formats(dtypes[param], torch.float32)
                made.add((False, _named(compute, (np.float32, *formats[1:]))))
    return made


def _named(compute, formats):
    formats = (compute,) * 4 if formats is None else formats
    return np.dtype(compute).name, tuple(np.dtype(kind).name for kind in formats)


def test_formats_are_those_the_torch_binding_launches():
    listed = {(False, (f.compute, f.formats)) for f in gpu_static.FORMATS}
    listed |= {(True, (f.compute, f.formats)) for f in gpu_static.INT8_FORMATS}
    assert _launched_formats() == listed


def test_signature_has_an_argument_per_kernel_parameter():
    for variant in gpu_static.variants():
        definition = cuda.kernel_source(variant.spec, variant.flags).splitlines()[0]
        parameters = definition[definition.index("(") + 1 : definition.index(")")].split(",")
        signature = gpu_static.signature(variant.spec, variant.format)
        assert len(signature) == len(parameters), variant.name


def test_usual_launch_source_sets_every_path_argument():
    for variant in gpu_static.variants():
        source = gpu_static.usual_launch_source(variant)
        compile(source, variant.name, "exec")
        for name, value in (*zip(variant.spec.flags, variant.flags), ("clear", False)):
            assert f"\n    {name} = {value}\n" in source
        assert f"\n    param_store = {variant.format.param_store}\n" in source


@pytest.mark.parametrize(
    ("registers", "expected"),
    [(32, 8), (40, 6), (48, 5), (56, 4), (64, 4), (65, 3), (80, 3), (128, 2), (255, 1)],
)
def test_blocks_per_sm_of_256_threads(registers, expected):
    # 64 registers: 2048 per warp, 32 warps of 64 K registers, 4 blocks of 8 warps (50%);
    # 80: 2560 per warp, 25 warps, 3 blocks (37.5%)
    assert gpu_static.blocks_per_sm(SM80, registers, 256) == expected
    assert gpu_static.blocks_per_sm(SM90, registers, 256) == expected


def test_blocks_per_sm_limited_by_shared_memory_and_threads():
    shared = 100 * 1024  # + 1 KB reserved a block: 1 fits in 164 KB, 2 in 228 KB
    assert gpu_static.blocks_per_sm(SM80, 32, 256, shared) == 1
    assert gpu_static.blocks_per_sm(SM90, 32, 256, shared) == 2
    assert gpu_static.blocks_per_sm(SM90, 16, 1024) == 2  # 2048 threads at most
    assert gpu_static.blocks_per_sm(SM90, 16, 32) == 32  # 32 blocks at most


def test_parse_ptxas_report():
    resources = gpu_static.parse_ptxas(PTXAS_REPORT)
    assert resources == gpu_static.Resources(
        registers=40, spill_stores=8, spill_loads=12, stack=24, local=0, shared=3072
    )
    with pytest.raises(ValueError):
        gpu_static.parse_ptxas("ptxas info    : 200 bytes gmem\n")


def test_targets_from_littles_law():
    assert SM90.target == pytest.approx(4.8e12 * 700e-9 / 132)  # H200: ≈ 24.9 KiB
    assert 24 * 1024 < SM90.target < 26 * 1024
    assert 12 * 1024 < SM80.target < 14 * 1024


def test_the_kernels_target_and_registers_are_those_of_sm_90():
    from kernels import config

    assert config.BYTES_IN_FLIGHT_PER_SM == round(SM90.target)
    assert config.REGISTERS_PER_SM == SM90.registers == SM80.registers


def _limit(spec, kinds, flags=None):
    formats = tuple(np.dtype(kind).type(0) for kind in kinds)
    return cuda.register_limit(spec, cuda.flag_values(spec, flags), formats)


F32, F64, BF16 = np.float32, np.float64, np.uint16  # bfloat16's carrier


@pytest.mark.parametrize(
    ("spec", "kinds", "flags", "expected"),
    [
        # 4 arrays × 16 bytes a thread: 64 B, 2 blocks of 256 hold 32 KB ≥ 24.9: 128
        (rules.adam.SPEC, (F32,) * 4, None, 128),
        (rules.adam.SPEC, (F64,) * 4, None, 128),  # 2 float64 a thread, as many bytes
        (rules.adam.SPEC, (BF16,) * 4, None, 128),  # 8 elements of 2 bytes
        # float32 param and grad, 16-bit moments: 4 × (4 + 4 + 2 + 2) = 48 B, 3 blocks
        (capturable(rules.radam.SPEC), (F32, F32, BF16, F32), None, 80),
        # AMSGrad's third moment only when the flag is set: 56 B, 2 blocks
        (rules.adam.SPEC, (F32, F32, BF16, F32), (True,), 128),
        (rules.adam.SPEC, (F32, F32, BF16, F32), (False,), 80),
        (rules.sgd.PLAIN, (F32,) * 4, None, 64),  # param and grad: 32 B, 4 blocks
    ],
)
def test_register_limit_leaves_room_for_the_blocks_the_target_needs(spec, kinds, flags, expected):
    limit = _limit(spec, kinds, flags)
    assert limit == expected
    blocks = gpu_static.blocks_per_sm(SM90, limit, 256)
    assert gpu_static.blocks_per_sm(SM90, limit + 1, 256) < blocks  # the most that fit


def test_register_limit_is_none_over_block_wise_state():
    spec = int8_blockwise(rules.adam.SPEC)
    assert _limit(spec, (F32,) * 4) is None


def test_register_limits_keep_every_variant_at_its_target():
    """For every kernel over 256-thread blocks, the blocks its limit lets be resident
    hold the target in flight, each thread loading what `register_limit` counts."""
    for variant in gpu_static.variants():
        limit = gpu_static.register_limit(variant)
        if variant.spec.blockwise:
            assert limit is None
            continue
        blocks = gpu_static.blocks_per_sm(SM90, limit, 256)
        sizes = [np.dtype(kind).itemsize for kind in variant.format.formats[:2]]
        flags = dict(zip(variant.spec.flags, variant.flags))
        state = np.dtype(variant.format.formats[2]).itemsize
        sizes += [state for n in variant.spec.state if flags.get(variant.spec.optional_flag(n), 1)]
        per_thread = 16 // max(sizes) * sum(sizes)
        assert blocks * 256 * per_thread >= SM90.target, variant
        assert (blocks - 1) * 256 * per_thread < SM90.target, variant  # the fewest


def _report(registers, spills=0):
    return (
        "ptxas info    : Function properties for kernel\n"
        f"    0 bytes stack frame, {spills} bytes spill stores, {spills} bytes spill loads\n"
        f"ptxas info    : Used {registers} registers, used 1 barriers, 112 bytes smem\n"
    )


@pytest.mark.parametrize(
    ("natural", "within", "expected"),
    [
        (83, _report(80), (80, 80)),  # the limit binds: ptxas is asked again
        (83, _report(80, spills=16), (83, None)),  # it would spill: kept as ptxas made it
        (76, None, (76, None)),  # under the limit: not asked again (ptxas would take more)
    ],
)
def test_fitted_assembles_again_only_where_the_limit_binds(monkeypatch, natural, within, expected):
    calls = []

    def assemble(ptx, arch, executable, register_limit=None):
        calls.append(register_limit)
        return _report(natural) if register_limit is None else within

    monkeypatch.setattr(gpu_static, "assemble", assemble)
    resources, limit = gpu_static.fitted("ptx", SM90, "ptxas", 80)
    assert (resources.registers, limit) == expected
    assert calls == ([None, 80] if within else [None])
    assert gpu_static.fitted("ptx", SM90, "ptxas", None)[1] is None


# A kernel's shape in PTX: the table's arrays are kernel parameters; an entry's arrays
# are addresses loaded from the table; the element index derives from %tid.
PTX = """\
.visible .entry kernel(
	.param .u64 table
)
{
	ld.param.u64 	%rd1, [table];
	cvta.to.global.u64 	%rd2, %rd1;
	ld.global.u64 	%rd3, [%rd2];
	ld.global.u64 	%rd4, [%rd2+8];
	ld.global.u64 	%rd5, [%rd2+16];
	ld.param.u8 	%rs1, [flag];
	setp.ne.s16 	%p1, %rs1, 0;
	selp.b64 	%rd6, %rd4, %rd5, %p1;
	ld.global.f32 	%f9, [%rd3];
	mov.u32 	%r1, %tid.x;
	mul.wide.s32 	%rd7, %r1, 4;
$L__BB0_1:
	add.s64 	%rd8, %rd3, %rd7;
	add.s64 	%rd9, %rd6, %rd7;
	ld.global.f32 	%f1, [%rd8];
	ld.global.v2.f32 	{%f2, %f3}, [%rd9];
	add.f32 	%f4, %f1, %f2;
	st.global.f32 	[%rd8], %f4;
	ld.u16 	%rs2, [%rd9];
	@%p1 bra 	$L__BB0_1;
	ret;
}
"""


def test_element_loads_leave_out_the_table_and_broadcasts():
    found = gpu_static.instructions(PTX)
    chosen = {found[i].opcode for i in gpu_static.element_loads(found)}
    # the table's addresses (from a parameter) and the value at an entry's first
    # element (the same for every thread) are not element loads
    assert chosen == {"ld.global.f32", "ld.global.v2.f32", "ld.u16"}
    assert len(gpu_static.element_loads(found)) == 3


def test_bytes_in_flight_counts_loads_before_a_store_or_branch():
    assert gpu_static.load_bytes("ld.global.v2.f32") == 8
    assert gpu_static.load_bytes("ld.u16") == 2
    assert gpu_static.bytes_in_flight(PTX) == 12  # 4 + 8 before the store; then 2


def test_the_functions_after_the_kernel_are_not_read_as_its_body():
    # a called function (libdevice's pow) follows the entry and reuses its register
    # names; read as the kernel's, its parameter would taint the element index
    called = "\n.func  (.param .b64 retval) pow(\n\t.param .b64 x\n)\n{\n"
    called += "\tld.param.f64 \t%fd1, [x];\n\tmov.b64 \t%r1, %fd1;\n\tret;\n}\n"
    assert gpu_static.bytes_in_flight(PTX + called) == gpu_static.bytes_in_flight(PTX) == 12


def test_vector_and_f64_instructions_are_found():
    ptx = PTX.replace(
        "add.f32 	%f4, %f1, %f2;", "cvt.f64.f32 	%fd1, %f1;\n\tadd.f64 	%fd2, %fd1, %fd1;"
    )
    assert gpu_static.f64_instructions(ptx) == ["cvt.f64.f32", "add.f64"]


def test_unrounded_counts_the_float_sums_and_products_ptxas_may_fuse():
    """The sample's ``add.f32`` has no rounding mode; with ``.rn``, and beside an integer
    ``add.s64``, an explicit ``fma.rn`` and ``mul.wide``, none is counted."""
    assert gpu_static.unrounded(PTX) == 1
    rounded = PTX.replace("add.f32", "add.rn.f32")
    rounded = rounded.replace(
        "ret;", "fma.rn.f32 \t%f5, %f1, %f2, %f4;\n\tmul.rn.f64 \t%fd1, %fd2, %fd3;\n\tret;"
    )
    assert gpu_static.unrounded(rounded) == 0
    assert gpu_static.unrounded(rounded.replace("mul.rn.f64", "mul.f64")) == 1
    assert gpu_static.unrounded(PTX.replace("add.f32", "sub.ftz.f32")) == 1


def test_global_stores_count_vector_ones_and_leave_out_shared_and_local():
    assert gpu_static.global_stores(PTX) == (0, 1)
    ptx = PTX.replace(
        "st.global.f32 	[%rd8], %f4;",
        "st.global.v4.f32 	[%rd8], {%f4, %f4, %f4, %f4};\n\tst.shared.f32 	[%rd1], %f4;\n"
        "\tst.local.f32 	[%rd1], %f4;\n\tst.f32 	[%rd9], %f4;",
    )
    assert gpu_static.global_stores(ptx) == (1, 2)


def test_f64_allowed_only_for_float64_arrays_and_lamb_sums():
    fp32, fp64 = gpu_static.FORMATS[0], gpu_static.FORMATS[1]
    sums = ["cvt.f64.f32", "fma.rn.f64", "atom.global.add.f64", "st.shared.f64"]
    narrowed = ["cvt.rn.f32.f64", "setp.lt.f64", "div.rn.f64"]
    lamb = next(spec for spec in rules.SPECS if spec.squares)
    assert gpu_static.unexpected_f64(lamb, fp32, sums) == []
    assert gpu_static.unexpected_f64(lamb, fp32, sums + narrowed) == narrowed
    assert gpu_static.unexpected_f64(rules.adam.SPEC, fp32, sums) == sums
    assert gpu_static.unexpected_f64(rules.adam.SPEC, fp64, narrowed) == []
    # per-segment coefficients in float64, by design
    assert gpu_static.unexpected_f64(capturable(rules.adam.SPEC), fp32, narrowed) == []
    assert gpu_static.unexpected_f64(rules.lamb.APPLY_ON_DEVICE, fp32, narrowed) == []


def test_known_misses_name_kernels_that_are_compiled():
    keys = {
        gpu_static.key({"kernel": v.name, "format": v.format.name, "arch": arch.name})
        for v in gpu_static.variants()
        for arch in gpu_static.ARCHS
    }
    assert gpu_static.known_below_target() <= keys


def _row(**changes):
    """A row of the table that passes every check, with ``changes``."""
    row = {"kernel": "adam", "format": "fp32", "arch": "sm_90", "spill_bytes": 0}
    row.update(unexpected_f64=[], in_flight_per_sm=300, target=200, element_wise=True)
    row.update(vector_loads=4, vector_stores=3, unrounded=0)
    return {**row, **changes}


def test_a_known_miss_fails_once_it_meets_the_target():
    row = _row(in_flight_per_sm=100)
    assert gpu_static.failures(row, known=set()) == ["below target"]
    assert gpu_static.failures(row, known={"adam fp32 sm_90"}) == []
    assert gpu_static.failures(row, known={"adam fp32 sm_90"}, strict=True) == ["below target"]
    row["in_flight_per_sm"] = 300
    assert "meets target" in gpu_static.failures(row, known={"adam fp32 sm_90"})[0]


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({}, []),
        ({"vector_loads": 0}, ["no vector load or store"]),
        ({"vector_stores": 0}, ["no vector load or store"]),
        ({"vector_loads": 0, "vector_stores": 0, "element_wise": False}, []),  # 8-bit state
    ],
)
def test_an_element_wise_kernel_without_vector_loads_or_stores_fails(changes, expected):
    """The aligned path's vector loads and stores (`kernels.cuda._element_loop`) are in
    every element-wise kernel: CI's run of bench.gpu_static fails where one has lost
    them (block-wise 8-bit kernels have none)."""
    assert gpu_static.failures(_row(**changes), known=set()) == expected


def test_a_sum_or_product_ptxas_may_fuse_fails_unless_contraction_is_asked_for(monkeypatch):
    """NVVM compiles the kernels without contraction (`kernels.contraction`), every
    float sum and product rounded (``.rn``): one without fails CI's run, but where
    ``FASTMOMENTUM_CUDA_CONTRACTION=1`` asks for NVVM's fused multiply-adds."""
    from kernels import config

    monkeypatch.setattr(config, "CUDA_CONTRACTION", False)
    assert gpu_static.failures(_row(unrounded=2), known=set()) == [
        "2 sums or products ptxas may fuse"
    ]
    monkeypatch.setattr(config, "CUDA_CONTRACTION", True)
    assert gpu_static.failures(_row(unrounded=2), known=set()) == []
