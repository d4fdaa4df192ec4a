"""The batched decode's x_proj and dt_proj as cuda/xdt.cu's PDL kernels (session 6, xdt64;
BLACKMAMBA_XDT_DEC): the two kernels against NumPy float64 on random inputs, and the whole
batched decode with the switch on ("1") and off ("0"), against each other and the CPU model,
with the launches counted (native counters, at graph capture) so that each path is asserted
taken.

Tolerances:
  TOL_F32 1e-5 (relative L2 against float64): fp32 FMAs over K <= 2944 terms of N(0, 1)
    inputs, summed in slices and partial tiles (~1e-7 relative per term, sqrt(K) growth);
  between the switch's two paths on the model's logits: fp32 weights under fp32 math, where
    both are fp32 products (cuBLAS sgemm or our FMAs: the summation order only) TOL_SPLIT
    1e-4; bf16 weights under bf16 math (the old path's products are tf32: 2^-11 relative per
    operand, which moves later bf16 roundings) 2e-3, as tests/test_cuda_dec64.py's FDT cases.
Greedy tokens: equal, except where the reference's top-2 gap is within the logits' measured
difference (a near-tie that either rounding may decide).
"""
import ctypes

import numpy as np
import pytest

from blackmamba import _lib, cuda, model_cuda
from blackmamba.model import Model, random_tensors

from conftest import decode_steps as steps, rel_err, small_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not model_cuda.is_available(),
                                 reason="no CUDA device, or blackmamba built without CUDA")]

TOL_F32 = 1e-5
TOL_SPLIT = 1e-4
SWITCHES = ("BLACKMAMBA_XDT_DEC", "BLACKMAMBA_SCAN4_DT", "BLACKMAMBA_DECODE_GEMM_MIN",
            "BLACKMAMBA_XDT_WARPS", "BLACKMAMBA_PREFILL_XDT")


def lib():
    L = ctypes.CDLL(_lib.C().__file__)
    P, I64 = ctypes.c_void_p, ctypes.c_int64
    L.bm_cuda_xdt_products.argtypes = [P] * 5 + [I64] * 4 + [P]
    L.bm_cuda_xdt_products.restype = ctypes.c_int
    L.bm_cuda_xdt_launches.argtypes = [ctypes.c_int]
    L.bm_cuda_xdt_launches.restype = ctypes.c_longlong
    return L


def launches():
    """(x_proj, dt_proj) launches of xdt.cu so far (counted at capture)."""
    L = lib()
    return L.bm_cuda_xdt_launches(0), L.bm_cuda_xdt_launches(1)


def products(xc, xw, dtw, R, N):
    """bm_cuda_xdt_products on host arrays -> (dbc, delta) on the host; outputs NaN-poisoned
    first, so that an element the kernels do not write fails."""
    M, E = xc.shape
    P = R + 2 * N
    d = {k: cuda.to_device(np.ascontiguousarray(v, np.float32))
         for k, v in dict(xc=xc, xw=xw, dtw=dtw).items()}
    dbc = cuda.to_device(np.full((M, P), np.nan, np.float32))
    delta = cuda.to_device(np.full((M, E), np.nan, np.float32))
    rc = lib().bm_cuda_xdt_products(d["xc"].ptr, d["xw"].ptr, d["dtw"].ptr, dbc.ptr, delta.ptr,
                                    M, E, R, N, None)
    return rc, dbc.numpy(), delta.numpy()


# (M, E, R, N): the 2.8B shape at batch 64 and 12; the tests' small config (E 128, R 4); M over
# several 16-row tiles with a tail; E whose last K slices are short (200: 7 x 28 + 4) or empty
# (36: slices of 8, the last three empty); P not a multiple of the 32-column tile
SHAPES = [(64, 2944, 92, 16), (12, 2944, 92, 16), (12, 128, 4, 16), (70, 200, 12, 6),
          (1, 36, 4, 2), (33, 1000, 20, 8), (17, 64, 8, 4)]


