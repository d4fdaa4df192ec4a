#!/usr/bin/env bash
# A digest of the native sources (cuda/, csrc/) and the Python package: the same tree gives
# the same 12 hex digits here and on the GPU machine (tools/gpu_final_check.sh prints it).
# Per-file hashes in C-locale name order, so neither the shell's glob order nor the locale
# changes it. -v: the per-file hashes too.
cd "$(dirname "$0")/.."
export LC_ALL=C
list=$(ls cuda/*.cu cuda/*.cuh cuda/*.h csrc/*.c csrc/*.h blackmamba/*.py 2>/dev/null | sort)
[ "${1:-}" = -v ] && sha1sum $list
sha1sum $list | sha1sum | cut -c1-12
