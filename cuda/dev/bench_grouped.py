"""Grouped-GEMM experts (cuda/grouped.cu) against the cuBLAS path and a dense cuBLAS gated MLP
of the same FLOPs, the wgmma core (grouped_wgmma.cuh) against the mma.sync one
(BLACKMAMBA_MOE_WGMMA=1 vs 0), then the whole model A/B (wgmma, mma.sync, cuBLAS path) in
one process (prefill; decode, where the core is not used, with --decode).
Dev script for the GPU machine (torch for the dense reference and the timing; the package's
C symbols through ctypes):

    python3 cuda/dev/bench_grouped.py [--no-model] [--decode] [--cublas] [--no-sweep]

(--cublas: the model A/B also on the cuBLAS path, BLACKMAMBA_MOE_GROUPED=0; --no-sweep: not
the cp.async wgmma core's tile variants.) The "wgmma" column is the cp.async core
(BLACKMAMBA_MOE_TMA=0), "tma" the same tiles fed by the copy engine (grouped_tma.cuh), the
default for the prefill sizes; the model A/B's "1" is the default.

Shapes: BlackMamba-2.8B (d=1472, F=3872, X=8), random bf16 weights, uniform random routing.
Grouped and dense are timed as CUDA-graph replays (median); the cuBLAS path synchronises the
host, so it is timed with events around back-to-back calls (after a GPU sleep that lets the
host queue ahead).
"""
import ctypes
import os
import sys
import time

import numpy as np
import torch

from gpu_timing import events_ms, graph_ms

from blackmamba import _lib

P, I64, I32, SZ = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_size_t
LIB = ctypes.CDLL(_lib.C().__file__)
LIB.bm_cuda_moe_grouped.argtypes = [P, P, P, P, P, I32, I32, P, I64, I64, I64, I64, P, SZ, P]
LIB.bm_cuda_moe_grouped_workspace.argtypes = [I64, I64, I64, I64, I32]
LIB.bm_cuda_moe_grouped_workspace.restype = SZ
LIB.bm_cuda_moe_experts.argtypes = [P, P, P, P, P, I32, I32, I32, P, I64, I64, I64, I64, P, SZ, P, P]
LIB.bm_cuda_moe_experts_workspace.argtypes = [I64, I64, I64, I64, I32, I32]
LIB.bm_cuda_moe_experts_workspace.restype = SZ
LIB.bm_cuda_cublas_create.argtypes = [P]
LIB.bm_cuda_last_error.restype = ctypes.c_char_p
DEV = torch.device("cuda")
SILU, BF16, MATH_BF16, MATH_BF16X2 = 2, 1, 2, 3


def stream():
    return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)


def ok(st):
    if st:
        raise RuntimeError(LIB.bm_cuda_last_error().decode())


def bench_graph(fn, inner=10, reps=11):
    return graph_ms(fn, inner, reps)


def bench_events(fn, inner=10, reps=7):
    return events_ms(fn, inner, reps)


