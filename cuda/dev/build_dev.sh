#!/bin/bash
# Dev build of the CUDA kernels as a standalone shared library for the ctypes harness
# (check_kernels.py, bench_kernels.py). Not part of the package build (setup.py compiles
# cuda/*.cu into blackmamba._C). Run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/../.."
NVCC=${NVCC:-nvcc}
OUT=${BM_DEV_SO:-cuda/dev/libbm_cuda_dev.so}
$NVCC -shared -Xcompiler -fPIC -O3 -std=c++17 -lineinfo --expt-relaxed-constexpr \
    -gencode=arch=compute_90,code=sm_90 -Icsrc -Icuda ${NVCC_EXTRA:-} \
    -o "$OUT" cuda/*.cu -lcublas
echo "built $OUT"
