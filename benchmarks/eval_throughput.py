"""Throughput of lm-eval style scoring (blackmamba.scoring.loglikelihoods) at a real shape.

Random weights (no download), built tensor by tensor as bfloat16 so the 2.8B shape needs
5.6 GB, not the 11 GB of float32 random_tensors. Requests mimic zero-shot HellaSwag: each
context (CTX tokens) has 4 continuations (CONT tokens). Reports:
  model tokens/s  tokens actually run through the model (contexts once + continuations)
  request tokens/s  context+continuation tokens per request, summed (what a scorer without
                    state sharing would run: lm-eval's HF model)

    python benchmarks/eval_throughput.py --shape 2.8B --dtype bfloat16 --docs 16
    python benchmarks/eval_throughput.py --shape 1.5B --layers 4   # first 4 layers only
"""
import argparse
import json
import time

import numpy as np

SHAPES = {   # SPEC 4
    "1.5B": dict(num_layers=30, hidden_size=1152, ffn_hidden_size=3072),
    "2.8B": dict(num_layers=36, hidden_size=1472, ffn_hidden_size=3872),
}


class _BF16Tensor:
    """What blackmamba.Model takes from a checkpoint: bf16 bits used in place."""
    dtype = "bfloat16"

    def __init__(self, bits):
        self.array, self.shape = bits, bits.shape

    def to_numpy(self, dtype="float32"):
        from blackmamba import ops
        return ops.bf16_to_f32(self.array)


def random_model(shape, layers=None, dtype="bfloat16", seed=0, device="cpu"):
    import blackmamba as bm
    from blackmamba import ops
    from blackmamba.config import Config
    from blackmamba.model import _expected_shapes, random_tensor, random_tensors

    s = dict(SHAPES[shape])
    if layers:
        s["num_layers"] = layers
    cfg = Config.from_dict(dict(state_size=16, conv_dimension=4, expansion_factor=2,
                                vocab_size=50304, bias=False, add_bias_linear=False,
                                swiglu=True, max_sequence_length=2048,
                                mamba_moe_layers=["r", "8"] * (s["num_layers"] // 2), **s))
    if device == "cuda":
        from blackmamba.model_cuda import CudaModel
        Model = CudaModel
    else:
        Model = bm.Model
    if dtype == "float32":
        return Model(cfg, random_tensors(cfg, seed), dtype="float32", name=shape), cfg
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shp in _expected_shapes(cfg).items():
        if len(shp) >= 2 and not name.endswith("A_log") and not name.endswith("conv1d.weight"):
            a = rng.standard_normal(shp, dtype=np.float32) * np.float32(0.5 / np.sqrt(shp[-1]))
            tensors[name] = _BF16Tensor(ops.f32_to_bf16(a))
        else:      # vectors, A_log, conv weights: float32, random_tensors' recipe
            tensors[name] = random_tensor(name, shp, rng)
    return Model(cfg, tensors, dtype="bfloat16", name=shape), cfg


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="2.8B")
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N layers")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--docs", type=int, default=16, help="contexts (each with 4 endings)")
    ap.add_argument("--ctx", type=int, default=80, help="context tokens (HellaSwag ~80)")
    ap.add_argument("--cont", type=int, default=25, help="continuation tokens (~25)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from blackmamba import ops, scoring
    if args.threads:
        ops.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, cfg = random_model(args.shape, args.layers, args.dtype, device=args.device)
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    reqs = []
    for _ in range(args.docs):
        ctx = list(rng.integers(2, 50000, args.ctx + int(rng.integers(-5, 6))))
        for _ in range(4):
            reqs.append((ctx, list(rng.integers(2, 50000, args.cont + int(rng.integers(-5, 6))))))
    scoring.loglikelihoods(model, reqs[:4], batch_size=args.batch_size)     # warm up
    t0, c0 = time.perf_counter(), time.process_time()
    scoring.loglikelihoods(model, reqs, batch_size=args.batch_size)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    model_tokens = sum(len(c) for c in {tuple(c) for c, _ in reqs}) + sum(len(t) for _, t in reqs)
    request_tokens = sum(len(c) + len(t) for c, t in reqs)
    res = dict(shape=args.shape, layers=cfg.num_layers, dtype=args.dtype, device=args.device,
               threads=ops.get_num_threads(), requests=len(reqs), seconds=dt,
               model_tokens=model_tokens, request_tokens=request_tokens,
               model_tokens_per_s=model_tokens / dt, request_tokens_per_s=request_tokens / dt,
               requests_per_s=len(reqs) / dt, build_seconds=build_s, cpu_seconds=cpu,
               batch_size=args.batch_size)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{args.shape} ({cfg.num_layers} layers) {args.dtype} on {args.device}, "
              f"{res['threads']} CPU threads, "
              f"batch {args.batch_size}: {len(reqs)} requests in {dt:.1f} s = "
              f"{res['requests_per_s']:.2f} req/s, {res['model_tokens_per_s']:.1f} model "
              f"tokens/s ({res['request_tokens_per_s']:.1f} request tokens/s); "
              f"CPU time {cpu:.1f} s = {cpu / dt:.2f} cores busy on average")


if __name__ == "__main__":
    main()
