"""Is the batch-B decode time of a short measurement what a GPU decoding continuously gets
(dev)? bench_gpu's random 2.8B model; a state after a 32-token prompt; then `n` graph replays
back to back (cuda_bench_step, events around each), printed as the median of each of `chunks`
consecutive chunks, while nvidia-smi samples the SM / memory clocks, temperatures and power
every 100 ms (smi_sampler.py: their ranges during the replays, and the last samples before).
Optionally first the ceilings of bench_gpu.py (--ceilings).

    python3 cuda/dev/sustain_probe.py [--batch 64] [--n 3000] [--chunks 10] [--ceilings]
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from bench_gpu import SHAPE_2_8B, random_bf16_tensors  # noqa: E402

from blackmamba import _lib, model_cuda  # noqa: E402
from blackmamba.config import Config  # noqa: E402
from smi_sampler import smi_samples, span  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("--ceilings", action="store_true")
    args = ap.parse_args()
    C = _lib.C()
    fields = ["clocks.sm", "clocks.mem", "temperature.gpu", "temperature.memory", "power.draw"]
    t0 = time.time()
    with smi_samples(fields) as before:
        if args.ceilings:
            C.cuda_bench_copy(2 << 30, 20)
            C.cuda_bench_gemm(8192, 8192, 8192, 10)
        cfg = Config.from_dict(dict(SHAPE_2_8B))
        model = model_cuda.CudaModel(cfg, random_bf16_tensors(cfg), dtype="bfloat16")
        rng = np.random.default_rng(0)
        B = args.batch
        st = model.new_state(B)
        model.prefill(rng.integers(0, cfg.real_vocab_size, (B, 32)), st, logits=None)
        model.step(rng.integers(0, cfg.real_vocab_size, B), st)
    t1 = time.time()
    with smi_samples(fields) as run:
        ms = np.asarray(C.cuda_bench_step(model._eng, st._h, 10, args.n), np.float64)
    t2 = time.time()
    k = len(ms) // args.chunks
    print(f"B={B}: {args.n} replays in {t2 - t1:.2f} s (load {t1 - t0:.1f} s); "
          f"chunk medians (ms): " + " ".join(f"{np.median(ms[i * k:(i + 1) * k]):.4f}"
                                            for i in range(args.chunks)))
    print(f"during the replays ({len(run)} samples): SM MHz {span(run, 0)}, mem MHz "
          f"{span(run, 1)}, GPU C {span(run, 2)}, mem C {span(run, 3)}, W {span(run, 4)}")
    print("before the replays: " + " | ".join(",".join(f"{v:g}" for v in r) for r in before[-5:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
