"""Target process for Nsight Compute (dev): one (Mamba + MoE) layer pair at the 2.8B shape,
decode graph replays at batch B (default 64), so that ncu sees the batched decode kernels
(grouped.cu's decode GEMMs, the float4 scan step) with real shapes.

    ncu --clock-control none -k regex:'grouped_gemm|step_scan4' -c 3 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        python3 cuda/dev/ncu_dec64.py [B]
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from bench_gpu import SHAPE_2_8B, random_bf16_tensors  # noqa: E402

from blackmamba import _lib, model_cuda  # noqa: E402
from blackmamba.config import Config  # noqa: E402


def main():
    B = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    shape = dict(SHAPE_2_8B, num_layers=2, mamba_moe_layers=["r", "8"])
    cfg = Config.from_dict(shape)
    model = model_cuda.CudaModel(cfg, random_bf16_tensors(cfg), dtype="bfloat16")
    rng = np.random.default_rng(0)
    st = model.new_state(B)
    model.prefill(rng.integers(0, cfg.real_vocab_size, (B, 8)), st, logits=None)
    model.step(rng.integers(0, cfg.real_vocab_size, B), st)      # capture
    _lib.C().cuda_bench_step(model._eng, st._h, 2, 3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
