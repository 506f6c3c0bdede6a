#!/usr/bin/env bash
# The GPU runner's two halves (scripts/gpu_runner.py says what it runs):
#
#   scripts/gpu_runner.sh fetch         here, with network: the wheels the GPU machine lacks, into .whl/
#                                       (pyopencl and its needs, liger-kernel; cp312, manylinux x86-64)
#   scripts/gpu_runner.sh run [ARGS]    there, on the lent GPU: the runner, results into $OUT
#
# One `run` call does it all (scripts/gpu_runner.py): the kernel, GEMM and linear tests on the GPU,
# the cross-entropy bench beside torch CUDA and Liger-Kernel, and the fused linear cross-entropy
# at 8192 x 4096 x 128256 bf16 (a Llama-3 head) through clce, torch CUDA and Liger-Kernel's
# LigerFusedLinearCrossEntropyLoss, with clce's loss and gradient checked against torch's.
# Where GPU memory does not allow a method at that shape it is recorded as out of memory; a
# smaller one is `run --linear-shape 4096x4096x128256`.
#
# The GPU machine's image has torch, triton, numpy, ml_dtypes, hypothesis, pytest, matplotlib,
# msgpack and tqdm; it has no pyopencl and no Liger-Kernel, and cannot reach an index.
set -euo pipefail
cd "$(dirname "$0")/.."
# the versions the project is tested with here (pyopencl's needs: pytools, platformdirs, siphash24)
WHEELS=(pyopencl==2026.1.4 pytools==2026.1.1 platformdirs==4.14.9 siphash24==1.9 liger-kernel==${LIGER_VERSION:-0.8.5})
case "${1:-}" in
    fetch)
        rm -rf .whl && mkdir -p .whl
        python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
        ls -l .whl
        ;;
    run)
        shift
        out=${OUT:-bench/results/gpu_runner}
        PYTHONUNBUFFERED=1 exec python3 scripts/gpu_runner.py --out "$out" "$@"
        ;;
    *) echo "usage: $0 fetch | run [gpu_runner.py arguments]" >&2; exit 2 ;;
esac
