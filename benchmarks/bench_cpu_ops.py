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
     a fraction of OpenBLAS's own rate on a large square sgemm (numpy.matmul float32: NumPy's
     bundled OpenBLAS with its own threads; measured last, since its idle workers spin)

Every figure is the best of several repetitions: the machine may be shared, and the best run
is the one least disturbed. Ratios against the read bandwidth are also given as the median
of per-repetition ratios (each repetition times the reference and the kernel back to back),
which is steadier than a ratio of two bests when the bandwidth drifts. Memory: up to about
3.8 GB (the 1.2 GB reference matrix stays while c.'s weights, 1.26 GB in bf16 and 2.5 GB in
fp32, are held one dtype at a time; fp32 is measured in halves below 5 GB available).
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
    """'model name (family F model M)' from /proc/cpuinfo (a VM may show a short name)."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                info.setdefault(k.strip(), v.strip())
    except OSError:
        return platform.processor() or "unknown"
    return (f"{info.get('model name', 'unknown')} (family {info.get('cpu family', '?')} "
            f"model {info.get('model', '?')})")


def mem_available_gb():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


def cpu_busy_seconds():
    """CPU-seconds all processes have spent busy (user, nice, system, irq, softirq, steal)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return None
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


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
    row("numpy.sum (1 thread, pairwise sum)", w.nbytes / t_np1 / 1e9, "GB/s", t_gemv / t_np1,
        "GEMV")
    row("numpy.sum on halves (2 Python threads)", w.nbytes / t_np2 / 1e9, "GB/s",
        t_gemv / t_np2, "GEMV")
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
        y[t] = (h * C[0, t]).sum(axis=1)          # elementwise: no BLAS threads involved
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


def paired(ref_fn, fn, reps):
    """Best times of ref_fn and fn called back to back, and the median of t_ref/t ratios."""
    tr, tf, ratios = float("inf"), float("inf"), []
    for _ in range(reps):
        t = time.perf_counter()
        ref_fn()
        a = time.perf_counter() - t
        t = time.perf_counter()
        fn()
        b = time.perf_counter() - t
        tr, tf = min(tr, a), min(tf, b)
        ratios.append(a / b)
    return tr, tf, float(np.median(ratios))


