"""CPU kernels against their rooflines and references, measured side by side in one run.

    PYTHONPATH=. python3 benchmarks/bench_cpu_ops.py [--threads 2] [--quick]

  a. memory read bandwidth: ops.linear fp32 GEMV at M=1 over a 1.2 GB (Nout, Kin) matrix
     ("fp32 streaming read", the roofline of every decode GEMV below), and numpy.sum over the
     same buffer (1 thread, and 2 Python threads on halves) as a second opinion
  b. selective scan (ops.selective_scan) in state elements/s (b*L*E*N / s) at 1 and 2 threads
     against a vectorised NumPy float32 scan (loop over t, vectorised over (E, N))
  c. decode GEMV over one token's active weights at the 2.8B shapes, bf16 and fp32, every
     matrix its own buffer (one reused matrix would sit in cache), in GB/s of weights read
  d. prefill sgemm at the model's shapes, fp32 and through the bf16 path, in GFLOP/s and as
     a fraction of OpenBLAS's own rate on a large square sgemm

Every figure is the best of several repetitions: the machine may be shared, and the best run
is the one least disturbed. Memory: about 2.5 GB at the peak (1.2 GB each for a. and c.'s
bf16 weights; the fp32 weights of c. are read in two halves of 1.26 GB).
"""
import argparse
import os
import platform
import time

import numpy as np

from blackmamba import ops

# The 2.8B model (BlackMamba 2.8B): d, E = 2d, N, R = ceil(d/16), F, vocabulary, layers of each kind
D, E, N, R, F, V, LAYERS = 1472, 2944, 16, 92, 3872, 50304, 18
# one token's matrices (Nout, Kin): per Mamba layer in_proj, x_proj, dt_proj, out_proj; per MoE
# layer the router and the one expert a token visits (fc1 gated: 2F rows, fc2); the LM head
MAMBA_MATS = [(2 * E, D), (R + 2 * N, E), (E, R), (D, E)]
MOE_MATS = [(8, D), (2 * F, D), (D, F)]
HEAD = (V, D)


def best_time(fn, reps, min_time=0.0):
    """Best wall time of fn() over reps calls (and at least min_time seconds of calls)."""
    best, t_start, n = float("inf"), time.perf_counter(), 0
    while n < reps or time.perf_counter() - t_start < min_time:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        n += 1
    return best


def interleaved(fns, reps):
    """Best time of each fn, calling them in turn so that all see the same machine state."""
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_available_gb():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


def row(name, value, unit, ratio=None, ref=""):
    r = f"{ratio:7.1%} of {ref}" if ratio is not None else ""
    print(f"  {name:<44} {value:10.2f} {unit:<9} {r}".rstrip())


# ---- a. read bandwidth ---------------------------------------------------------------------

