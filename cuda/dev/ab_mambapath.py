"""Same-process A/B of branch mambapath's Mamba-layer changes on the 2.8B shape (random bf16
weights, math "bf16", as benchmarks/bench_gpu.py): BLACKMAMBA_MAMBAPATH=0 plus
BLACKMAMBA_SCAN_SEGMENTS=1 give the paths as before the branch ("old"), unset the new ones
("new"). Alternates old/new twice so that drift shows. Prefill: bm_cuda_bench_prefill (events
around the whole call, host syncs included), median of 5 after 2 warm-up; decode B=64: graph
replay of a fresh state (captured under the current setting), median of 30 after 10.
  python3 cuda/dev/ab_mambapath.py
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "benchmarks"))
import bench_gpu as bg  # noqa: E402

from blackmamba import _lib, model_cuda  # noqa: E402
from blackmamba.config import Config  # noqa: E402


def setmode(mode):
    for k in ("BLACKMAMBA_MAMBAPATH", "BLACKMAMBA_SCAN_SEGMENTS"):
        os.environ.pop(k, None)
    if mode == "old":
        os.environ["BLACKMAMBA_MAMBAPATH"] = "0"
        os.environ["BLACKMAMBA_SCAN_SEGMENTS"] = "1"


def main():
    C = _lib.C()
    cfg = Config.from_dict(dict(bg.SHAPE_2_8B))
    model = model_cuda.CudaModel(cfg, bg.random_bf16_tensors(cfg), dtype="bfloat16", math="bf16")
    rng = np.random.default_rng(0)
    L = 2048
    ids = {B: rng.integers(0, cfg.real_vocab_size, (B, L)) for B in (1, 8)}
    print("mode   prefill B=1 ms  prefill B=8 ms  decode B=64 ms/step")
    for rnd in range(2):
        for mode in ("old", "new"):
            setmode(mode)
            p1 = bg.median(C.cuda_bench_prefill(model._eng, ids[1], 2, 5))
            p8 = bg.median(C.cuda_bench_prefill(model._eng, ids[8], 1, 3))
            st = model.new_state(64)
            model.prefill(rng.integers(0, cfg.real_vocab_size, (64, 32)), st, logits=None)
            model.step(rng.integers(0, cfg.real_vocab_size, 64), st)      # captures the graph
            d64 = bg.median(C.cuda_bench_step(model._eng, st._h, 10, 30))
            print(f"{mode:5s} {p1:14.2f} {p8:15.2f} {d64:19.3f}   "
                  f"(B=1 {2048 / p1:.0f}K tok/s, B=8 {8 * 2048 / p8:.0f}K, B=64 "
                  f"{64 / d64:.1f}K)", flush=True)
            del st
    # per-stage profile of the new paths (events after every stage, as bench_gpu)
    setmode("new")
    prof = {}
    for label, B, LL in (("decode B=64", 64, 0), ("prefill B=1", 1, L), ("prefill B=8", 8, L)):
        st = model.new_state(B)
        model.prefill(rng.integers(0, cfg.real_vocab_size, (B, 8)), st, logits=None)
        x = rng.integers(0, cfg.real_vocab_size, (B, LL)) if LL else None
        prof[label] = C.cuda_bench_profile(model._eng, st._h, x, 3 if LL else 6)
    setmode("old")
    for label, B, LL in (("old pre B=1", 1, L),):
        st = model.new_state(B)
        model.prefill(rng.integers(0, cfg.real_vocab_size, (B, 8)), st, logits=None)
        prof[label] = C.cuda_bench_profile(model._eng, st._h, rng.integers(0, cfg.real_vocab_size, (B, LL)), 3)
    setmode("new")
    names = list(next(iter(prof.values())))
    print("\nms per stage (sums over layers)")
    print(f"{'stage':>11} " + " ".join(f"{k:>12}" for k in prof))
    for n in names:
        print(f"{n:>11} " + " ".join(f"{prof[k][n]:>12.3f}" for k in prof))
    print(f"{'total':>11} " + " ".join(f"{sum(prof[k].values()):>12.3f}" for k in prof))


if __name__ == "__main__":
    main()
