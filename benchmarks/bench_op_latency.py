"""Longest single C call in a prefill chunk / a decode step at the 2.8B shape (SPEC 4).

Python handles Ctrl-C only between C calls (the kernels run with the GIL released), so the
longest single call bounds how late a KeyboardInterrupt can arrive. Random weights; each op
is timed alone (best of `reps`), float32 and bf16 weights.

    PYTHONPATH=. python3 benchmarks/bench_op_latency.py [--tokens 2048 512] [--reps 2]
"""
import argparse
import time

import numpy as np

from blackmamba import ops

d, E, N, K, R, F, X, V = 1472, 2944, 16, 4, 92, 3872, 8, 50304


def best(fn, reps):
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return min(t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 512])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    f = lambda *s: (rng.standard_normal(s, dtype=np.float32) * 0.05)  # noqa: E731
    print(f"threads {ops.get_num_threads()}  2.8B shape d={d} E={E} F={F} V={V}")
    for dtype in a.dtype:
        w = (lambda *s: f(*s)) if dtype == "float32" else (lambda *s: ops.f32_to_bf16(f(*s)))
        in_w, x_w, dt_w, out_w = w(2 * E, d), w(R + 2 * N, E), w(E, R), w(d, E)
        fc1, fc2, emb = w(2 * F, d), w(d, F), w(V, d)
        conv_w, A = f(E, K), -np.exp(f(E, N))
        for T in a.tokens:
            x = f(1, T, d)
            xe = f(1, T, E)
            Tx = max(1, T // X * 2)         # tokens one expert sees (2x the balanced share)
            rows = {
                "in_proj": lambda: ops.linear(x, in_w),
                "conv1d": lambda: ops.causal_conv1d(xe, conv_w, None, None, "silu"),
                "x_proj": lambda: ops.linear(xe, x_w),
                "dt_proj": lambda: ops.linear(f(1, T, R), dt_w),
                "scan": lambda: ops.selective_scan(xe, xe, A, f(1, T, N), f(1, T, N), None, xe,
                                                   None, True),
                "out_proj": lambda: ops.linear(xe, out_w),
                "router": lambda: ops.route_top1(x, f(X, d), f(X)),
                f"expert mlp ({Tx} tok)": lambda: ops.mlp(f(Tx, d), fc1, fc2, "gelu", True),
                "lm_head last": lambda: ops.linear(x[:, -1], emb),
                "lm_head all": lambda: ops.linear(x, emb),
            }
            print(f"-- {dtype} weights, prefill chunk of {T} tokens")
            for name, fn in rows.items():
                print(f"   {name:24s} {best(fn, a.reps) * 1e3:9.1f} ms")
        xs = f(1, d)
        st = f(1, E, N)
        cs = f(1, K - 1, E)
        xe1 = f(1, E)
        rows = {
            "in_proj": lambda: ops.linear(xs, in_w),
            "conv update": lambda: ops.causal_conv1d_update(xe1, cs, conv_w, None, "silu"),
            "state update": lambda: ops.selective_state_update(st, xe1, xe1, A, f(1, N), f(1, N)),
            "expert mlp": lambda: ops.mlp(xs, fc1, fc2, "gelu", True),
            "lm_head": lambda: ops.linear(xs, emb),
        }
        print(f"-- {dtype} weights, decode step (batch 1)")
        for name, fn in rows.items():
            print(f"   {name:24s} {best(fn, a.reps + 2) * 1e3:9.1f} ms")


if __name__ == "__main__":
    main()
