"""What the split bf16 activations (math "bf16x2", and "bf16" on prefills of at most
bf16_split_rows tokens) cost and buy, at the BlackMamba-2.8B widths with 8 layers (r,8 x 4;
per-layer costs scale to the 36-layer model), random bf16 weights.

    PYTHONPATH=. python3 benchmarks/bench_gpu_split.py [--json out.json]

For prefills of 74 (the golden's size), 128, 512 and 2048 tokens it times (CUDA events,
median of 7 after 2 warm-ups, logits of the last position) four models on the same weights:
  bf16        math "bf16", the default: split up to 128 tokens, rounded beyond
  bf16-round  math "bf16", bf16_split_rows=0: always rounded (the old behaviour)
  bf16x2      always split
  fp32        bf16 weights expanded to fp32 per product, exact
and the relative L2 error of each one's last-position logits against the fp32 model.
"""
import argparse
import json
import sys

import numpy as np

from blackmamba import _lib, model_cuda
from blackmamba.config import Config

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_gpu import SHAPE_2_8B, random_bf16_tensors   # noqa: E402

SIZES = [(2, 37), (1, 128), (4, 32), (1, 512), (1, 2048)]
MODELS = [("bf16", "bf16", None), ("bf16-round", "bf16", 0), ("bf16x2", "bf16x2", None),
          ("fp32", "fp32", None)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    model_cuda.require()
    C = _lib.C()
    shape = dict(SHAPE_2_8B)
    shape["num_layers"] = args.layers
    shape["mamba_moe_layers"] = ["r", "8"] * (args.layers // 2)
    cfg = Config.from_dict(shape)
    t = random_bf16_tensors(cfg, seed=1)
    models = {name: model_cuda.CudaModel(cfg, t, dtype="bfloat16", math=math,
                                         bf16_split_rows=rows)
              for name, math, rows in MODELS}
    rng = np.random.default_rng(0)
    res = {}
    print(f"2.8B widths, {args.layers} layers; prefill ms (median of 7), rel. L2 error of the "
          f"last logits against fp32 math")
    print(f"{'B x L':>9} " + " ".join(f"{n:>12}" for n, _, _ in MODELS) + "   err: "
          + " ".join(f"{n:>10}" for n, _, _ in MODELS[:3]))
    for B, L in SIZES:
        ids = rng.integers(0, cfg.real_vocab_size, (B, L))
        row = {}
        for name, m in models.items():
            row[name] = float(np.median(C.cuda_bench_prefill(m._eng, ids, 2, 7)))
        last = {name: m.prefill(ids, m.new_state(B), logits="last") for name, m in models.items()}
        ref = last["fp32"].astype(np.float64)
        errs = {name: float(np.linalg.norm(last[name] - ref) / np.linalg.norm(ref))
                for name, _, _ in MODELS[:3]}
        print(f"{B:>3} x {L:<4} " + " ".join(f"{row[n]:>12.3f}" for n, _, _ in MODELS)
              + "        " + " ".join(f"{errs[n]:>10.2e}" for n, _, _ in MODELS[:3]),
              flush=True)
        res[f"{B}x{L}"] = dict(ms=row, err_vs_fp32=errs)
    print("ratios: bf16 (default) / bf16-round, bf16x2 / bf16-round")
    for k, v in res.items():
        ms = v["ms"]
        print(f"{k:>9}: {ms['bf16'] / ms['bf16-round']:.3f}  {ms['bf16x2'] / ms['bf16-round']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
