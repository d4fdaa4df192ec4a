"""The selective scan prefill, one pass against sequence-parallel (cuda/scan.cu), at the 2.8B
width (E = 2944, N = 16, L = 2048, float32, z/D/bias/softplus) for b = 1, 2, 4, 8, 16.

Calls bm_cuda_scan_forward_ws of the built package (blackmamba._C through ctypes, no dev
library) on torch tensors; each line is the median of 11 CUDA-graph replays of 3 launches
(bench_kernels.py's method), after warm-up. segments: 1 = the one-pass kernel (auto TPC),
0 = the auto rule, S = forced. Also checks the auto result against the one-pass result.
  python3 cuda/dev/bench_scanseg.py
"""
import ctypes

import torch

from gpu_timing import graph_ms

from blackmamba import _lib

DEV = "cuda"
lib = ctypes.CDLL(_lib.C().__file__)
P, I64, I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
lib.bm_cuda_scan_forward_ws.argtypes = ([P] * 8 + [I32, P, P, P, P, P] + [I64] * 4 +
                                        [I32, I32, I32, P, ctypes.c_size_t, P])
lib.bm_cuda_scan_forward_ws.restype = I32
lib.bm_cuda_scan_workspace.argtypes = [I64, I64]
lib.bm_cuda_scan_workspace.restype = ctypes.c_size_t


bench = graph_ms  # median ms of one call, CUDA graph replays


def main():
    L, E, N = 2048, 2944, 16
    print(f"device: {torch.cuda.get_device_name()}; scan L={L} E={E} N={N}, ms per scan")
    ws = torch.empty(64 * 16 * E * (N + 1), device=DEV)   # enough for any S * b <= 1024
    print(f"bm_cuda_scan_workspace(E, N) = {lib.bm_cuda_scan_workspace(E, N)} bytes")
    for b in (1, 2, 4, 8, 16):
        g = torch.Generator(device=DEV).manual_seed(b)
        rn = lambda *s: torch.randn(*s, device=DEV, generator=g)  # noqa: E731
        t = dict(u=rn(b, L, E), delta=torch.rand(b, L, E, device=DEV, generator=g) * 7 - 6,
                 z=rn(b, L, E), A=-(torch.rand(E, N, device=DEV, generator=g) * N + 0.5),
                 B=rn(b, L, N), C=rn(b, L, N), D=rn(E), bias=rn(E) * 0.5)
        h0 = rn(b, E, N)
        outs = {}

        def run(seg, y, hs):
            hs.copy_(h0)
            rc = lib.bm_cuda_scan_forward_ws(
                *[t[k].data_ptr() for k in ("u", "delta", "A", "B", "C", "D", "z", "bias")], 1,
                hs.data_ptr(), hs.data_ptr(), y.data_ptr(), None, None, b, L, E, N, 0, -1, seg,
                ws.data_ptr(), ws.numel() * 4, torch.cuda.current_stream().cuda_stream)
            assert rc == 0, rc
        segs = [1, 0] + {1: [4, 8, 11, 16, 22], 2: [3, 5, 8], 4: [2, 3], 8: [2], 16: []}[b]
        for seg in segs:
            y, hs = torch.empty(b, L, E, device=DEV), torch.empty(b, E, N, device=DEV)
            ms = bench(lambda: run(seg, y, hs))
            run(seg, y, hs)
            torch.cuda.synchronize()
            outs[seg] = (y.clone(), hs.clone())
            name = {1: "one pass", 0: "auto"}.get(seg, f"S={seg}")
            err = ""
            if seg != 1:
                y1, h1 = outs[1]
                ey = ((y - y1).norm() / y1.norm()).item()
                eh = ((hs - h1).norm() / h1.norm()).item()
                err = f"  rel diff vs one pass: y {ey:.2e} state {eh:.2e}"
            print(f"  b={b:2d} {name:9s} {ms:8.4f} ms{err}")
        del t, outs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