def kernels(d=1472, F=3872, X=8):
    torch.manual_seed(0)
    w1 = (torch.randn(X, 2 * F, d, device=DEV) * (0.5 / d ** 0.5)).to(torch.bfloat16)
    w2 = (torch.randn(X, d, F, device=DEV) * (0.5 / F ** 0.5)).to(torch.bfloat16)
    hdl = ctypes.c_void_p()
    ok(LIB.bm_cuda_cublas_create(ctypes.byref(hdl)))
    wbytes = 3 * X * F * d * 2
    print(f"experts d={d} F={F} X={X}: FLOPs 6 T d F; weights {wbytes / 1e6:.0f} MB")
    # wgmma tile variants (grouped_wgmma.cuh wgmma_dispatch): fc1 varied with fc2 = 1, then fc2
    wg = ("11", "21", "31", "41", "44", "66", "76", "86", "96", "99", "69", "79", "89", "00")
    os.environ["BLACKMAMBA_MOE_TMA"] = "0"
    for T in (() if "--no-sweep" in sys.argv else (2048, 16384)):
        x = torch.randn(T, d, device=DEV)
        ids = torch.randint(0, X, (T,), device=DEV, dtype=torch.int32)
        g = torch.rand(T, device=DEV) * 0.9 + 0.1
        out = torch.empty(T, d, device=DEV)
        nb = LIB.bm_cuda_moe_grouped_workspace(T, d, X, F, 0)
        ws = torch.empty(nb, dtype=torch.uint8, device=DEV)

        def grouped():
            ok(LIB.bm_cuda_moe_grouped(x.data_ptr(), ids.data_ptr(), g.data_ptr(), w1.data_ptr(),
                                       w2.data_ptr(), SILU, 0, out.data_ptr(), T, d, X, F,
                                       ws.data_ptr(), nb, stream()))
        res = []
        for c in wg:
            os.environ["BLACKMAMBA_MOE_WGMMA_TILES"] = c
            res.append(f"{c} {bench_graph(grouped):.4f}")
        os.environ.pop("BLACKMAMBA_MOE_WGMMA_TILES")
        print(f"wgmma tiles T={T}: " + ", ".join(res) + " ms", flush=True)
    print(f"{'T':>6} {'split':>5} {'mma.sync':>8} {'wgmma':>8} {'TFLOP/s':>7} {'cuBLAS':>8} "
          f"{'dense':>8} {'dense/mma':>9} {'dense/wg':>8} {'rel(wg,mma)':>11} {'rel(wg,cublas)':>14}"
          f" {'tma':>8} {'TFLOP/s':>7} {'dense/tma':>9} {'tma==wg':>7}  (ms)")
    for T, split in ((64, 0), (512, 0), (2048, 0), (2048, 1), (16384, 0)):
        x = torch.randn(T, d, device=DEV)
        ids = torch.randint(0, X, (T,), device=DEV, dtype=torch.int32)
        g = torch.rand(T, device=DEV) * 0.9 + 0.1
        out = torch.empty(T, d, device=DEV)
        out_mma = torch.empty(T, d, device=DEV)
        out_old = torch.empty(T, d, device=DEV)
        nb = LIB.bm_cuda_moe_grouped_workspace(T, d, X, F, split)
        ws = torch.empty(nb, dtype=torch.uint8, device=DEV)
        math = MATH_BF16X2 if split else MATH_BF16
        nb_old = LIB.bm_cuda_moe_experts_workspace(T, d, X, F, BF16, math)
        ws_old = torch.empty(nb_old, dtype=torch.uint8, device=DEV)

        def run_into(o):
            ok(LIB.bm_cuda_moe_grouped(x.data_ptr(), ids.data_ptr(), g.data_ptr(), w1.data_ptr(),
                                       w2.data_ptr(), SILU, split, o.data_ptr(), T, d, X, F,
                                       ws.data_ptr(), nb, stream()))

        def grouped():
            run_into(out)

        def old():
            os.environ["BLACKMAMBA_MOE_GROUPED"] = "0"
            ok(LIB.bm_cuda_moe_experts(x.data_ptr(), ids.data_ptr(), g.data_ptr(), w1.data_ptr(),
                                       w2.data_ptr(), BF16, SILU, math, out_old.data_ptr(), T, d,
                                       X, F, ws_old.data_ptr(), nb_old, hdl, stream()))
            os.environ["BLACKMAMBA_MOE_GROUPED"] = "1"

        os.environ["BLACKMAMBA_MOE_WGMMA"] = "0"
        run_into(out_mma)
        ms_m = bench_graph(grouped)
        os.environ["BLACKMAMBA_MOE_WGMMA"] = "1"
        grouped()
        old()
        torch.cuda.synchronize()
        rel = ((out - out_old).norm() / out_old.norm()).item()
        rel_m = ((out - out_mma).norm() / out_mma.norm()).item()
        ms_g = bench_graph(grouped)
        out_t = torch.empty(T, d, device=DEV)
        os.environ["BLACKMAMBA_MOE_TMA"] = "1"
        run_into(out_t)
        ms_t = bench_graph(grouped)
        os.environ["BLACKMAMBA_MOE_TMA"] = "0"
        torch.cuda.synchronize()
        same_t = bool(torch.equal(out_t, out))
        ms_o = bench_events(old) if T >= 256 else float("nan")
        ms_d = float("nan")
        if not split:  # dense gated MLP of the same FLOPs: (T, d) @ (d, 2F), act*up, @ (F, d)
            xb = x.to(torch.bfloat16)
            d1, d2 = w1[0], w2[0]

            def dense():
                h = xb @ d1.t()
                a = torch.nn.functional.silu(h[:, :F]) * h[:, F:]
                return a @ d2.t()
            ms_d = bench_graph(dense)
        fl = 6 * T * d * F
        print(f"{T:>6} {split:>5} {ms_m:>8.4f} {ms_g:>8.4f} {fl / ms_g / 1e9:>7.0f} {ms_o:>8.4f} "
              f"{ms_d:>8.4f} {ms_d / ms_m:>9.2f} {ms_d / ms_g:>8.2f} {rel_m:>11.2e} {rel:>14.2e}"
              f" {ms_t:>8.4f} {fl / ms_t / 1e9:>7.0f} {ms_d / ms_t:>9.2f} {str(same_t):>7}",
              flush=True)
        del ws, ws_old
        torch.cuda.empty_cache()
    os.environ.pop("BLACKMAMBA_MOE_WGMMA")
    os.environ.pop("BLACKMAMBA_MOE_TMA")


