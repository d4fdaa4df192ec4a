"""How much of a short prompt's time is the host's (dev only)? At the 2.8B shape with
bench_gpu's random bf16 weights, in one process and alternating: the eager prefill as
bench_gpu times it (cuda_bench_prefill: CUDA events around the host's launches) against the
same prefill captured once as a CUDA graph and replayed (cuda_bench_prefill(.., graph=True)),
which leaves the GPU's own time. The ratio bounds what graphs (or a lighter host path) could
give a prompt of that length.

    PYTHONPATH=. python3 cuda/dev/prefill_graph_probe.py [--batches 1] [--length 8,32,128]
                                                          [--rounds 3]
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
    ap.add_argument("--batches", default="1")
    ap.add_argument("--length", default="8,16,32,64,128,512")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    C = _lib.C()
    cfg = Config.from_dict(dict(SHAPE_2_8B))
    model = model_cuda.CudaModel(cfg, random_bf16_tensors(cfg), dtype="bfloat16")
    rng = np.random.default_rng(0)
    for B in (int(b) for b in args.batches.split(",")):
        for L in (int(n) for n in args.length.split(",")):
            ids = rng.integers(0, cfg.real_vocab_size, (B, L))
            eager, graph = [], []
            for _ in range(args.rounds):
                eager.append(float(np.median(C.cuda_bench_prefill(model._eng, ids, 2, 7))))
                graph.append(float(np.median(C.cuda_bench_prefill(model._eng, ids, 2, 7, True))))
            e, g = np.median(eager), np.median(graph)
            print(f"B={B} L={L}: eager " + " ".join(f"{v:.3f}" for v in eager)
                  + " ms, graph " + " ".join(f"{v:.3f}" for v in graph)
                  + f" ms | graph/eager {g / e:.4f} (host share {e - g:.3f} ms)", flush=True)


if __name__ == "__main__":
    main()
