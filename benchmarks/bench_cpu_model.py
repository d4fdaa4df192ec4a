"""Whole-model CPU benchmark at a released shape, on a synthetic checkpoint.

Writes a random checkpoint of the 2.8B shape (or --shape 1.5b) in the released format
(pytorch_model.bin, bf16) under .bench/ (never committed), then measures, side by side in
one run:
  - the machine's streaming read bandwidth (fp32 GEMV over a 1 GB matrix, the same kernel
    family decoding uses) -> the decode floor: active params x bytes / bandwidth;
  - load time and peak RSS (in a child process) for bf16 and fp32 weights;
  - decode ms/token at batch 1 for bf16 and fp32 weights, against that floor;
  - prefill tokens/s at L=512 and L=2048 (bf16 weights).

    python benchmarks/bench_cpu_model.py [--shape 2.8b] [--threads 2] [--keep]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = {
    "2.8b": dict(num_layers=36, hidden_size=1472, ffn_hidden_size=3872),
    "1.5b": dict(num_layers=30, hidden_size=1152, ffn_hidden_size=3072),
}


def write_checkpoint(path, shape):
    from blackmamba.checkpoint import Deferred, save_torch_zip
    from blackmamba.config import Config
    from blackmamba.model import _expected_shapes
    from blackmamba import ops
    raw = dict(state_size=16, conv_dimension=4, vocab_size=50304, expansion_factor=2,
               bias=False, add_bias_linear=False, swiglu=True, max_sequence_length=2048,
               mamba_moe_layers=["r", "8"] * (SHAPES[shape]["num_layers"] // 2),
               **SHAPES[shape])
    cfg = Config.from_dict(dict(raw))
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)
    wfile = os.path.join(path, "pytorch_model.bin")
    if os.path.exists(wfile):
        return cfg
    rng = np.random.default_rng(0)

    def maker(name, shp):
        def make():
            if name.endswith("A_log"):
                a = np.log(np.broadcast_to(np.arange(1, shp[1] + 1, dtype=np.float32), shp))
            elif "norm" in name and name.endswith("weight"):
                a = np.ones(shp, np.float32)
            elif name.endswith("dt_proj.bias"):
                a = np.full(shp, -4.0, np.float32)
            else:
                a = rng.standard_normal(shp, dtype=np.float32) * (0.5 / np.sqrt(shp[-1]))
            return (ops.f32_to_bf16(np.ascontiguousarray(a, np.float32).reshape(-1))
                    .reshape(shp), "bfloat16")
        return make

    tensors = {n: Deferred(s, "bfloat16", maker(n, s)) for n, s in _expected_shapes(cfg).items()}
    t0 = time.perf_counter()
    save_torch_zip(wfile, tensors, root="archive")
    print(f"wrote {wfile} ({os.path.getsize(wfile) / 1e9:.2f} GB) in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    return cfg


def read_bandwidth():
    """GB/s of an fp32 GEMV streaming a 1 GB matrix (best of 5)."""
    from blackmamba import ops
    W = np.random.default_rng(1).standard_normal((65536, 4096), dtype=np.float32)
    x = np.ones((1, 4096), np.float32)
    best = 1e9
    for _ in range(6):
        t0 = time.perf_counter()
        ops.linear(x, W)
        best = min(best, time.perf_counter() - t0)
    return W.nbytes / best / 1e9


def child_load(path, dtype):
    """Run in a child process: load, report seconds and peak RSS."""
    import blackmamba as bm
    t0 = time.perf_counter()
    m = bm.load(path, dtype=dtype, tokenizer=False, progress=False)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": dt, "peak_rss": peak}))
    del m


def measure_load(path, dtype):
    out = subprocess.run([sys.executable, __file__, "--child-load", path, dtype],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def decode_ms(model, steps=12):
    st = model.new_state(1)
    logits = model.prefill(np.array([[1, 2, 3, 4]]), st, logits="last")
    times = []
    tok = np.array([int(logits[0].argmax())])
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        logits = model.step(tok, st)
        times.append(time.perf_counter() - t0)
        tok = np.array([int(logits[0].argmax())])
    return 1e3 * float(np.median(times[2:]))


def prefill_tps(model, L):
    ids = np.random.default_rng(2).integers(0, 50000, (1, L))
    st = model.new_state(1)
    t0 = time.perf_counter()
    model.prefill(ids, st, logits="last")
    return L / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=SHAPES, default="2.8b")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dir", default=os.path.join(HERE, "..", ".bench"))
    ap.add_argument("--skip-fp32", action="store_true")
    ap.add_argument("--child-load", nargs=2, metavar=("PATH", "DTYPE"))
    args = ap.parse_args()
    if args.child_load:
        return child_load(*args.child_load)
    import blackmamba as bm
    from blackmamba.model import count_parameters
    if args.threads:
        bm.ops.set_num_threads(args.threads)
    path = os.path.join(args.dir, f"blackmamba-{args.shape}-random")
    cfg = write_checkpoint(path, args.shape)
    total, active = count_parameters(cfg)
    info = bm.ops.cpu_info()
    bw = read_bandwidth()
    print(f"machine: {os.cpu_count()} cpus, threads {bm.ops.get_num_threads()}, "
          f"avx512={info['avx512']}; fp32 streaming read {bw:.1f} GB/s")
    print(f"shape {args.shape}: {total:,} params, {active:,} active per token")
    rows = []
    for dtype, nbytes in (("bfloat16", 2), ("float32", 4)):
        if dtype == "float32" and args.skip_fp32:
            continue
        ld = measure_load(path, dtype)
        model = bm.load(path, dtype=dtype, tokenizer=False)
        floor = active * nbytes / (bw * 1e9) * 1e3
        ms = decode_ms(model)
        rows.append((dtype, ld, ms, floor))
        print(f"{dtype:9s} load {ld['seconds']:6.2f} s  peak RSS {ld['peak_rss'] / 1e9:5.2f} GB "
              f"(weights {total * nbytes / 1e9:.2f} GB)  decode {ms:7.1f} ms/token  floor "
              f"{floor:6.1f} ms  -> {floor / ms:5.1%} of the bandwidth floor", flush=True)
        if dtype == "bfloat16":
            for L in (512, 2048):
                print(f"{dtype:9s} prefill L={L:5d}: {prefill_tps(model, L):8.1f} tokens/s",
                      flush=True)
        del model


if __name__ == "__main__":
    main()
