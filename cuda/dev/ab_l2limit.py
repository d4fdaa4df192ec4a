"""A/B of the device's persisting-L2 set-aside (cudaLimitPersistingL2CacheSize) in one process,
at the 2.8B shape with bench_gpu's random bf16 weights (dev only).

    PYTHONPATH=. python3 cuda/dev/ab_l2limit.py [--batches 1,8,64] [--limits dflt,0]
        [--l2side 32] [--prefill 1,8] [--rounds 3]

The limit is a property of the device context, not of a graph, so each batch size's state and
graph are timed under every limit in turn (same buffers, same graph): per round, for each
--l2side value (BLACKMAMBA_L2SIDE, MB: a new state, so a new capture), for each limit: set it,
then the median of 50 graph replays after 10 (cuda_bench_step, CUDA events). --prefill times
prefills of 2048 tokens at the given batch sizes (median of 3 after 1) under each limit.
"dflt" is the value the process found. Prints the ratios against the first limit.
"""
import argparse
import ctypes
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from bench_gpu import SHAPE_2_8B, random_bf16_tensors  # noqa: E402

from blackmamba import _lib, model_cuda  # noqa: E402
from blackmamba.config import Config  # noqa: E402

LIMIT = 6  # cudaLimitPersistingL2CacheSize


def cudart():
    """The libcudart that the extension loaded (the limit is set through the same runtime)."""
    with open("/proc/self/maps") as f:
        for line in f:
            if "libcudart.so" in line:
                return ctypes.CDLL(line.split()[-1])
    raise RuntimeError("libcudart is not loaded")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--limits", default="dflt,0", help="MB, or dflt (the value found)")
    ap.add_argument("--l2side", default="", help="BLACKMAMBA_L2SIDE values (MB); empty: as set")
    ap.add_argument("--prefill", default="", help="prefill batch sizes (L = 2048)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    C = _lib.C()
    cfg = Config.from_dict(dict(SHAPE_2_8B))
    model = model_cuda.CudaModel(cfg, random_bf16_tensors(cfg), dtype="bfloat16")
    rt = cudart()
    cur = ctypes.c_size_t(0)
    assert rt.cudaDeviceGetLimit(ctypes.byref(cur), LIMIT) == 0
    found = cur.value
    limits = [found if v == "dflt" else int(float(v) * (1 << 20)) for v in args.limits.split(",")]
    names = [f"{v / (1 << 20):g}MB" for v in limits]
    print(f"set-aside found: {found} bytes ({found / (1 << 20):g} MB); limits {names}", flush=True)

    def set_limit(v):
        assert rt.cudaDeviceSetLimit(LIMIT, ctypes.c_size_t(v)) == 0
        got = ctypes.c_size_t(0)
        assert rt.cudaDeviceGetLimit(ctypes.byref(got), LIMIT) == 0
        return got.value

    for v in limits:
        got = set_limit(v)
        if got != v:
            print(f"  asked {v}, the device reports {got}", flush=True)
    sides = [s for s in args.l2side.split(",") if s] or [None]
    rng = np.random.default_rng(0)

    def line(label, ms):
        base = np.median(ms[names[0]])
        return (f"{label}: " + "  ".join(f"{n} {' '.join(f'{x:.4f}' for x in ms[n])}" for n in names)
                + "  | " + " ".join(f"{n}/{names[0]} {np.median(ms[n]) / base:.4f}" for n in names[1:]))

    for B in [int(b) for b in args.batches.split(",") if b]:
        prompt = rng.integers(0, cfg.real_vocab_size, (B, 32))
        tok = rng.integers(0, cfg.real_vocab_size, B)
        ms = {(s, n): [] for s in sides for n in names}
        for _ in range(args.rounds):
            for s in sides:
                if s is not None:
                    os.environ["BLACKMAMBA_L2SIDE"] = s
                st = model.new_state(B)
                model.prefill(prompt, st, logits=None)
                model.step(tok, st)
                for v, n in zip(limits, names):
                    set_limit(v)
                    ms[(s, n)].append(float(np.median(C.cuda_bench_step(model._eng, st._h, 10, 50))))
        for s in sides:
            print(line(f"B={B:>3} l2side {s or 'as set'}", {n: ms[(s, n)] for n in names}), flush=True)
        if len(sides) > 1:
            b0 = np.median(ms[(sides[0], names[0])])
            print(f"B={B:>3} against l2side {sides[0]} at {names[0]}: " + "  ".join(
                f"{s}@{n} {np.median(ms[(s, n)]) / b0:.4f}" for s in sides for n in names), flush=True)
    for B in [int(b) for b in args.prefill.split(",") if b]:
        ids = np.random.default_rng(1).integers(0, cfg.real_vocab_size, (B, 2048)).astype(np.int64)
        ms = {n: [] for n in names}
        for _ in range(args.rounds):
            for v, n in zip(limits, names):
                set_limit(v)
                ms[n].append(float(np.median(C.cuda_bench_prefill(model._eng, ids, 1, 3))))
        print(line(f"prefill B={B} L=2048", ms), flush=True)
    set_limit(found)
    return 0


if __name__ == "__main__":
    sys.exit(main())
