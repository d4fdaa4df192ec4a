"""Time the CUDA kernels of cuda/bm_cuda.h on the GPU machine (dev harness, not the package).

`bash cuda/dev/build_dev.sh && python3 cuda/dev/bench_kernels.py [out.json]`

Each measurement: warm-up, then the median over repetitions of a CUDA graph replaying
`inner` launches (graphs remove the host's ctypes/launch gaps, which would otherwise dominate
microsecond kernels), divided by `inner`. Launchers that synchronise the host (the prefill
MoE) are timed with plain events. Bytes are the floor's (each input read once, each output
written once); GB/s is compared with a measured device-to-device copy (read + write).
"""
import ctypes
import json
import math
import os
import statistics
import sys
import time

import torch

from gpu_timing import events_ms, graph_ms

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bmcuda as bc  # noqa: E402

LIB = bc.load()
DEV = torch.device("cuda")
RESULTS = []
COPY_GBS = [None]


def S():
    return bc.stream()


def P(t):
    return bc.ptr(t)


def bench(fn, inner=20, reps=15, graph=True):
    """Median ms of one fn() (fn enqueues work on the current stream)."""
    if graph:
        try:
            return graph_ms(fn, inner, reps)
        except Exception as exc:  # noqa: BLE001
            print(f"  (graph capture failed: {exc}; timing with events)")
            torch.cuda.synchronize()
    return events_ms(fn, inner, reps, sleep_cycles=2_000_000)


def report(name, ms, nbytes=None, flops=None, note=""):
    gbs = nbytes / ms / 1e6 if nbytes else None
    tfs = flops / ms / 1e9 if flops else None
    row = dict(name=name, ms=ms, GBs=gbs, TFLOPs=tfs, note=note)
    if gbs and COPY_GBS[0]:
        row["frac_copy"] = gbs / COPY_GBS[0]
    RESULTS.append(row)
    extra = ""
    if gbs:
        extra += f" {gbs:8.0f} GB/s"
        if COPY_GBS[0]:
            extra += f" ({100 * gbs / COPY_GBS[0]:5.1f}% of copy)"
    if tfs:
        extra += f" {tfs:7.1f} TFLOP/s"
    print(f"{name:58s} {ms * 1000:10.2f} us{extra}  {note}", flush=True)


def randn(*shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, device=DEV) * scale).to(dtype)


def bf16_bits(t):
    return t.to(torch.bfloat16).view(torch.int16)


# ---- ceilings ------------------------------------------------------------------------------
def smi_clocks():
    import subprocess
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception as exc:  # noqa: BLE001
        return str(exc)


def bench_copy():
    # Warm the clocks up first (the card idles at a low SM clock).
    x = randn(8192, 8192, dtype=torch.bfloat16)
    y = randn(8192, 8192, dtype=torch.bfloat16)
    t0 = time.time()
    while time.time() - t0 < 1.0:
        torch.matmul(x, y)
        torch.cuda.synchronize()
    print("  clocks after warm-up (sm, mem, power, temp):", smi_clocks())
    ms = bench(lambda: torch.matmul(x, y), inner=5, reps=7)
    report("torch bf16 GEMM 8192^3 (random data)", ms, flops=2 * 8192 ** 3, note="the matrix ceiling")
    best = 0.0
    for n in (1 << 28, 1 << 29):   # 1 and 2 GiB of float32
        a = torch.randn(n, device=DEV)
        b = torch.empty_like(a)
        for kind, f in (("copy_", lambda: b.copy_(a)), ("add", lambda: torch.add(a, 1.0, out=b))):
            ms = bench(f, inner=5, reps=11)
            gbs = 2 * 4 * n / ms / 1e6
            best = max(best, gbs)
            report(f"d2d {kind} {4 * n >> 30} GiB (read+write)", ms, 2 * 4 * n)
    COPY_GBS[0] = best
    print(f"  bandwidth ceiling used below: {best:.0f} GB/s (best of the above)")