def bench_read(threads, reps):
    from concurrent.futures import ThreadPoolExecutor
    Kin = 4096
    Nout = (1200 * 10**6 // 4) // Kin             # 1.2 GB of float32
    w = np.full((Nout, Kin), 0.01, np.float32)    # written, so really in memory
    x = np.full((1, Kin), 0.5, np.float32)
    pool = ThreadPoolExecutor(2)
    halves = [w[: Nout // 2], w[Nout // 2:]]
    t_gemv, t_np1, t_np2 = interleaved([
        lambda: ops.linear(x, w),
        lambda: w.sum(),
        lambda: list(pool.map(np.sum, halves)),
    ], reps)
    pool.shutdown()
    bw = w.nbytes / t_gemv
    print(f"a. memory read bandwidth over {w.nbytes / 1e9:.2f} GB")
    row(f"fp32 GEMV M=1 (ops.linear, {threads} threads)", bw / 1e9, "GB/s")
    row("numpy.sum (1 thread, pairwise sum)", w.nbytes / t_np1 / 1e9, "GB/s", t_gemv / t_np1, "GEMV")
    row("numpy.sum on halves (2 Python threads)", w.nbytes / t_np2 / 1e9, "GB/s", t_gemv / t_np2, "GEMV")
    return w, x, bw


# ---- b. selective scan ---------------------------------------------------------------------

def scan_numpy(u, delta, A, B, C, D_, z, delta_bias):
    """float32 NumPy scan, b = 1: the recurrence loops over t, each step vectorised over (E, N)."""
    dt = delta[0] + delta_bias
    dt = np.where(dt > 20, dt, np.log1p(np.exp(np.minimum(dt, 20))))   # softplus, (L, E)
    du = dt * u[0]                                                       # (L, E)
    h = np.zeros((u.shape[2], A.shape[1]), np.float32)                   # (E, N)
    y = np.empty_like(u[0])
    for t in range(u.shape[1]):
        h = np.exp(dt[t, :, None] * A) * h + du[t, :, None] * B[0, t, None, :]
        y[t] = h @ C[0, t]
    y = (y + D_ * u[0]) * (z[0] / (1 + np.exp(-z[0])))
    return y[None]


def bench_scan(threads, reps, L=2048):
    rng = np.random.default_rng(0)
    f32 = np.float32
    u = rng.standard_normal((1, L, E), dtype=f32)
    delta = (rng.standard_normal((1, L, E), dtype=f32) * 0.5 - 2).astype(f32)
    A = -np.exp(rng.standard_normal((E, N), dtype=f32) * 0.5).astype(f32)
    B = rng.standard_normal((1, L, N), dtype=f32)
    C = rng.standard_normal((1, L, N), dtype=f32)
    D_ = rng.standard_normal(E, dtype=f32)
    z = rng.standard_normal((1, L, E), dtype=f32)
    db = (rng.standard_normal(E, dtype=f32) * 0.1).astype(f32)
    elems = L * E * N
    print(f"b. selective scan, b=1 L={L} E={E} N={N}: state elements/s (L*E*N / s)")
    t_np = best_time(lambda: scan_numpy(u, delta, A, B, C, D_, z, db), max(1, reps // 3))
    row("NumPy float32 (loop over t, vectorised over (E, N))", elems / t_np / 1e9, "G/s")
    try:
        y, _ = ops.selective_scan(u, delta, A, B, C, D_, z, db, True)
    except Exception as exc:  # noqa: BLE001 - the kernel may not be built yet
        print(f"  ops.selective_scan unavailable: {type(exc).__name__}: {exc}")
        return
    y_np = scan_numpy(u, delta, A, B, C, D_, z, db)
    err = np.linalg.norm(y - y_np) / np.linalg.norm(y_np)
    for nt in sorted({1, threads}):
        ops.set_num_threads(nt)
        t = best_time(lambda: ops.selective_scan(u, delta, A, B, C, D_, z, db, True), reps)
        rate = elems / t
        print(f"  {'ops.selective_scan, %d thread%s' % (nt, 's' if nt > 1 else ''):<44} "
              f"{rate / 1e9:10.2f} G/s       {t_np / t:6.1f}x NumPy, {rate / 0.50e9:5.2f}x ggml "
              f"ssm_scan (0.50 G/s, 2 thr)")
    ops.set_num_threads(threads)
    print(f"  (ops vs NumPy float32 output: relative L2 {err:.1e})")


# ---- c. decode GEMV over one token's active weights ----------------------------------------

def token_mats():
    return [s for _ in range(LAYERS) for s in MAMBA_MATS + MOE_MATS] + [HEAD]


def bench_gemv(read_w, read_x, threads, reps):
    mats = token_mats()
    params = sum(n * k for n, k in mats)
    xs = {k: np.full((1, k), 0.5, np.float32) for k in {k for _, k in mats}}
    print(f"c. decode GEMV (M=1) over one token's active weights: {len(mats)} matrices, "
          f"{params:,} params")
    results = {}
    # bf16 (1.26 GB): the 1.2 GB fp32 read (a.) interleaved with it, so both see the same machine
    ws = [np.full(s, 0x3c23, np.uint16) for s in mats]           # bf16 0.00995
    t_read, t16 = interleaved([lambda: ops.linear(read_x, read_w),
                               lambda: [ops.linear(xs[w.shape[1]], w) for w in ws]], reps)
    read_bw = read_w.nbytes / t_read
    del ws
    results["bf16"] = (params * 2 / t16, t16)
    # fp32 (2.5 GB): in two halves so that at most ~2.5 GB is held; each timed separately
    if mem_available_gb() < 3.0:
        print("  fp32: skipped, less than 3 GB of memory available")
    else:
        t32 = 0.0
        half = len(mats) // 2
        for part in (mats[:half], mats[half:]):
            ws = [np.full(s, 0.01, np.float32) for s in part]
            t32 += best_time(lambda: [ops.linear(xs[w.shape[1]], w) for w in ws], reps)
            del ws
        results["fp32"] = (params * 4 / t32, t32)
    row("fp32 streaming read (a., interleaved)", read_bw / 1e9, "GB/s")
    for name, (bw, t) in results.items():
        row(f"{name} token GEMV ({t * 1e3:.1f} ms/token)", bw / 1e9, "GB/s", bw / read_bw,
            "read")
    return read_bw, results


# ---- d. prefill sgemm ----------------------------------------------------------------------

def bench_gemm(reps, Ms=(512, 2048), square=3072):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((square, square), dtype=np.float32)
    b = rng.standard_normal((square, square), dtype=np.float32)
    t = best_time(lambda: ops.linear(a, b), reps)
    peak = 2 * square**3 / t
    print(f"d. prefill GEMM, GFLOP/s; BLAS peak = ops.linear fp32 {square}^3: {peak / 1e9:.1f} GFLOP/s")
    del a, b
    shapes = [("in_proj", 2 * E, D), ("out_proj", D, E), ("fc1", 2 * F, D), ("fc2", D, F)]
    out = []
    for M in Ms:
        for name, n, k in shapes:
            x = rng.standard_normal((M, k), dtype=np.float32)
            w32 = (rng.standard_normal((n, k), dtype=np.float32) * 0.05).astype(np.float32)
            w16 = ops.f32_to_bf16(w32)
            t32, t16 = interleaved([lambda: ops.linear(x, w32), lambda: ops.linear(x, w16)], reps)
            fl = 2 * M * n * k
            print(f"  M={M:<5} {name:<9}({n:>5},{k:>5})  fp32 {fl / t32 / 1e9:7.1f} ({fl / t32 / peak:6.1%})"
                  f"   bf16 {fl / t16 / 1e9:7.1f} ({fl / t16 / peak:6.1%})   bf16/fp32 {t32 / t16:6.1%}")
            out.append((M, name, fl / t32, fl / t16))
    return peak, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--skip", default="", help="letters of sections to skip, e.g. 'bd'")
    args = ap.parse_args()
    ops.set_num_threads(args.threads)
    info = ops.cpu_info()
    t0 = time.perf_counter()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; threads used: {args.threads}; "
          f"AVX-512: {'yes' if info['avx512'] else 'no'} (bf16 insns: "
          f"{'yes' if info['avx512bf16'] else 'no'}); numpy {np.__version__}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    w, x, _ = bench_read(args.threads, args.reps)
    if "c" not in args.skip:
        bench_gemv(w, x, args.threads, args.reps)
    del w, x
    if "b" not in args.skip:
        bench_scan(args.threads, args.reps)
    if "d" not in args.skip:
        bench_gemm(max(3, args.reps // 2))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
