#!/usr/bin/env bash
# A digest of the native sources (cuda/, csrc/) and the Python package: the same tree gives
# the same 12 hex digits here and on the GPU machine (tools/gpu_final_check.sh prints it).
cd "$(dirname "$0")/.."
cat cuda/*.cu cuda/*.cuh cuda/*.h csrc/*.c csrc/*.h blackmamba/*.py 2>/dev/null | sha1sum | cut -c1-12