# ---- scan ------------------------------------------------------------------------------------
def scan_setup(b, L, E, N, with_z=True):
    t = dict(u=randn(b, L, E), delta=torch.rand(b, L, E, device=DEV) * 7 - 6,
             z=randn(b, L, E) if with_z else None, A=-(torch.rand(E, N, device=DEV) * N + 0.5),
             B=randn(b, L, N), C=randn(b, L, N), D=randn(E), bias=randn(E, scale=0.5),
             y=torch.empty(b, L, E, device=DEV), hs=torch.empty(b, E, N, device=DEV))
    args = [P(t[k]) for k in ("u", "delta", "A", "B", "C", "D", "z", "bias")]

    def fn(tpc=0, var=-1):
        bc.call(LIB, "bm_cuda_scan_forward_variant", *args, 1, None, P(t["hs"]), P(t["y"]), b, L, E, N, tpc, var, S())
    return t, fn


def bench_scan():
    configs = [(8, 2048, 2944, 16, tpc, var, True) for var in (0, 1, 3, 4) for tpc in (0, 1, 2, 4)]
    configs += [(8, 2048, 2944, 16, 0, -1, False), (8, 2048, 2944, 4, 0, -1, True), (16, 2048, 2944, 16, 0, -1, True),
                (8, 2048, 2304, 16, 0, -1, True), (1, 2048, 2944, 16, 0, -1, True), (1, 2048, 2944, 16, 1, -1, True),
                (2, 2048, 2944, 16, 0, -1, True)]
    cache = {}
    for (b, L, E, N, tpc, var, with_z) in configs:
        key = (b, L, E, N, with_z)
        if key not in cache:
            cache.clear()
            torch.cuda.empty_cache()
            cache[key] = scan_setup(b, L, E, N, with_z)
        _, fn = cache[key]
        ms = bench(lambda: fn(tpc, var), inner=3, reps=11)
        nact = 4 if with_z else 3
        nbytes = nact * b * L * E * 4 + 2 * b * L * N * 4 + b * E * N * 4
        note = "ref mamba bf16 0.82 ms: x%.2f" % (0.82 / ms) if (b, L, E, N) == (8, 2048, 2944, 16) else ""
        vs = "default" if var < 0 else f"var={var}"
        report(f"scan_forward b={b} L={L} E={E} N={N} tpc={tpc} {vs}{'' if with_z else ' no z'}", ms, nbytes, note=note)
    cache.clear()


def bench_scan_step():
    for b in (1, 8, 64):
        E, N = 2944, 16
        st = randn(b, E, N)
        x, dl, z = randn(b, E), randn(b, E), randn(b, E)
        A = -(torch.rand(E, N, device=DEV) * N + 0.5)
        Bs, Cs, D, bias = randn(b, N), randn(b, N), randn(E), randn(E)
        y = torch.empty(b, E, device=DEV)
        args = [P(t) for t in (st, x, dl, A, Bs, Cs, D, z, bias)]
        ms = bench(lambda: bc.call(LIB, "bm_cuda_scan_step", *args, 1, P(y), b, E, N, S()), inner=50)
        report(f"scan_step b={b} E={E} N={N}", ms, 2 * b * E * N * 4 + 4 * b * E * 4)


