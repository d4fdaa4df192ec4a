"""The early PDL decode kernels of the batch-1 graph (cuda/common.cuh bm_pdl_early;
BLACKMAMBA_CUDA_PDL_EARLY): the batch-1 GEMV (gemv.cu gemv1_kernel), fc2's expert rows, the
fused step scan, norm + route and the RMSNorm load their weights (and their own recurrent
state) before the PDL wait, and the wait-first kernels behind them invalidate L1 after theirs.
They must compute exactly what the wait-first kernels compute: decode logits and the state
after several graph steps are compared for equality (not a tolerance: same arithmetic in the
same order) between BLACKMAMBA_CUDA_PDL_EARLY=0 and =1, with counters showing which path ran
(batch 3: none, the larger graphs keep their kernels), and against the CPU model at TOL_F32
(tests/test_cuda_model.py's float32 tolerance). The batch-1 Mamba layers' RMSNorm rides on
in_proj's early GEMV (GemvParams::norm_h): the same bits as the norm kernel, so the third run
(BLACKMAMBA_DECODE_NORM_FUSE=0: the norm kernel) must be equal too.
"""
import ctypes

import numpy as np
import pytest

from blackmamba import _lib, model_cuda
from blackmamba.model import Model, random_tensors

from conftest import LAYER_KIND_CONFIGS, native_count, rel_err, small_config as make_cfg

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not model_cuda.is_available(),
                                 reason="no CUDA device, or blackmamba built without CUDA")]

TOL_F32 = 1e-4  # float32 math against the CPU model (see tests/test_cuda_model.py)
KINDS = ("gemv1", "rows", "scan", "norm_route", "rms_norm")

# small configs of every layer kind, and one wide enough (fp32 rows of 2112) that every early
# kernel also runs the part of its row past the registers it loads early
CONFIGS = LAYER_KIND_CONFIGS + [
    dict(mamba_moe_layers=["r", "2"], hidden_size=2112, expansion_factor=1,
         ffn_hidden_size=2200),
    # a vocabulary past one wave of 8-row GEMV blocks (> 8448 rows on 132 SMs): the LM head
    # through gemv_head_kernel at batch 1 (16-bit weights; float32 rows of 24 too)
    dict(mamba_moe_layers=["r", "2"], vocab_size=20000),
    # d = 20: 16-bit rows of 20 are not whole 16-byte pieces, so in_proj is no gemv1 and the
    # fused norm (BLACKMAMBA_DECODE_NORM_FUSE=1) falls back to the norm kernel inside the
    # GEMV launcher (float32 rows of 20 still take the fused form)
    dict(mamba_moe_layers=["r", "2", "r", "2"], hidden_size=20),
]


def counts():
    lib = ctypes.CDLL(_lib.C().__file__)
    lib.bm_cuda_pdl_early_launches.restype = ctypes.c_longlong
    return np.array([lib.bm_cuda_pdl_early_launches(k) for k in range(len(KINDS))])


def head_calls():
    return native_count("bm_cuda_gemv_head_calls")


def norm_fused_calls():
    return native_count("bm_cuda_gemv1_norm_calls")


def run(g, B, prompt, toks, graph=True):
    st = g.new_state(B)
    g.prefill(prompt, st, logits=None)
    lg = np.stack([g.step(t, st, graph=graph) for t in toks])
    cs = st.to_cpu()
    return lg, [a for a in cs.conv + cs.ssm if a is not None]


@pytest.mark.parametrize("ci", range(len(CONFIGS)))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("B", [1, 3])
def test_early_equals_wait_first(ci, dtype, B, monkeypatch):
    cfg = make_cfg(**CONFIGS[ci])
    t = random_tensors(cfg, seed=60 + ci)
    g = model_cuda.CudaModel(cfg, t, dtype=dtype, math="fp32")
    rng = np.random.default_rng(ci * 10 + B)
    prompt = rng.integers(0, g.vocab_size, (B, 7))
    toks = rng.integers(0, g.vocab_size, (5, B))
    out = {}
    layers = cfg.mamba_moe_layers
    for env in ("0", "1", "nofuse"):
        monkeypatch.setenv("BLACKMAMBA_CUDA_PDL_EARLY", "0" if env == "0" else "1")
        monkeypatch.setenv("BLACKMAMBA_DECODE_NORM_FUSE", "0" if env == "nofuse" else "1")
        c0, n0, h0 = counts(), norm_fused_calls(), head_calls()
        out[env] = run(g, B, prompt, toks)
        # the LM head's row-walking kernel: batch 1, early kernels on, more rows than a wave
        # of 8-row blocks
        big = cfg.vocab_size >= 20000  # 2500 blocks of 8 rows: over a wave below 312 SMs
        assert (head_calls() > h0) == (env != "0" and B == 1 and big), (env, B, cfg.vocab_size)
        # plain Mamba layers ("r") at batch 1 with the early kernels: the norm on in_proj,
        # where in_proj is a gemv1 launch (rows of whole 16-byte pieces)
        vecw = cfg.hidden_size % (4 if dtype == "float32" else 8) == 0
        fused = env == "1" and B == 1 and "r" in layers and vecw
        assert (norm_fused_calls() > n0) == fused, (env, B, layers)
        eager = run(g, B, prompt, toks[:2], graph=False)[0]   # the same kernels, no graph
        assert rel_err(eager, out[env][0][:2]) <= 1e-6     # test_graph_replay_equals_eager's
        dc = counts() - c0
        if env == "0":
            assert not dc.any(), dict(zip(KINDS, dc))
            continue
        # only the one-token graph runs early kernels (larger batches keep the wait-first
        # ones); every config has Mamba layers (RMSNorm, scan, the GEMVs) and MLP layers (fc2
        # rows); norm + route only on MoE layers of their own (the parallel "rX" layers
        # route separately)
        taken = dict(zip(KINDS, dc > 0))
        moe = [k.isdigit() and int(k) >= 2 for k in layers]
        # the RMSNorm kernel: every layer but MoE ones (norm + route) and, fused, plain "r"
        want = dict(gemv1=True, rows=True, scan=True, norm_route=any(moe),
                    rms_norm=any(not m and (env == "nofuse" or k != "r" or not vecw)
                                 for k, m in zip(layers, moe)))
        if B > 1:
            want = dict.fromkeys(KINDS, False)
        assert taken == want, dc
    for env in ("1", "nofuse"):
        np.testing.assert_array_equal(out["0"][0], out[env][0])
        for a, b in zip(out["0"][1], out[env][1]):
            np.testing.assert_array_equal(a, b)
    if ci != 4 and dtype == "float32":  # and both against the CPU model (4: the wide one)
        c = Model(cfg, t, dtype=dtype)
        sc = c.new_state(B)
        c.prefill(prompt, sc, logits=None)
        want = np.stack([c.step(tk, sc) for tk in toks])
        assert rel_err(out["1"][0], want) < TOL_F32
