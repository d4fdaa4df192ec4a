"""Target process for Nsight Compute (dev): one grouped expert MLP call (grouped.cu) at the
2.8B shape's d, F, X with T tokens (default 16384, uniform random routing; ab_grouped.py's
grouped_call), so that ncu sees the prefill cores (the TMA core by default;
BLACKMAMBA_MOE_TMA=0 the cp.async wgmma core). Run from cuda/dev:

    ncu --clock-control none -k regex:'grouped_tma|grouped_wgmma' -c 2 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
        python3 ncu_grouped.py [T] [act]

act: 0 exact GELU (the model's), 1 tanh GELU, 2 SiLU (the default here).
"""
import sys

import torch

from ab_grouped import grouped_call


def main():
    run, _ = grouped_call(int(sys.argv[1]) if len(sys.argv) > 1 else 16384,
                          act=int(sys.argv[2]) if len(sys.argv) > 2 else 2)
    for _ in range(2):
        run()
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