# ---- conv, norms -----------------------------------------------------------------------------
def bench_conv_norm():
    b, L, E, K = 8, 2048, 2944, 4
    x, w, bias = randn(b, L, E), randn(E, K), randn(E)
    cin, cout, y = randn(b, K - 1, E), torch.empty(b, K - 1, E, device=DEV), torch.empty(b, L, E, device=DEV)
    ms = bench(lambda: bc.call(LIB, "bm_cuda_conv_forward", P(x), P(w), P(bias), P(cin), P(cout), P(y), 1,
                               b, L, E, K, S()), inner=5)
    report(f"conv_forward b={b} L={L} E={E} K={K} silu", ms, 2 * b * L * E * 4)
    xs, st, ys = randn(8, E), randn(8, K - 1, E), torch.empty(8, E, device=DEV)
    ms = bench(lambda: bc.call(LIB, "bm_cuda_conv_step", P(xs), P(st), P(w), P(bias), P(ys), 1, 8, E, K, S()), inner=50)
    report(f"conv_step b=8 E={E} K={K}", ms, (2 * 8 * E + 2 * 8 * (K - 1) * E) * 4)
    T, dd = 16384, 1472
    xx, res, wn, bn = randn(T, dd), randn(T, dd), randn(dd), randn(dd)
    out, ro = torch.empty(T, dd, device=DEV), torch.empty(T, dd, device=DEV)
    ms = bench(lambda: bc.call(LIB, "bm_cuda_rms_norm", P(xx), P(res), P(wn), 1e-5, P(out), P(ro), T, dd, S()), inner=10)
    report(f"rms_norm+residual T={T} d={dd}", ms, 4 * T * dd * 4)
    ms = bench(lambda: bc.call(LIB, "bm_cuda_layer_norm", P(xx), P(res), P(wn), P(bn), 1e-5, P(out), T, dd, S()), inner=10)
    report(f"layer_norm+residual T={T} d={dd}", ms, 3 * T * dd * 4)
    for T1 in (1, 8):
        ms = bench(lambda: bc.call(LIB, "bm_cuda_rms_norm", P(xx), P(res), P(wn), 1e-5, P(out), P(ro), T1, dd, S()), inner=50)
        report(f"rms_norm+residual T={T1} d={dd}", ms, 4 * T1 * dd * 4, note="latency")


# ---- GEMV --------------------------------------------------------------------------------------
SHAPES_28B = [("in_proj", 5888, 1472), ("x_proj", 124, 2944), ("dt_proj", 2944, 92), ("out_proj", 1472, 2944),
              ("fc1 (one expert)", 7744, 1472), ("fc2 (one expert)", 1472, 3872), ("lm_head", 50304, 1472)]


def bench_gemv():
    for M in (1, 4, 8):
        for name, Nout, Kin in SHAPES_28B:
            if M > 1 and name not in ("in_proj", "lm_head"):
                continue
            nbytes_w = Nout * Kin * 2
            copies = max(1, math.ceil(240e6 / nbytes_w))      # rotate: the set is > 4x L2
            Ws = [bf16_bits(randn(Nout, Kin)) for _ in range(copies)]
            x, y = randn(M, Kin), torch.empty(M, Nout, device=DEV)
            inner = max(copies, 20)
            for ks in ((0, 1) if M == 1 else (0,)):
                it = [0]

                def fn():
                    W = Ws[it[0] % copies]
                    it[0] += 1
                    bc.call(LIB, "bm_cuda_gemv_ks", P(x), P(W), bc.BM_BF16, None, P(y), M, Nout, Kin, ks, S())
                ms = bench(fn, inner=inner)
                report(f"gemv bf16 {name} M={M} ({Nout}x{Kin}) ks={'auto' if ks == 0 else ks}", ms,
                       nbytes_w + M * (Kin + Nout) * 4)


