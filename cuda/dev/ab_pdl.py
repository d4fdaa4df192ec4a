"""A/B of the early PDL decode kernels (BLACKMAMBA_CUDA_PDL_EARLY=0 / 1) in one process, at the
2.8B shape with bench_gpu's random bf16 weights (dev only; the trace needs torch).

    PYTHONPATH=. python3 cuda/dev/ab_pdl.py [--batches 1,8,64] [--trace DIR] [--rounds 2]
                                            [--env BLACKMAMBA_DECODE_NORM_FUSE]

--env: A/B another switch read at graph capture instead ("old" = 0, "early" = 1).
--sets "a:K=V,K2=V2;b:K=V": named sets of switches instead (the first is "old", the second
"early"; each set unsets the other sets' names).

For each batch size and mode (alternating, `rounds` times): a fresh state, the same 32-token
prompt, 6 graph steps with the same tokens (their logits must be bit-identical between the
modes), then the median of 50 graph replays after 10 (cuda_bench_step, CUDA events). With
--trace: a CUPTI trace of 5 replays per mode at batch --trace-batch (default 1) (cuda/dev/trace_model.py's report).
"""
import argparse
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
sys.path.insert(0, os.path.dirname(__file__))
from bench_gpu import SHAPE_2_8B, random_bf16_tensors  # noqa: E402

from blackmamba import _lib, model_cuda  # noqa: E402
from blackmamba.config import Config  # noqa: E402

MODES = (("old", "0"), ("early", "1"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--trace", default=None)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--env", default="BLACKMAMBA_CUDA_PDL_EARLY")
    ap.add_argument("--values", default="0,1", help="the switch's values (the first is 'old')")
    ap.add_argument("--trace-batch", type=int, default=1, help="the traced decode's batch")
    ap.add_argument("--sets", default=None, help='"name:K=V,K=V;name:K=V" (see above)')
    args = ap.parse_args()
    C = _lib.C()
    cfg = Config.from_dict(dict(SHAPE_2_8B))
    model = model_cuda.CudaModel(cfg, random_bf16_tensors(cfg), dtype="bfloat16")
    rng = np.random.default_rng(0)
    ok = True
    global MODES
    vals = args.values.split(",")
    MODES = tuple(("old" if i == 0 else "early" if i == 1 else f"v{v}", v)
                  for i, v in enumerate(vals))
    sets = {}  # --sets: name -> its switches
    if args.sets:
        for part in args.sets.split(";"):
            name, _, kvs = part.partition(":")
            # pairs split at a comma before the next NAME= (values may hold commas)
            sets[name] = dict(kv.split("=", 1) for kv in re.split(r",(?=[A-Z_0-9]+=)", kvs) if kv)
        MODES = tuple(("old" if i == 0 else "early" if i == 1 else n, n)
                      for i, n in enumerate(sets))
    keys = sorted({k for kv in sets.values() for k in kv})

    def apply(v):
        """Switch to mode value v: the switch's value, or (--sets) a set's name."""
        if not sets:
            os.environ[args.env] = v
            return
        for k in keys:
            os.environ.pop(k, None)
        os.environ.update(sets[v])
    print(f"A/B of {args.env if not sets else 'sets'}: " + ", ".join(
        f"{n} = {sets.get(v, v)}" for n, v in MODES), flush=True)
    for B in [int(b) for b in args.batches.split(",")]:
        prompt = rng.integers(0, cfg.real_vocab_size, (B, 32))
        toks = rng.integers(0, cfg.real_vocab_size, (6, B))
        ms = {name: [] for name, _ in MODES}
        ref = {}
        for r in range(args.rounds):
            for name, env in MODES:
                apply(env)
                st = model.new_state(B)
                model.prefill(prompt, st, logits=None)
                lg = np.stack([np.asarray(model.step(toks[i], st)) for i in range(6)])
                if name not in ref:
                    ref[name] = lg
                elif not np.array_equal(ref[name], lg):
                    print(f"B={B} {name}: logits differ between rounds", flush=True)
                    ok = False
                ms[name].append(float(np.median(C.cuda_bench_step(model._eng, st._h, 10, 50))))
        same = all(np.array_equal(ref["old"], ref[n]) for n, _ in MODES)
        ok &= same
        print(f"B={B:>3}: " + "  ".join(f"{n} {' '.join(f'{v:.4f}' for v in ms[n])} ms"
                                         for n, _ in MODES)
              + f"  | early/old {np.median(ms['early']) / np.median(ms['old']):.3f}"
              + f"  | logits bit-identical: {same}"
              + ("" if same else f" (max |diff| {np.abs(ref['old'] - ref['early']).max():.3e})"),
              flush=True)
    if args.trace:
        import torch  # noqa: F401
        from trace_model import kernels_of, report
        torch.cuda.init()
        for name, env in MODES:
            apply(env)
            TB = args.trace_batch
            st = model.new_state(TB)
            model.prefill(rng.integers(0, cfg.real_vocab_size, (TB, 32)), st, logits=None)
            model.step(rng.integers(0, cfg.real_vocab_size, TB), st)
            C.cuda_bench_step(model._eng, st._h, 5, 5)
            reps = 5
            ks = kernels_of(lambda: C.cuda_bench_step(model._eng, st._h, 0, reps), reps)
            m = float(np.median(C.cuda_bench_step(model._eng, st._h, 5, 30)))
            with open(os.path.join(args.trace, f"trace_{name}.log"), "w") as out:
                report(f"decode B={TB} {name} (events: {m:.3f} ms/step)", ks, reps, out)
    print("ALL BIT-IDENTICAL" if ok else "MISMATCH", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
