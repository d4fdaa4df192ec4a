"""Same-process A/B of several combinations of switches read at graph capture (dev only), at
the 2.8B shape with bench_gpu's random bf16 weights: ab_pdl.py's method (a fresh state, the
same 32-token prompt, 6 graph steps whose logits must be bit-identical between the
configurations, then the median of 50 graph replays after 10, CUDA events), the
configurations alternating `rounds` times, one model load for all.

    PYTHONPATH=. python3 cuda/dev/ab_moe64.py --batches 64,8 --rounds 3 \
        --configs "BLACKMAMBA_MOE_ROUTE_DISPATCH=0,BLACKMAMBA_MOE_DEC_PDL=0;BLACKMAMBA_MOE_DEC_PDL=1"

The first configuration is the reference ("old"); a variable a configuration leaves out is
unset (the default).
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from bench_gpu import SHAPE_2_8B, random_bf16_tensors  # noqa: E402

from blackmamba import _lib, model_cuda  # noqa: E402
from blackmamba.config import Config  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="64,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--configs", required=True, help="';'-separated, each 'VAR=v,VAR=v' or ''")
    args = ap.parse_args()
    confs = []
    for c in args.configs.split(";"):
        kv = dict(p.split("=", 1) for p in c.split(",") if p.strip())
        confs.append((c.strip() or "(defaults)", kv))
    names = sorted({k for _, kv in confs for k in kv})
    C = _lib.C()
    cfg = Config.from_dict(dict(SHAPE_2_8B))
    model = model_cuda.CudaModel(cfg, random_bf16_tensors(cfg), dtype="bfloat16")
    rng = np.random.default_rng(0)
    ok = True
    for B in [int(b) for b in args.batches.split(",")]:
        prompt = rng.integers(0, cfg.real_vocab_size, (B, 32))
        toks = rng.integers(0, cfg.real_vocab_size, (6, B))
        ms = [[] for _ in confs]
        ref = [None] * len(confs)
        for r in range(args.rounds):
            for i, (_, kv) in enumerate(confs):
                for k in names:
                    os.environ.pop(k, None)
                os.environ.update(kv)
                st = model.new_state(B)
                model.prefill(prompt, st, logits=None)
                lg = np.stack([np.asarray(model.step(toks[j], st)) for j in range(6)])
                if ref[i] is None:
                    ref[i] = lg
                elif not np.array_equal(ref[i], lg):
                    print(f"B={B} config {i}: logits differ between rounds", flush=True)
                    ok = False
                ms[i].append(float(np.median(C.cuda_bench_step(model._eng, st._h, 10, 50))))
        base = np.median(ms[0])
        for i, (name, _) in enumerate(confs):
            same = np.array_equal(ref[0], ref[i])
            ok &= same
            print(f"B={B:>3} [{i}] {name}: {' '.join(f'{v:.4f}' for v in ms[i])} ms"
                  f"  median {np.median(ms[i]):.4f}  /old {np.median(ms[i]) / base:.4f}"
                  f"  bit-identical {same}"
                  + ("" if same else f" (max |diff| {np.abs(ref[0] - ref[i]).max():.3e})"),
                  flush=True)
    for k in names:
        os.environ.pop(k, None)
    print("ALL BIT-IDENTICAL" if ok else "MISMATCH", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
