#!/usr/bin/env bash
# One call on a GPU machine (the H200 of the `device` tool): build, the GPU tests, and the
# benchmarks of the bf16 split, the Sinkhorn and the scan kernels; every log under $OUT (or
# ./gpu_perf_out), numbered so that the important ones sort first (the device tool brings back
# only the first few files). Each stage runs even when an earlier one failed; the summary at the end
# of summary.txt says which failed. Carried paths as for tools/device_test.sh: .whl (wheels
# the machine lacks) and .shared (golden files).
#   bash tools/gpu_perf_check.sh [stages]    stages: comma list of
#     tests, kernels (cuda/dev/bench_kernels.py: copy, scan, sinkhorn), split
#     (benchmarks/bench_gpu_split.py), model (benchmarks/bench_gpu.py, ~90 s), check
#     (cuda/dev/check_kernels.py), trace (cuda/dev/trace_model.py: per-kernel durations and
#     gaps of decode B=1/64 and prefill B=1 from a CUPTI trace; needs torch); default:
#     tests,kernels,split
set -uo pipefail
cd "$(dirname "$0")/.."
STAGES=",${1:-tests,kernels,split},"
OUT=${OUT:-$PWD/gpu_perf_out}
mkdir -p "$OUT"
SUM="$OUT/1_summary.txt"
: > "$SUM"
note() { echo "$*" | tee -a "$SUM"; }

source tools/device_env.sh
[ -f .shared/golden/tiny-a/golden.npz ] && export BM_GOLDEN="$PWD/.shared/golden/tiny-a/golden.npz"
note "$(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader 2>&1)"
note "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?') stages $STAGES"

# builds: the package in place, and (for the kernel benchmarks) the dev library, in parallel
t0=$(date +%s)
(BLACKMAMBA_STRICT_BUILD=1 BLACKMAMBA_NVCC_THREADS=8 python3 setup.py -q build_ext --inplace \
    > "$OUT/7_build.log" 2>&1; echo $? > /tmp/bm_build.rc) &
bp=$!
if [[ $STAGES == *,kernels,* || $STAGES == *,check,* ]]; then
    (bash cuda/dev/build_dev.sh > /tmp/bm_build_dev.log 2>&1; echo $? > /tmp/bm_build_dev.rc) &
    dp=$!
    wait $dp
fi
wait $bp
note "build rc $(cat /tmp/bm_build.rc) dev-build rc $(cat /tmp/bm_build_dev.rc 2>/dev/null || echo -) ($(( $(date +%s) - t0 )) s)"
[ -f /tmp/bm_build_dev.log ] && cat /tmp/bm_build_dev.log >> "$OUT/7_build.log"
grep -E "error" "$OUT/7_build.log" | head -20 | tee -a "$SUM"

run() {  # run NAME TIMEOUT CMD...: log to $OUT/NAME.log, note the rc and the seconds
    local name=$1 to=$2
    shift 2
    local s=$(date +%s)
    timeout "$to" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    note "$name rc $rc ($(( $(date +%s) - s )) s)"
    return $rc
}

if [[ $STAGES == *,tests,* ]]; then
    BM_MEASURE_OUT="$OUT/5_measured.json" BM_ERR_TABLE="$OUT/6_errors.txt" \
        run 2_tests 300 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda_*.py
    tail -4 "$OUT/2_tests.log" | tee -a "$SUM"
    grep -E "^(FAILED|ERROR)|^E  " "$OUT/2_tests.log" | head -20 | tee -a "$SUM"
fi
if [[ $STAGES == *,kernels,* ]]; then
    run 4_kernels 120 python3 cuda/dev/bench_kernels.py --only=copy,scan,sinkhorn
    grep -E "scan_forward b=8 L=2048 E=2944 N=16|sinkhorn|torch loop|GEMM|bandwidth" \
        "$OUT/4_kernels.log" | tee -a "$SUM"
fi
if [[ $STAGES == *,split,* ]]; then
    run 3_split 120 python3 benchmarks/bench_gpu_split.py
    cat "$OUT/3_split.log" >> "$SUM"
fi
if [[ $STAGES == *,check,* ]]; then
    run 8_check 200 python3 cuda/dev/check_kernels.py
    grep -E "FAIL|passed|checks" "$OUT/8_check.log" | tail -15 | tee -a "$SUM"
fi
if [[ $STAGES == *,model,* ]]; then
    run 9_model 240 python3 benchmarks/bench_gpu.py
    grep -A4 -E "^decode|^prefill|targets" "$OUT/9_model.log" | tee -a "$SUM"
fi
if [[ $STAGES == *,trace,* ]]; then
    run 10_trace 200 python3 cuda/dev/trace_model.py --cases d1,d64,p1 --out "$OUT/10_trace.txt"
    grep -E "^== " "$OUT/10_trace.txt" | tee -a "$SUM"
fi
note "done $(date -u +%FT%TZ)"
