#!/usr/bin/env bash
# One GPU lease, run from the repository root (the device tool's `run`): the parts of
# `python -m bench.gpu_check` in the order the open questions need them (docs/gpu.md,
# "First run on a GPU"): our CUDA step against our CPU step as the library compiles it
# (without FMA contraction, kernels/contraction.py) and with it, the registers the device
# gave the kernels and the bandwidth, then parity.
# Each part has its own time limit and report, $OUT/<part>/gpu_check.md (default OUT:
# bench/out), written row by row, so a lease cut short keeps what ran; an empty Numba
# cache for each exactness part keeps every kernel's PTX (its fma.rn are counted). The
# device image's NumPy 2.5 breaks numba-cuda 0.30.4: a NumPy wheel left under
# .device/whl (ignored by git; carried) is installed into /tmp/site.
set -u
out=${OUT:-bench/out}
if compgen -G ".device/whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/whl/*.whl
    export PYTHONPATH=$PWD:/tmp/site
fi
unset NUMBA_ENABLE_CUDASIM
export PYTHONUNBUFFERED=1

part() {  # name, seconds, then gpu_check's arguments
    local name=$1 limit=$2
    shift 2
    timeout "$limit" python3 -m bench.gpu_check --output "$out/$name" "$@"
    echo "== $name: exit $? (124: cut at ${limit} s)"
}

NUMBA_CACHE_DIR=$(mktemp -d) part no-fma 110 --parts exactness
NUMBA_CACHE_DIR=$(mktemp -d) part fma 110 --parts exactness --contraction on
part bandwidth 170 --parts registers,bandwidth --repeats 10
part parity 180 --parts parity
