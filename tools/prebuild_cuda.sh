#!/usr/bin/env bash
# Compiles cuda/*.cu here into .cuobj/ (ignored), so that a GPU machine with the same nvcc
# links them instead of compiling (tools/device_env.sh points setup.py at .cuobj; name it in
# the device tool's carry). Objects whose key (nvcc version, flags, source and headers) is
# unchanged are kept. Also builds the extension in place here. --force: without it build_ext
# skips the whole extension, CUDA step included, when no C source is newer than the .so.
#   bash tools/prebuild_cuda.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BLACKMAMBA_CUDA_OBJ_CACHE="$PWD/.cuobj" BLACKMAMBA_STRICT_BUILD=1 \
    BLACKMAMBA_NVCC_THREADS="${BLACKMAMBA_NVCC_THREADS:-$(nproc)}" \
    python3 setup.py -q build_ext --inplace --force 2>&1 | grep -E "error|warning: |nvcc" || true
ls .cuobj/*.o | wc -l
