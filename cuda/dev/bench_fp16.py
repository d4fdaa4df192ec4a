"""Decode and prefill time of the weight dtypes at the BlackMamba-2.8B shape, in one process
(CUDA events: cuda/bench.cu through _C.cuda_bench_step / cuda_bench_prefill, as
benchmarks/bench_gpu.py measures them).

    PYTHONPATH=. python3 cuda/dev/bench_fp16.py [--json out.json]

Models, one at a time, on the same random weights (bench_gpu.random_bf16_tensors' draws; the
float16 model gets them converted from bf16 exactly, |w| >= 2^-17, pool by pool):
  float16 (math fp32, the default), bfloat16 under fp32 math (the same kernels as float16 but
  the conversion: bf16 vs half bits), bfloat16 under bf16 math (the default, the fast path),
  float32 (fp32 math). Also the relative L2 between the float16 and float32 models' logits of
  a 16-token prefill (the same math on the same values: ~1e-6 expected).
"""
import argparse
import gc
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from bench_gpu import SHAPE_2_8B, median, random_bf16_tensors  # noqa: E402

from blackmamba import _lib, model_cuda  # noqa: E402
from blackmamba.config import Config  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--prefill", type=int, default=2048, help="L of a batch-1 prefill (0: none)")
    args = ap.parse_args()
    model_cuda.require()
    C = _lib.C()
    cfg = Config.from_dict(dict(SHAPE_2_8B))
    batches = [int(b) for b in args.batches.split(",")]
    rng = np.random.default_rng(0)
    probe = rng.integers(0, cfg.real_vocab_size, (1, 16))
    res, probe_logits = {}, {}
    for dtype, mth in (("float16", "fp32"), ("bfloat16", "fp32"), ("bfloat16", "bf16"),
                       ("float32", "fp32")):
        label = f"{dtype}/{mth}"
        t0 = time.perf_counter()
        tensors = random_bf16_tensors(cfg, half=dtype == "float16")
        t1 = time.perf_counter()
        model = model_cuda.CudaModel(cfg, tensors, dtype=dtype, math=mth)
        t2 = time.perf_counter()
        del tensors
        r = res[label] = dict(weight_GB=model.memory()["weight_bytes"] / 1e9,
                              host_s=t1 - t0, upload_s=t2 - t1, decode_ms={})
        for B in batches:
            st = model.new_state(B)
            model.prefill(rng.integers(0, cfg.real_vocab_size, (B, 32)), st, logits=None)
            model.step(rng.integers(0, cfg.real_vocab_size, B), st)      # captures the graph
            r["decode_ms"][B] = median(C.cuda_bench_step(model._eng, st._h, 10, 50))
            del st
        if args.prefill:
            ids = rng.integers(0, cfg.real_vocab_size, (1, args.prefill))
            r["prefill_ms"] = median(C.cuda_bench_prefill(model._eng, ids, 1, 3))
        probe_logits[label] = model(probe)
        print(f"{label:>14}: weights {r['weight_GB']:.2f} GB (host {r['host_s']:.1f} s, upload "
              f"{r['upload_s']:.1f} s); decode ms/step " +
              ", ".join(f"B={B} {ms:.3f}" for B, ms in r["decode_ms"].items()) +
              (f"; prefill L={args.prefill} {r['prefill_ms']:.2f} ms" if args.prefill else ""),
              flush=True)
        del model
        gc.collect()

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))
    ref = probe_logits["float32/fp32"]
    for label, lg in probe_logits.items():
        res[label]["probe_rel_vs_f32"] = rel(lg, ref)
        print(f"{label:>14}: 16-token logits vs float32/fp32: rel L2 {rel(lg, ref):.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
