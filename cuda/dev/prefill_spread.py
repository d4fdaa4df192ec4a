"""The run-to-run spread of one prefill size (dev): N timed prefills back to back at the 2.8B
shape with bench_gpu's random bf16 weights, each one's ms printed, with the SM clock, power and
temperature sampled by nvidia-smi (every 100 ms) during them, to tell a clock or power effect
from one in the code.

    PYTHONPATH=. python3 cuda/dev/prefill_spread.py [--batch 8] [--length 2048] [--iters 20]
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from bench_gpu import SHAPE_2_8B, random_bf16_tensors  # noqa: E402

from blackmamba import _lib, model_cuda  # noqa: E402
from blackmamba.config import Config  # noqa: E402
from smi_sampler import smi_samples, span  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    C = _lib.C()
    cfg = Config.from_dict(dict(SHAPE_2_8B))
    model = model_cuda.CudaModel(cfg, random_bf16_tensors(cfg), dtype="bfloat16")
    ids = np.random.default_rng(0).integers(0, cfg.real_vocab_size, (args.batch, args.length))
    model.prefill(ids, model.new_state(args.batch), logits="last")
    with smi_samples(["clocks.sm", "power.draw", "temperature.gpu"]) as rows:
        ms = np.asarray(C.cuda_bench_prefill(model._eng, ids, 2, args.iters), np.float64)
    print(f"B={args.batch} L={args.length}: ms " + " ".join(f"{x:.2f}" for x in ms))
    print(f"  min {ms.min():.2f} median {np.median(ms):.2f} max {ms.max():.2f} "
          f"(max/min {ms.max() / ms.min():.3f})")
    if rows:
        print(f"  nvidia-smi, {len(rows)} samples: SM clock {span(rows, 0)} MHz "
              f"(median {np.nanmedian(np.asarray(rows)[:, 0]):.0f}), power {span(rows, 1)} W, "
              f"temperature {span(rows, 2)} C")
    return 0


if __name__ == "__main__":
    sys.exit(main())