@pytest.mark.parametrize("M,E,R,N", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("warps", [8, 16])
def test_xdt_products(env, M, E, R, N, seed, warps):
    # warps: x_proj's warps a CTA (BLACKMAMBA_XDT_WARPS; 16 split each K slice twice as far)
    env(BLACKMAMBA_XDT_WARPS=warps)
    rng = np.random.default_rng(seed * 100 + M)
    P = R + 2 * N
    xc = rng.standard_normal((M, E)).astype(np.float32)
    xw = (rng.standard_normal((P, E)) / np.sqrt(E)).astype(np.float32)
    dtw = (rng.standard_normal((E, R)) / np.sqrt(R)).astype(np.float32)
    n0 = launches()
    rc, dbc, delta = products(xc, xw, dtw, R, N)
    assert rc == 0
    assert launches() == (n0[0] + 1, n0[1] + 1)
    want = xc.astype(np.float64) @ xw.astype(np.float64).T
    assert np.isfinite(dbc).all() and rel_err(dbc, want) < TOL_F32
    # delta from the kernel's own (float32) dbc, so that only dt_proj's error is measured
    want_d = dbc[:, :R].astype(np.float64) @ dtw.astype(np.float64).T
    assert np.isfinite(delta).all() and rel_err(delta, want_d) < TOL_F32
    # and the chain against float64 throughout
    assert rel_err(delta, want[:, :R] @ dtw.astype(np.float64).T) < TOL_F32
    # deterministic: the same bits again
    _, dbc2, delta2 = products(xc, xw, dtw, R, N)
    np.testing.assert_array_equal(dbc2, dbc)
    np.testing.assert_array_equal(delta2, delta)


@pytest.mark.parametrize("E,R,N", [(128, 6, 16), (130, 4, 16), (128, 4, 3)])
def test_xdt_products_unsupported(E, R, N):
    # R % 4, E % 4 or P % 4 != 0: the launcher refuses (the engine keeps cuBLAS, below)
    rng = np.random.default_rng(5)
    xc = rng.standard_normal((9, E))
    rc, dbc, _ = products(xc, rng.standard_normal((R + 2 * N, E)), rng.standard_normal((E, R)),
                          R, N)
    assert rc != 0 and np.isnan(dbc).all()


def model(seed, dtype, math, **over):
    cfg = small_config(**{"hidden_size": 64, "mamba_moe_layers": ["r", "8", "r", "3"], **over})
    t = random_tensors(cfg, seed=seed)
    return (model_cuda.CudaModel(cfg, t, dtype=dtype, math=math), Model(cfg, t, dtype=dtype))


def assert_greedy_equal(got, ref):
    top = np.sort(ref, axis=-1)
    gap = top[..., -1] - top[..., -2]
    diff = np.abs(got - ref).max()
    mism = got.argmax(-1) != ref.argmax(-1)
    assert (gap[mism] <= 2 * diff).all(), (mism.sum(), gap[mism], diff)
    assert mism.mean() <= 0.02


# (B, weight dtype, math): bf16 weights under bf16 math (the float32 copies x_wf / dt_wf; at 8
# rows the scan computes delta itself and only x_proj is ours), fp32 weights under fp32 and bf16
# math (the weights themselves)
CASES = [(12, "bfloat16", "bf16"), (64, "bfloat16", "bf16"), (40, "bfloat16", "bf16x2"),
         (8, "bfloat16", "bf16"), (12, "float32", "fp32"), (64, "float32", "bf16")]


@pytest.mark.parametrize("B,dtype,math", CASES)
def test_xdt_decode(env, B, dtype, math):
    g, c = model(110 + B, dtype, math)
    ids = np.random.default_rng(B + 7).integers(0, g.vocab_size, (B, 6))
    # (the prefills of up to 128 tokens take xdt.cu's kernels too since session 22: off here,
    # so that the launch counts are the decode's)
    env(BLACKMAMBA_PREFILL_XDT=0, BLACKMAMBA_XDT_DEC=1)
    n0 = launches()
    new, want = steps(g, c, ids, 3)
    n1 = launches()
    assert n1[0] >= n0[0] + 2                          # two Mamba layers
    if B > 8:                                          # 8 rows: delta in the scan (FDT)
        assert n1[1] >= n0[1] + 2
    exact = math in ("fp32", "bf16x2") or B <= 8 or dtype == "float32" and math == "fp32"
    assert rel_err(new, want) < (TOL_SPLIT if exact else 1e-2)
    env(BLACKMAMBA_PREFILL_XDT=0, BLACKMAMBA_XDT_DEC=0)
    old, _ = steps(g, c, ids, 3)
    assert launches() == n1                            # the old path took none
    old_tf32 = math == "bf16" and B > 8                # tf32 products on the old path
    assert rel_err(new, old) < (2e-3 if old_tf32 else TOL_SPLIT)
    assert_greedy_equal(new, old)
    # unset: the default (on at every batched size; above 8 rows only before session 18)
    env(BLACKMAMBA_PREFILL_XDT=0)
    n2 = launches()
    dflt, _ = steps(g, c, ids, 3)
    assert launches()[0] >= n2[0] + 2
    np.testing.assert_array_equal(dflt, new)
    # x_proj with 8 and with 16 warps a CTA: the same products summed in another order; the
    # default takes 16 up to 32 rows, 8 above
    w = {}
    for nw in (8, 16):
        env(BLACKMAMBA_PREFILL_XDT=0, BLACKMAMBA_XDT_DEC=1, BLACKMAMBA_XDT_WARPS=nw)
        w[nw], _ = steps(g, c, ids, 3)
    assert rel_err(w[16], w[8]) < (TOL_SPLIT if exact else 2e-3)
    assert_greedy_equal(w[16], w[8])
    np.testing.assert_array_equal(new, w[16 if B <= 32 else 8])


@pytest.mark.parametrize("B,gmin", [(8, None), (3, 2)])
def test_xdt_decode_default_small(env, B, gmin):
    # unset at up to 8 rows (the batched path from 2 rows by default since session 18; 3 rows
    # also with BLACKMAMBA_DECODE_GEMM_MIN=2 set): x_proj through xdt.cu since session 18 (it was the cuBLAS
    # path there before), delta in the scan (FDT: no dt_proj launch); against the old path
    # ("0": split bf16 products) and the CPU model, both at the split tolerance
    g, c = model(3, "bfloat16", "bf16")
    ids = np.random.default_rng(1).integers(0, g.vocab_size, (B, 5))
    kw = {} if gmin is None else {"BLACKMAMBA_DECODE_GEMM_MIN": gmin}
    env(BLACKMAMBA_PREFILL_XDT=0, **kw)
    n0 = launches()
    got, want = steps(g, c, ids, 2)
    assert launches() == (n0[0] + 2, n0[1])          # two Mamba layers' x_proj, no dt_proj
    assert rel_err(got, want) < TOL_SPLIT
    env(BLACKMAMBA_PREFILL_XDT=0, BLACKMAMBA_XDT_DEC=0, **kw)
    old, _ = steps(g, c, ids, 2)
    assert launches() == (n0[0] + 2, n0[1])
    assert rel_err(got, old) < TOL_SPLIT
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_xdt_decode_fallback(env):
    # hidden 96: dt rank 6, so R % 4 != 0 and P % 4 != 0: the switch on, but the engine keeps
    # its cuBLAS products (bm_xdt_ok), and the results are right
    g, c = model(4, "bfloat16", "bf16", hidden_size=96)
    ids = np.random.default_rng(2).integers(0, g.vocab_size, (12, 5))
    env(BLACKMAMBA_XDT_DEC=1)
    n0 = launches()
    got, want = steps(g, c, ids, 2)
    assert launches() == n0
    assert rel_err(got, want) < 1e-2
