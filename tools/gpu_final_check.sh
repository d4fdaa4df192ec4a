#!/usr/bin/env bash
# One call on the GPU machine for a whole-tree check at the end of a session: build (with the
# carried .cuobj), every GPU test, the grouped-GEMM tile sweep (cuda/dev/bench_grouped.py
# --no-model), the scan variants (cuda/dev/bench_scanvar.py), bench_gpu.py and a CUPTI trace
# (cuda/dev/trace_model.py). Unlike tools/gpu_perf_check.sh it builds no dev library (that
# compiles every kernel again on the machine). Logs under $OUT, eight files at most.
#   OUT=$OUT bash tools/gpu_final_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_final_out}
mkdir -p "$OUT"
SUM="$OUT/1_summary.txt"
: > "$SUM"
note() { echo "$*" | tee -a "$SUM"; }
source tools/device_env.sh
[ -f .shared/golden/tiny-a/golden.npz ] && export BM_GOLDEN="$PWD/.shared/golden/tiny-a/golden.npz"
note "$(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader 2>&1)"
# The device copy's .git may be stale (sessions 10, 22, 23: it printed an earlier session's
# HEAD), so the line says so, and the digest of the sources is the one to compare with
# `bash tools/src_digest.sh` here.
note "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?') (the device copy's .git: may be stale)"
note "sources $(bash tools/src_digest.sh)"
run() {  # run NAME TIMEOUT CMD...
    local name=$1 to=$2
    shift 2
    local s=$(date +%s)
    timeout "$to" "$@" > "$OUT/$name.log" 2>&1
    note "$name rc $? ($(( $(date +%s) - s )) s)"
}
BLACKMAMBA_STRICT_BUILD=1 BLACKMAMBA_NVCC_THREADS=16 run 7_build 300 \
    python3 setup.py -q build_ext --force --inplace
run 2_tests 300 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda_*.py
tail -3 "$OUT/2_tests.log" | tee -a "$SUM"
grep -E "^(FAILED|ERROR)" "$OUT/2_tests.log" | head -30 | tee -a "$SUM"
run 3_grouped 120 python3 cuda/dev/bench_grouped.py --no-model
grep -E "wgmma tiles|^ +(2048|16384) +0" "$OUT/3_grouped.log" | tee -a "$SUM"
run 4_scan 120 python3 cuda/dev/bench_scanvar.py
run 9_model 240 python3 benchmarks/bench_gpu.py
grep -A4 -E "^decode|^prefill|targets" "$OUT/9_model.log" | tee -a "$SUM"
grep -A6 -E "^short prompts" "$OUT/9_model.log" | tee -a "$SUM"
run 10_trace 200 python3 cuda/dev/trace_model.py --cases d1,d8,d64,p1,p8,p1x32
grep -E "^== " "$OUT/10_trace.log" | tee -a "$SUM"
note "done $(date -u +%FT%TZ)"
