#!/usr/bin/env bash
# Short prefills' grouped expert tiles (grouped.cu plain_tile): every fc1 / fc2 decode-tile
# variant at batch 1 over prompt lengths, then the plain-launch defaults against the decode's
# (BLACKMAMBA_MOE_PLAIN_TILES), on the GPU machine after the build (dev only; logs in $OUT).
#   OUT=$OUT bash cuda/dev/sweep_plain_tiles.sh [lengths]
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp}
LENS=${1:-8,16,32,48,64,96,128,192,256,384}
A="python3 cuda/dev/ab_prefill.py --batches 1 --no-same --rounds 2 --length $LENS"
$A --env BLACKMAMBA_MOE_GROUPED_TILES --values 0000,0010,0020,0030,0050 > "$OUT/sweep_fc1.log" 2>&1
$A --env BLACKMAMBA_MOE_GROUPED_TILES --values 0000,0001,0002,0003,0004,0005,0007 \
    > "$OUT/sweep_fc2.log" 2>&1
python3 cuda/dev/ab_prefill.py --env BLACKMAMBA_MOE_PLAIN_TILES --values 0,1 --no-same \
    --batches 1 --length 2,4,8,16,32,64,128,256,384,512 --rounds 3 > "$OUT/ab_plain.log" 2>&1
python3 cuda/dev/ab_prefill.py --env BLACKMAMBA_MOE_PLAIN_TILES --values 0,1 --no-same \
    --batches 2,4 --length 16,64 --rounds 3 > "$OUT/ab_plain_b.log" 2>&1
