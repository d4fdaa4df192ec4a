"""What does stepping several states in turn cost (dev only)? A decode graph holds its state's
buffer addresses; before session 26 each batch size kept one graph, captured again whenever
another state stepped. This times model.step (the Python call, host logits) at the 2.8B shape
with random bf16 weights, one process, for each BLACKMAMBA_DECODE_GRAPHS value given:
one state stepping alone, 2 / 4 / 8 states in turn, and the first step of a fresh state; then
greedy(8-token prompt, 32 tokens) on a fresh state against the same on a warm one.

    PYTHONPATH=. python3 cuda/dev/state_switch_probe.py [--B 1] [--values 1,8] [--n 48]
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from bench_gpu import SHAPE_2_8B, random_bf16_tensors  # noqa: E402

from blackmamba import model_cuda  # noqa: E402
from blackmamba.config import Config  # noqa: E402


def per_step(model, sts, n, rng, V):
    toks = rng.integers(0, V, (n, sts[0].batch_size))
    t = time.perf_counter()
    for k in range(n):
        model.step(toks[k], sts[k % len(sts)])
    return (time.perf_counter() - t) / n * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--values", default="1,8")
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    cfg = Config.from_dict(dict(SHAPE_2_8B))
    model = model_cuda.CudaModel(cfg, random_bf16_tensors(cfg), dtype="bfloat16")
    V, B = cfg.real_vocab_size, args.B
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, V, (B, 8))
    sts = []
    for _ in range(8):
        st = model.new_state(B)
        model.prefill(prompt, st, logits=None)
        sts.append(st)
    rows = {}
    for r in range(args.rounds):
        for v in args.values.split(","):
            os.environ["BLACKMAMBA_DECODE_GRAPHS"] = v
            for k in range(8):                       # every state captured under this value
                model.step(rng.integers(0, V, B), sts[k])
            res = {}
            for ns in (1, 2, 4, 8):
                per_step(model, sts[:ns], 4, rng, V)  # warm
                res[f"{ns} state(s) in turn"] = per_step(model, sts[:ns], args.n, rng, V)
            fresh = []
            for _ in range(4):
                st = model.new_state(B)
                model.prefill(prompt, st, logits=None)
                t = time.perf_counter()
                model.step(rng.integers(0, V, B), st)
                fresh.append((time.perf_counter() - t) * 1e3)
            res["first step of a fresh state"] = float(np.median(fresh))
            gf, gw = [], []
            for _ in range(3):
                t = time.perf_counter()
                model.greedy(prompt, 32)
                gf.append((time.perf_counter() - t) * 1e3)
                t = time.perf_counter()
                model.greedy(prompt, 32, state=sts[0])
                gw.append((time.perf_counter() - t) * 1e3)
            res["greedy 8 + 32 tokens, fresh state"] = float(np.median(gf))
            res["greedy 8 + 32 tokens, warm state"] = float(np.median(gw))
            for k, x in res.items():
                rows.setdefault(k, {}).setdefault(v, []).append(x)
            print(f"round {r} DECODE_GRAPHS={v}: " +
                  ", ".join(f"{k} {x:.3f}" for k, x in res.items()), flush=True)
    print(f"\nB = {B}, ms (median over {args.rounds} rounds), model.step / greedy from Python:")
    vals = args.values.split(",")
    print(f"{'':40}" + "".join(f"{'GRAPHS=' + v:>14}" for v in vals))
    for k, d in rows.items():
        print(f"{k:40}" + "".join(f"{np.median(d[v]):>14.3f}" for v in vals))
    print("memory():", model.memory())
    return 0


if __name__ == "__main__":
    sys.exit(main())
