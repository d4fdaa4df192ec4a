"""The one-pass selective scan's variants (cuda/scan.cu, VAR 1..4) against each other, in one
process, at the 2.8B width (E = 2944, N = 16, L = 2048, float32, z/D/bias/softplus).

Calls bm_cuda_scan_forward_ws of the built package (blackmamba._C through ctypes) on torch
tensors; each time is the median of 11 CUDA-graph replays of 3 launches (bench_kernels.py's
method) after warm-up, and every variant of a shape is timed in two interleaved rounds (A B A
B), both printed, so that clock drift shows. Also y and the state of each variant against VAR 1.
Last, the 16-bit activations (bm_cuda_scan_forward_act: u, delta, z, y in bf16 / fp16) at b = 8
against the float32 kernel in the same rounds: bf16 is the reference kernel's own dtype.
  python3 cuda/dev/bench_scanvar.py            the table
  python3 cuda/dev/bench_scanvar.py --ncu      one b=8 launch of VAR 3, then one of VAR 4 (for
                                               ncu -k regex:scan_fwd -c 2)
"""
import ctypes
import sys
import time

import torch

from gpu_timing import graph_ms

from blackmamba import _lib

DEV = "cuda"
lib = ctypes.CDLL(_lib.C().__file__)
P, I64, I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
lib.bm_cuda_scan_forward_ws.argtypes = ([P] * 8 + [I32, P, P, P, P, P] + [I64] * 4 +
                                        [I32, I32, I32, P, ctypes.c_size_t, P])
lib.bm_cuda_scan_forward_ws.restype = I32
lib.bm_cuda_scan_packed_calls.restype = ctypes.c_longlong
lib.bm_cuda_scan_forward_act.argtypes = [P] * 8 + [I32, P, P, P, I32] + [I64] * 4 + [P]
lib.bm_cuda_scan_forward_act.restype = I32


bench = graph_ms  # median ms of one call, CUDA graph replays


