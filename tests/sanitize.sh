#!/usr/bin/env bash
# Build the C core with AddressSanitizer + UndefinedBehaviorSanitizer in a scratch copy and
# run the kernel and model tests against it. Any ASan/UBSan report aborts the run.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
export BLACKMAMBA_SHARED="${BLACKMAMBA_SHARED:-$(cd "$here/.." && pwd)/shared}"
cp -r "$here/setup.py" "$here/pyproject.toml" "$here/README.md" "$here/csrc" "$here/blackmamba" "$here/tests" "$here/tools" "$tmp/"
rm -f "$tmp"/blackmamba/*.so
cd "$tmp"
BLACKMAMBA_SANITIZE=1 BLACKMAMBA_CUDA=0 BLACKMAMBA_STRICT_BUILD=1 \
    python3 setup.py -q build_ext --inplace 2>&1 | grep -E "error|warning: " || true
test -n "$(ls blackmamba/_C*.so)"
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allocator_may_return_null=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export BLACKMAMBA_SANITIZED=1   # tests that time things or fork skip themselves
PYTHONPATH="$tmp" python3 -m pytest -q -p no:cacheprovider -x -m "not slow" \
    $(ls tests/test_*.py | grep -E "test_(scan|conv|norm|moe|sinkhorn|gemm|ops|model|default_model|reliability)" ) "$@"
