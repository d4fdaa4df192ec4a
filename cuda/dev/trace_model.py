"""Per-kernel time of the whole-model engine on the GPU, from a CUPTI trace (torch.profiler,
dev only: the package never imports torch). The 2.8B shape with bench_gpu's random bf16
weights; for each case, the kernels of a few decode graph replays (or prefills) with their
real durations, and the idle time between consecutive kernels ("gap": launch latency, PDL
waits, host syncs), which the event profile of bench_gpu.py cannot separate.

    PYTHONPATH=. python3 cuda/dev/trace_model.py [--cases d1,d8,d64,p1,p8] [--out DIR]
    (a case may carry switches for itself alone: p1x128@BLACKMAMBA_CONV_SCAN_PDL=0@NAME=V; the
    decode graph of a batch size is captured once, so a decode case's switches count only at
    its batch size's first case)

Prints, per case: ms per step (kernels + gaps, from the trace), the sum of kernel time, the
sum of gaps, and a table by kernel name (count per step, us per call, us per step, share).
"""
import argparse
import json
import os
import re
import sys
import tempfile
from collections import defaultdict

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from bench_gpu import SHAPE_2_8B, random_bf16_tensors  # noqa: E402

from blackmamba import _lib, model_cuda  # noqa: E402
from blackmamba.config import Config  # noqa: E402


def short(name):
    name = name.replace("(anonymous namespace)::", "")
    name = re.sub(r"\((?:int|unsigned int|bool|long|char)\)", "", name)   # template casts
    name = re.sub(r"\(.*$", "", name)            # drop argument lists
    name = re.sub(r"^void ", "", name)
    return name[:70]


def trace_events(fn, activities=(ProfilerActivity.CUDA,)):
    """The complete ("X") events of a torch.profiler chrome trace around fn() and a device
    synchronize (also cuda/dev/bench_sample.py's and host_gap_probe.py's)."""
    with profile(activities=list(activities)) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            ev = json.load(f)["traceEvents"]
    return [e for e in ev if e.get("ph") == "X"]


def kernels_of(fn, reps):
    return sorted((e for e in trace_events(fn) if e.get("cat") == "kernel"),
                  key=lambda e: e["ts"])


def report(label, ks, reps, out):
    if not ks:
        print(f"{label}: no kernels traced", file=out)
        return
    span = ks[-1]["ts"] + ks[-1]["dur"] - ks[0]["ts"]
    busy = sum(e["dur"] for e in ks)
    gaps = []
    for a, b in zip(ks, ks[1:]):
        gaps.append(b["ts"] - (a["ts"] + a["dur"]))
    by = defaultdict(list)
    for e in ks:
        by[short(e["name"])].append(e["dur"])
    print(f"\n== {label}: {len(ks) / reps:.0f} kernels a step; per step: span {span / reps:.1f} us, "
          f"kernels {busy / reps:.1f} us, gaps {sum(max(g, 0) for g in gaps) / reps:.1f} us "
          f"(median gap {np.median(gaps):.2f} us, overlap {-sum(min(g, 0) for g in gaps) / reps:.1f} us)",
          file=out)
    rows = sorted(by.items(), key=lambda kv: -sum(kv[1]))
    print(f"{'us/step':>9} {'share':>6} {'n/step':>7} {'us/call':>8} {'min':>7} {'max':>7}  kernel",
          file=out)
    for name, d in rows:
        d = np.asarray(d, np.float64)
        print(f"{d.sum() / reps:>9.1f} {d.sum() / busy:>6.1%} {len(d) / reps:>7.1f} {d.mean():>8.2f} "
              f"{d.min():>7.2f} {d.max():>7.2f}  {name}", file=out)
    # the first step in order: kernel, duration, gap before it (for the layer pattern)
    n1 = len(ks) // reps
    print("first step in order (us: gap before, duration):", file=out)
    line = []
    for i, e in enumerate(ks[:min(n1, 40)]):
        g = e["ts"] - (ks[i - 1]["ts"] + ks[i - 1]["dur"]) if i else 0.0
        line.append(f"{short(e['name'])[:28]} {g:.1f}/{e['dur']:.1f}")
    print("  " + "\n  ".join(line), file=out)
    # the gap before each later step's first kernel (graph launch to graph launch)
    starts = [ks[k * n1]["ts"] - (ks[k * n1 - 1]["ts"] + ks[k * n1 - 1]["dur"])
              for k in range(1, reps) if k * n1 < len(ks)]
    if starts:
        print("gap before each later step's first kernel (us): "
              + " ".join(f"{g:.1f}" for g in starts), file=out)
    out.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="d1,d8,d64,p1,p8",
                    help="d<B>: decode; p<B>[x<L>]: prefill of L tokens (2048); "
                         "@NAME=VALUE after a case: that switch for the case alone")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = open(args.out, "w") if args.out else sys.stdout
    C = _lib.C()
    cfg = Config.from_dict(dict(SHAPE_2_8B))
    model = model_cuda.CudaModel(cfg, random_bf16_tensors(cfg), dtype="bfloat16")
    rng = np.random.default_rng(0)
    torch.cuda.init()
    for case in args.cases.split(","):
        case, *sets = case.split("@")           # "p1x128@NAME=V": switches for this case
        saved = {k: os.environ.get(k) for k, _ in (kv.split("=", 1) for kv in sets)}
        os.environ.update(dict(kv.split("=", 1) for kv in sets))
        kind = case[0]
        B, _, Lp = case[1:].partition("x")   # "p1x32": a prefill of 32 tokens (default 2048)
        B, Lp = int(B), int(Lp or 2048)
        st = model.new_state(B)
        model.prefill(rng.integers(0, cfg.real_vocab_size, (B, 32)), st, logits=None)
        if kind == "d":
            model.step(rng.integers(0, cfg.real_vocab_size, B), st)     # capture
            C.cuda_bench_step(model._eng, st._h, 5, 5)
            reps = 5
            ks = kernels_of(lambda: C.cuda_bench_step(model._eng, st._h, 0, reps), reps)
            ms = float(np.median(C.cuda_bench_step(model._eng, st._h, 5, 30)))
            label = f"decode B={B} (events: {ms:.3f} ms/step)"
        else:
            ids = rng.integers(0, cfg.real_vocab_size, (B, Lp))
            C.cuda_bench_prefill(model._eng, ids, 1, 1)
            reps = 2 if Lp >= 1024 else 4
            ks = kernels_of(lambda: C.cuda_bench_prefill(model._eng, ids, 0, reps), reps)
            ms = float(np.median(C.cuda_bench_prefill(model._eng, ids, 2, 5)))
            label = f"prefill B={B} L={Lp} (events: {ms:.3f} ms)"
        report(label + "".join(f" @{kv}" for kv in sets), ks, reps, out)
        for k, v in saved.items():  # the switches back as they were
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return 0


if __name__ == "__main__":
    sys.exit(main())
