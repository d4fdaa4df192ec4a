"""Target process for Nsight Compute (dev): one grouped expert MLP call (grouped.cu) at the
2.8B shape's d, F, X with T tokens (default 16384, uniform random routing), so that ncu sees
the prefill cores (the TMA core by default; BLACKMAMBA_MOE_TMA=0 the cp.async wgmma core).

    ncu --clock-control none -k regex:'grouped_tma|grouped_wgmma' -c 2 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
        python3 cuda/dev/ncu_grouped.py [T]
"""
import ctypes
import sys

import torch

from blackmamba import _lib

P, I64, I32, SZ = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_size_t


def main():
    T = int(sys.argv[1]) if len(sys.argv) > 1 else 16384
    d, F, X = 1472, 3872, 8
    lib = ctypes.CDLL(_lib.C().__file__)
    lib.bm_cuda_moe_grouped.argtypes = [P, P, P, P, P, I32, I32, P, I64, I64, I64, I64, P, SZ, P]
    lib.bm_cuda_moe_grouped_workspace.argtypes = [I64, I64, I64, I64, I32]
    lib.bm_cuda_moe_grouped_workspace.restype = SZ
    dev = torch.device("cuda")
    torch.manual_seed(0)
    w1 = (torch.randn(X, 2 * F, d, device=dev) * (0.5 / d ** 0.5)).to(torch.bfloat16)
    w2 = (torch.randn(X, d, F, device=dev) * (0.5 / F ** 0.5)).to(torch.bfloat16)
    x = torch.randn(T, d, device=dev)
    ids = torch.randint(0, X, (T,), device=dev, dtype=torch.int32)
    g = torch.rand(T, device=dev) * 0.9 + 0.1
    out = torch.empty(T, d, device=dev)
    nb = lib.bm_cuda_moe_grouped_workspace(T, d, X, F, 0)
    ws = torch.empty(nb, dtype=torch.uint8, device=dev)
    s = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    for _ in range(2):
        st = lib.bm_cuda_moe_grouped(x.data_ptr(), ids.data_ptr(), g.data_ptr(), w1.data_ptr(),
                                     w2.data_ptr(), 2, 0, out.data_ptr(), T, d, X, F,
                                     ws.data_ptr(), nb, s)
        assert st == 0
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
