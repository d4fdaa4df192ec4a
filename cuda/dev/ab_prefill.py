"""A/B of a switch read by the prefill (an environment variable the engine reads at every
forward) in one process, at the 2.8B shape with bench_gpu's random bf16 weights (dev only).

    PYTHONPATH=. python3 cuda/dev/ab_prefill.py --env BLACKMAMBA_NORM_BF_ONLY --values 0,1
                                                [--batches 1,8] [--length 2048,32] [--rounds 3]
    (--env A+B --values 0+0,1+1 sets several switches together)

For each batch size and value (alternating, `rounds` times): the last position's logits of
one prefill (must be bit-identical between the values unless --no-same), then the median of
cuda_bench_prefill (5 timed after 2 warm-up, CUDA events) as bench_gpu.py measures it.
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
    ap.add_argument("--env", required=True)
    ap.add_argument("--values", default="0,1")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--length", default="2048", help="prompt lengths, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-same", action="store_true", help="values may change the logits")
    args = ap.parse_args()
    C = _lib.C()
    cfg = Config.from_dict(dict(SHAPE_2_8B))
    model = model_cuda.CudaModel(cfg, random_bf16_tensors(cfg), dtype="bfloat16")
    rng = np.random.default_rng(0)
    vals = args.values.split(",")
    ok = True
    for B, L in [(int(b), int(n)) for b in args.batches.split(",")
                 for n in args.length.split(",")]:
        ids = rng.integers(0, cfg.real_vocab_size, (B, L))
        ms = {v: [] for v in vals}
        ref = {}
        for _ in range(args.rounds):
            for v in vals:
                # several switches at once: --env A+B --values 0+0,1+1
                for name, x in zip(args.env.split("+"), v.split("+")):
                    os.environ[name] = x
                lg = np.asarray(model.prefill(ids, model.new_state(B), logits="last"))
                ref.setdefault(v, lg)
                ms[v].append(float(np.median(C.cuda_bench_prefill(model._eng, ids, 2, 5))))
        same = all(np.array_equal(ref[vals[0]], ref[v]) for v in vals)
        diff = max(float(np.abs(ref[vals[0]] - ref[v]).max()) for v in vals)
        ok &= same or args.no_same
        tok = B * L
        print(f"B={B} L={L}: " + "  ".join(
            f"{args.env}={v} {' '.join(f'{x:.3f}' for x in ms[v])} ms "
            f"({tok / np.median(ms[v]) * 1e3:,.0f} tok/s)" for v in vals)
            + f"  | {vals[-1]}/{vals[0]} {np.median(ms[vals[-1]]) / np.median(ms[vals[0]]):.4f}"
            + f"  | logits bit-identical: {same}" + ("" if same else f" (max |diff| {diff:.2e})"),
            flush=True)
    print("OK" if ok else "MISMATCH", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
