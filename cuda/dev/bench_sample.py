"""Timing of the device sampler (cuda/sample.cu) at the 2.8B vocabulary, dev only (PyTorch for
the logits, CUDA events and a CUPTI trace; the package never imports torch).

    PYTHONPATH=. python3 cuda/dev/bench_sample.py [--out FILE]

For B in (1, 64), V = 50,304, each case (greedy, plain temperature, top-k, top-p, both, the
forced generic path, the uncached and the one-block kernels; B = 1 runs the cluster kernel) on LM-like logits (normal * 3: a peaked distribution) and on flat
ones (normal * 0.3): the kernel's own duration (median over the traced calls, CUPTI) and the
whole call from Python (CUDA events around `iters` calls; each call also reads the status
back to the host, so it includes a host synchronisation). Also the model-level loop on a
tiny model: ms per token of CudaModel.sample against CudaModel.greedy.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from trace_model import trace_events  # noqa: E402

from blackmamba import _lib, cuda  # noqa: E402

V = 50304
CASES = [  # name, temperature, top_k, top_p, path
    ("greedy", 0.0, None, None, 0),
    ("temp", 1.0, None, None, 0),
    ("top_k50", 0.8, 50, None, 0),
    ("top_p0.9", 1.0, None, 0.9, 0),
    ("k50_p0.9", 0.8, 50, 0.9, 0),
    ("top_p0.9_generic", 1.0, None, 0.9, 1),
    ("temp_uncached", 1.0, None, None, 2),
    ("k50_p0.9_uncached", 0.8, 50, 0.9, 2),
    ("top_p0.9_gen_unc", 1.0, None, 0.9, 3),
    ("temp_1block", 1.0, None, None, 4),        # the one-block kernel where the cluster
    ("top_k50_1block", 0.8, 50, None, 4),       # kernel (B <= 16) would run
    ("top_p0.9_1block", 1.0, None, 0.9, 4),
]


def kernel_us(fn, names=("sample_kernel", "sample_cluster_kernel")):
    d = [e["dur"] for e in trace_events(fn)
         if e.get("cat") == "kernel" and any(n in e.get("name", "") for n in names)]
    return statistics.median(d) if d else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    out = open(args.out, "w") if args.out else sys.stdout
    C = _lib.C()
    print(f"device sampler, V = {V}; kernel = CUPTI duration (median), call = CUDA events per "
          "Python call (includes the status read-back)", file=out)
    for dist, scale in (("peaked", 3.0), ("flat", 0.3)):
        for B in (1, 64):
            torch.manual_seed(0)
            lg = (torch.randn(B, V, device="cuda") * scale).contiguous()
            d = cuda.asarray(lg)
            for name, T, k, p, path in CASES:
                def call():
                    return C.cuda_sample(d, T, k, p, 0, 0, None, True, path, True)
                for _ in range(3):
                    call()
                torch.cuda.synchronize()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for i in range(args.iters):
                    call()
                b.record()
                b.synchronize()
                per_call = a.elapsed_time(b) / args.iters * 1e3
                st = call()[1]
                paths = sorted(set(((st >> 8) & 0xFF).tolist()))
                paths = [f"{q}{'c' if ((st >> 16) & 1).max() else ''}"
                         f"{'x' if ((st >> 17) & 1).max() else ''}" for q in paths]  # x: cluster
                ku = kernel_us(lambda: [call() for _ in range(5)])
                print(f"{dist:6s} B={B:3d} {name:17s} kernel {ku:8.1f} us   call {per_call:8.1f} us"
                      f"   paths {paths}", file=out)
                out.flush()

    # model level: ms per token, device sampling vs device greedy (tiny model: launch-bound)
    from blackmamba import model_cuda
    from blackmamba.config import Config
    from blackmamba.model import random_tensors
    cfg = Config.from_dict(dict(num_layers=4, hidden_size=64, state_size=16, conv_dimension=4,
                                vocab_size=V, ffn_hidden_size=128,
                                mamba_moe_layers=["r", "8", "r", "8"]))
    g = model_cuda.CudaModel(cfg, random_tensors(cfg, seed=0), dtype="float32")
    for B in (1, 64):
        ids = np.random.default_rng(0).integers(0, 1000, (B, 4))
        n = 64
        for label, fn in (("greedy", lambda: g.greedy(ids, n)),
                          ("sample T=1", lambda: g.sample(ids, n, temperature=1.0, seed=1)),
                          ("sample k50 p0.9", lambda: g.sample(ids, n, temperature=0.8, top_k=50,
                                                               top_p=0.9, seed=1))):
            fn()
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3 / n
            print(f"tiny model V={V} B={B:3d} {label:16s} {ms:7.3f} ms/token (wall, incl. prefill)",
                  file=out)
    if args.out:
        out.close()


if __name__ == "__main__":
    main()
