#!/bin/bash
# Dev build of the CUDA kernels as a standalone shared library for the ctypes harness
# (check_kernels.py, bench_kernels.py). Not part of the package build (setup.py compiles
# cuda/*.cu into blackmamba._C with the same flags). Run from anywhere; objects are
# compiled in parallel, one nvcc per file. NVCC_EXTRA="-Xptxas -v" shows registers/spills.
set -euo pipefail
cd "$(dirname "$0")/../.."
NVCC=${NVCC:-nvcc}
OUT=${BM_DEV_SO:-cuda/dev/libbm_cuda_dev.so}
OBJ=$(mktemp -d)
FLAGS="-O3 -std=c++17 -Xcompiler -fPIC -lineinfo --expt-relaxed-constexpr -Icsrc -Icuda
       -gencode=arch=compute_90,code=sm_90 ${NVCC_EXTRA:-}"
pids=()
for f in cuda/*.cu; do
    F=$FLAGS  # grouped.cu: wgmma needs sm_90a (setup.py SM90A_SOURCES)
    [ "$(basename "$f")" = grouped.cu ] && F="${FLAGS/compute_90,code=sm_90/compute_90a,code=sm_90a} -DBM_HAVE_SM90A=1"
    $NVCC -c $F -o "$OBJ/$(basename "$f").o" "$f" & pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
$NVCC -shared -o "$OUT" "$OBJ"/*.o -lcublas
rm -rf "$OBJ"
echo "built $OUT"
