"""Where does a prefill's first layer wait (dev only; torch's CUPTI trace)? Session 17 found a
~68 us GPU gap before the first in_proj of every prefill (later layers: 4-5 us). This prints
the host's CUDA runtime / driver calls and the GPU's kernels of one prefill in host-time
order, so that a long host call (or a long stretch between two calls) before the first
products shows.

    PYTHONPATH=. python3 cuda/dev/host_gap_probe.py [--B 1] [--L 2048] [--n 60]
"""
import argparse
import os
import sys

import numpy as np
import torch
from torch.profiler import ProfilerActivity

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
sys.path.insert(0, os.path.dirname(__file__))
from bench_gpu import SHAPE_2_8B, random_bf16_tensors  # noqa: E402
from trace_model import short, trace_events  # noqa: E402

from blackmamba import _lib, model_cuda  # noqa: E402
from blackmamba.config import Config  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--L", type=int, default=2048)
    ap.add_argument("--n", type=int, default=60, help="host calls to print")
    args = ap.parse_args()
    C = _lib.C()
    cfg = Config.from_dict(dict(SHAPE_2_8B))
    model = model_cuda.CudaModel(cfg, random_bf16_tensors(cfg), dtype="bfloat16")
    ids = np.random.default_rng(1).integers(0, cfg.real_vocab_size, (args.B, args.L)).astype(np.int64)
    torch.cuda.init()
    C.cuda_bench_prefill(model._eng, ids, 1, 2)  # warm: every shape seen once
    ev = trace_events(lambda: C.cuda_bench_prefill(model._eng, ids, 0, 2),
                      (ProfilerActivity.CPU, ProfilerActivity.CUDA))
    cats = {}
    for e in ev:
        cats[e.get("cat")] = cats.get(e.get("cat"), 0) + 1
    print("event categories:", cats)
    api = sorted((e for e in ev if e.get("cat") in ("cuda_runtime", "cuda_driver")),
                 key=lambda e: e["ts"])
    ks = sorted((e for e in ev if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    corr = {}
    for k in ks:
        c = k.get("args", {}).get("correlation")
        if c is not None:
            corr[c] = k
    if not api:
        print("no host API events traced")
        return 1
    # the second prefill: from the API call that launched its first kernel (the embedding)
    emb = [i for i, a in enumerate(api) if "embed" in short(corr.get(a.get("args", {}).get("correlation"), {}).get("name", ""))]
    start = emb[1] if len(emb) > 1 else 0
    t0 = api[start]["ts"]
    # the second prefill's host time by call name, and between calls (our C code, cuBLAS's own)
    end = emb[2] if len(emb) > 2 else len(api)
    tot, cnt, between = {}, {}, 0.0
    prev = None
    for a in api[start:end]:
        tot[a["name"]] = tot.get(a["name"], 0.0) + a["dur"]
        cnt[a["name"]] = cnt.get(a["name"], 0) + 1
        if prev is not None:
            between += max(0.0, a["ts"] - (prev["ts"] + prev["dur"]))
        prev = a
    span = api[end - 1]["ts"] + api[end - 1]["dur"] - t0
    gpu = [k for k in ks if k["ts"] >= api[start]["ts"]][:len(ks) // 2]
    print(f"one prefill: host span {span:.0f} us, in API calls {sum(tot.values()):.0f} us, "
          f"between calls {between:.0f} us; GPU kernels {sum(k['dur'] for k in gpu):.0f} us")
    for name in sorted(tot, key=lambda n: -tot[n])[:12]:
        print(f"  {tot[name]:>8.0f} us  {cnt[name]:>5} calls  {tot[name] / cnt[name]:>6.2f} us/call  {name}")
    print(f"{'host us':>9} {'dur':>7} {'after prev':>10}  call -> kernel (GPU start us, dur)")
    prev_end = t0
    for a in api[start:start + args.n]:
        k = corr.get(a.get("args", {}).get("correlation"))
        kk = f" -> {short(k['name'])} ({k['ts'] - t0:.1f}, {k['dur']:.1f})" if k else ""
        print(f"{a['ts'] - t0:>9.1f} {a['dur']:>7.1f} {a['ts'] - prev_end:>10.1f}  {a['name']}{kk}")
        prev_end = a["ts"] + a["dur"]
    return 0


if __name__ == "__main__":
    sys.exit(main())
