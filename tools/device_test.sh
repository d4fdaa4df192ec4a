#!/usr/bin/env bash
# Build and test blackmamba on a GPU machine in one call (the H200 of the `device` tool:
# Python 3.12, nvcc 13, no network). Carried paths: .whl (wheels of PyPI dependencies the
# machine lacks, e.g. scipy-openblas32) and .shared (a copy of ../shared: golden files).
#   bash tools/device_test.sh [pytest args...]      (default: the GPU tests, then all tests)
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
t0=$(date +%s)
BLACKMAMBA_STRICT_BUILD=1 BLACKMAMBA_NVCC_THREADS=8 python3 setup.py -q build_ext --inplace 2>&1 \
    | grep -E "error|warning: " || true
echo "build: $(( $(date +%s) - t0 )) s"
python3 -c "import blackmamba as bm; print(bm.ops.cpu_info())"
if [ $# -gt 0 ]; then
    python3 -m pytest -q -p no:cacheprovider "$@"
else
    python3 -m pytest -q -p no:cacheprovider -m gpu tests
fi
