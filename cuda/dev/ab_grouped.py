"""Same-process A/B of switches read by the grouped experts (cuda/grouped.cu) at the 2.8B
shape's d, F, X (random bf16 weights, uniform random routing; dev only, torch for the
timing): each named set of environment variables, alternated `rounds` times, CUDA-graph
replays of bm_cuda_moe_grouped (gpu_timing.graph_ms), outputs compared bit for bit.

    python3 cuda/dev/ab_grouped.py --sets "old:BLACKMAMBA_MOE_TMA=0;new:" \
                                   [--tokens 2048,16384] [--rounds 3]

`grouped_call(T)` is also the target process of cuda/dev/ncu_grouped.py.
"""
import argparse
import ctypes
import os

import torch

from gpu_timing import graph_ms

from blackmamba import _lib

P, I64, I32, SZ = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_size_t


D, F, X = 1472, 3872, 8


def grouped_call(T, seed=0, act=2):
    """A function running bm_cuda_moe_grouped once on torch's current stream, at T tokens
    (uniform random routing) and the 2.8B shape's d, F, X, activation `act` (bm_act: 0 exact
    GELU, the model's default, 1 tanh GELU, 2 SiLU); and its output tensor."""
    lib = ctypes.CDLL(_lib.C().__file__)
    lib.bm_cuda_moe_grouped.argtypes = [P, P, P, P, P, I32, I32, P, I64, I64, I64, I64, P, SZ, P]
    lib.bm_cuda_moe_grouped_workspace.argtypes = [I64, I64, I64, I64, I32]
    lib.bm_cuda_moe_grouped_workspace.restype = SZ
    dev = torch.device("cuda")
    torch.manual_seed(seed)
    w1 = (torch.randn(X, 2 * F, D, device=dev) * (0.5 / D ** 0.5)).to(torch.bfloat16)
    w2 = (torch.randn(X, D, F, device=dev) * (0.5 / F ** 0.5)).to(torch.bfloat16)
    x = torch.randn(T, D, device=dev)
    ids = torch.randint(0, X, (T,), device=dev, dtype=torch.int32)
    g = torch.rand(T, device=dev) * 0.9 + 0.1
    out = torch.empty(T, D, device=dev)
    nb = lib.bm_cuda_moe_grouped_workspace(T, D, X, F, 0)
    ws = torch.empty(nb, dtype=torch.uint8, device=dev)

    def run():
        s = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        st = lib.bm_cuda_moe_grouped(x.data_ptr(), ids.data_ptr(), g.data_ptr(), w1.data_ptr(),
                                     w2.data_ptr(), act, 0, out.data_ptr(), T, D, X, F,
                                     ws.data_ptr(), nb, s)
        assert st == 0
    return run, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", required=True, help='"name:K=V,K=V;name:K=V"')
    ap.add_argument("--tokens", default="2048,16384")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--act", type=int, default=2, help="0 exact GELU, 1 tanh GELU, 2 SiLU")
    args = ap.parse_args()
    sets = {}
    for part in args.sets.split(";"):
        name, _, kvs = part.partition(":")
        sets[name] = dict(kv.split("=", 1) for kv in kvs.split(",") if kv)
    keys = sorted({k for kv in sets.values() for k in kv})
    ok = True
    for T in [int(t) for t in args.tokens.split(",")]:
        run, out = grouped_call(T, act=args.act)
        ms = {n: [] for n in sets}
        ref = {}
        for _ in range(args.rounds):
            for n, kv in sets.items():
                for k in keys:
                    os.environ.pop(k, None)
                os.environ.update(kv)
                run()
                torch.cuda.synchronize()
                ref.setdefault(n, out.clone())
                ms[n].append(graph_ms(run, 10, 11))
        first = next(iter(sets))
        same = all(torch.equal(ref[first], ref[n]) for n in sets)
        ok &= same
        print(f"T={T} act={args.act}: " + "  ".join(f"{n} " + " ".join(f"{v:.4f}" for v in ms[n]) + " ms"
                                     for n in sets) + f"  | bit-identical: {same}", flush=True)
    print("ALL BIT-IDENTICAL" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