def bench_gemv(read_w, read_x, threads, reps):
    mats = token_mats()
    params = sum(n * k for n, k in mats)
    xs = {k: np.full((1, k), 0.5, np.float32) for k in {k for _, k in mats}}
    read = lambda: ops.linear(read_x, read_w)  # noqa: E731
    print(f"c. decode GEMV (M=1) over one token's active weights: {len(mats)} matrices "
          f"(18 x Mamba in/x/dt/out_proj, 18 x router + one expert's fc1/fc2, LM head), "
          f"{params:,} params; each repetition times the 1.2 GB fp32 read (a.) back to back")
    rows = []
    # bf16: 1.26 GB
    ws = [np.full(s, 0x3c23, np.uint16) for s in mats]           # bf16 0.00995
    tr, t16, med = paired(read, lambda: [ops.linear(xs[w.shape[1]], w) for w in ws], reps)
    del ws
    rows.append(("bf16", read_w.nbytes / tr, params * 2 / t16, t16,
                 med * params * 2 / read_w.nbytes))
    # fp32: 2.5 GB, in halves when memory is short
    parts = [mats] if mem_available_gb() > 5.0 else [mats[: len(mats) // 2], mats[len(mats) // 2:]]
    t32, tr32, med32 = 0.0, float("inf"), []
    for part in parts:
        ws = [np.full(s, 0.01, np.float32) for s in part]
        pb = sum(n * k for n, k in part) * 4
        a, b, m = paired(read, lambda: [ops.linear(xs[w.shape[1]], w) for w in ws], reps)
        del ws
        t32 += b
        tr32 = min(tr32, a)
        med32.append(m * pb / read_w.nbytes)
    # the token's fp32 bandwidth relative to the read, from each part's median ratio
    rel32 = (params * 4) / sum(pb / r for pb, r in zip(
        [sum(n * k for n, k in p) * 4 for p in parts], med32))
    rows.append(("fp32", read_w.nbytes / tr32, params * 4 / t32, t32, rel32))
    print(f"  {'':<30} {'read GB/s':>10} {'GEMV GB/s':>10} {'ms/token':>9} {'best/best':>10} "
          f"{'median':>8}")
    for name, rbw, bw, t, med in rows:
        print(f"  {name + ' token GEMV':<30} {rbw / 1e9:10.2f} {bw / 1e9:10.2f} {t * 1e3:9.1f} "
              f"{bw / rbw:10.1%} {med:8.1%}")
    print("  (ggml on this machine class: bf16 GEMV 21.3 GB/s, fp32 GEMV 28.4 GB/s)")
    return rows


# ---- d. prefill sgemm ----------------------------------------------------------------------

def bench_gemm(reps, Ms=(512, 2048), square=3072):
    rng = np.random.default_rng(1)
    shapes = [("in_proj", 2 * E, D), ("out_proj", D, E), ("fc1", 2 * F, D), ("fc2", D, F)]
    print("d. prefill GEMM (ops.linear, M tokens x weight (Nout, Kin)), GFLOP/s")
    out = []
    for M in Ms:
        for name, n, k in shapes:
            x = rng.standard_normal((M, k), dtype=np.float32)
            w32 = (rng.standard_normal((n, k), dtype=np.float32) * 0.05).astype(np.float32)
            w16 = ops.f32_to_bf16(w32)
            t32, t16 = interleaved([lambda: ops.linear(x, w32), lambda: ops.linear(x, w16)], reps)
            fl = 2 * M * n * k
            out.append((M, name, n, k, fl / t32, fl / t16))
    a = rng.standard_normal((square, square), dtype=np.float32)
    b = rng.standard_normal((square, square), dtype=np.float32)
    t_ops = best_time(lambda: ops.linear(a, b), reps)
    # NumPy's OpenBLAS last: its idle worker threads spin for a while after each call
    t_np = best_time(lambda: a @ b.T, reps)
    peak = 2 * square**3 / t_np
    print(f"  BLAS peak: numpy.matmul float32 {square}^3 (NumPy's OpenBLAS, its own threads): "
          f"{peak / 1e9:.1f} GFLOP/s; ops.linear fp32 same shape: "
          f"{2 * square**3 / t_ops / 1e9:.1f} ({t_np / t_ops:.1%})")
    print(f"  {'M':>5} {'weight':<20} {'fp32':>8} {'of peak':>8} {'bf16':>8} {'of peak':>8} "
          f"{'bf16/fp32':>10}")
    for M, name, n, k, g32, g16 in out:
        print(f"  {M:>5} {name + f' ({n},{k})':<20} {g32 / 1e9:8.1f} {g32 / peak:8.1%} "
              f"{g16 / 1e9:8.1f} {g16 / peak:8.1%} {g16 / g32:10.1%}")
    return peak, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--skip", default="", help="letters of sections to skip, e.g. 'bd'")
    args = ap.parse_args()
    ops.set_num_threads(args.threads)
    info = ops.cpu_info()
    t0, busy0, own0 = time.perf_counter(), cpu_busy_seconds(), sum(os.times()[:2])
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; threads used: {args.threads}; "
          f"AVX-512: {'yes' if info['avx512'] else 'no'} (bf16 insns: "
          f"{'yes' if info['avx512bf16'] else 'no'}); numpy {np.__version__}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    sections = [("a", lambda: bench_read(args.threads, args.reps))]
    if "b" not in args.skip:
        sections.append(("b", lambda: bench_scan(args.threads, args.reps)))
    if "c" not in args.skip:
        sections.append(("c", lambda: bench_gemv(state["w"], state["x"], args.threads, args.reps)))
    if "d" not in args.skip:
        sections.append(("d", lambda: bench_gemm(max(3, args.reps // 2))))
    state, disturbed = {}, []
    for name, fn in sections:
        t, b, o = time.perf_counter(), cpu_busy_seconds(), sum(os.times()[:2])
        out = fn()
        if name == "a":
            state["w"], state["x"] = out[0], out[1]
        if name == "c" or "c" in args.skip:
            state.clear()                       # the 1.2 GB reference is no longer needed
        out = None
        if b is not None:
            own, dt = sum(os.times()[:2]) - o, time.perf_counter() - t
            disturbed.append(f"{name} {((cpu_busy_seconds() - b) - own) / dt:.2f}")
    wall = time.perf_counter() - t0
    busy1, own1 = cpu_busy_seconds(), sum(os.times()[:2])
    other = "" if busy0 is None else (
        f"; other processes kept the CPUs busy {((busy1 - busy0) - (own1 - own0)) / wall:.2f} "
        f"CPUs on average (per section: {', '.join(disturbed)}; 0 on a quiet machine, more "
        f"means those figures are disturbed)")
    print(f"total {wall:.0f} s{other}")


if __name__ == "__main__":
    main()
