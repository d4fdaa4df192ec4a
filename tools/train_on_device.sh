#!/usr/bin/env bash
# Train the embedded default model on the GPU machine in one call (see tools/train_default_model.py).
# Carried: .whl (scipy-openblas32 for py3.12), .shared (golden + data/tinyshakespeare.txt).
#   bash tools/train_on_device.sh OUTDIR [extra train args...]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?output folder}; shift
mkdir -p "$out"
source tools/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader | tee "$out/gpu.txt"
t0=$(date +%s)
BLACKMAMBA_STRICT_BUILD=1 BLACKMAMBA_NVCC_THREADS=8 python3 setup.py -q build_ext --inplace 2>&1 \
    | grep -E "error|warning: " || true
echo "build: $(( $(date +%s) - t0 )) s"
python3 -c "import torch, blackmamba.cuda as c; print('torch', torch.__version__, 'cuda', c.is_available())"
python3 tools/train_default_model.py --data .shared/data/tinyshakespeare.txt \
    --out "$out/model" --log "$out/log" "$@" 2>&1 | tee "$out/train.out"