# ---- MoE ------------------------------------------------------------------------------------------
def bench_moe():
    d, X, F = 1472, 8, 3872
    T = 16384
    x = randn(T, d)
    rw, rb = randn(X, d, scale=d ** -0.5), randn(X)
    ids = torch.empty(T, dtype=torch.int32, device=DEV)
    gates, logits = torch.empty(T, device=DEV), torch.empty(T, X, device=DEV)
    ms = bench(lambda: bc.call(LIB, "bm_cuda_route_top1", P(x), P(rw), bc.BM_F32, P(rb), P(logits), P(ids), P(gates),
                               T, d, X, S()), inner=10)
    report(f"route_top1 T={T} d={d} X={X}", ms, T * d * 4 + T * X * 4 + 8 * T)
    counts, offs, perm = (torch.empty(X, dtype=torch.int32, device=DEV), torch.empty(X + 1, dtype=torch.int32, device=DEV),
                          torch.empty(T, dtype=torch.int32, device=DEV))
    ms = bench(lambda: bc.call(LIB, "bm_cuda_moe_dispatch", P(ids), T, X, P(counts), P(offs), P(perm), S()), inner=10)
    report(f"moe_dispatch T={T} X={X} (one block)", ms, T * 4 * 2)
    print("  expert counts:", counts.tolist())

    fc1 = bf16_bits(randn(X, 2 * F, d, scale=d ** -0.5))
    fc2 = bf16_bits(randn(X, d, F, scale=F ** -0.5))
    fc1_f = fc1.view(torch.bfloat16).float()
    fc2_f = fc2.view(torch.bfloat16).float()
    handle = ctypes.c_void_p()
    bc.call(LIB, "bm_cuda_cublas_create", ctypes.byref(handle))
    out = torch.empty(T, d, device=DEV)
    for Tm in (T, 2048):
        xm, idm, gm, om = x[:Tm], ids[:Tm], gates[:Tm], out[:Tm]
        fl = 6 * Tm * d * F
        for math_mode, mname in ((bc.MATH_FP32, "fp32"), (bc.MATH_TF32, "tf32"), (bc.MATH_BF16, "bf16")):
            wsb = LIB.bm_cuda_moe_experts_workspace(Tm, d, X, F, bc.BM_BF16, math_mode)
            ws = torch.empty(wsb, dtype=torch.uint8, device=DEV)

            def fn():
                bc.call(LIB, "bm_cuda_moe_experts", P(xm), P(idm), P(gm), P(fc1), P(fc2), bc.BM_BF16, bc.ACTS["gelu"],
                        math_mode, P(om), Tm, d, X, F, P(ws), wsb, handle, S())
            ms = bench(fn, inner=1, reps=7, graph=False)
            report(f"moe_experts prefill T={Tm} bf16 weights, math={mname}", ms, flops=fl,
                   note="incl. dispatch, host sync, gather/scatter" + (", bf16->f32 weight expansion" if mname != "bf16" else ""))
            # the same FLOPs as one dense gated MLP through torch/cuBLAS, same precision
            torch.backends.cuda.matmul.allow_tf32 = mname == "tf32"
            if mname == "bf16":
                xd, w1, w2 = xm.to(torch.bfloat16), fc1[0].view(torch.bfloat16), fc2[0].view(torch.bfloat16)
            else:
                xd, w1, w2 = xm, fc1_f[0], fc2_f[0]

            def dense():
                a = xd @ w1.t()
                a = torch.nn.functional.gelu(a[:, :F]) * a[:, F:]
                return a @ w2.t()
            ms = bench(dense, inner=3, reps=7, graph=False)
            report(f"  dense torch gated MLP T={Tm} {mname} (same FLOPs)", ms, flops=fl)
            torch.backends.cuda.matmul.allow_tf32 = False
    bc.call(LIB, "bm_cuda_cublas_destroy", handle)

    # decode: no host sync, each used expert's weights read once
    for Td in (1, 4, 8):
        xd = randn(Td, d)
        idd = torch.randint(0, X, (Td,), dtype=torch.int32, device=DEV)
        gd = torch.rand(Td, device=DEV)
        od = torch.empty(Td, d, device=DEV)
        wsb = LIB.bm_cuda_moe_decode_workspace(Td, F)
        ws = torch.empty(wsb, dtype=torch.uint8, device=DEV)
        used = len(set(idd.tolist()))
        # rotate over copies of the expert weights so that L2 does not serve them
        copies = 2
        f1s = [fc1] + [bf16_bits(randn(X, 2 * F, d, scale=d ** -0.5)) for _ in range(copies - 1)]
        f2s = [fc2] + [bf16_bits(randn(X, d, F, scale=F ** -0.5)) for _ in range(copies - 1)]
        it = [0]

        def fn():
            k = it[0] % copies
            it[0] += 1
            bc.call(LIB, "bm_cuda_moe_experts_decode", P(xd), P(idd), P(gd), P(f1s[k]), P(f2s[k]), bc.BM_BF16,
                    bc.ACTS["gelu"], P(od), Td, d, X, F, P(ws), wsb, S())
        ms = bench(fn, inner=10)
        report(f"moe_experts_decode T={Td} ({used} experts used)", ms, used * 3 * F * d * 2,
               note="bytes = used experts' bf16 weights")


