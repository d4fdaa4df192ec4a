"""Session 5 (dec64b): batched decode A/B in one process, 2.8B shape, random bf16 weights.

    PYTHONPATH=. python3 cuda/dev/bench_dec64b.py [--trace OUT.txt]

1. The grouped experts alone (bm_cuda_moe_grouped: dispatch, x -> bf16, fc1, fc2) at T = 64
   (uniform ids, unsplit: decode B = 64) and T = 8 (split: decode B = 8), CUDA-graph replay,
   per BLACKMAMBA_MOE_GROUPED_TILES string (digits 3, 4: decode fc1, fc2; 6..9 =
   grouped_dec_kernel, grouped.cu), and the largest difference from the old tiles ("0022").
2. The model's decode step (ms/step, graph replay, median of 50 after 10) per variant of
   BLACKMAMBA_MOE_GROUPED_TILES and BLACKMAMBA_SCAN4_ROWS, read at graph capture; "best" is
   the fastest decode digits of part 2 at B = 64 with the fastest scan rows.
3. --trace: per-kernel durations of decode B = 64 (CUPTI) for "old" and "best".
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
KEYS = ("BLACKMAMBA_MOE_GROUPED_TILES", "BLACKMAMBA_SCAN4_ROWS")


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

    old = {"BLACKMAMBA_MOE_GROUPED_TILES": "0022", "BLACKMAMBA_SCAN4_ROWS": "1"}
    variants = [("old", old)]
    variants += [(f"fc2 {v}", {**old, "BLACKMAMBA_MOE_GROUPED_TILES": f"002{v}"})
                 for v in "56789"]
    variants += [(f"fc1 {v}", {**old, "BLACKMAMBA_MOE_GROUPED_TILES": f"00{v}2"})
                 for v in "6789"]
    variants += [(f"scan rows {r}", {**old, "BLACKMAMBA_SCAN4_ROWS": r}) for r in "24"]
    print("\ndecode ms/step (graph replay, median of 50 after 10; same process)", flush=True)
    print(f"{'variant':>22} {'B=8':>8} {'B=64':>8} {'tok/s B=64':>10}", flush=True)
    res = {}
    for name, env in variants + [("old (again)", old)]:
        r = measure(env, (8, 64))
        res[name] = r
        print(f"{name:>22} {r[8]:8.3f} {r[64]:8.3f} {64e3 / r[64]:10.0f}", flush=True)
    f2 = min("56789", key=lambda v: res[f"fc2 {v}"][64])
    f2 = f2 if res[f"fc2 {f2}"][64] < res["old"][64] else "2"
    f1 = min("6789", key=lambda v: res[f"fc1 {v}"][64])
    f1 = f1 if res[f"fc1 {f1}"][64] < res["old"][64] else "2"
    rb = min("124", key=lambda r: res["old"][64] if r == "1" else res[f"scan rows {r}"][64])
    best = {"BLACKMAMBA_MOE_GROUPED_TILES": f"00{f1}{f2}", "BLACKMAMBA_SCAN4_ROWS": rb}
    print(f"best: {best}", flush=True)
    for name, env in (("best", best), ("best, fc1 old", {**best,
                      "BLACKMAMBA_MOE_GROUPED_TILES": f"002{f2}"}), ("old (3)", old),
                      ("best (again)", best)):
        r = measure(env, (1, 8, 64))
        print(f"{name:>22} {r[8]:8.3f} {r[64]:8.3f} {64e3 / r[64]:10.0f}   B=1 {r[1]:.3f}",
              flush=True)
    # logits of one step, best vs old, same state and token
    for B in (8, 64):
        tok = rng.integers(0, cfg.real_vocab_size, B)
        out = {}
        for name, env in (("old", old), ("best", best)):
            setenv(env)
            out[name] = model.step(tok, states[B].copy())
        rel = float(np.linalg.norm(out["best"] - out["old"]) / np.linalg.norm(out["old"]))
        agree = float(np.mean(out["best"].argmax(-1) == out["old"].argmax(-1)))
        print(f"B={B}: logits rel diff best vs old {rel:.3e}, argmax agree {agree:.3f}",
              flush=True)
    if trace:
        from trace_model import kernels_of, report
        with open(trace, "w") as out:
            for name, env in (("best", best), ("old", old)):
                setenv(env)
                st = states[64].copy()
                model.step(rng.integers(0, cfg.real_vocab_size, 64), st)
                C.cuda_bench_step(model._eng, st._h, 5, 5)
                ks = kernels_of(lambda: C.cuda_bench_step(model._eng, st._h, 0, 5), 5)
                report(f"{name} decode B=64 {env}", ks, 5, out)
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
