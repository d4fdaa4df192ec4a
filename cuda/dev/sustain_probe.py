"""Is the batch-B decode time of a short measurement what a GPU decoding continuously gets
(dev)? bench_gpu's random 2.8B model; a state after a 32-token prompt; then `n` graph replays
back to back (cuda_bench_step, events around each), printed as the median of each of `chunks`
consecutive chunks, while nvidia-smi samples the SM / memory clocks, temperature and power
every 100 ms (printed per chunk of wall time). Optionally first the ceilings of
bench_gpu.py (--ceilings).

    python3 cuda/dev/sustain_probe.py [--batch 64] [--n 3000] [--chunks 10] [--ceilings]
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from bench_gpu import SHAPE_2_8B, random_bf16_tensors  # noqa: E402

from blackmamba import _lib, model_cuda  # noqa: E402
from blackmamba.config import Config  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("--ceilings", action="store_true")
    args = ap.parse_args()
    C = _lib.C()
    log = tempfile.NamedTemporaryFile("w+", suffix=".csv", delete=False)
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,clocks.mem,"
                            "temperature.gpu,temperature.memory,power.draw",
                            "--format=csv,noheader,nounits", "-lms", "100"], stdout=log,
                           stderr=subprocess.DEVNULL)
    t0 = time.time()
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
    ms = np.asarray(C.cuda_bench_step(model._eng, st._h, 10, args.n), np.float64)
    t2 = time.time()
    time.sleep(0.3)
    smi.terminate()
    smi.wait()
    log.seek(0)
    rows = [r.split(", ") for r in log.read().strip().splitlines()]
    k = len(ms) // args.chunks
    print(f"B={B}: {args.n} replays in {t2 - t1:.2f} s (load {t1 - t0:.1f} s); "
          f"chunk medians (ms): " + " ".join(f"{np.median(ms[i * k:(i + 1) * k]):.4f}"
                                            for i in range(args.chunks)))
    # the samples during the replays (the last ~(t2 - t1) s before the end of sampling)
    n_run = max(1, int((t2 - t1) / 0.1))
    run = rows[-(n_run + 3):-3] if len(rows) > n_run + 3 else rows
    def col(i):
        v = [float(r[i]) for r in run if len(r) > i and r[i].replace(".", "").isdigit()]
        return f"{min(v):.0f}-{max(v):.0f}" if v else "?"
    print(f"during the replays ({len(run)} samples): SM MHz {col(1)}, mem MHz {col(2)}, "
          f"GPU C {col(3)}, mem C {col(4)}, W {col(5)}")
    print("before the replays: " + " | ".join(",".join(r[1:]) for r in rows[:max(0, len(rows) - n_run - 3)][-5:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
