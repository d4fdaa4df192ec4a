"""Decode A/B of the batched decode path (session 4, dec64) in one process, 2.8B shape, random
bf16 weights (bench_gpu's). Each variant sets environment switches that engine.cu
reads at graph capture; a new state per measurement recaptures the graph.

    PYTHONPATH=. python3 cuda/dev/bench_dec64.py [--trace OUT.log] [--profile]

Switches: BLACKMAMBA_DECODE_GEMM_MIN (9: the 8-row GEMVs up to batch 8, as before),
BLACKMAMBA_SCAN4=0 (scalar step + to_bf16 pass), BLACKMAMBA_DECODE_NORM_BF=0 (in_proj converts
its input itself), BLACKMAMBA_NORM_ROUTE_PRE=0
(norm_route_kernel<., NR_PLAIN> instead of <., NR_PRE_ROW>).
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from bench_gpu import SHAPE_2_8B, random_bf16_tensors  # noqa: E402

from blackmamba import _lib, model_cuda  # noqa: E402
from blackmamba.config import Config  # noqa: E402

OLD = dict(BLACKMAMBA_DECODE_GEMM_MIN="9", BLACKMAMBA_SCAN4="0", BLACKMAMBA_DECODE_NORM_BF="0",
           BLACKMAMBA_NORM_ROUTE_PRE="0")
VARIANTS = [
    ("old", OLD),
    ("new", {}),
    ("new, nr_pre off", dict(BLACKMAMBA_NORM_ROUTE_PRE="0")),
    ("new, scan4 off", dict(BLACKMAMBA_SCAN4="0")),
    ("new, norm_bf off", dict(BLACKMAMBA_DECODE_NORM_BF="0")),
    ("old (again)", OLD),
    ("new (again)", {}),
]
KEYS = sorted({k for _, v in VARIANTS for k in v})


def setenv(env):
    for k in KEYS:
        os.environ.pop(k, None)
    os.environ.update(env)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", default=None, help="CUPTI trace of d8,d64 (new) to this file")
    ap.add_argument("--profile", action="store_true", help="per-stage profile old/new B=8, 64")
    ap.add_argument("--batches", default="1,8,64")
    args = ap.parse_args()
    C = _lib.C()
    cfg = Config.from_dict(dict(SHAPE_2_8B))
    model = model_cuda.CudaModel(cfg, random_bf16_tensors(cfg), dtype="bfloat16")
    rng = np.random.default_rng(0)
    batches = [int(b) for b in args.batches.split(",")]
    states = {}
    for B in batches:
        st = model.new_state(B)
        model.prefill(rng.integers(0, cfg.real_vocab_size, (B, 32)), st, logits=None)
        states[B] = st
    print("decode ms/step (graph replay, median of 50 after 10; same process)", flush=True)
    print(f"{'variant':>20} " + " ".join(f"{'B=' + str(B):>9}" for B in batches), flush=True)
    res = {}
    for name, env in VARIANTS:
        setenv(env)
        row = []
        for B in batches:
            st = states[B].copy()   # same state contents, new serial: the graph is recaptured
            model.step(rng.integers(0, cfg.real_vocab_size, B), st)
            ms = float(np.median(C.cuda_bench_step(model._eng, st._h, 10, 50)))
            row.append(ms)
        res[name] = row
        print(f"{name:>20} " + " ".join(f"{ms:>9.3f}" for ms in row), flush=True)
    # logits of one step, old vs new, from the same state (the paths' numerical difference)
    for B in batches:
        tok = rng.integers(0, cfg.real_vocab_size, B)
        out = {}
        for name, env in (("old", OLD), ("new", {})):
            setenv(env)
            st = states[B].copy()
            out[name] = model.step(tok, st)
        d = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))  # noqa: E731
        print(f"B={B}: logits rel diff new vs old {d(out['new'], out['old']):.3e}, "
              f"argmax agree "
              f"{np.mean(out['new'].argmax(-1) == out['old'].argmax(-1)):.3f}", flush=True)
    if args.profile:
        prof = {}
        for name, env in (("old", OLD), ("new", {})):
            setenv(env)
            for B in (8, 64):
                if B not in states:
                    continue
                st = states[B].copy()
                prof[f"{name} B={B}"] = C.cuda_bench_profile(model._eng, st._h, None, 6)
        names = list(next(iter(prof.values())))
        print("\nms per stage (events after every stage, inside a graph; sums over layers)")
        print(f"{'stage':>11} " + " ".join(f"{k:>11}" for k in prof))
        for n in names:
            print(f"{n:>11} " + " ".join(f"{prof[k][n]:>11.3f}" for k in prof))
        print(f"{'total':>11} " + " ".join(f"{sum(prof[k].values()):>11.3f}" for k in prof))
    if args.trace:
        import torch
        sys.path.insert(0, os.path.dirname(__file__))
        from trace_model import kernels_of, report
        torch.cuda.init()
        with open(args.trace, "w") as out:
            for name, env in (("new", {}), ("old", OLD)):
                setenv(env)
                for B in (8, 64):
                    if B not in states:
                        continue
                    st = states[B].copy()
                    model.step(rng.integers(0, cfg.real_vocab_size, B), st)
                    C.cuda_bench_step(model._eng, st._h, 5, 5)
                    ks = kernels_of(lambda: C.cuda_bench_step(model._eng, st._h, 0, 5), 5)
                    report(f"{name} decode B={B}", ks, 5, out)
    setenv({})
    return 0


if __name__ == "__main__":
    sys.exit(main())
