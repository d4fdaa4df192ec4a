"""Emulate the GPU engine's math="bf16" prefill on the CPU (NumPy, float64) on the tiny-a
golden, to find which bf16 activation roundings flip an argmax.

The engine (cuda/engine.cu `linear`, cuda/moe.cu) rounds the *input* of every product of more
than 8 rows to bf16 (round to nearest even) before a cuBLAS bf16 GEMM with fp32 accumulate;
the weights are bf16 already. On the golden forward (T = 74 tokens) that is, per Mamba
layer: in_proj (xn), out_proj (y); per MoE layer: fc1 (x) and fc2 (act(a) * up); and the LM
head (the final LayerNorm's output y). x_proj (xc) and dt_proj (dt_r) run in tf32 since
session 3 (engine.cu tf32_small(): float32 weight copies, in which bf16 weights are exact),
so their inputs keep 11 significant bits (tf32 below). The router, the conv,
the scan and the norms stay float32. This script runs the forward in float64 with any subset
of those roundings (the accumulation order of an fp32 GEMM is a ~1e-7 effect, ignored) and
reports rel L2 / argmax agreement against golden.npz and the positions that flip.

  python3 tools/bf16_emulate.py [path/to/golden/tiny-a]
"""
import itertools
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from blackmamba import ref                              # noqa: E402
from blackmamba.checkpoint import load_tensors         # noqa: E402
from blackmamba.config import load_config, has_mamba, num_experts   # noqa: E402

POINTS = ("in", "xproj", "dt", "out", "fc1", "fc2", "head")


def bf16(x):
    """float64 -> float32 -> bf16 (RNE) -> float64: what to_bf16_kernel does."""
    return ref.bf16_to_f32(ref.f32_to_bf16(np.asarray(x, np.float32))).astype(np.float64)


def tf32(x):
    """float64 -> float32 -> tf32 (10 stored mantissa bits, round to nearest even) -> float64:
    the engine's x_proj / dt_proj inputs under bf16 math."""
    b = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0xFFF + ((b >> 13) & 1)) & ~np.uint64(0x1FFF)
    return b.astype(np.uint32).view(np.float32).astype(np.float64)


def split2(x):
    """x ~ hi + lo, both bf16 (the two-GEMM exact-ish product): hi = bf16(x), lo = bf16(x - hi)."""
    x32 = np.asarray(x, np.float32)
    hi = bf16(x32)
    lo = bf16((x32.astype(np.float64) - hi).astype(np.float32))
    return hi + lo


class Emu:
    def __init__(self, path):
        self.cfg = load_config(path)
        t = load_tensors(os.path.join(path, "pytorch_model.bin"))
        self.w = {k: np.asarray(v.to_numpy("float32"), np.float64) for k, v in t.items()}

    def forward(self, ids, rnd):
        """rnd: dict point -> function applied to that product's input (identity if absent)."""
        cfg, w = self.cfg, self.w
        R_ = lambda p, x: rnd.get(p, lambda v: v)(x)
        lin = lambda p, x, W: R_(p, x) @ W.T
        E, N, R = cfg.d_inner, cfg.state_size, cfg.dt_rank
        h = w["embedding.word_embeddings.weight"][ids]           # (B, L, d)
        r = None
        for li, kind in enumerate(cfg.layer_kinds):
            p = f"decoder.layers.{li}."
            xn, r = ref.rms_norm(h, w[p + "norm.weight"], r)
            xn = xn.astype(np.float32).astype(np.float64)        # fp32 activations between ops
            r = r.astype(np.float32).astype(np.float64)
            if has_mamba(kind):
                m = p + "mixer."
                xz = lin("in", xn, w[m + "in_proj.weight"])
                x, z = xz[..., :E], xz[..., E:]
                xc, _ = ref.causal_conv1d(x, w[m + "conv1d.weight"], w.get(m + "conv1d.bias"))
                dbc = lin("xproj", xc, w[m + "x_proj.weight"])
                dt = lin("dt", dbc[..., :R], w[m + "dt_proj.weight"])
                A = -np.exp(w[m + "A_log"].astype(np.float32)).astype(np.float64)
                y, _ = ref.selective_scan(xc, dt, A, dbc[..., R:R + N], dbc[..., R + N:],
                                          w[m + "D"], z, w[m + "dt_proj.bias"], True)
                h = lin("out", y, w[m + "out_proj.weight"])
            else:
                m = p + "mixer."
                X = num_experts(kind)
                B_, L_, d = xn.shape
                x2 = xn.reshape(-1, d)
                ids_, gates, _ = ref.route_top1(x2, w[m + "router.weight"], w[m + "router.bias"])
                out = np.zeros_like(x2)
                F = cfg.ffn_hidden_size
                for e in range(X):
                    rows = np.nonzero(ids_ == e)[0]
                    if rows.size == 0:
                        continue
                    a = lin("fc1", x2[rows], w[f"{m}local_experts.{e}.linear_fc1.weight"])
                    a = ref.gelu(a[:, :F]) * a[:, F:]
                    out[rows] = lin("fc2", a, w[f"{m}local_experts.{e}.linear_fc2.weight"]) \
                        * gates[rows, None]
                h = out.reshape(B_, L_, d)
            h = h.astype(np.float32).astype(np.float64)
        y = ref.layer_norm(h, w["decoder.final_layernorm.weight"],
                           w["decoder.final_layernorm.bias"], r).astype(np.float32)
        return lin("head", y.astype(np.float64), w["embedding.word_embeddings.weight"])


