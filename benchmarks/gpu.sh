#!/usr/bin/env bash
# The GPU checks in one command, on a machine with a CUDA GPU, torch (>= 2.11), pytest and ninja installed; no
# network needed. Builds fastdarts._C with its CUDA kernels (incrementally: build/ keeps the objects), then
#
#   bash benchmarks/gpu.sh test [pytest args]    # the test suite, every op test on the CPU and on CUDA (in 8
#                                                # processes where pytest-xdist is installed)
#   bash benchmarks/gpu.sh bench [suite args]    # python -m benchmarks.run (results to benchmarks/results/;
#                                                # where OUT is set, to the same name in $OUT, then copied back)
#   bash benchmarks/gpu.sh all                   # both
#
# The whole suite takes longer than 10 minutes (on an H200 the build took 50 s, the CUDA tests 81 s, and the b64
# steps, HVP and agreement ~6 minutes). Where a command has a time limit, split it, the headline figures first;
# --merge keeps the cases of the results file that a run does not measure (--impls picks impls within a case), so
# the parts collect in one file when each part starts from the file the last one wrote:
#   bash benchmarks/gpu.sh bench --only 'step/cifar-b64/*,hvp/*,agreement*'
#   bash benchmarks/gpu.sh bench --only 'step/cifar-b256/*,step/pcdarts*,op/*' --merge
#   bash benchmarks/gpu.sh bench --only 'step/imagenet*,compat/*' --merge
# and, where the time allows, the reference under torch.compile (each compile may take minutes; --compile-timeout):
#   bash benchmarks/gpu.sh bench --only 'step/cifar-b64/*' --compile --merge
#
# TORCH_CUDA_ARCH_LIST defaults to the GPU's own architecture here (one arch compiles in half the time of two).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
mode=${1:-all}
shift || true
if [[ ! $mode =~ ^(test|bench|all)$ ]]; then
    echo "benchmarks/gpu.sh: unknown mode '$mode', expected test, bench or all" >&2
    exit 2
fi
if [[ $mode == all && $# -gt 0 ]]; then
    echo "benchmarks/gpu.sh: extra arguments go with test or bench, not all: $*" >&2
    exit 2
fi

arch=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
FASTDARTS_FORCE_CUDA=1 python3 -m pip install -q --no-deps --no-build-isolation -e .
python3 -c "import json, fastdarts; print(json.dumps(fastdarts.info(), indent=1))"

if [[ $mode != bench ]]; then
    if python3 -c "import xdist" 2>/dev/null; then  # 8 processes of 2 threads each on the one GPU
        OMP_NUM_THREADS=2 python3 -m pytest -q -ra -n 8 tests "$@"
    else
        python3 -m pytest -q -ra tests "$@"
    fi
fi
if [[ $mode != test ]]; then
    if [[ -n ${OUT:-} ]]; then  # a folder whose files come back (the device tool's), written after every case, so
        # that a run stopped at a time limit still brings back what it measured; --merge starts from the repo's file
        results=$(python3 -c "import torch; from benchmarks.run import _default_out as d; print(d(torch.device('cuda')))")
        if [[ -f $results ]]; then cp "$results" "$OUT"/; fi
        python3 -m benchmarks.run --out "$OUT/$(basename "$results")" "$@"
        cp "$OUT/$(basename "$results")" "$results"
    else
        python3 -m benchmarks.run "$@"
    fi
fi
