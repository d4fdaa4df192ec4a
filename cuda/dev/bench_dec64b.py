"""Session 5 (dec64b): batched decode A/B in one process, 2.8B shape, random bf16 weights.

    PYTHONPATH=. python3 cuda/dev/bench_dec64b.py [--trace OUT.txt]

1. The grouped experts alone (bm_cuda_moe_grouped: dispatch, x -> bf16, fc1, fc2) at T = 64
   (uniform ids, unsplit: decode B = 64) and T = 8 (split: decode B = 8), CUDA-graph replay,
   per BLACKMAMBA_MOE_GROUPED_TILES string (digits 3, 4: decode fc1, fc2; 6..9 =
   grouped_dec_kernel, grouped.cu), and the largest difference from the old tiles ("0022").
2. The model's decode step (ms/step, graph replay, median of 50 after 10) per variant of
   BLACKMAMBA_MOE_GROUPED_TILES, BLACKMAMBA_SCAN4_ROWS and BLACKMAMBA_SCAN4_DT, read at graph
   capture: "old" = the session-4 paths, "new" = the defaults. (Run 1 of the session swept the
   tile digits one role at a time and picked the best automatically; its log is
   benchmarks/results/s5-dec64b/run1_bench.log.)
3. --trace: per-kernel durations of decode B = 8 and 64 (CUPTI) for "new" and "old".
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "benchmarks"))
from bench_grouped import LIB, bench_graph, ok, stream  # noqa: E402
from bench_gpu import SHAPE_2_8B, random_bf16_tensors  # noqa: E402

from blackmamba import _lib, model_cuda  # noqa: E402
from blackmamba.config import Config  # noqa: E402

DEV = torch.device("cuda")
KEYS = ("BLACKMAMBA_MOE_GROUPED_TILES", "BLACKMAMBA_SCAN4_ROWS", "BLACKMAMBA_SCAN4_DT")


def setenv(env):
    for k in KEYS:
        os.environ.pop(k, None)
    os.environ.update(env)


def kernels(d=1472, F=3872, X=8):
    torch.manual_seed(0)
    w1 = (torch.randn(X, 2 * F, d, device=DEV) * (0.5 / d ** 0.5)).to(torch.bfloat16)
    w2 = (torch.randn(X, d, F, device=DEV) * (0.5 / F ** 0.5)).to(torch.bfloat16)
    wmb = 3 * X * F * d * 2 / 1e6
    tiles = ["0022", "0025", "0026", "0027", "0028", "0029", "0062", "0072", "0082", "0092",
             "0066", "0067", "0068", "0086", "0087", "0088", "0096", "0098", "0022"]
    for T, split in ((64, 0), (8, 1)):
        x = torch.randn(T, d, device=DEV)
        ids = torch.randint(0, X, (T,), device=DEV, dtype=torch.int32)
        g = torch.rand(T, device=DEV) * 0.9 + 0.1
        nb = LIB.bm_cuda_moe_grouped_workspace(T, d, X, F, split)
        ws = torch.empty(nb, dtype=torch.uint8, device=DEV)
        outs = {}

        def run_into(o):
            ok(LIB.bm_cuda_moe_grouped(x.data_ptr(), ids.data_ptr(), g.data_ptr(), w1.data_ptr(),
                                       w2.data_ptr(), 2, split, o.data_ptr(), T, d, X, F,
                                       ws.data_ptr(), nb, stream()))
        print(f"\ngrouped experts T={T} split={split} (experts used "
              f"{len(torch.unique(ids))}, max rows {int(torch.bincount(ids).max())}; "
              f"weights {wmb:.0f} MB)", flush=True)
        for t in tiles:
            os.environ["BLACKMAMBA_MOE_GROUPED_TILES"] = t
            o = torch.empty(T, d, device=DEV)
            run_into(o)
            torch.cuda.synchronize()
            outs.setdefault(t, o)
            ms = bench_graph(lambda: run_into(o), inner=20, reps=15)
            ref = outs["0022"]
            rel = ((o - ref).norm() / ref.norm()).item()
            print(f"  tiles {t}: {ms * 1e3:8.2f} us ({wmb / ms / 1e3:6.0f} GB/s of all "
                  f"weights), rel diff vs 0022 {rel:.2e}", flush=True)
        os.environ.pop("BLACKMAMBA_MOE_GROUPED_TILES")
        del ws
    del w1, w2
    torch.cuda.empty_cache()


def model_ab(trace):
    C = _lib.C()
    cfg = Config.from_dict(dict(SHAPE_2_8B))
    model = model_cuda.CudaModel(cfg, random_bf16_tensors(cfg), dtype="bfloat16")
    rng = np.random.default_rng(0)
    states = {}
    for B in (1, 8, 64):
        st = model.new_state(B)
        model.prefill(rng.integers(0, cfg.real_vocab_size, (B, 32)), st, logits=None)
        states[B] = st

    def measure(env, batches):
        setenv(env)
        row = {}
        for B in batches:
            st = states[B].copy()   # same contents, new serial: the graph is recaptured
            model.step(rng.integers(0, cfg.real_vocab_size, B), st)
            row[B] = float(np.median(C.cuda_bench_step(model._eng, st._h, 10, 50)))
        return row

    old = {"BLACKMAMBA_MOE_GROUPED_TILES": "0022", "BLACKMAMBA_SCAN4_ROWS": "1",
           "BLACKMAMBA_SCAN4_DT": "0"}
    new = {}
    variants = [("old", old), ("new", new),
                ("new, scan dt off", {"BLACKMAMBA_SCAN4_DT": "0"}),
                ("new, fc2 tiles old", {"BLACKMAMBA_MOE_GROUPED_TILES": "0022"}),
                ("new, fc2 7", {"BLACKMAMBA_MOE_GROUPED_TILES": "0027"}),
                ("new, fc2 5", {"BLACKMAMBA_MOE_GROUPED_TILES": "0025"}),
                ("new, scan rows 2", {"BLACKMAMBA_SCAN4_ROWS": "2"}),
                ("new, scan rows 4", {"BLACKMAMBA_SCAN4_ROWS": "4"}),
                ("old (again)", old), ("new (again)", new), ("old (3)", old), ("new (3)", new)]
    print("\ndecode ms/step (graph replay, median of 50 after 10; same process)", flush=True)
    print(f"{'variant':>22} {'B=1':>8} {'B=8':>8} {'B=64':>8} {'tok/s B=64':>10}", flush=True)
    for name, env in variants:
        r = measure(env, (1, 8, 64))
        print(f"{name:>22} {r[1]:8.3f} {r[8]:8.3f} {r[64]:8.3f} {64e3 / r[64]:10.0f}",
              flush=True)
    best = new
    # logits of one step, new vs old, same state and token
    for B in (1, 8, 64):
        tok = rng.integers(0, cfg.real_vocab_size, B)
        out = {}
        for name, env in (("old", old), ("new", new)):
            setenv(env)
            out[name] = model.step(tok, states[B].copy())
        rel = float(np.linalg.norm(out["new"] - out["old"]) / np.linalg.norm(out["old"]))
        agree = float(np.mean(out["new"].argmax(-1) == out["old"].argmax(-1)))
        print(f"B={B}: logits rel diff new vs old {rel:.3e}, argmax agree {agree:.3f}",
              flush=True)
    if trace:
        from trace_model import kernels_of, report
        with open(trace, "w") as out:
            for name, env in (("new", best), ("old", old)):
                setenv(env)
                for B in (8, 64):
                    st = states[B].copy()
                    model.step(rng.integers(0, cfg.real_vocab_size, B), st)
                    C.cuda_bench_step(model._eng, st._h, 5, 5)
                    ks = kernels_of(lambda: C.cuda_bench_step(model._eng, st._h, 0, 5), 5)
                    report(f"{name} decode B={B} {env}", ks, 5, out)
    setenv({})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", default=None)
    ap.add_argument("--no-kernels", action="store_true")
    args = ap.parse_args()
    if not args.no_kernels:
        kernels()
    model_ab(args.trace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
