"""Target process for Nsight Compute (dev): prefills of (B, L) tokens at the 2.8B shape with
bench_gpu's random bf16 weights, so that ncu sees the prefill's own kernels (the norms, the
routing, conv, scan) in place. Switches come from the environment. From the repository root:

    ncu --clock-control none -k regex:'norm_route_warp|rms_norm' --launch-skip 36 -c 2 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats \
        python3 cuda/dev/ncu_prefill.py [B] [L] [prefills]
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from bench_gpu import SHAPE_2_8B, random_bf16_tensors  # noqa: E402

from blackmamba import model_cuda  # noqa: E402
from blackmamba.config import Config  # noqa: E402


def main():
    B = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    L = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    cfg = Config.from_dict(dict(SHAPE_2_8B))
    model = model_cuda.CudaModel(cfg, random_bf16_tensors(cfg), dtype="bfloat16")
    ids = np.random.default_rng(0).integers(0, cfg.real_vocab_size, (B, L))
    for _ in range(n):
        np.asarray(model.prefill(ids, model.new_state(B), logits="last"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
