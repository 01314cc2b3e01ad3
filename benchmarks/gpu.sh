#!/usr/bin/env bash
# The GPU checks in one command, on a machine with a CUDA GPU, torch (>= 2.11), pytest and ninja installed; no
# network needed. Builds fastdarts._C with its CUDA kernels (incrementally: build/ keeps the objects), then
#
#   bash benchmarks/gpu.sh test [pytest args]    # the test suite, every op test on the CPU and on CUDA
#   bash benchmarks/gpu.sh bench [suite args]    # python -m benchmarks.run (results to benchmarks/results/, or to
#                                                # $OUT/suite.json when OUT is set)
#   bash benchmarks/gpu.sh all                   # both
#
# The whole suite takes longer than 10 minutes (an estimate: it has not run on a GPU yet). Where a command has a
# time limit, split it, the headline figures first, and collect the parts in one file with --merge:
#   bash benchmarks/gpu.sh bench --only 'step/cifar-b64/*,hvp/*,agreement*'
#   bash benchmarks/gpu.sh bench --only 'step/cifar-b256/*,step/pcdarts*,op/*' --merge
#   bash benchmarks/gpu.sh bench --only 'step/imagenet*,compat/*' --merge
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
    python3 -m pytest -q -ra tests "$@"
fi
if [[ $mode != test ]]; then
    python3 -m benchmarks.run ${OUT:+--out "$OUT/suite.json"} "$@"
fi
