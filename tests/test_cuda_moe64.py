"""The MoE half of the batched decode (session 6, moe64): the grouped experts' dispatch built
by the routing kernel's last block (norm_route_kernel<., NR_PRE_DISP>, cuda/moe_dispatch.cuh;
BLACKMAMBA_MOE_ROUTE_DISPATCH) and the decode GEMMs launched with programmatic dependent
launch, fc2 requesting its first weight stages before its wait (grouped.cu launch_grouped;
BLACKMAMBA_MOE_DEC_PDL 0 / 1 / 2). Skipped where no GPU is visible.

None of them changes arithmetic: the dispatch is the same permutation and offsets as
dispatch_kernel's (asserted equal, unrouted ids included, through bm_cuda_moe_dispatch's
last-block form BLACKMAMBA_MOE_DISPATCH_LAST=1), and the GEMMs read the same bytes in the same
order, so the decode logits must be bit-identical with and without each switch (asserted
equal), besides the CPU model's tolerance (test_cuda_dec64's: 1e-2 under unsplit bf16 above
8 rows, TOL_SPLIT at 8 rows where the products split). Each path is asserted taken through
native counters (counted at launch, i.e. at graph capture).
"""
import ctypes
import zlib

import numpy as np
import pytest

from blackmamba import _lib, cuda, model_cuda
from blackmamba.config import Config
from blackmamba.model import Model, random_tensors

from conftest import decode_steps as steps, rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not model_cuda.is_available(),
                                 reason="no CUDA device, or blackmamba built without CUDA")]

TOL_SPLIT = 1e-4
SWITCHES = ("BLACKMAMBA_MOE_ROUTE_DISPATCH", "BLACKMAMBA_MOE_DEC_PDL", "BLACKMAMBA_MOE_DEC_PDL_CAP",
            "BLACKMAMBA_MOE_IDS", "BLACKMAMBA_MOE_GROUPED_TILES", "BLACKMAMBA_MOE_WPOL",
            "BLACKMAMBA_L2SIDE", "BLACKMAMBA_DECODE_NORM_FC2", "BLACKMAMBA_DECODE_NORM_FC2_SPLIT",
            "BLACKMAMBA_MOE_DISPATCH_LAST", "BLACKMAMBA_CUDA_PDL", "BLACKMAMBA_DECODE_GEMM_MIN",
            "BLACKMAMBA_NORM_ROUTE_WARP", "BLACKMAMBA_NORM_ROUTE_WARP_MIN",
            "BLACKMAMBA_NORM_ROUTE_PRE", "BLACKMAMBA_PREFILL_STACK_OUT",
            "BLACKMAMBA_PREFILL_STACK_IN", "BLACKMAMBA_PREFILL_STACK_XPROJ",
            "BLACKMAMBA_PREFILL_FUSE_BF", "BLACKMAMBA_PREFILL_GEMM_MIN", "BLACKMAMBA_PREFILL_XDT",
            "BLACKMAMBA_MOE_PLAIN_TILES", "BLACKMAMBA_PREFILL_L2SIDE", "BLACKMAMBA_PREFILL_MOE_PDL",
            "BLACKMAMBA_PREFILL_OUT_ONE")
LEGACY_STREAM = ctypes.c_void_p(1)   # cudaStreamLegacy: the stream blackmamba.ops uses


class NormOut(ctypes.Structure):
    """bm_cuda_moe_norm_out (cuda/bm_cuda.h)."""
    _fields_ = [("res", ctypes.c_void_p), ("w", ctypes.c_void_p), ("xbf", ctypes.c_void_p),
                ("ssp", ctypes.c_void_p), ("xlo", ctypes.c_void_p)]


def _lib_c():
    lib = ctypes.CDLL(_lib.C().__file__)
    P, I64 = ctypes.c_void_p, ctypes.c_int64
    lib.bm_cuda_moe_dispatch.argtypes = [P, I64, I64, P, P, P, P]
    lib.bm_cuda_moe_dispatch.restype = ctypes.c_int
    lib.bm_cuda_last_error.restype = ctypes.c_char_p
    lib.bm_cuda_moe_grouped_bf16_ex.argtypes = [P, P, P, P, P, P, P, ctypes.c_int, ctypes.c_int,
                                                P, I64, I64, I64, I64, P, ctypes.c_size_t,
                                                ctypes.c_int, P]
    lib.bm_cuda_moe_grouped_bf16_ex.restype = ctypes.c_int
    lib.bm_cuda_moe_grouped_workspace.argtypes = [I64, I64, I64, I64, ctypes.c_int]
    lib.bm_cuda_moe_grouped_workspace.restype = ctypes.c_size_t
    for f in ("bm_cuda_moe_dispatch_last_calls", "bm_cuda_norm_route_dispatch_calls",
              "bm_cuda_moe_grouped_pdl_launches", "bm_cuda_norm_route_pre_calls",
              "bm_cuda_moe_grouped_expert_launches", "bm_cuda_moe_grouped_ids_calls",
              "bm_cuda_norm_route_ids_calls", "bm_cuda_moe_grouped_wpol_calls",
              "bm_cuda_moe_grouped_plain_tile_calls"):
        getattr(lib, f).restype = ctypes.c_longlong
    lib.bm_cuda_moe_grouped_ids_ok.argtypes = [I64, I64, ctypes.c_int]
    lib.bm_cuda_moe_grouped_ids_ok.restype = ctypes.c_int
    lib.bm_cuda_moe_grouped_norm_ok.argtypes = [I64, I64, ctypes.c_int]
    lib.bm_cuda_moe_grouped_norm_ok.restype = ctypes.c_int
    lib.bm_cuda_moe_norm_parts.argtypes = [I64]
    lib.bm_cuda_moe_norm_parts.restype = I64
    lib.bm_cuda_moe_grouped_bf16_norm.argtypes = (lib.bm_cuda_moe_grouped_bf16_ex.argtypes[:-1] +
                                                  [ctypes.POINTER(NormOut), P])
    lib.bm_cuda_moe_grouped_bf16_norm.restype = ctypes.c_int
    F32 = ctypes.c_float
    lib.bm_cuda_conv_step_norm.argtypes = [P, P, I64, P, P, P, P, P, ctypes.c_int, I64, I64, I64,
                                           P, I64, I64, F32, P]
    lib.bm_cuda_conv_step_norm.restype = ctypes.c_int
    lib.bm_cuda_conv_step_sum.argtypes = [P, P, I64, I64, P, P, P, P, P, ctypes.c_int, I64, I64,
                                          I64, P]
    lib.bm_cuda_conv_step_sum.restype = ctypes.c_int
    lib.bm_cuda_conv_step_sum_norm.argtypes = [P, P, I64, I64, P, P, P, P, P, ctypes.c_int, I64,
                                               I64, I64, P, I64, I64, F32, P]
    lib.bm_cuda_conv_step_sum_norm.restype = ctypes.c_int
    lib.bm_cuda_conv_forward_sum.argtypes = [P, P, I64, I64, P, P, P, P, P, P, P, P,
                                             ctypes.c_int, I64, I64, I64, I64, P]
    lib.bm_cuda_conv_forward_sum.restype = ctypes.c_int
    lib.bm_cuda_conv_forward.argtypes = [P, P, P, P, P, P, ctypes.c_int, I64, I64, I64, I64, P]
    lib.bm_cuda_conv_forward.restype = ctypes.c_int
    lib.bm_cuda_prefill_fuse_bf_calls.argtypes = [ctypes.c_int]
    lib.bm_cuda_prefill_fuse_bf_calls.restype = ctypes.c_longlong
    for f in ("bm_cuda_moe_grouped_norm_calls", "bm_cuda_norm_fc2_calls",
              "bm_cuda_norm_route_warp_calls", "bm_cuda_prefill_out_pair_calls",
              "bm_cuda_prefill_out_one_calls",
              "bm_cuda_norm_route_pre_prefill_calls",
              "bm_cuda_norm_route_dispatch_prefill_calls", "bm_cuda_prefill_stack_in_calls",
              "bm_cuda_prefill_stack_xproj_calls", "bm_cuda_prefill_xdt_calls"):
        getattr(lib, f).restype = ctypes.c_longlong
    return lib


LIB = _lib_c()