def model_ab():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                    "benchmarks"))
    import bench_gpu as bg
    from blackmamba import model_cuda
    from blackmamba.config import Config
    C = _lib.C()
    cfg = Config.from_dict(dict(bg.SHAPE_2_8B))
    t0 = time.perf_counter()
    model = model_cuda.CudaModel(cfg, bg.random_bf16_tensors(cfg), dtype="bfloat16", math="bf16")
    print(f"\nmodel 2.8B shape, bf16 math ({time.perf_counter() - t0:.0f} s to build)")
    rng = np.random.default_rng(0)
    rows = {}
    for mode in ("1", "w0", "0") if "--cublas" in sys.argv else ("1", "w0"):
        # "1": grouped, wgmma core; "w0": grouped, mma.sync core (BLACKMAMBA_MOE_WGMMA=0);
        # "0": the cuBLAS path
        os.environ["BLACKMAMBA_MOE_GROUPED"] = "0" if mode == "0" else "1"
        os.environ["BLACKMAMBA_MOE_WGMMA"] = "0" if mode == "w0" else "1"
        r = {}
        for B in ((16, 64) if "--decode" in sys.argv else ()):
            st = model.new_state(B)   # a new state: the decode graph is captured in this mode
            model.prefill(rng.integers(0, cfg.real_vocab_size, (B, 32)), st, logits=None)
            model.step(rng.integers(0, cfg.real_vocab_size, B), st)
            r[f"decode B={B} ms"] = float(np.median(C.cuda_bench_step(model._eng, st._h, 10, 30)))
            prof = C.cuda_bench_profile(model._eng, st._h, None, 4)
            r[f"decode B={B} experts ms"] = prof.get("experts", float("nan"))
        for B in (1, 8):
            ids = rng.integers(0, cfg.real_vocab_size, (B, 2048))
            r[f"prefill B={B} ms"] = float(np.median(C.cuda_bench_prefill(model._eng, ids, 2, 5)))
            st = model.new_state(B)
            model.prefill(rng.integers(0, cfg.real_vocab_size, (B, 8)), st, logits=None)
            prof = C.cuda_bench_profile(model._eng, st._h, ids, 3)
            r[f"prefill B={B} experts ms"] = prof.get("experts", float("nan"))
        rows.setdefault(mode, []).append(r)
        print(f"mode {mode}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()),
              flush=True)
    os.environ["BLACKMAMBA_MOE_GROUPED"] = "1"
    os.environ.pop("BLACKMAMBA_MOE_WGMMA")
    print("\nstage names:", list(prof))
    nan = {k: float("nan") for k in rows["1"][-1]}
    g, m, o = rows["1"][-1], rows["w0"][0], rows.get("0", [nan])[0]
    for k in g:
        extra = ""
        if k.startswith("decode") and not k.endswith("experts ms"):
            B = int(k.split("=")[1].split()[0])
            extra = f"  ({B / g[k] * 1e3:.0f} vs {B / o[k] * 1e3:.0f} tok/s)"
        if k.startswith("prefill") and not k.endswith("experts ms"):
            B = int(k.split("=")[1].split()[0])
            extra = f"  ({B * 2048 / g[k] * 1e3:.0f} vs {B * 2048 / o[k] * 1e3:.0f} tok/s)"
        if k.startswith("prefill") and not k.endswith("experts ms"):
            extra += f"  (mma.sync core {B * 2048 / m[k] * 1e3:.0f})"
        print(f"{k:>24}: wgmma {g[k]:8.3f}  mma.sync {m[k]:8.3f}  cuBLAS path {o[k]:8.3f}{extra}")


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), flush=True)
    kernels()
    if "--no-model" not in sys.argv:
        model_ab()
