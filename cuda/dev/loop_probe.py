"""What does the device decoding loop add to a graph step (dev only; the trace needs torch)?
bm_cuda_model_greedy / _sample run, per token, the decode graph, then the choice (argmax_kernel
or sample.cu's kernel) into the graph's token buffer, then a copy of it into the history. This
times each loop per token against cuda_bench_step's graph replays (same state, same process;
2.8B shape, random bf16 weights) and prints a CUPTI trace of the kernels between two graphs.

    PYTHONPATH=. python3 cuda/dev/loop_probe.py [--B 1] [--n 64] [--rounds 3] [--trace]
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
sys.path.insert(0, os.path.dirname(__file__))
from bench_gpu import SHAPE_2_8B, random_bf16_tensors  # noqa: E402

from blackmamba import _lib, model_cuda  # noqa: E402
from blackmamba.config import Config  # noqa: E402

MODES = {  # name -> (temperature, top_k, top_p) (None: off); None: the greedy loop
    "greedy loop": None,
    "sample T=0": (0.0, None, None),
    "sample T=0.8": (0.8, None, None),
    "sample T=0.8 top_p=0.95": (0.8, None, 0.95),
    "sample T=0.8 top_k=50": (0.8, 50, None),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--trace", action="store_true")
    args = ap.parse_args()
    C = _lib.C()
    cfg = Config.from_dict(dict(SHAPE_2_8B))
    model = model_cuda.CudaModel(cfg, random_bf16_tensors(cfg), dtype="bfloat16")
    B, n = args.B, args.n
    rng = np.random.default_rng(0)
    st = model.new_state(B)
    model.prefill(rng.integers(0, cfg.real_vocab_size, (B, 32)), st, logits=None)
    tok = rng.integers(0, cfg.real_vocab_size, B).astype(np.int64)

    def loop(mode, k):
        if MODES[mode] is None:
            return C.cuda_model_greedy(model._eng, st._h, tok, k)
        T, top_k, top_p = MODES[mode]
        return C.cuda_model_sample(model._eng, st._h, None, tok, k, T, top_k, top_p, 7, 0)

    for mode in MODES:  # warm (and the state's graph)
        loop(mode, 4)
    res = {m: [] for m in ["graph replay"] + list(MODES)}
    for _ in range(args.rounds):
        res["graph replay"].append(float(np.median(C.cuda_bench_step(model._eng, st._h, 5, n))))
        for mode in MODES:
            t = time.perf_counter()
            loop(mode, n)
            res[mode].append((time.perf_counter() - t) / n * 1e3)
    base = np.median(res["graph replay"])
    print(f"B = {B}, ms a token (median of {args.rounds} rounds of {n} tokens; the loops "
          "timed from the host, one call each, incl. its history copy back):")
    for mode, v in res.items():
        m = np.median(v)
        print(f"  {mode:28} {m:.4f}  (+{(m - base) * 1e3:5.1f} us over a graph replay)  "
              + " ".join(f"{x:.4f}" for x in v))
    if args.trace:
        import torch  # noqa: F401
        from trace_model import kernels_of
        torch.cuda.init()
        for mode in MODES:
            ks = kernels_of(lambda: loop(mode, 8), 8)
            # the kernels from each step's LM head to the next step's embedding
            print(f"\n{mode}: from the LM head's end to the next embed (name gap/dur, us)")
            shown = 0
            for i in range(1, len(ks)):
                if "embed" not in ks[i]["name"]:
                    continue
                j = i - 1
                while j > 0 and "head" not in ks[j]["name"] and j > i - 5:
                    j -= 1
                t0 = ks[j]["ts"] + ks[j]["dur"]
                row = []
                for q in range(j + 1, i + 1):
                    row.append(f"{ks[q]['name'][:24]} {ks[q]['ts'] - t0:.1f}/{ks[q]['dur']:.1f}")
                    t0 = ks[q]["ts"] + ks[q]["dur"]
                print("   " + " | ".join(row))
                shown += 1
                if shown >= 3:
                    break
    return 0


if __name__ == "__main__":
    sys.exit(main())