def rng_for(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def dispatch(ids, X):
    """bm_cuda_moe_dispatch on the device -> (counts, offsets, perm) int32 host arrays."""
    T = ids.size
    D = cuda.to_device
    di = D(np.ascontiguousarray(ids, np.int32))
    counts, offsets = D(np.full(X, -7, np.int32)), D(np.full(X + 1, -7, np.int32))
    perm = D(np.full(max(T, 1), -7, np.int32))
    st = LIB.bm_cuda_moe_dispatch(di.ptr, T, X, counts.ptr, offsets.ptr, perm.ptr, LEGACY_STREAM)
    assert st == 0, LIB.bm_cuda_last_error().decode()
    return counts.numpy(), offsets.numpy(), perm.numpy()[:T]


@pytest.mark.parametrize("T", [9, 64, 100, 300, 2000])
@pytest.mark.parametrize("X", [1, 2, 8])
def test_dispatch_last_block(env, T, X):
    # the last-block dispatch (the code of the fused routing) against dispatch_kernel and a
    # stable argsort, ids outside [0, X) included (counted nowhere); T = 300 and 2000 take
    # several rounds of the block's 256 threads; two calls in a row with different block
    # counts (1 + T % 7, then the next T's) check that the ticket counter resets itself
    rng = rng_for("dispatch last", T, X)
    ids = rng.integers(0, X, T)
    ids[rng.random(T) < 0.1] = -1
    ids[rng.random(T) < 0.05] = X
    ids[rng.random(T) < 0.02] = 1 << 30
    env(BLACKMAMBA_MOE_DISPATCH_LAST=0)
    n0 = LIB.bm_cuda_moe_dispatch_last_calls()
    c0, o0, p0 = dispatch(ids, X)
    assert LIB.bm_cuda_moe_dispatch_last_calls() == n0
    env(BLACKMAMBA_MOE_DISPATCH_LAST=1)
    ok = (ids >= 0) & (ids < X)
    want = np.nonzero(ok)[0][np.argsort(ids[ok], kind="stable")]
    for t2 in (T, T + 1):   # the second call: another block count (1 + t2 % 7)
        ids2 = ids if t2 == T else np.append(ids, X - 1)
        ok2 = (ids2 >= 0) & (ids2 < X)
        want2 = np.nonzero(ok2)[0][np.argsort(ids2[ok2], kind="stable")]
        c1, o1, p1 = dispatch(ids2, X)
        n = int(o1[X])
        assert n == ok2.sum()
        np.testing.assert_array_equal(p1[:n], want2)
        np.testing.assert_array_equal(c1, np.bincount(ids2[ok2], minlength=X))
        if t2 == T:
            np.testing.assert_array_equal(o1, o0)
            np.testing.assert_array_equal(c1, c0)
            np.testing.assert_array_equal(p1[:n], p0[:n])
            np.testing.assert_array_equal(p0[:n], want)
    assert LIB.bm_cuda_moe_dispatch_last_calls() == n0 + 2


# bm_cuda_moe_grouped_bf16_ex's flags (cuda/bm_cuda.h)
DISPATCHED, PDL, PDL_EARLY, PDL_EXPERT, IDS, PREFILL = 1, 2, 4, 8, 64, 128
# (T, X, d, F, kind): K tails (d, F not multiples of 64), N tails, several k tiles, experts
# over several row tiles of 32 / 16 ("last", "skewed"), empty experts, X = 1
GEMM_CASES = [(64, 8, 184, 248, "uniform"), (100, 1, 48, 72, "uniform"),
              (150, 4, 200, 136, "skewed"), (9, 8, 64, 40, "uniform"), (70, 3, 136, 64, "last")]


def moe_case(tag, T, X, d, F, kind, split):
    """x (T, d), ids (T) by kind (uniform; skewed: 80% on expert 0, the rest on odd experts;
    last: all on expert X-1; unrouted: uniform with ~20% -1 and ~10% X), gates, bf16 fc1, fc2."""
    from blackmamba import ref
    rng = rng_for(tag, T, X, d, F, kind, split)
    x = rng.standard_normal((T, d)).astype(np.float32)
    if kind in ("uniform", "unrouted"):
        ids = rng.integers(0, X, T)
    elif kind == "skewed":
        ids = np.where(rng.random(T) < 0.8, 0, 2 * rng.integers(0, max(X // 2, 1), T) + 1)
        ids = np.minimum(ids, X - 1)
    else:
        ids = np.full(T, X - 1)
    if kind == "unrouted":
        ids[rng.random(T) < 0.2] = -1
        ids[rng.random(T) < 0.1] = X
    gates = rng.uniform(0.1, 1.0, T).astype(np.float32)
    fc1 = ref.f32_to_bf16((0.3 * rng.standard_normal((X, 2 * F, d))).astype(np.float32))
    fc2 = ref.f32_to_bf16((0.3 * rng.standard_normal((X, d, F))).astype(np.float32))
    return x, ids, gates, fc1, fc2


def grouped_ex(x, ids, gates, fc1, fc2, split, flags):
    D = cuda.to_device
    T, d = x.shape
    X, F = fc1.shape[0], fc1.shape[1] // 2
    dx, di, dg = D(x), D(ids.astype(np.int32)), D(gates)
    d1, d2 = D(fc1), D(fc2)
    out = D(np.full((T, d), np.float32(3.0)))
    nb = LIB.bm_cuda_moe_grouped_workspace(T, d, X, F, split)
    ws = D(np.zeros(nb, np.uint8))
    st = LIB.bm_cuda_moe_grouped_bf16_ex(dx.ptr, None, None, di.ptr, dg.ptr, d1.ptr, d2.ptr, 2,
                                         split, out.ptr, T, d, X, F, ws.ptr, nb, flags,
                                         LEGACY_STREAM)
    assert st == 0, LIB.bm_cuda_last_error().decode()
    return out.numpy()


@pytest.mark.parametrize("T,X,d,F,kind", GEMM_CASES)
@pytest.mark.parametrize("split", [0, 1])
def test_grouped_pdl_forms(env, T, X, d, F, kind, split):
    # the kernels' PDL forms (fc2's weights before the wait, fc1 one CTA row per expert with
    # its row-tile loop) against the plain launch: the same tiles, the same k order, so
    # bit-identical. Called on the legacy stream with BLACKMAMBA_CUDA_PDL=0 (plain launches,
    # the waits no-ops: the forms' indexing and pipelines, not the overlap, which the engine
    # tests below take). The plain launch on the decode's tiles (its own defaults are
    # test_grouped_plain_tiles').
    from blackmamba import ref
    x, ids, gates, fc1, fc2 = moe_case("pdl forms", T, X, d, F, kind, split)
    env(BLACKMAMBA_CUDA_PDL=0, BLACKMAMBA_MOE_PLAIN_TILES=0)
    old = grouped_ex(x, ids, gates, fc1, fc2, split, 0)
    want = ref.moe_experts(x, ids, gates, fc1, fc2, "silu")
    assert rel_err(old, want) < (5e-5 if split else 1.5e-2)
    for flags in (PDL, PDL_EARLY, PDL_EXPERT):
        e0 = LIB.bm_cuda_moe_grouped_expert_launches()
        got = grouped_ex(x, ids, gates, fc1, fc2, split, flags)
        assert LIB.bm_cuda_moe_grouped_expert_launches() - e0 == (flags == PDL_EXPERT)
        np.testing.assert_array_equal(got, old, err_msg=str(flags))


def plain_want(T, X, split):
    """grouped.cu plain_tile's variant digits (fc1, fc2) for a plain launch of T rows."""
    v1 = 5 if T <= 8 * X else 1 if T <= 16 * X else 2
    v2 = 1 if T <= 6 * X else 2 if split and T <= 16 * X else 3
    return v1, v2


# (T, X, d, F, kind): each band of plain_tile's rule at X = 8, an empty expert, K / N tails
PLAIN_CASES = [(16, 8, 184, 248, "uniform"), (48, 8, 200, 136, "skewed"),
               (64, 8, 64, 40, "uniform"), (100, 8, 136, 64, "uniform"),
               (200, 8, 184, 248, "last"), (300, 8, 64, 72, "uniform")]


@pytest.mark.parametrize("T,X,d,F,kind", PLAIN_CASES)
@pytest.mark.parametrize("split", [0, 1])
def test_grouped_plain_tiles(env, T, X, d, F, kind, split):
    # A plain launch (no PDL flag: the prefill's, ops calls) of the decode tiles takes
    # plain_tile's defaults: the counter, the float64 reference, and bit-equality with the
    # variants forced through BLACKMAMBA_MOE_GROUPED_TILES (the rule picks what it says);
    # BLACKMAMBA_MOE_PLAIN_TILES=0 and the PDL launches keep the decode's defaults, except a
    # prefill's (PREFILL, session 24): its PDL forms on plain_tile's, bit-identical.
    from blackmamba import ref
    x, ids, gates, fc1, fc2 = moe_case("plain tiles", T, X, d, F, kind, split)
    want = ref.moe_experts(x, ids, gates, fc1, fc2, "silu")
    env()
    n0 = LIB.bm_cuda_moe_grouped_plain_tile_calls()
    got = grouped_ex(x, ids, gates, fc1, fc2, split, 0)
    assert LIB.bm_cuda_moe_grouped_plain_tile_calls() - n0 == 2
    assert rel_err(got, want) < (5e-5 if split else 1.5e-2)
    v1, v2 = plain_want(T, X, split)
    env(BLACKMAMBA_MOE_GROUPED_TILES=f"00{v1}{v2}")
    n0 = LIB.bm_cuda_moe_grouped_plain_tile_calls()
    np.testing.assert_array_equal(grouped_ex(x, ids, gates, fc1, fc2, split, 0), got)
    assert LIB.bm_cuda_moe_grouped_plain_tile_calls() == n0  # a forced digit wins
    env(BLACKMAMBA_MOE_PLAIN_TILES=0)
    old = grouped_ex(x, ids, gates, fc1, fc2, split, 0)
    assert LIB.bm_cuda_moe_grouped_plain_tile_calls() == n0
    assert rel_err(old, want) < (5e-5 if split else 1.5e-2)
    env(BLACKMAMBA_CUDA_PDL=0)  # the PDL form's tiles, launched plainly (as above)
    np.testing.assert_array_equal(grouped_ex(x, ids, gates, fc1, fc2, split, PDL), old)
    assert LIB.bm_cuda_moe_grouped_plain_tile_calls() == n0
    for flags in (PDL | PREFILL, PDL_EARLY | PREFILL, PDL_EXPERT | PREFILL, PREFILL):
        np.testing.assert_array_equal(grouped_ex(x, ids, gates, fc1, fc2, split, flags), got)
    assert LIB.bm_cuda_moe_grouped_plain_tile_calls() == n0 + 8


def grouped_norm(x, ids, gates, fc1, fc2, res, w, flags, split=0, lo=None):
    """bm_cuda_moe_grouped_bf16_norm -> (res after, xbf bits, ssp, xlo bits or None); or the
    status and error message where the call fails. lo (split): pass the low parts' buffer
    (default: exactly where split)."""
    D = cuda.to_device
    T, d = x.shape
    X, F = fc1.shape[0], fc1.shape[1] // 2
    dx, di, dg = D(x), D(ids.astype(np.int32)), D(gates)
    d1, d2, dr, dw = D(fc1), D(fc2), D(res), D(w)
    out = D(np.full((T, d), np.float32(3.0)))
    xbf = D(np.full((T, d), 0x7FC1, np.uint16))
    xlo = D(np.full((T, d), 0x7FC1, np.uint16)) if (split if lo is None else lo) else None
    parts = LIB.bm_cuda_moe_norm_parts(d)
    ssp = D(np.full((T, parts), np.float32(np.nan)))
    nb = LIB.bm_cuda_moe_grouped_workspace(T, d, X, F, split)
    ws = D(np.zeros(nb, np.uint8))
    no = NormOut(dr.ptr, dw.ptr, xbf.ptr, ssp.ptr, xlo.ptr if xlo is not None else None)
    st = LIB.bm_cuda_moe_grouped_bf16_norm(dx.ptr, None, None, di.ptr, dg.ptr, d1.ptr, d2.ptr, 2,
                                           split, out.ptr, T, d, X, F, ws.ptr, nb, flags,
                                           ctypes.byref(no), LEGACY_STREAM)
    if st:
        return st, LIB.bm_cuda_last_error().decode()
    np.testing.assert_array_equal(out.numpy(), 3.0)   # out itself is left alone
    return dr.numpy(), xbf.numpy(), ssp.numpy(), None if xlo is None else xlo.numpy()


def norm_want(res, out, w):
    """What the norm epilogue must leave for fc2's output `out` on the residual res (T, d):
    (res + out, bf16 bits of (res + out) * w, the bits of its low part, the sums of squares of
    res + out over each 32 columns in float64)."""
    from blackmamba import ref
    T, d = res.shape
    parts = -(-d // 32)
    r = res + out
    hi = ref.f32_to_bf16(r * w)
    lo = ref.f32_to_bf16(r * w - ref.bf16_to_f32(hi))
    sq = np.zeros((T, parts * 32))
    sq[:, :d] = r.astype(np.float64) ** 2
    return r, hi, lo, sq.reshape(T, parts, 32).sum(-1)


NORM_CASES = [(64, 8, 184, 248, "uniform"), (150, 4, 200, 136, "skewed"),
              (9, 8, 64, 40, "uniform"), (70, 3, 136, 64, "last"), (256, 8, 1472, 40, "skewed"),
              (300, 8, 64, 40, "uniform")]


@pytest.mark.parametrize("T,X,d,F,kind", NORM_CASES)
def test_grouped_norm_epilogue(env, T, X, d, F, kind):
    # fc2's norm epilogue (bm_cuda_moe_grouped_bf16_norm: the batched decode's next Mamba
    # norm): res + out of the plain call bit for bit (g * acc rounded, then the sum), xbf =
    # bf16(res * w) bit for bit, ssp the sums of res^2 over 32 columns against float64; with
    # every fc2 tile variant 1..5, perm or ids, PDL forms; refused where fc2 is not on those
    # tiles (grouped_dec_kernel's variants unsplit) and then nothing is written. Split
    # (session 19): fc2 on grouped_dec_kernel's 32-column tiles (the default variant 7 up to
    # 16 rows an expert, or a forced 6..9) writes the low parts of res * w too (xlo: the split
    # of the same value), against the split plain call; refused without xlo, and elsewhere
    x, ids, gates, fc1, fc2 = moe_case("norm", T, X, d, F, kind, 0)
    rng = rng_for("norm res", T, d)
    res = rng.standard_normal((T, d)).astype(np.float32)
    w = rng.uniform(0.5, 1.5, d).astype(np.float32)
    parts = -(-d // 32)
    assert LIB.bm_cuda_moe_norm_parts(d) == parts
    for tiles in (None, "0001", "0002", "0003", "0004", "0005", "0006"):
        kv = {"BLACKMAMBA_CUDA_PDL": 0, "BLACKMAMBA_MOE_PLAIN_TILES": 0}  # the same tiles
        if tiles:
            kv["BLACKMAMBA_MOE_GROUPED_TILES"] = tiles
        env(**kv)
        out = grouped_ex(x, ids, gates, fc1, fc2, 0, 0)
        want_res, want_bf, _, want_ss = norm_want(res, out, w)
        ok = tiles != "0006"
        assert LIB.bm_cuda_moe_grouped_norm_ok(T, X, 0) == ok
        for flags in (0, PDL_EARLY, IDS, IDS | PDL_EARLY, IDS | PDL_EXPERT):
            n0 = LIB.bm_cuda_moe_grouped_norm_calls()
            got = grouped_norm(x, ids, gates, fc1, fc2, res, w, flags)
            if not ok:
                assert got[0] != 0 and "norm epilogue" in got[1], got
                assert LIB.bm_cuda_moe_grouped_norm_calls() == n0
                continue
            assert LIB.bm_cuda_moe_grouped_norm_calls() == n0 + 1
            r2, xbf, ssp, _ = got
            np.testing.assert_array_equal(r2, want_res, err_msg=f"{tiles} {flags}")
            np.testing.assert_array_equal(xbf, want_bf, err_msg=f"{tiles} {flags}")
            np.testing.assert_allclose(ssp, want_ss, rtol=2e-6, err_msg=f"{tiles} {flags}")
    # split
    xs, ids, gates, fc1, fc2 = moe_case("norm", T, X, d, F, kind, 1)
    for tiles in (None, "0006", "0007", "0008", "0009", "0002"):
        kv = {"BLACKMAMBA_CUDA_PDL": 0, "BLACKMAMBA_MOE_PLAIN_TILES": 0}
        if tiles:
            kv["BLACKMAMBA_MOE_GROUPED_TILES"] = tiles
        env(**kv)
        ok = tiles in ("0006", "0007", "0008", "0009") or (tiles is None and T <= 16 * X)
        assert LIB.bm_cuda_moe_grouped_norm_ok(T, X, 1) == ok, tiles
        out = grouped_ex(xs, ids, gates, fc1, fc2, 1, 0)
        want_res, hi, want_lo, want_ss = norm_want(res, out, w)
        for flags in (0, PDL_EARLY, IDS, IDS | PDL_EARLY):
            n0 = LIB.bm_cuda_moe_grouped_norm_calls()
            got = grouped_norm(xs, ids, gates, fc1, fc2, res, w, flags, split=1)
            if not ok:
                assert got[0] != 0 and "norm epilogue" in got[1], got
                assert LIB.bm_cuda_moe_grouped_norm_calls() == n0
                continue
            assert LIB.bm_cuda_moe_grouped_norm_calls() == n0 + 1
            r2, xbf, ssp, xlo = got
            msg = f"split {tiles} {flags}"
            np.testing.assert_array_equal(r2, want_res, err_msg=msg)
            np.testing.assert_array_equal(xbf, hi, err_msg=msg)
            np.testing.assert_array_equal(xlo, want_lo, err_msg=msg)
            np.testing.assert_allclose(ssp, want_ss, rtol=2e-6, err_msg=msg)
        if ok:   # the low parts' buffer is required where split, refused where not
            got = grouped_norm(xs, ids, gates, fc1, fc2, res, w, 0, split=1, lo=False)
            assert got[0] != 0 and "xlo" in got[1], got
            got = grouped_norm(x, ids, gates, fc1, fc2, res, w, 0, split=0, lo=True)
            assert got[0] != 0 and "xlo" in got[1], got


# (T, X, d, F, kind) for the routing from the ids: GEMM_CASES, the most tokens (256) and
# experts (64) it takes and one past each, tokens routed nowhere (ids -1 and X)
IDS_CASES = GEMM_CASES + [(256, 8, 64, 40, "skewed"), (257, 8, 64, 40, "uniform"),
                          (40, 64, 32, 24, "uniform"), (40, 65, 32, 24, "uniform"),
                          (33, 5, 48, 40, "unrouted"), (64, 8, 64, 40, "last")]


@pytest.mark.parametrize("T,X,d,F,kind", IDS_CASES)
@pytest.mark.parametrize("split", [0, 1])
def test_grouped_ids(env, T, X, d, F, kind, split):
    # BM_MOE_GROUPED_IDS: each CTA of the decode tiles derives its expert's offset and tokens
    # from the ids (grouped.cu ids_list), with no perm / offsets built; taken up to 256 tokens
    # and 64 experts on every decode tile (grouped_gemm_kernel's 1..5, and since session 19
    # grouped_dec_kernel's 6..9 and split calls), else the dispatch is launched as without it.
    # Either way, and with every PDL form, bit-identical to the plain call (the same tiles, k
    # order and epilogue rows)
    from blackmamba import ref
    x, ids, gates, fc1, fc2 = moe_case("ids", T, X, d, F, kind, split)
    env(BLACKMAMBA_CUDA_PDL=0, BLACKMAMBA_MOE_PLAIN_TILES=0)  # plain calls on the decode's tiles
    old = grouped_ex(x, ids, gates, fc1, fc2, split, 0)
    ok = (ids >= 0) & (ids < X)
    if ok.all():
        want = ref.moe_experts(x, ids, gates, fc1, fc2, "silu")
        assert rel_err(old, want) < (5e-5 if split else 1.5e-2)
    else:
        np.testing.assert_array_equal(old[~ok], 0)   # routed nowhere: zero rows
    taken = T <= 256 and X <= 64
    assert LIB.bm_cuda_moe_grouped_ids_ok(T, X, split) == taken
    for tiles in (None, "0011", "0055", "0023", "0096", "0077", "0068"):
        kv = {"BLACKMAMBA_CUDA_PDL": 0, "BLACKMAMBA_MOE_PLAIN_TILES": 0}
        if tiles:
            kv["BLACKMAMBA_MOE_GROUPED_TILES"] = tiles
        env(**kv)
        on = taken
        assert LIB.bm_cuda_moe_grouped_ids_ok(T, X, split) == on
        base = old if tiles is None else grouped_ex(x, ids, gates, fc1, fc2, split, 0)
        if tiles is not None:   # another tile: the same values up to fp32 summation order
            assert rel_err(base, old) < 2e-3
        for flags in (IDS, IDS | PDL, IDS | PDL_EARLY, IDS | PDL_EXPERT):
            n0 = LIB.bm_cuda_moe_grouped_ids_calls()
            got = grouped_ex(x, ids, gates, fc1, fc2, split, flags)
            assert LIB.bm_cuda_moe_grouped_ids_calls() - n0 == on, (tiles, flags)
            np.testing.assert_array_equal(got, base, err_msg=f"{tiles} {flags}")


def make(seed, math="bf16", layers=("r", "8", "r", "3"), bias=None, dtype="bfloat16",
         hidden=64):
    # test_cuda_dec64's small config: hidden 64, F = 40, two MoE layers (8 and 3 experts)
    base = dict(num_layers=len(layers), hidden_size=hidden, state_size=16, conv_dimension=4,
                vocab_size=97, ffn_hidden_size=40, mamba_moe_layers=list(layers))
    cfg = Config.from_dict(base)
    t = random_tensors(cfg, seed=seed)
    if bias is not None:   # skewed routing: experts with several row tiles, unused experts
        for k in [k for k in t if k.endswith("router.bias")]:
            t[k] = np.asarray(bias[: t[k].size], np.float32)
    return (model_cuda.CudaModel(cfg, t, dtype=dtype, math=math),
            Model(cfg, t, dtype=dtype))


def counted_steps(g, c, ids, *names):
    """steps(g, c, ids, 3) with the native counters `names` read around it: (GPU logits, CPU
    logits or None, each counter's increase)."""
    fns = [getattr(LIB, n) for n in names]
    k0 = [f() for f in fns]
    got, want = steps(g, c, ids, 3)
    return got, want, [f() - k for f, k in zip(fns, k0)]


def counts():
    return (LIB.bm_cuda_norm_route_dispatch_calls(), LIB.bm_cuda_moe_grouped_pdl_launches(),
            LIB.bm_cuda_norm_route_pre_calls(), LIB.bm_cuda_moe_grouped_expert_launches())


CASES = [(12, "bf16", None), (64, "bf16", None), (64, "bf16x2", None), (8, "bf16", None),
         (3, "bf16", None), (96, "bf16", [4, 3, -9, -9, -9, -9, -9, -9])]


# BLACKMAMBA_MOE_DEC_PDL -> (GEMMs launched with PDL a MoE layer, fc1 one row per expert)
PDL_MODES = {"0": (0, False), "1": (2, False), "2": (2, False), "3": (2, True),
             "4": (1, False), "5": (1, True)}



@pytest.mark.parametrize("b,E,K,parts,silu", [(3, 40, 4, 2, 1), (8, 2944, 4, 46, 1),
                                               (5, 33, 3, 3, 0), (1, 7, 2, 1, 1)])
def test_conv_step_sum_norm(b, E, K, parts, silu):
    # bm_cuda_conv_step_sum_norm (session 19): the stacked split in_proj's two products
    # summed, then the norm's row scale s = rsqrt(sum(ssp row) / d + eps): the conv step on
    # (x_hi + x_lo) * s, z = (z_hi + z_lo) * s, the state shifted with the scaled x; against
    # float64 on the float32 sums; then each refusal, with the entry point named
    D = cuda.to_device
    rng = rng_for("conv sum norm", b, E, K)
    d, eps = 64, 1e-5
    xz = rng.standard_normal((2 * b, 2 * E)).astype(np.float32)
    xz[b:] *= np.float32(1e-3)
    st = rng.standard_normal((b, K - 1, E)).astype(np.float32)
    w = rng.standard_normal((E, K)).astype(np.float32)
    bias = rng.standard_normal(E).astype(np.float32)
    ssp = rng.uniform(0.0, 50.0, (b, parts)).astype(np.float32)
    dxz, ds, dw, db, dss = D(xz), D(st), D(w), D(bias), D(ssp)
    y = D(np.full((b, E), np.float32(np.nan)))
    z = D(np.full((b, E), np.float32(np.nan)))

    def call(part=b * 2 * E, rows=b, ssp_ptr=dss.ptr, nparts=parts, ld=2 * E):
        return LIB.bm_cuda_conv_step_sum_norm(dxz.ptr, dxz.ptr + 4 * E, ld, part, z.ptr, ds.ptr,
                                              dw.ptr, db.ptr, y.ptr, silu, rows, E, K, ssp_ptr,
                                              nparts, d, eps, LEGACY_STREAM)
    rc = call()
    assert rc == 0, LIB.bm_cuda_last_error().decode()
    s = 1.0 / np.sqrt(ssp.astype(np.float64).sum(1) / d + eps)
    xs = (xz[:b, :E] + xz[b:, :E]).astype(np.float64) * s[:, None]
    win = np.concatenate([st.astype(np.float64), xs[:, None, :]], axis=1)   # (b, K, E)
    acc = bias + np.einsum("bke,ek->be", win, w.astype(np.float64))
    want_y = acc / (1 + np.exp(-acc)) if silu else acc
    np.testing.assert_allclose(y.numpy(), want_y, rtol=2e-5, atol=2e-5)
    zs = (xz[:b, E:] + xz[b:, E:]).astype(np.float64) * s[:, None]
    np.testing.assert_allclose(z.numpy(), zs, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(ds.numpy(), win[:, 1:], rtol=2e-6, atol=1e-7)
    np.testing.assert_array_equal(dxz.numpy(), xz)                  # inputs untouched
    for kw, msg in [(dict(part=0), "conv_step_sum_norm: needs part past the rows and ssp"),
                    (dict(ssp_ptr=None), "conv_step_sum_norm: needs part past the rows and ssp"),
                    (dict(part=2 * E, rows=max(b, 2)), "conv_step_sum_norm: needs part past"),
                    (dict(nparts=0), "conv_step_sum_norm: needs parts >= 1"),
                    (dict(ld=E - 1), "conv_step_sum_norm: needs z, zin and ld >= E"),
                    (dict(part=65536 * 2 * E, rows=65536), "b <= 65535")]:
        assert call(**kw) != 0, kw
        assert msg in LIB.bm_cuda_last_error().decode(), (kw, LIB.bm_cuda_last_error())


@pytest.mark.parametrize("B,math,bias", CASES)
def test_route_dispatch_and_pdl(env, B, math, bias):
    # every combination of the switches against all off: logits bit-identical; the default
    # (unset) fuses the dispatch and takes PDL mode 2 up to 8 rows, above 3 where
    # 2X <= B <= 32X and 2 elsewhere, fc2 capped above 8 rows and up to 5 (engine.cu
    # moe_dec_pdl_flags);
    # against the CPU model within the math's tolerance
    # (the dispatch built by the routing kernel: BLACKMAMBA_MOE_IDS=0 throughout; the routing
    # from the ids is test_route_ids's; the prompt's GEMMs launched plainly, so that the PDL
    # launches counted are the decode's)
    g, c = make(200 + B, math=math, bias=bias)
    ids = np.random.default_rng(B + 7).integers(0, g.vocab_size, (B, 5))
    env(BLACKMAMBA_MOE_ROUTE_DISPATCH=0, BLACKMAMBA_MOE_DEC_PDL=0, BLACKMAMBA_MOE_IDS=0,
        BLACKMAMBA_PREFILL_MOE_PDL=0)
    k0 = counts()
    old, want = steps(g, c, ids, 3)
    k1 = counts()
    assert k1[0] == k0[0] and k1[1] == k0[1] and k1[3] == k0[3]   # none of the paths taken
    assert k1[2] >= k0[2] + 2                     # the batched routing (two MoE layers)
    split = math == "bf16x2" or B <= 8
    assert rel_err(old, want) < (TOL_SPLIT if split else 1e-2)
    combos = [(d, p, None) for d in ("0", "1", None) for p in list(PDL_MODES) + [None]]
    combos += [("1", p, c) for p in ("1", "2", "3") for c in ("0", "1")]  # fc2 capped or not
    for disp, pdl, cap in combos:
        if disp == "0" and pdl == "0":
            continue
        kv = {"BLACKMAMBA_MOE_IDS": 0, "BLACKMAMBA_PREFILL_MOE_PDL": 0}
        if disp is not None:
            kv["BLACKMAMBA_MOE_ROUTE_DISPATCH"] = disp
        if pdl is not None:
            kv["BLACKMAMBA_MOE_DEC_PDL"] = pdl
        if cap is not None:
            kv["BLACKMAMBA_MOE_DEC_PDL_CAP"] = cap
        env(**kv)
        k0 = counts()
        got, _ = steps(g, None, ids, 3)
        k1 = counts()
        on_d = disp != "0"
        if pdl is not None:
            n_p, on_x = PDL_MODES[pdl]
            xm = 2 if on_x else 0                 # fc1 one row per expert, of 2 MoE layers
        else:   # the default: 2 up to 8 rows; above, 3 for the layers with 2X <= B <= 32X
            n_p = 2
            xm = 0 if B <= 8 else sum(2 * X <= B <= 32 * X for X in (8, 3))
        nr = k1[2] - k0[2]                        # batched routings captured (2 a capture)
        assert nr >= 2, kv
        assert k1[0] - k0[0] == (nr if on_d else 0), kv
        assert k1[1] - k0[1] == n_p * nr, kv          # n_p GEMMs of each MoE layer with PDL
        assert k1[3] - k0[3] == xm * nr // 2, kv
        np.testing.assert_array_equal(got, old, err_msg=str(kv))


@pytest.mark.parametrize("B,math,bias", CASES)
def test_route_ids(env, B, math, bias):
    # the batched decode's default: the routing kernel builds no dispatch and the grouped
    # GEMMs derive it from the ids (BLACKMAMBA_MOE_IDS, default on; split products too since
    # session 19), with every PDL mode: logits bit-identical to the dispatch built by the
    # routing kernel (BLACKMAMBA_MOE_IDS=0), besides the CPU model
    g, c = make(400 + B, math=math, bias=bias)
    ids = np.random.default_rng(B + 9).integers(0, g.vocab_size, (B, 5))
    env(BLACKMAMBA_MOE_IDS=0)
    old, want, n = counted_steps(g, c, ids, "bm_cuda_norm_route_ids_calls",
                                 "bm_cuda_moe_grouped_ids_calls")
    assert n == [0, 0]
    split = math == "bf16x2" or B <= 8
    assert rel_err(old, want) < (TOL_SPLIT if split else 1e-2)
    for kv in ({}, {"BLACKMAMBA_MOE_IDS": 1}, {"BLACKMAMBA_MOE_DEC_PDL": 2},
               {"BLACKMAMBA_MOE_DEC_PDL": 3}, {"BLACKMAMBA_MOE_DEC_PDL": 0},
               {"BLACKMAMBA_MOE_DEC_PDL": 1, "BLACKMAMBA_MOE_DEC_PDL_CAP": 0},
               {"BLACKMAMBA_MOE_ROUTE_DISPATCH": 0}):
        env(**kv)
        got, _, (n_nr, n_grouped, n_disp, nr) = counted_steps(
            g, None, ids, "bm_cuda_norm_route_ids_calls", "bm_cuda_moe_grouped_ids_calls",
            "bm_cuda_norm_route_dispatch_calls", "bm_cuda_norm_route_pre_calls")
        assert nr >= 2, kv                        # batched routings captured (2 a capture)
        n_ids = nr                                # both MoE layers (8 and 3 experts)
        assert n_nr == n_ids, kv
        assert n_grouped == n_ids, kv             # each taken by the grouped call too
        fused = kv.get("BLACKMAMBA_MOE_ROUTE_DISPATCH") != 0
        assert n_disp == (nr - n_ids if fused else 0), kv   # else the last-block one
        np.testing.assert_array_equal(got, old, err_msg=str(kv))


@pytest.mark.parametrize("B,math,bias", CASES)
def test_weight_policy(env, B, math, bias):
    # the decode tiles' weight loads as evict_first L2 lines (default on, unsplit only) and
    # the L2 staging's size: hints, so the logits are bit-identical to the plain loads and to
    # no staging at all, besides the CPU model; the hint is counted where taken (each grouped
    # call of an unsplit batched capture), never on split products
    g, c = make(500 + B, math=math, bias=bias)
    ids = np.random.default_rng(B + 11).integers(0, g.vocab_size, (B, 5))
    env(BLACKMAMBA_MOE_WPOL=0, BLACKMAMBA_L2SIDE=0)
    old, want, n = counted_steps(g, c, ids, "bm_cuda_moe_grouped_wpol_calls")
    assert n == [0]
    split = math == "bf16x2" or B <= 8
    assert rel_err(old, want) < (TOL_SPLIT if split else 1e-2)
    for kv in ({}, {"BLACKMAMBA_L2SIDE": 0}, {"BLACKMAMBA_L2SIDE": 1},
               {"BLACKMAMBA_MOE_WPOL": "junk", "BLACKMAMBA_MOE_DEC_PDL": 3},
               {"BLACKMAMBA_MOE_IDS": 0}):
        env(**kv)
        got, _, (n_wpol, nr) = counted_steps(g, None, ids, "bm_cuda_moe_grouped_wpol_calls",
                                             "bm_cuda_norm_route_pre_calls")
        assert nr >= 2, kv                        # batched routings captured (2 a capture)
        assert n_wpol == (0 if split else nr), kv
        np.testing.assert_array_equal(got, old, err_msg=str(kv))


@pytest.mark.parametrize("b,E,K,parts,silu", [(3, 40, 4, 2, 1), (64, 2944, 4, 46, 1),
                                               (5, 33, 3, 3, 0), (1, 7, 2, 1, 1),
                                               (9, 100, 8, 70, 1)])
def test_conv_step_norm(b, E, K, parts, silu):
    # bm_cuda_conv_step_norm: the conv step on x * s with s = rsqrt(sum(ssp row) / d + eps)
    # per row, z * s in place, the state shifted with the scaled x; against float64. E = 40,
    # 33, 100, 2944: rows ending inside a block of 128 channels; b > 65535 refused
    D = cuda.to_device
    rng = rng_for("conv norm", b, E, K)
    d, eps = 64, 1e-5
    x = rng.standard_normal((b, E)).astype(np.float32)
    z = rng.standard_normal((b, E)).astype(np.float32)
    st = rng.standard_normal((b, K - 1, E)).astype(np.float32)
    w = rng.standard_normal((E, K)).astype(np.float32)
    bias = rng.standard_normal(E).astype(np.float32)
    ssp = rng.uniform(0.0, 50.0, (b, parts)).astype(np.float32)
    dx, dz, ds, dw, db, dss = D(x), D(z), D(st), D(w), D(bias), D(ssp)
    y = D(np.full((b, E), np.float32(np.nan)))
    rc = LIB.bm_cuda_conv_step_norm(dx.ptr, dz.ptr, E, dz.ptr, ds.ptr, dw.ptr, db.ptr, y.ptr,
                                    silu, b, E, K, dss.ptr, parts, d, eps, LEGACY_STREAM)
    assert rc == 0, LIB.bm_cuda_last_error().decode()
    s = 1.0 / np.sqrt(ssp.astype(np.float64).sum(1) / d + eps)
    xs = x * s[:, None]
    win = np.concatenate([st.astype(np.float64), xs[:, None, :]], axis=1)   # (b, K, E)
    acc = bias + np.einsum("bke,ek->be", win, w.astype(np.float64))
    want_y = acc / (1 + np.exp(-acc)) if silu else acc
    np.testing.assert_allclose(y.numpy(), want_y, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(dz.numpy(), z * s[:, None], rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(ds.numpy(), win[:, 1:], rtol=2e-6, atol=1e-7)
    # x and z interleaved in one (b, 2E) buffer (row stride 2E), z written apart
    xz = np.concatenate([x, z], 1)
    dxz, dz2, ds2 = D(xz), D(np.full((b, E), np.float32(np.nan))), D(st)
    y2 = D(np.full((b, E), np.float32(np.nan)))
    rc = LIB.bm_cuda_conv_step_norm(dxz.ptr, dxz.ptr + 4 * E, 2 * E, dz2.ptr, ds2.ptr, dw.ptr,
                                    db.ptr, y2.ptr, silu, b, E, K, dss.ptr, parts, d, eps,
                                    LEGACY_STREAM)
    assert rc == 0, LIB.bm_cuda_last_error().decode()
    np.testing.assert_array_equal(y2.numpy(), y.numpy())
    np.testing.assert_array_equal(dz2.numpy(), dz.numpy())
    np.testing.assert_array_equal(ds2.numpy(), ds.numpy())
    np.testing.assert_array_equal(dxz.numpy(), xz)
    rc = LIB.bm_cuda_conv_step_norm(dx.ptr, dz.ptr, E, dz.ptr, ds.ptr, dw.ptr, db.ptr, y.ptr,
                                    silu, 65536, E, K, dss.ptr, parts, d, eps, LEGACY_STREAM)
    assert rc != 0 and "b <= 65535" in LIB.bm_cuda_last_error().decode()


@pytest.mark.parametrize("b,E,K,silu", [(3, 40, 4, 1), (8, 2944, 4, 1), (5, 33, 3, 0),
                                         (1, 7, 2, 1), (16, 100, 8, 1)])
def test_conv_step_sum(b, E, K, silu):
    # bm_cuda_conv_step_sum (session 18): x and z as the sums of two parts, the hi and lo
    # products of a stacked split in_proj, (2b, 2E) rows of x then z, the lo rows b * 2E on;
    # the conv step on x_hi + x_lo, z = z_hi + z_lo, the state shifted; against float64 on the
    # float32 sums (each sum is one fp32 addition: exact to the float32 rounding of that sum)
    D = cuda.to_device
    rng = rng_for("conv sum", b, E, K)
    xz = rng.standard_normal((2 * b, 2 * E)).astype(np.float32)
    xz[b:] *= np.float32(1e-3)              # the lo products: small, as x - bf16(x) is
    st = rng.standard_normal((b, K - 1, E)).astype(np.float32)
    w = rng.standard_normal((E, K)).astype(np.float32)
    bias = rng.standard_normal(E).astype(np.float32)
    dxz, ds, dw, db = D(xz), D(st), D(w), D(bias)
    y = D(np.full((b, E), np.float32(np.nan)))
    z = D(np.full((b, E), np.float32(np.nan)))
    rc = LIB.bm_cuda_conv_step_sum(dxz.ptr, dxz.ptr + 4 * E, 2 * E, b * 2 * E, z.ptr, ds.ptr,
                                   dw.ptr, db.ptr, y.ptr, silu, b, E, K, LEGACY_STREAM)
    assert rc == 0, LIB.bm_cuda_last_error().decode()
    xs = (xz[:b, :E] + xz[b:, :E]).astype(np.float64)         # float32 sums, then float64
    win = np.concatenate([st.astype(np.float64), xs[:, None, :]], axis=1)   # (b, K, E)
    acc = bias + np.einsum("bke,ek->be", win, w.astype(np.float64))
    want_y = acc / (1 + np.exp(-acc)) if silu else acc
    np.testing.assert_allclose(y.numpy(), want_y, rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(z.numpy(), xz[:b, E:] + xz[b:, E:])
    np.testing.assert_array_equal(ds.numpy(), win[:, 1:].astype(np.float32))
    np.testing.assert_array_equal(dxz.numpy(), xz)                  # inputs untouched
    # the lo part overlapping the hi rows, b > 65535: refused with a message
    rc = LIB.bm_cuda_conv_step_sum(dxz.ptr, dxz.ptr + 4 * E, 2 * E, 2 * E, z.ptr, ds.ptr,
                                   dw.ptr, db.ptr, y.ptr, silu, max(b, 2), E, K, LEGACY_STREAM)
    assert rc != 0 and "part past the rows" in LIB.bm_cuda_last_error().decode()
    rc = LIB.bm_cuda_conv_step_sum(dxz.ptr, dxz.ptr + 4 * E, 2 * E, 65536 * 2 * E, z.ptr,
                                   ds.ptr, dw.ptr, db.ptr, y.ptr, silu, 65536, E, K,
                                   LEGACY_STREAM)
    assert rc != 0 and "b <= 65535" in LIB.bm_cuda_last_error().decode()


@pytest.mark.parametrize("b,L,E,K,silu,state", [(1, 32, 40, 4, 1, True), (2, 9, 2944, 4, 1, False),
                                                 (3, 50, 33, 3, 0, True), (1, 128, 7, 2, 1, True),
                                                 (2, 5, 100, 8, 1, False)])
def test_conv_forward_sum(b, L, E, K, silu, state):
    # bm_cuda_conv_forward_sum (session 22): the prefill conv on the sum of a stacked split
    # in_proj's two products, (2T, 2E) rows of x then z (T = b L, the lo rows T * 2E on), and
    # z = z_hi + z_lo written (b, L, E) for the scan: each input one fp32 addition, then the
    # same conv, so bit-equal to bm_cuda_conv_forward on the float32 sums; the carried state
    # (conv_in -> conv_out) alike
    D = cuda.to_device
    T = b * L
    rng = rng_for("conv fwd sum", b, L, E, K)
    xz = rng.standard_normal((2 * T, 2 * E)).astype(np.float32)
    xz[T:] *= np.float32(1e-3)              # the lo products: small, as x - bf16(x) is
    w = rng.standard_normal((E, K)).astype(np.float32)
    bias = rng.standard_normal(E).astype(np.float32)
    st = rng.standard_normal((b, K - 1, E)).astype(np.float32)
    xs = xz[:T, :E] + xz[T:, :E]
    dxz, dw, db = D(xz), D(w), D(bias)
    from blackmamba import ref
    out = {}
    for form in ("sum", "plain", "sum+bf", "sum+hi"):
        ds = D(st) if state else None
        y = D(np.full((T, E), np.float32(np.nan)))
        if form.startswith("sum"):
            z = D(np.full((T, E), np.float32(np.nan)))
            # y also as bf16 hi (+ lo) parts: x_proj's split input (the engine's conv_fused_bf)
            hi = D(np.full((T, E), 0x7FC1, np.uint16)) if "+" in form else None
            lo = D(np.full((T, E), 0x7FC1, np.uint16)) if form == "sum+bf" else None
            rc = LIB.bm_cuda_conv_forward_sum(dxz.ptr, dxz.ptr + 4 * E, 2 * E, T * 2 * E, z.ptr,
                                              dw.ptr, db.ptr, ds.ptr if state else None,
                                              ds.ptr if state else None, y.ptr,
                                              hi.ptr if hi is not None else None,
                                              lo.ptr if lo is not None else None, silu, b, L, E,
                                              K, LEGACY_STREAM)
        else:
            dx = D(xs)
            rc = LIB.bm_cuda_conv_forward(dx.ptr, dw.ptr, db.ptr, ds.ptr if state else None,
                                          ds.ptr if state else None, y.ptr, silu, b, L, E, K,
                                          LEGACY_STREAM)
        assert rc == 0, LIB.bm_cuda_last_error().decode()
        out[form] = (y.numpy(), ds.numpy() if state else None)
        if form.startswith("sum"):
            np.testing.assert_array_equal(z.numpy(), xz[:T, E:] + xz[T:, E:])
        if "+" in form:   # the bits of bm_f32_to_bf16_split: hi = bf16(y), lo = bf16(y - hi)
            yv = out[form][0]
            want_hi = ref.f32_to_bf16(yv)
            np.testing.assert_array_equal(hi.numpy(), want_hi)
            if lo is not None:
                rest = (yv - ref.bf16_to_f32(want_hi)).astype(np.float32)
                np.testing.assert_array_equal(lo.numpy(), ref.f32_to_bf16(rest))
    for form in ("plain", "sum+bf", "sum+hi"):
        np.testing.assert_array_equal(out["sum"][0], out[form][0])
        if state:
            np.testing.assert_array_equal(out["sum"][1], out[form][1])
    # against float64 on the float32 sums (the plain conv's own reference, to its tolerance)
    xp = np.concatenate([st if state else np.zeros((b, K - 1, E), np.float32),
                         xs.reshape(b, L, E)], axis=1).astype(np.float64)
    acc = bias + sum(w[:, k] * xp[:, k:k + L] for k in range(K))
    want = acc / (1 + np.exp(-acc)) if silu else acc
    np.testing.assert_allclose(out["sum"][0].reshape(b, L, E), want, rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(dxz.numpy(), xz)                  # inputs untouched
    # the lo part overlapping the hi rows, ld below E: refused with a message
    z = D(np.zeros((T, E), np.float32))
    for ld, part, lo in ((2 * E, 2 * E * (T - 1), None), (E - 1, T * 2 * E, None),
                         (2 * E, T * 2 * E, z)):   # (the last: ylo without ybf)
        rc = LIB.bm_cuda_conv_forward_sum(dxz.ptr, dxz.ptr + 4 * E, ld, part, z.ptr, dw.ptr,
                                          db.ptr, None, None, y.ptr, None,
                                          lo.ptr if lo is not None else None, silu, b, L, E, K,
                                          LEGACY_STREAM)
        assert rc != 0 and "part past the first" in LIB.bm_cuda_last_error().decode()


@pytest.mark.parametrize("B,math,bias", CASES)
def test_norm_fc2(env, B, math, bias):
    # the Mamba layer's RMSNorm after a MoE layer done by that layer's fc2 (its epilogue adds
    # to the residual and writes bf16(r * w) and partial sums of squares; the conv step
    # scales x and z by the row's rsqrt: BLACKMAMBA_DECODE_NORM_FC2, default on in the
    # batched decode) against the norm kernel (=0): the same residual, in_proj's input rounded
    # to bf16 before the row scale instead of after, so close to it and to the CPU model;
    # counted once a capture (layer "8" before "r"; "3" is the last layer). Split (session
    # 19): on grouped_dec_kernel, with the low parts, in_proj stacked (hi + lo added, then the
    # row scale: bm_cuda_conv_step_sum_norm), so fp32-class like the norm kernel's split;
    # BLACKMAMBA_DECODE_NORM_FC2_SPLIT=0 keeps the norm kernel there, bit-identical to =0
    g, c = make(700 + B, math=math, bias=bias)
    ids = np.random.default_rng(B + 13).integers(0, g.vocab_size, (B, 5))
    env(BLACKMAMBA_DECODE_NORM_FC2=0)
    old, want, n = counted_steps(g, c, ids, "bm_cuda_norm_fc2_calls",
                                 "bm_cuda_moe_grouped_norm_calls")
    assert n == [0, 0]
    split = math == "bf16x2" or B <= 8
    e_old = rel_err(old, want)
    assert e_old < (TOL_SPLIT if split else 1e-2)
    for kv in ({}, {"BLACKMAMBA_DECODE_NORM_FC2": 1}, {"BLACKMAMBA_MOE_IDS": 0},
               {"BLACKMAMBA_MOE_DEC_PDL": 0}, {"BLACKMAMBA_DECODE_NORM_FC2_SPLIT": 0},
               {"BLACKMAMBA_MOE_GROUPED_TILES": "0008"}, {"BLACKMAMBA_MOE_GROUPED_TILES": "0006"}):
        if not split and "BLACKMAMBA_MOE_GROUPED_TILES" in kv:
            continue                              # (grouped_dec_kernel's tiles: split only)
        env(**kv)
        got, _, (n_engine, n_grouped, nr) = counted_steps(
            g, None, ids, "bm_cuda_norm_fc2_calls", "bm_cuda_moe_grouped_norm_calls",
            "bm_cuda_norm_route_pre_calls")
        caps = nr // 2                            # captures (two batched routings each)
        assert caps >= 1, kv
        off = split and "BLACKMAMBA_DECODE_NORM_FC2_SPLIT" in kv
        assert n_engine == (0 if off else caps), kv
        assert n_grouped == n_engine, kv
        if off:
            np.testing.assert_array_equal(got, old, err_msg=str(kv))
            continue
        if split:
            assert rel_err(got, old) < 1e-5, kv
            assert rel_err(got, want) < TOL_SPLIT, kv
            continue
        # measured (H200): new-old 1.0-1.5e-3 at 9-64 rows, both ~2.6e-3 from the CPU model
        e_new, e_diff = rel_err(got, want), rel_err(got, old)
        assert e_new < 1e-2, kv
        assert e_diff < 5e-3, kv


def test_pdl_switch_off(env):
    # BLACKMAMBA_CUDA_PDL=0 turns the attribute off here too (mode 3 forced) (the kernels' waits are then
    # no-ops; fc2's early loads run after fc1 completed): the same logits, no PDL launches
    g, _ = make(301)
    ids = np.random.default_rng(3).integers(0, g.vocab_size, (40, 4))
    env(BLACKMAMBA_MOE_DEC_PDL=3)
    k0 = counts()
    ref, _ = steps(g, None, ids, 2)
    assert counts()[1] > k0[1]
    env(BLACKMAMBA_MOE_DEC_PDL=3, BLACKMAMBA_CUDA_PDL=0)
    k0, i0 = counts(), LIB.bm_cuda_norm_route_ids_calls()
    got, _ = steps(g, None, ids, 2)
    assert counts()[1] == k0[1]
    # the batched routing, the dispatch built by it or (the default) read from the ids
    assert LIB.bm_cuda_norm_route_ids_calls() - i0 >= 2
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("math", ["bf16", "bf16x2"])
def test_prefill_stack_out(env, math):
    # Session 21: a split prefill (bf16 math, at most 128 tokens; bf16x2 splits every length)
    # runs out_proj as one strided batch of its hi and lo rows into two products, which the
    # next layer's routing kernel sums (BLACKMAMBA_PREFILL_STACK_OUT; "0": linear()'s two
    # GEMMs, the second accumulating). The same two fp32 sums in another place: close to 1e-5,
    # and both against the CPU model. Only Mamba layers followed by a MoE layer of their own
    # take it ("r" before "r" keeps linear()), and only up to 128 tokens.
    # Session 23: the scan writes the lo rows right after the hi rows and out_proj is one GEMM
    # of 2T rows (BLACKMAMBA_PREFILL_OUT_ONE; "0": the strided batch), counted apart.
    g, c = make(79, math=math, layers=("r", "r", "8", "r", "3"))
    fn, fn1 = LIB.bm_cuda_prefill_out_pair_calls, LIB.bm_cuda_prefill_out_one_calls
    for B, L in ((1, 9), (2, 40), (1, 128), (1, 129), (1, 3)):
        ids = np.random.default_rng(B * 100 + L).integers(0, g.vocab_size, (B, L))
        got = {}
        for v, one in (("0", "1"), ("1", "0"), ("1", "1")):
            env(BLACKMAMBA_PREFILL_STACK_OUT=v, BLACKMAMBA_PREFILL_OUT_ONE=one)
            n0, m0 = fn(), fn1()
            got[v + one] = g(ids)
            # two Mamba layers before a MoE layer; from 2 rows (session 22: the GEMVs only for
            # a 1-token prefill, BLACKMAMBA_PREFILL_GEMM_MIN), up to 128
            want_n = 2 if v == "1" and 1 < B * L <= 128 else 0
            assert fn() - n0 == want_n, (B, L, v)
            assert fn1() - m0 == (want_n if one == "1" else 0), (B, L, v, one)
        assert rel_err(got["10"], got["01"]) < 1e-5, (B, L)
        assert rel_err(got["11"], got["01"]) < 1e-5, (B, L)
        if B * L <= 128 or math == "bf16x2":
            assert rel_err(got["11"], c(ids)) < TOL_SPLIT, (B, L)


@pytest.mark.parametrize("dtype,math", [("bfloat16", "bf16"), ("bfloat16", "bf16x2"),
                                        ("float32", "fp32")])
def test_prefill_norm_route_pre(env, dtype, math):
    # Session 21: a prefill on the block routing kernel (under 1024 tokens) loads the router
    # row and norm weights before its PDL wait and, where the grouped experts follow (bf16
    # weights, more than 4 tokens), builds their dispatch in its last block instead of a
    # dispatch_kernel launch: the same bits as the plain block kernel and the dispatch launch
    # (BLACKMAMBA_NORM_ROUTE_PRE=0), and with BLACKMAMBA_MOE_ROUTE_DISPATCH=0 (early row only)
    g, c = make(78, math=math, dtype=dtype)
    fns = [LIB.bm_cuda_norm_route_pre_prefill_calls,
           LIB.bm_cuda_norm_route_dispatch_prefill_calls]
    for B, L in ((1, 4), (1, 7), (3, 50), (1, 300)):
        ids = np.random.default_rng(B * 1000 + L).integers(0, g.vocab_size, (B, L))
        grouped = dtype == "bfloat16" and B * L > 4
        got = {}
        for kv in ({"BLACKMAMBA_NORM_ROUTE_PRE": "0"}, {},
                   {"BLACKMAMBA_MOE_ROUTE_DISPATCH": "0"}):
            env(**kv)
            k0 = [f() for f in fns]
            got[str(kv)] = g(ids)
            pre, disp = [f() - k for f, k in zip(fns, k0)]
            on = not kv.get("BLACKMAMBA_NORM_ROUTE_PRE")
            assert pre == (2 if on else 0), (B, L, kv)            # two MoE layers
            assert disp == (2 if on and grouped and not kv else 0), (B, L, kv)
            np.testing.assert_array_equal(got[str(kv)], got[str({"BLACKMAMBA_NORM_ROUTE_PRE": "0"})],
                                          err_msg=str((B, L, kv)))
        # (bf16 activations: the bf16 bound, as test_norm_route_warp's long prompt)
        assert rel_err(got["{}"], c(ids)) < (TOL_SPLIT if math != "bf16" else 0.05)


@pytest.mark.parametrize("dtype,math", [("bfloat16", "bf16"), ("bfloat16", "bf16x2"),
                                        ("float32", "fp32")])
def test_norm_route_warp(env, dtype, math):
    # the prefill's norm + routing a warp per token (BLACKMAMBA_NORM_ROUTE_WARP, the default
    # from BLACKMAMBA_NORM_ROUTE_WARP_MIN = 1024 tokens, session 21) against the block kernel
    # ("0"): the same sums in other orders, so close, not bit-equal;
    # both against the CPU model. bf16: the grouped experts read the bf16 rows only (no fp32
    # xn written); bf16x2 their low parts too; fp32 weights: the fp32 rows (per-expert path).
    g, c = make(77, math=math, dtype=dtype)
    ids = np.random.default_rng(5).integers(0, g.vocab_size, (3, 50))  # T = 150 tokens
    want = c(ids)
    got = {}
    for v in ("1", "0"):
        # (150 tokens: under the warp kernel's default minimum, so the minimum lowered here)
        env(BLACKMAMBA_NORM_ROUTE_WARP=v, BLACKMAMBA_NORM_ROUTE_WARP_MIN="100")
        n0 = LIB.bm_cuda_norm_route_warp_calls()
        got[v] = g(ids)
        assert LIB.bm_cuda_norm_route_warp_calls() - n0 == (2 if v == "1" else 0)
    # the defaults: the block kernel below 1024 tokens (the same bits as "0"), the warp
    # kernel from 1024; and a malformed minimum is the default
    for mn in (None, "junk", "0"):
        env(**({} if mn is None else dict(BLACKMAMBA_NORM_ROUTE_WARP_MIN=mn)))
        n0 = LIB.bm_cuda_norm_route_warp_calls()
        np.testing.assert_array_equal(g(ids), got["0"])
        assert LIB.bm_cuda_norm_route_warp_calls() == n0
    env(BLACKMAMBA_NORM_ROUTE_WARP_MIN="150")            # at the minimum: the warp kernel
    n0 = LIB.bm_cuda_norm_route_warp_calls()
    np.testing.assert_array_equal(g(ids), got["1"])
    assert LIB.bm_cuda_norm_route_warp_calls() - n0 == 2
    long_ids = np.random.default_rng(6).integers(0, g.vocab_size, (1, 1024))
    env(BLACKMAMBA_NORM_ROUTE_WARP="0")
    long_blk = g(long_ids)
    env()
    n0 = LIB.bm_cuda_norm_route_warp_calls()
    long_got = g(long_ids)
    assert LIB.bm_cuda_norm_route_warp_calls() - n0 == 2
    assert rel_err(long_got, long_blk) < (TOL_SPLIT if math != "bf16" else 2e-3)
    # (bf16 activations over 1024 tokens: the bf16 bound, tests/test_cuda_model.py)
    assert rel_err(long_got, c(long_ids)) < (TOL_SPLIT if math != "bf16" else 0.05)
    tol = TOL_SPLIT if math != "bf16" else 1e-2
    assert rel_err(got["1"], want) < tol
    assert rel_err(got["0"], want) < tol
    assert rel_err(got["1"], got["0"]) < (TOL_SPLIT if math != "bf16" else 2e-3)


@pytest.mark.parametrize("math", ["bf16", "bf16x2"])
def test_prefill_stack_in(env, math):
    # Session 22, the short split prefill's Mamba layer (bf16 math, at most 128 tokens; bf16x2
    # splits every length):
    # - in_proj as one GEMM of the hi and lo rows (the norm writes them one after the other),
    #   the conv adding each row's two products and writing the summed z
    #   (BLACKMAMBA_PREFILL_STACK_IN; "0": in_proj()'s two strided batches, the second
    #   accumulating; up to 128 rows, what its scratch holds);
    # - x_proj's K-split as one batch of both (BLACKMAMBA_PREFILL_STACK_XPROJ), the reduction
    #   adding each slice's two;
    # - the bf16 rows of x_proj's input written by that conv and dt_proj's by x_proj's
    #   reduction instead of to_bf16 launches (BLACKMAMBA_PREFILL_FUSE_BF): the same bits.
    # The same fp32 sums, the products in cuBLAS's order: close to 1e-5 (bit-equal on the
    # H200); against the CPU model. Every Mamba layer takes them, with or without a MoE layer
    # after. (Hidden 128: E = 256, so that x_proj's K splits at all: slices of at least 128.)
    # With xdt.cu's x_proj / dt_proj off (BLACKMAMBA_PREFILL_XDT=0): up to 128 tokens they take
    # the short prefill's x_proj and dt_proj by default (test_prefill_xdt).
    g, c = make(81, math=math, layers=("r", "r", "8", "r", "3"), hidden=128)
    fns = [LIB.bm_cuda_prefill_stack_in_calls, LIB.bm_cuda_prefill_stack_xproj_calls,
           lambda: LIB.bm_cuda_prefill_fuse_bf_calls(0),
           lambda: LIB.bm_cuda_prefill_fuse_bf_calls(1)]
    off = dict(BLACKMAMBA_PREFILL_STACK_IN="0", BLACKMAMBA_PREFILL_STACK_XPROJ="0",
               BLACKMAMBA_PREFILL_FUSE_BF="0")
    for B, L in ((1, 9), (2, 40), (1, 128), (1, 129), (1, 3), (3, 7), (1, 1)):
        T = B * L
        ids = np.random.default_rng(B * 100 + L + 7).integers(0, g.vocab_size, (B, L))
        got = {}
        # from 2 rows (the GEMVs only for a 1-token prefill: test_prefill_gemm_min); in_proj up
        # to 128 rows; the others wherever the rows split (bf16x2: every length)
        short, split = 1 < T <= 128, 1 < T and (T <= 128 or math == "bf16x2")
        for name, kv in (("off", off), ("in", dict(off, BLACKMAMBA_PREFILL_STACK_IN="1")),
                         ("in+x", dict(BLACKMAMBA_PREFILL_FUSE_BF="0")),
                         ("nofuse_in", dict(BLACKMAMBA_PREFILL_STACK_IN="0")), ("all", {})):
            env(BLACKMAMBA_PREFILL_XDT="0", **kv)
            k0 = [f() for f in fns]
            got[name] = g(ids)
            on = [kv.get(k, "1") == "1" for k in off]
            want = [short and on[0], split and on[1], short and on[0] and on[2], split and on[2]]
            # three Mamba layers
            assert [f() - k for f, k in zip(fns, k0)] == [3 * w for w in want], (B, L, name)
        for name in got:
            assert rel_err(got[name], got["off"]) < 1e-5, (B, L, name)
        np.testing.assert_array_equal(got["all"], got["in+x"])   # the conversions: same bits
        if T <= 128 or math == "bf16x2":
            assert rel_err(got["all"], c(ids)) < TOL_SPLIT, (B, L)


@pytest.mark.parametrize("math", ["bf16", "bf16x2"])
def test_prefill_gemm_min(env, math):
    # Session 22: prefills of 2..8 tokens take the batched products (split into bf16 hi + lo,
    # the short prompts' stacked forms) instead of the fp32 GEMVs, as decode batches of those
    # sizes have since session 18 (BLACKMAMBA_PREFILL_GEMM_MIN, default 2; 9: the GEMVs up to
    # 8 tokens as before; a malformed or out-of-range value is the default). Both fp32-class:
    # close to each other and to the CPU model; a 1-token prefill stays on the GEMVs.
    g, c = make(82, math=math, layers=("r", "8", "r", "3"))
    fn = LIB.bm_cuda_prefill_stack_in_calls
    for B, L in ((1, 2), (1, 5), (2, 4), (1, 8), (1, 1)):
        T = B * L
        ids = np.random.default_rng(T * 31 + B).integers(0, g.vocab_size, (B, L))
        want = c(ids)
        got = {}
        for v in ("9", None, "junk", "1", "10"):
            env(**({} if v is None else dict(BLACKMAMBA_PREFILL_GEMM_MIN=v)))
            n0 = fn()
            got[v] = g(ids)
            batched = T >= 2 and v != "9"
            assert fn() - n0 == (2 if batched else 0), (B, L, v)   # two Mamba layers
            assert rel_err(got[v], want) < TOL_SPLIT, (B, L, v)
        for v in ("junk", "1", "10"):
            np.testing.assert_array_equal(got[v], got[None])
        assert rel_err(got[None], got["9"]) < 1e-4, (B, L)


@pytest.mark.parametrize("math", ["bf16", "bf16x2"])
def test_prefill_xdt(env, math):
    # Session 22: a prefill of 2..128 tokens under bf16 math runs x_proj and dt_proj through
    # xdt.cu's fp32 kernels on the float32 weight copies (BLACKMAMBA_PREFILL_XDT; "0": the
    # split path, test_prefill_stack_in). fp32 products against split bf16 ones: close, and
    # both against the CPU model; a 1-token prefill and longer ones keep their paths.
    g, c = make(83, math=math, layers=("r", "r", "8", "r", "3"), hidden=128)
    fn = LIB.bm_cuda_prefill_xdt_calls
    for B, L in ((1, 2), (1, 9), (2, 40), (1, 128), (1, 129), (1, 1)):
        T = B * L
        ids = np.random.default_rng(T * 7 + B).integers(0, g.vocab_size, (B, L))
        got = {}
        for v in ("0", None):
            env(**({} if v is None else dict(BLACKMAMBA_PREFILL_XDT=v)))
            n0 = fn()
            got[v] = g(ids)
            assert fn() - n0 == (3 if v is None and 2 <= T <= 128 else 0), (B, L, v)
        assert rel_err(got[None], got["0"]) < 1e-4, (B, L)
        if T <= 128 or math == "bf16x2":
            assert rel_err(got[None], c(ids)) < TOL_SPLIT, (B, L)
