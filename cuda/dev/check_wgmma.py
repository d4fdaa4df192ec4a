"""The wgmma core of grouped.cu (grouped_wgmma.cuh) as a plain dense GEMM first: one expert
(X = 1, every token routed to it), so fc1 is xb (T, d) @ fc1 (2F, d)^T and its epilogue
output, the bf16 hidden bf16(act(g) * u), is read back from the workspace and compared
element by element with float64; where it is wrong, a map of the wrong 8 x 8 blocks (rows
down, columns across) shows which part of the tile layout is off. Then fc2's output.
Dev script for the GPU machine:

    PYTHONPATH=. python3 cuda/dev/check_wgmma.py [--ncu]

--ncu: only two calls at the 2.8B shape (T = 16384), for ncu's kernel profiles.
"""
import ctypes
import os

import numpy as np

from blackmamba import _lib, cuda, ref

P, I64, I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
LIB = ctypes.CDLL(_lib.C().__file__)
LIB.bm_cuda_moe_grouped.argtypes = [P, P, P, P, P, I32, I32, P, I64, I64, I64, I64, P,
                                    ctypes.c_size_t, P]
LIB.bm_cuda_moe_grouped_workspace.argtypes = [I64, I64, I64, I64, I32]
LIB.bm_cuda_moe_grouped_workspace.restype = ctypes.c_size_t
LIB.bm_cuda_last_error.restype = ctypes.c_char_p
LIB.bm_cuda_moe_grouped_wgmma_launches.restype = ctypes.c_longlong
D = cuda.to_device
SILU = 2


def a256(n):
    return (n + 255) // 256 * 256


def run(T, d, F, X, tiles, mode="force", seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, d)).astype(np.float32)
    ids = np.zeros(T, np.int32) if X == 1 else rng.integers(0, X, T).astype(np.int32)
    fc1 = ref.f32_to_bf16((0.3 * rng.standard_normal((X, 2 * F, d))).astype(np.float32))
    fc2 = ref.f32_to_bf16((0.3 * rng.standard_normal((X, d, F))).astype(np.float32))
    nb = LIB.bm_cuda_moe_grouped_workspace(T, d, X, F, 0)
    ws, out = D(np.zeros(nb, np.uint8)), D(np.zeros((T, d), np.float32))
    dx, di, d1, d2 = D(x), D(ids), D(fc1), D(fc2)
    os.environ["BLACKMAMBA_MOE_WGMMA"] = mode
    os.environ["BLACKMAMBA_MOE_WGMMA_TILES"] = tiles
    n0 = LIB.bm_cuda_moe_grouped_wgmma_launches()
    st = LIB.bm_cuda_moe_grouped(dx.ptr, di.ptr, None, d1.ptr, d2.ptr, SILU, 0, out.ptr, T, d,
                                 X, F, ws.ptr, nb, ctypes.c_void_p(1))
    assert st == 0, LIB.bm_cuda_last_error().decode()
    launches = LIB.bm_cuda_moe_grouped_wgmma_launches() - n0
    w = ws.numpy()
    off = a256(T * 4) + a256((X + 1) * 4) + a256(T * d * 2)
    ab = ref.bf16_to_f32(w[off:off + T * F * 2].view(np.uint16).reshape(T, F)).astype(np.float64)
    xb = ref.bf16_to_f32(ref.f32_to_bf16(x)).astype(np.float64)
    w1 = ref.bf16_to_f32(fc1).astype(np.float64)
    w2 = ref.bf16_to_f32(fc2).astype(np.float64)
    msg = [f"T={T} d={d} F={F} X={X} tiles={tiles} mode={mode}: wgmma launches {launches}"]
    if X == 1:
        a = xb @ w1[0].T
        h = ref.ACTIVATIONS["silu"](a[:, :F]) * a[:, F:]
        err = np.abs(ab - h) / (np.abs(h).max() + 1e-30)
        msg.append(f"fc1 hidden max err {err.max():.2e} (bf16: < 8e-3)")
        if err.max() > 8e-3:
            bad = err > 8e-3
            Rb, Cb = (T + 7) // 8, (F + 7) // 8
            m = np.zeros((Rb, Cb), bool)
            for i in range(Rb):
                for j in range(Cb):
                    m[i, j] = bad[8 * i:8 * i + 8, 8 * j:8 * j + 8].any()
            msg.append("bad 8x8 blocks (rows down, cols across), first 32 x 48:")
            msg += ["".join("#" if v else "." for v in row[:48]) for row in m[:32]]
            r, c = np.argwhere(bad)[0]
            msg.append(f"first bad ({r}, {c}): got {ab[r, c]:.5f} want {h[r, c]:.5f}; "
                       f"does it match another column? "
                       f"{np.argwhere(np.abs(h[r] - ab[r, c]) < 1e-2 * abs(h[r, c]) + 1e-6)[:5].ravel()}")
        want = ab @ w2[0].T  # fc2 from the GPU's own hidden: the fc2 GEMM alone
        e2 = np.abs(out.numpy() - want).max() / (np.abs(want).max() + 1e-30)
        msg.append(f"fc2 (from the GPU hidden) max err {e2:.2e} (fp32 sums: < 1e-4)")
    got = out.numpy()
    want = ref.moe_experts(x, ids, None, fc1, fc2, "silu")
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    msg.append(f"out rel err vs float64 {rel:.2e} (bf16: < 1.5e-2)")
    print("\n  ".join(msg), flush=True)


def profile_once(T=16384, d=1472, F=3872, X=8):
    """One call at the 2.8B shape under the defaults, no checks: for ncu (--ncu)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, d)).astype(np.float32)
    ids = rng.integers(0, X, T).astype(np.int32)
    # bf16 bit patterns 0x3c00..0x3cff and their negatives: values of magnitude ~0.008-0.016
    sign = lambda n: (rng.integers(0, 2, n, dtype=np.uint16) << 15).astype(np.uint16)
    fc1 = (rng.integers(0x3c00, 0x3d00, (X, 2 * F, d), dtype=np.uint16) | sign((X, 2 * F, d)))
    fc2 = (rng.integers(0x3c00, 0x3d00, (X, d, F), dtype=np.uint16) | sign((X, d, F)))
    nb = LIB.bm_cuda_moe_grouped_workspace(T, d, X, F, 0)
    ws, out = D(np.zeros(nb, np.uint8)), D(np.zeros((T, d), np.float32))
    dx, di, d1, d2 = D(x), D(ids), D(fc1), D(fc2)
    for _ in range(2):
        st = LIB.bm_cuda_moe_grouped(dx.ptr, di.ptr, None, d1.ptr, d2.ptr, SILU, 0, out.ptr, T,
                                     d, X, F, ws.ptr, nb, ctypes.c_void_p(1))
        assert st == 0, LIB.bm_cuda_last_error().decode()
    cuda.synchronize()
    print("profiled call done", flush=True)


if __name__ == "__main__":
    import sys
    if "--ncu" in sys.argv:
        profile_once()
        sys.exit(0)
    for tiles in ("11", "22", "33", "44", "55"):
        run(256, 128, 128, 1, tiles)
    run(200, 72, 40, 1, "11")      # partial tiles, K tail (72 = 64 + 8), column tail
    run(1000, 200, 136, 5, "11")   # several experts
    run(1000, 200, 136, 5, "00", mode="0")  # the mma.sync core, same case