def setup(b, L, E, N, z=True, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    rn = lambda *s: torch.randn(*s, device=DEV, generator=g)  # noqa: E731
    t = dict(u=rn(b, L, E), delta=torch.rand(b, L, E, device=DEV, generator=g) * 7 - 6,
             z=rn(b, L, E) if z else None, A=-(torch.rand(E, N, device=DEV, generator=g) * N + 0.5),
             B=rn(b, L, N), C=rn(b, L, N), D=rn(E), bias=rn(E) * 0.5)
    t["h0"] = rn(b, E, N)
    return t


def runner(t, b, L, E, N, var, seg=1, bf16=False):
    y = None if bf16 else torch.empty(b, L, E, device=DEV)
    ybf = torch.empty(b, L, E, dtype=torch.int16, device=DEV) if bf16 else None
    ylo = torch.empty(b, L, E, dtype=torch.int16, device=DEV) if bf16 == 2 else None
    hs = torch.empty(b, E, N, device=DEV)
    ws = torch.empty(64 * b * E * (N + 1), device=DEV) if seg != 1 else None
    ptr = lambda x: None if x is None else x.data_ptr()  # noqa: E731

    def run():
        rc = lib.bm_cuda_scan_forward_ws(
            *[ptr(t[k]) for k in ("u", "delta", "A", "B", "C", "D", "z", "bias")], 1,
            t["h0"].data_ptr(), hs.data_ptr(), ptr(y), ptr(ybf), ptr(ylo), b, L, E, N, 0, var, seg,
            ptr(ws), 0 if ws is None else ws.numel() * 4, torch.cuda.current_stream().cuda_stream)
        assert rc == 0, rc
    return run, (y if y is not None else ybf), hs


def runner_act(t, b, L, E, N, tdt):
    """bm_cuda_scan_forward_act: u, delta, z and y in tdt (torch.bfloat16 / float16 / float32),
    the rest float32, as the reference's kernel takes its activations."""
    adt = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[tdt]
    a = {k: t[k].to(tdt) for k in ("u", "delta", "z")}
    y = torch.empty(b, L, E, dtype=tdt, device=DEV)
    hs = torch.empty(b, E, N, device=DEV)

    def run():
        rc = lib.bm_cuda_scan_forward_act(
            a["u"].data_ptr(), a["delta"].data_ptr(), t["A"].data_ptr(), t["B"].data_ptr(),
            t["C"].data_ptr(), t["D"].data_ptr(), a["z"].data_ptr(), t["bias"].data_ptr(), 1,
            t["h0"].data_ptr(), hs.data_ptr(), y.data_ptr(), adt, b, L, E, N,
            torch.cuda.current_stream().cuda_stream)
        assert rc == 0, rc
    return run, y, hs


def act_dtypes(L, E):
    """16-bit activations (ADT) at b = 8, N = 16 against the float32 default, interleaved;
    each y against the float32 kernel's y on the same (rounded) inputs."""
    b, N = 8, 16
    t = setup(b, L, E, N, True, seed=8)
    kinds = (torch.float32, torch.bfloat16, torch.float16)
    runs = {k: runner_act(t, b, L, E, N, k) for k in kinds}
    times = {k: [] for k in kinds}
    for _ in range(2):
        for k in kinds:
            times[k].append(bench(runs[k][0]))
    # bytes of the activations (u, delta, z read, y written) at each width
    for k in kinds:
        w = torch.tensor([], dtype=k).element_size()
        gbs = 4 * b * L * E * w / min(times[k]) / 1e6
        ref32, hs32 = None, None
        if k != torch.float32:  # the float32 kernel on this dtype's rounded inputs
            t32 = dict(t, **{n: t[n].to(k).float() for n in ("u", "delta", "z")})
            r32 = runner_act(t32, b, L, E, N, torch.float32)
            r32[0]()
            runs[k][0]()
            torch.cuda.synchronize()
            ref32, hs32 = r32[1], r32[2]
            diff = (f"y vs float32 kernel {rel(runs[k][1].float(), ref32):.2e}, state "
                    f"{rel(runs[k][2], hs32):.2e}")
        else:
            diff = ""
        r = " ".join(f"{x:.4f}" for x in times[k])
        print(f"  b=8 N=16 {str(k).split('.')[-1]:8s} activations: {r} ms  act bytes {gbs:6.0f} GB/s"
              f"  ref 0.82 ms (bf16): x{0.82 / min(times[k]):.2f}  {diff}", flush=True)
    del t, runs
    torch.cuda.empty_cache()


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def warm_clocks():
    x = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    t0 = time.time()
    while time.time() - t0 < 1.0:
        torch.matmul(x, x)
        torch.cuda.synchronize()


def main():
    if "--ncu" in sys.argv:
        b, L, E, N = 8, 2048, 2944, 16
        t = setup(b, L, E, N)
        for var in (3, 4):
            runner(t, b, L, E, N, var)[0]()
        torch.cuda.synchronize()
        return
    print(f"device: {torch.cuda.get_device_name()}; ms per scan, two interleaved rounds")
    warm_clocks()
    L, E = 2048, 2944
    cases = [  # (label, b, N, z, seg, bf16 (1: hi, 2: hi + lo), variants; -1 the default)
        ("b=8 N=16 (issue 4's shape)", 8, 16, True, 1, 0, (1, 2, 3, 4, -1)),
        ("b=8 N=16 bf16 y (prefill B=8)", 8, 16, True, 1, 1, (1, 3, 4)),
        ("b=8 N=16 bf16 hi+lo y", 8, 16, True, 1, 2, (1, 3)),
        ("b=8 N=16 no z", 8, 16, False, 1, 0, (1, 3)),
        ("b=1 one pass (TPC 4)", 1, 16, True, 1, 0, (1, 3, -1)),
        ("b=1 auto (segmented: VAR 1 kernels)", 1, 16, True, 0, 1, (-1,)),
        ("b=2 auto (segmented)", 2, 16, True, 0, 1, (-1,)),
        ("b=4 one pass", 4, 16, True, 1, 0, (1, 3)),
        ("b=16 one pass", 16, 16, True, 1, 0, (1, 3, -1)),
        ("b=8 N=4 (TPC 1: VAR 1 only)", 8, 4, True, 1, 0, (1, 3)),
    ]
    for label, b, N, z, seg, bf16, variants in cases:
        t = setup(b, L, E, N, z, seed=b)
        runs = {v: runner(t, b, L, E, N, v, seg, bf16) for v in variants}
        times = {v: [] for v in variants}
        for _ in range(2):
            for v in variants:
                times[v].append(bench(runs[v][0]))
        base = variants[0]
        runs[base][0]()
        torch.cuda.synchronize()
        yb, hb = runs[base][1].clone(), runs[base][2].clone()
        for v in variants:
            runs[v][0]()
            torch.cuda.synchronize()
            y, h = runs[v][1], runs[v][2]
            if bf16:
                diff = f"bf16 hi bits differing {(y != yb).float().mean().item():.2e}"
            else:
                diff = f"y {rel(y, yb):.2e}"
            r = " ".join(f"{x:.4f}" for x in times[v])
            ratio = f"  ref 0.82 ms: x{0.82 / min(times[v]):.2f}" if (b, N) == (8, 16) else ""
            print(f"  {label:38s} var {v:2d}: {r} ms{ratio}  vs var {base}: {diff} state "
                  f"{rel(h, hb):.2e}", flush=True)
        del t, runs
        torch.cuda.empty_cache()
    print("16-bit activations (bm_cuda_scan_forward_act):")
    act_dtypes(L, E)
    print("packed launches:", lib.bm_cuda_scan_packed_calls())


if __name__ == "__main__":
    main()