def score(logits, gold):
    err = np.linalg.norm(logits - gold) / np.linalg.norm(gold)
    am, ag = logits.argmax(-1), gold.argmax(-1)
    flips = [tuple(int(i) for i in ix) for ix in np.argwhere(am != ag)]
    return err, float(np.mean(am == ag)), flips


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "..", "..", "shared",
                                                              "golden", "tiny-a")
    if not os.path.exists(os.path.join(path, "golden.npz")):
        path = "/work/shared/golden/tiny-a"
    g = np.load(os.path.join(path, "golden.npz"))
    gold = g["logits"].astype(np.float64)
    emu = Emu(path)
    ids = g["input_ids"]
    srt = np.sort(gold, -1)
    gap = srt[..., -1] - srt[..., -2]
    order = np.argsort(gap.reshape(-1))[:5]
    print("smallest top-2 gaps of the golden logits:",
          ", ".join(f"{tuple(np.unravel_index(i, gap.shape))}: {gap.reshape(-1)[i]:.4f}"
                    for i in order))
    base = emu.forward(ids, {})
    print(f"no rounding:          err {score(base, gold)[0]:.2e} agree {score(base, gold)[1]:.4f}")
    allr = {p: bf16 for p in POINTS}
    allr["xproj"] = allr["dt"] = tf32   # the engine's tf32_small()
    lg = emu.forward(ids, allr)
    e, a, f = score(lg, gold)
    print(f"all rounded (GPU):    err {e:.2e} agree {a:.4f} flips {f}")
    flips = {tuple(x) for x in f}
    watch = sorted(flips | {tuple(int(v) for v in np.unravel_index(i, gap.shape))
                            for i in order[:2]})

    def margin(lg):   # logit[golden argmax] - best other logit, at the watched positions
        out = []
        for b, t in watch:
            ga = int(gold[b, t].argmax())
            other = np.delete(lg[b, t], ga).max()
            out.append(f"{lg[b, t, ga] - other:+.4f}")
        return " ".join(out)
    print(f"margins at {watch} (golden {' '.join(f'{gap[b, t]:+.4f}' for b, t in watch)}):")
    print(f"  all rounded:        {margin(lg)}")
    for p in POINTS:        # each rounding alone, and all but one
        only = emu.forward(ids, {p: bf16})
        but = emu.forward(ids, {q: bf16 for q in POINTS if q != p})
        eo, ao, _ = score(only, gold)
        eb, ab, fb = score(but, gold)
        print(f"  only {p:6s} err {eo:.2e} agree {ao:.4f} {margin(only)} | all but {p:6s} "
              f"err {eb:.2e} agree {ab:.4f} {margin(but)}")
    for exact in (("head",), ("fc1", "fc2"), ("head", "fc1", "fc2"), ("in",), ("head", "in"),
                  ("out",), ("head", "out")):
        for how, fn in (("exact", lambda v: v), ("hi+lo", split2)):
            rr = dict(allr)
            for p in exact:
                rr[p] = fn
            lg2 = emu.forward(ids, rr)
            e2, a2, f2 = score(lg2, gold)
            print(f"  {'+'.join(exact):16s} {how}: err {e2:.2e} agree {a2:.4f} flips {f2} "
                  f"margins {margin(lg2)}")


if __name__ == "__main__":
    main()