# ---- sinkhorn -------------------------------------------------------------------------------------
def sinkhorn_torch(cost, tol=1e-4, init="blackmamba", max_iters=1000):
    """The same algorithm as PyTorch code runs it (Megatron-style loop, a host sync per check)."""
    T, X = cost.shape
    Cm = torch.exp(2.0 * cost) if init == "blackmamba" else torch.exp(cost)
    d0 = torch.ones(T, device=cost.device, dtype=cost.dtype)
    d1 = 1.0 / (X * Cm.sum(0)) if init == "blackmamba" else torch.ones(X, device=cost.device, dtype=cost.dtype)
    it = 0
    while it < max_iters:
        it += 1
        d1_old = d1
        d0 = (1.0 / T) / (Cm @ d1 + 1e-8)
        d1 = (1.0 / X) / (Cm.t() @ d0 + 1e-8)
        if torch.mean(torch.abs(d1 - d1_old)).item() <= tol:
            break
    return d0[:, None] * Cm * d1[None, :], it


def bench_sinkhorn():
    for T, X, init, scale in ((512, 8, "blackmamba", 1.0), (4096, 8, "blackmamba", 1.0), (4096, 8, "uniform", 1.0),
                              (4096, 8, "uniform", 3.0), (16384, 8, "uniform", 3.0), (2048, 64, "uniform", 2.0)):
        Sm = randn(T, X, scale=scale)
        Pm = torch.empty(T, X, device=DEV)
        it = torch.zeros(1, dtype=torch.int32, device=DEV)
        ms = bench(lambda: bc.call(LIB, "bm_cuda_sinkhorn", P(Sm), P(Pm), T, X, 1e-4, bc.SINKHORN_INIT[init], 1000,
                                   P(it), S()), inner=5, reps=9)
        iters = int(it.item())
        report(f"sinkhorn T={T} X={X} {init} logits*{scale} ({iters} it)", ms, note=f"{1000 * ms / max(iters, 1):.2f} us/iter")
        for dt in (torch.float32, torch.float64):
            Sd = Sm.to(dt)
            sinkhorn_torch(Sd, init=init)
            torch.cuda.synchronize()
            ts = []
            for _ in range(7):
                t0 = time.perf_counter()
                _, itt = sinkhorn_torch(Sd, init=init)
                torch.cuda.synchronize()
                ts.append((time.perf_counter() - t0) * 1000)
            tm = statistics.median(ts)
            report(f"  torch loop {str(dt)[6:]} ({itt} it)", tm, note=f"ours is x{tm / ms:.1f} faster")


def ncu_targets():
    """One scan (default) and one K-split GEMV, for `ncu --kernel-name regex:...`."""
    _, fn = scan_setup(8, 2048, 2944, 16)
    fn()
    W, x, y = bf16_bits(randn(1472, 2944)), randn(1, 2944), torch.empty(1, 1472, device=DEV)
    bc.call(LIB, "bm_cuda_gemv_ks", P(x), P(W), bc.BM_BF16, None, P(y), 1, 1472, 2944, 0, S())
    torch.cuda.synchronize()


def main():
    if "--ncu" in sys.argv:
        ncu_targets()
        return
    # [out.json] [--only copy,scan,sinkhorn,...]: the sections to run (default all)
    args = [a for a in sys.argv[1:] if not a.startswith("--only")]
    only = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--only=")), None)
    out_json = args[0] if args else None
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    t0 = time.time()
    sections = (bench_copy, bench_scan, bench_scan_step, bench_conv_norm, bench_gemv, bench_moe,
                bench_sinkhorn)
    if only:
        sections = [f for f in sections if f.__name__[6:] in only.split(",")]
    for f in sections:
        try:
            f()
        except Exception as exc:  # noqa: BLE001 - keep the other numbers
            import traceback
            traceback.print_exc()
            print(f"{f.__name__} FAILED: {exc}")
        torch.cuda.empty_cache()
    print("  clocks at the end (sm, mem, power, temp):", smi_clocks())
    print(f"bench done in {time.time() - t0:.1f} s")
    if out_json:
        with open(out_json, "w") as fh:
            json.dump(RESULTS, fh, indent=1)


if __name__ == "__main__":
    main()
