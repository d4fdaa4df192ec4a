"""GPU ops (_C.cuda_<op> through blackmamba.ops) against the float64 references and the CPU
ops, DeviceArray round trips, and interop with CuPy and PyTorch arrays (CAI and DLPack, in
and out, without copies). Skipped where no GPU is visible (CI builds with nvcc, no GPU).

Tolerances are relative L2 errors (conftest.rel_err) against blackmamba.ref (float64), with
the reason next to each. Every case draws fresh inputs from a seed made of its parameters.
"""
import gc
import os
import sys
import threading
import zlib

import numpy as np
import pytest

from blackmamba import cuda, ops, ref

from conftest import rel_err

pytestmark = pytest.mark.gpu

if not cuda.is_available():
    pytest.skip("no CUDA GPU visible (or blackmamba built without CUDA)", allow_module_level=True)

from blackmamba import _lib  # noqa: E402

C = _lib.C()
DA = cuda.DeviceArray
D = cuda.to_device

# float32 math against float64: sums of a few thousand products land near 1e-7..1e-6
TOL_F32 = 1e-5
# the scan's state decays through the MUFU ex2 (about 2 ulp per step) over up to 300 steps
TOL_SCAN = 3e-5
# cuBLAS tf32 (10-bit mantissa inputs, fp32 accumulate) and bf16 (8-bit inputs) GEMMs
TOL_TF32, TOL_BF16 = 3e-3, 1.5e-2
# bf16x2: x split into bf16 hi + lo keeps 16 significant bits (|x - hi - lo| <= 2^-17 |x|),
# both GEMMs accumulate in fp32: ~1e-5 at worst per product, 300x below TOL_BF16
TOL_BF16X2 = 5e-5


def rng_for(*key):
    """A fresh generator per case, seeded by the case's parameters."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def f32(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


WORST = {}   # op -> (worst rel. error, its tolerance), written out at the end (BM_ERR_TABLE)


def check(op, got, want, tol):
    """rel_err(got, want) < tol, remembering the worst ratio per op for the report."""
    err = rel_err(got, want)
    if op not in WORST or err / tol > WORST[op][0] / WORST[op][1]:
        WORST[op] = (err, tol)
    assert err < tol, f"{op}: relative error {err:.3g} >= {tol:.3g}"


@pytest.fixture(scope="module", autouse=True)
def _error_table():
    yield
    path = os.environ.get("BM_ERR_TABLE")
    if path:
        with open(path, "w") as f:
            f.write(f"{'op':28s} {'worst rel err':>14s} {'tolerance':>10s} {'ratio':>7s}\n")
            for op, (err, tol) in sorted(WORST.items()):
                f.write(f"{op:28s} {err:14.3g} {tol:10.3g} {err / tol:7.3f}\n")


def H(a):
    assert isinstance(a, DA), type(a)
    return a.numpy()


def Dopt(a):
    return None if a is None else D(a)


# ---- linear ------------------------------------------------------------------------------

@pytest.mark.parametrize("M,N,K", [(1, 7, 5), (3, 33, 64), (8, 130, 67), (9, 33, 64),
                                   (33, 64, 2947), (100, 257, 96), (0, 5, 3)])
@pytest.mark.parametrize("wdt", ["f32", "bf16"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear(M, N, K, wdt, bias):
    # M <= 8 (f32) / 32 (bf16): the GEMV; beyond: cuBLAS (bf16 weights expanded to fp32)
    rng = rng_for("linear", M, N, K, wdt, bias)
    x, W = f32(rng, M, K), f32(rng, N, K)
    if wdt == "bf16":
        W = ref.f32_to_bf16(W)
    b = f32(rng, N) if bias else None
    y = ops.linear(D(x), D(W), Dopt(b))
    assert isinstance(y, DA) and y.shape == (M, N) and y.dtype == np.float32
    if M:
        path = "gemv" if M <= (32 if wdt == "bf16" else 8) else "cublas"
        check(f"linear {path} w={wdt}", H(y), ref.linear(x, W, b), TOL_F32)
        check("linear vs CPU op", H(y), ops.linear(x, W, b), TOL_F32)


def test_linear_leading_dims_and_math():
    rng = rng_for("linear-math")
    x, W, b = f32(rng, 2, 50, 96), f32(rng, 72, 96), f32(rng, 72)
    want = ref.linear(x, W, b)
    assert H(ops.linear(D(x), D(W), D(b))).shape == (2, 50, 72)
    check("linear", H(ops.linear(D(x), D(W), D(b), math="fp32")), want, TOL_F32)
    check("linear math=tf32", H(ops.linear(D(x), D(W), D(b), math="tf32")), want, TOL_TF32)
    Wb = ref.f32_to_bf16(W)
    wantb = ref.linear(x, Wb, b)
    check("linear math=bf16 w=bf16", H(ops.linear(D(x), D(Wb), D(b), math="bf16")), wantb, TOL_BF16)
    check("linear math=tf32 w=bf16", H(ops.linear(D(x), D(Wb), D(b), math="tf32")), wantb, TOL_TF32)
    check("linear math=bf16x2 w=bf16", H(ops.linear(D(x), D(Wb), D(b), math="bf16x2")), wantb,
          TOL_BF16X2)
    check("linear math=bf16x2 w=f32 (tf32)", H(ops.linear(D(x), D(W), D(b), math="bf16x2")), want,
          TOL_TF32)
    # the low parts really are added: bf16x2 is far closer than bf16 (and than a bf16 rounding)
    e1 = rel_err(H(ops.linear(D(x), D(Wb), D(b), math="bf16")), wantb)
    e2 = rel_err(H(ops.linear(D(x), D(Wb), D(b), math="bf16x2")), wantb)
    assert e2 < e1 / 50, (e1, e2)
    with pytest.raises(ValueError, match="bf16x2"):
        ops.linear(D(x), D(Wb), D(b), math="bf16x3")
    # K = 0: an empty sum, y = bias
    y0 = ops.linear(D(np.zeros((20, 0), np.float32)), D(np.zeros((5, 0), np.float32)), D(b[:5]))
    np.testing.assert_array_equal(H(y0), np.broadcast_to(b[:5], (20, 5)))


# ---- bf16 conversions ----------------------------------------------------------------------

def test_bf16_conversions_bit_exact():
    rng = rng_for("bf16")
    a = f32(rng, 3, 1001, scale=10.0)
    a.flat[:8] = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40, -3e-39, 3.4e38]
    b = ops.f32_to_bf16(D(a))
    assert b.dtype == np.uint16 and b.shape == a.shape
    np.testing.assert_array_equal(H(b), ref.f32_to_bf16(a))
    back = ops.bf16_to_f32(b)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(H(back).view(np.uint32), ref.bf16_to_f32(H(b)).view(np.uint32))
    with pytest.raises(ValueError, match="at least one dimension"):
        ops.f32_to_bf16(D(np.float32(1.0)))


# ---- selective scan --------------------------------------------------------------------------

def scan_inputs(rng, b, L, E, N, opts):
    u, dt, z = f32(rng, b, L, E), f32(rng, b, L, E), f32(rng, b, L, E)
    A = -np.exp(f32(rng, E, N, scale=0.5))
    B, Cm = f32(rng, b, L, N), f32(rng, b, L, N)
    Dv, db, st = f32(rng, E), f32(rng, E), f32(rng, b, E, N)
    softplus = opts != "no_softplus"
    if not softplus:            # delta must stay positive without softplus (else exp blows up)
        dt = (0.1 * np.abs(dt) + 0.01).astype(np.float32)
        db = (0.05 * np.abs(db)).astype(np.float32)
    if opts == "bare":
        Dv = z = db = st = None
    return dict(u=u, delta=dt, A=A, B=B, C=Cm, D=Dv, z=z, delta_bias=db,
                delta_softplus=softplus, state=st)


@pytest.mark.parametrize("b,L,E,N", [(1, 1, 1, 1), (2, 33, 7, 16), (3, 70, 130, 5),
                                     (2, 17, 64, 64), (1, 300, 33, 16), (2, 0, 5, 4)])
@pytest.mark.parametrize("opts", ["all", "bare", "no_softplus"])
def test_selective_scan(b, L, E, N, opts):
    kw = scan_inputs(rng_for("scan", b, L, E, N, opts), b, L, E, N, opts)
    dev = {k: (D(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    y, fin = ops.selective_scan(**dev)
    yr, finr = ref.selective_scan(**kw)
    assert y.shape == (b, L, E) and fin.shape == (b, E, N)
    if L:
        check("selective_scan", H(y), yr, TOL_SCAN)
    check("selective_scan", H(fin), finr, TOL_SCAN)
    if L == 0 and kw["state"] is not None:
        np.testing.assert_array_equal(H(fin), kw["state"])


@pytest.mark.parametrize("b,E,N", [(1, 1, 1), (3, 33, 16), (2, 130, 64), (5, 7, 5)])
@pytest.mark.parametrize("opts", ["all", "bare"])
def test_selective_state_update_in_place(b, E, N, opts):
    rng = rng_for("step", b, E, N, opts)
    kw = scan_inputs(rng, b, 1, E, N, opts)
    st = f32(rng, b, E, N)
    x, dt, B, Cm = kw["u"][:, 0], kw["delta"][:, 0], kw["B"][:, 0], kw["C"][:, 0]
    z = None if kw["z"] is None else kw["z"][:, 0]
    std = D(st)
    y = ops.selective_state_update(std, D(x), D(dt), D(kw["A"]), D(B), D(Cm), Dopt(kw["D"]),
                                   Dopt(z), Dopt(kw["delta_bias"]), True)
    yr, str_ = ref.selective_state_update(st, x, dt, kw["A"], B, Cm, kw["D"], z,
                                          kw["delta_bias"], True)
    assert y.shape == (b, E)
    check("selective_state_update", H(y), yr, TOL_F32)
    check("selective_state_update", H(std), str_, TOL_F32)


def test_prefill_then_step_equals_prefill():
    rng = rng_for("prefill-step")
    b, L, E, N = 2, 40, 37, 16
    kw = scan_inputs(rng, b, L, E, N, "all")
    dev = {k: (D(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    y_all, fin_all = ops.selective_scan(**dev)
    head = dict(dev, u=D(kw["u"][:, :-1]), delta=D(kw["delta"][:, :-1]), B=D(kw["B"][:, :-1]),
                C=D(kw["C"][:, :-1]), z=D(kw["z"][:, :-1]))
    _, st = ops.selective_scan(**head)
    y_last = ops.selective_state_update(st, D(kw["u"][:, -1]), D(kw["delta"][:, -1]), dev["A"],
                                        D(kw["B"][:, -1]), D(kw["C"][:, -1]), dev["D"],
                                        D(kw["z"][:, -1]), dev["delta_bias"], True)
    check("prefill+step", H(y_last), H(y_all)[:, -1], 1e-5)
    check("prefill+step", H(st), H(fin_all), 1e-5)


def native():
    """The extension's C symbols through ctypes (launchers without a Python binding)."""
    import ctypes
    lib = ctypes.CDLL(C.__file__)
    P, I64, I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.bm_cuda_scan_forward_ws.argtypes = ([P] * 8 + [I32, P, P, P, P, P] + [I64] * 4 +
                                            [I32, I32, I32, P, ctypes.c_size_t, P])
    lib.bm_cuda_scan_forward_ws.restype = I32
    lib.bm_cuda_scan_workspace.argtypes = [I64, I64]
    lib.bm_cuda_scan_workspace.restype = ctypes.c_size_t
    lib.bm_cuda_scan_segmented_calls.restype = ctypes.c_longlong
    lib.bm_cuda_scan_packed_calls.restype = ctypes.c_longlong
    lib.bm_cuda_xproj_ksplit_calls.restype = ctypes.c_longlong
    return lib


def scan_ws_call(kw, segments, tpc=0, in_place=False, ws_floats=None, bf16_out=False, var=-1):
    """bm_cuda_scan_forward_ws on kw (scan_inputs) -> (y, final state) on the host; with
    bf16_out also y as bf16 hi and lo bits: (y, state, hi, lo)."""
    b, L, E = kw["u"].shape
    N = kw["A"].shape[1]
    lib = native()
    dev = {k: (D(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    ptr = lambda a: None if a is None else a.ptr  # noqa: E731
    y = D(np.full((b, L, E), np.nan, np.float32))
    if in_place:
        st_in = st_out = dev["state"] if dev["state"] is not None else D(np.zeros((b, E, N), np.float32))
    else:
        st_in, st_out = dev["state"], D(np.full((b, E, N), np.nan, np.float32))
    if ws_floats is None:
        ws_floats = max(segments, 1) * b * E * (N + 1)
    ws = D(np.zeros(max(ws_floats, 1), np.float32))
    hi = lo = None
    if bf16_out:
        hi, lo = (D(np.full((b, L, E), 0xFFFF, np.uint16)) for _ in range(2))
    rc = lib.bm_cuda_scan_forward_ws(
        ptr(dev["u"]), ptr(dev["delta"]), ptr(dev["A"]), ptr(dev["B"]), ptr(dev["C"]),
        ptr(dev["D"]), ptr(dev["z"]), ptr(dev["delta_bias"]), int(kw["delta_softplus"]),
        ptr(st_in), ptr(st_out), y.ptr, ptr(hi), ptr(lo), b, L, E, N, tpc, var, segments,
        ws.ptr, ws_floats * 4, None)
    assert rc == 0, rc
    if bf16_out:
        return H(y), H(st_out), H(hi), H(lo)
    return H(y), H(st_out)


# Sequence-parallel scan (cuda/scan.cu: pass 1 from zero per segment, pass 2 from the true
# segment states): forced segment counts (uneven last segments, one-chunk segments, every
# N kernel, TPC 1/2/4), in place and out of place, against the float64 reference with the
# scan's tolerance: the only new rounding is exp(A * sum(delta)) for the product of a
# segment's decays (~1e-6 relative), far below TOL_SCAN.
@pytest.mark.parametrize("b,L,E,N,S,tpc", [(1, 300, 33, 16, 4, 0), (1, 257, 130, 16, 5, 0),
                                           (2, 100, 64, 5, 3, 0), (3, 64, 40, 64, 4, 0),
                                           (1, 33, 70, 16, 3, 4), (2, 200, 36, 8, 64, 1),
                                           (1, 160, 48, 32, 7, 2), (2, 77, 36, 16, 5, 2)])
@pytest.mark.parametrize("opts", ["all", "bare", "no_softplus"])
def test_selective_scan_segmented(b, L, E, N, S, tpc, opts):
    kw = scan_inputs(rng_for("scanseg", b, L, E, N, S, opts), b, L, E, N, opts)
    yr, finr = ref.selective_scan(**kw)
    before = native().bm_cuda_scan_segmented_calls()
    for in_place in (False, True):
        y, fin = scan_ws_call(kw, S, tpc=tpc, in_place=in_place)
        check("selective_scan_segmented", y, yr, TOL_SCAN)
        check("selective_scan_segmented", fin, finr, TOL_SCAN)
    assert native().bm_cuda_scan_segmented_calls() == before + 2
    # segments = 1: the one-pass kernel, which the segmented result must match closely
    y1, fin1 = scan_ws_call(kw, 1, tpc=tpc)
    assert native().bm_cuda_scan_segmented_calls() == before + 2
    assert rel_err(y, y1) < TOL_SCAN and rel_err(fin, fin1) < TOL_SCAN


@pytest.mark.parametrize("b,L,E,N,S", [(1, 100, 64, 16, 3), (2, 37, 30, 16, 1),
                                       (1, 50, 33, 4, 1)])
def test_selective_scan_bf16_outputs(b, L, E, N, S):
    # y_bf16 / y_lo (the engine's out_proj input, written by the scan): exactly the bf16
    # rounding of the float32 y and of its remainder, as to_bf16 would give; E = 30, 33: the
    # scalar write-out path, E = 64: the 16-byte one
    kw = scan_inputs(rng_for("scanbf", b, L, E, N, S), b, L, E, N, "all")
    y, fin, hi, lo = scan_ws_call(kw, S, bf16_out=True)
    check("selective_scan", y, ref.selective_scan(**kw)[0], TOL_SCAN)
    want_hi = ref.f32_to_bf16(y)
    np.testing.assert_array_equal(hi, want_hi)
    np.testing.assert_array_equal(lo, ref.f32_to_bf16(y - ref.bf16_to_f32(want_hi)))


# The one-pass kernel's variants (cuda/scan.cu): 1 (per-(t, e) work per step), 2 (packed once
# per chunk; the chunk's y over u's slot, one barrier per chunk), 3 (2 with one reciprocal for
# softplus and silu: the default at TPC >= 2), 4 (3 with one exp in 16 on the FMA pipe; N = 16
# at TPC = 2 only, else it runs 3). Against float64 with the scan's tolerance (the new roundings,
# ~2e-7 each, are far below it), and 2..4 against 1. Shapes: E = 7, 130 (no 16-byte copies, the
# scalar y path, a partial block), L not a multiple of 16 (a partial last chunk), TPC 2 and 4
# with 4, 8 and 16 states a thread, N = 5 (padded states), one-chunk L.
@pytest.mark.parametrize("b,L,E,N,tpc", [(2, 33, 7, 16, 0), (1, 300, 64, 16, 2),
                                         (3, 70, 130, 5, 0), (2, 50, 36, 32, 4),
                                         (1, 40, 40, 64, 4), (2, 16, 68, 16, 4),
                                         (4, 129, 96, 16, 2)])
@pytest.mark.parametrize("opts", ["all", "bare", "no_softplus"])
def test_selective_scan_variants(b, L, E, N, tpc, opts):
    kw = scan_inputs(rng_for("scanvar", b, L, E, N, tpc, opts), b, L, E, N, opts)
    yr, finr = ref.selective_scan(**kw)
    lib = native()
    y1, fin1 = scan_ws_call(kw, 1, tpc=tpc, var=1)
    for var in (2, 3, 4, -1):
        before = lib.bm_cuda_scan_packed_calls()
        y, fin = scan_ws_call(kw, 1, tpc=tpc, var=var)
        # every shape here has TPC >= 2 (auto: N > 8 or b * E small), so the default is packed
        assert lib.bm_cuda_scan_packed_calls() == before + 1
        check("selective_scan_variants", y, yr, TOL_SCAN)
        check("selective_scan_variants", fin, finr, TOL_SCAN)
        assert rel_err(y, y1) < TOL_SCAN and rel_err(fin, fin1) < TOL_SCAN
    if N > 16:  # TPC = 1 holds at most 16 states a thread
        return
    # TPC = 1 has no packed kernel (48 KB of static shared memory): 3 runs 1, counted as such
    before = lib.bm_cuda_scan_packed_calls()
    y, fin = scan_ws_call(kw, 1, tpc=1, var=3)
    assert lib.bm_cuda_scan_packed_calls() == before
    check("selective_scan_variants", y, yr, TOL_SCAN)


@pytest.mark.parametrize("E", [64, 30])
def test_selective_scan_variants_bf16_outputs(E):
    # the packed variants' own y write-out (per warp): bf16 hi / lo exactly as to_bf16 would
    # round the float32 y; E = 64 the 16-byte path, E = 30 the scalar one
    kw = scan_inputs(rng_for("scanvarbf", E), 2, 37, E, 16, "all")
    for var in (2, 3):
        y, fin, hi, lo = scan_ws_call(kw, 1, bf16_out=True, var=var)
        check("selective_scan_variants", y, ref.selective_scan(**kw)[0], TOL_SCAN)
        want_hi = ref.f32_to_bf16(y)
        np.testing.assert_array_equal(hi, want_hi)
        np.testing.assert_array_equal(lo, ref.f32_to_bf16(y - ref.bf16_to_f32(want_hi)))


def test_selective_scan_variant_bad():
    kw = scan_inputs(rng_for("scanvarbad"), 1, 5, 8, 16, "all")
    with pytest.raises(AssertionError):
        scan_ws_call(kw, 1, var=5)


def test_selective_scan_segmented_auto_rule():
    # b = 1 at the 2.8B width (E = 2944) picks segments by itself, through ops (the scratch
    # from the stream-ordered pool) and through _ws with bm_cuda_scan_workspace's bytes; b = 8
    # fills the machine already and does not, nor a sequence under 384 steps at b = 1 (session
    # 24; 768 in session 23) or under 768 at b = 2
    lib = native()
    kw = scan_inputs(rng_for("scanseg-auto"), 1, 1024, 2944, 16, "all")
    yr, finr = ref.selective_scan(**kw)
    n0 = lib.bm_cuda_scan_segmented_calls()
    dev = {k: (D(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    y, fin = ops.selective_scan(**dev)
    assert lib.bm_cuda_scan_segmented_calls() == n0 + 1
    check("selective_scan_segmented", H(y), yr, TOL_SCAN)
    check("selective_scan_segmented", H(fin), finr, TOL_SCAN)
    wsb = lib.bm_cuda_scan_workspace(2944, 16)
    assert wsb >= 11 * 2944 * 17 * 4       # S = 11 here (8 x 132 SMs / 92 blocks)
    y2, fin2 = scan_ws_call(kw, 0, in_place=True, ws_floats=wsb // 4)
    assert lib.bm_cuda_scan_segmented_calls() == n0 + 2
    check("selective_scan_segmented", y2, yr, TOL_SCAN)
    check("selective_scan_segmented", fin2, finr, TOL_SCAN)
    # too little scratch: the auto rule falls back to one pass
    scan_ws_call(kw, 0, ws_floats=16)
    assert lib.bm_cuda_scan_segmented_calls() == n0 + 2
    kw8 = scan_inputs(rng_for("scanseg-auto8"), 8, 128, 2944, 16, "all")
    dev8 = {k: (D(v) if isinstance(v, np.ndarray) else v) for k, v in kw8.items()}
    y8, _ = ops.selective_scan(**dev8)
    assert lib.bm_cuda_scan_segmented_calls() == n0 + 2
    check("selective_scan", H(y8), ref.selective_scan(**kw8)[0], TOL_SCAN)
    for (b, L), seg in (((1, 383), 0), ((2, 767), 0), ((1, 384), 1)):
        kw5 = scan_inputs(rng_for("scanseg-auto-min", b, L), b, L, 2944, 16, "all")
        dev5 = {k: (D(v) if isinstance(v, np.ndarray) else v) for k, v in kw5.items()}
        n5 = lib.bm_cuda_scan_segmented_calls()
        y5, _ = ops.selective_scan(**dev5)
        assert lib.bm_cuda_scan_segmented_calls() == n5 + seg, (b, L)
        check("selective_scan", H(y5), ref.selective_scan(**kw5)[0], TOL_SCAN)


def test_selective_scan_segments_switch(monkeypatch):
    # BLACKMAMBA_SCAN_SEGMENTS, read per call where the caller leaves the count to the auto
    # rule (A/B measurements): "1" one pass, "any" the rule without its 384-step minimum, a
    # count n that many segments (one pass where the workspace has no room), junk the rule
    lib = native()
    kw = scan_inputs(rng_for("scanseg-switch"), 1, 300, 2944, 16, "all")
    yr, finr = ref.selective_scan(**kw)
    wsf = lib.bm_cuda_scan_workspace(2944, 16) // 4
    # "64": 19 segments of one chunk, and room for 5 only: one pass
    for val, seg in ((None, 0), ("any", 1), ("5", 1), ("junk", 0), ("1", 0), ("64", 0)):
        if val is None:
            monkeypatch.delenv("BLACKMAMBA_SCAN_SEGMENTS", raising=False)
        else:
            monkeypatch.setenv("BLACKMAMBA_SCAN_SEGMENTS", val)
        n0 = lib.bm_cuda_scan_segmented_calls()
        y, fin = scan_ws_call(kw, 0, ws_floats=wsf if val != "64" else 5 * 2944 * 17)
        assert lib.bm_cuda_scan_segmented_calls() == n0 + seg, val
        check("selective_scan_segmented", y, yr, TOL_SCAN)
        check("selective_scan_segmented", fin, finr, TOL_SCAN)
        # a count the caller asks for wins over the switch
        y2, _ = scan_ws_call(kw, 3)
        assert lib.bm_cuda_scan_segmented_calls() == n0 + seg + 1, val
        check("selective_scan_segmented", y2, yr, TOL_SCAN)


@pytest.mark.parametrize("b,L", [(1, 16), (1, 128), (1, 600), (2, 300), (16, 40)])
def test_conv_scan_pdl_switch(monkeypatch, b, L):
    # BLACKMAMBA_CONV_SCAN_PDL (session 24; on by default since session 25): the conv and the
    # scan launched with PDL (they wait first) or plainly give the same bits, and so does the
    # scan's padded shared memory that spreads its blocks (BLACKMAMBA_SCAN_PDL_SPREAD, session
    # 25: 184 blocks at b = 1 cap at 2 an SM, 110 KB each; b = 16 runs past one wave, unpadded)
    kw = scan_inputs(rng_for("scanpdl", b, L), b, L, 2944, 16, "all")
    dev = {k: (D(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    rng = rng_for("convpdl", b, L)
    x, w, bias = f32(rng, b, L, 96), f32(rng, 96, 4), f32(rng, 96)
    outs = {}
    for val, spread in (("0", None), ("1", "0"), ("1", None), (None, None)):
        for name, v in (("BLACKMAMBA_CONV_SCAN_PDL", val), ("BLACKMAMBA_SCAN_PDL_SPREAD", spread)):
            if v is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, v)
        y, fin = ops.selective_scan(**dev)
        cy, cfin = ops.causal_conv1d(D(x), D(w), D(bias), None, "silu")
        outs[val, spread] = [H(a) for a in (y, fin, cy, cfin)]
    for key in (("1", "0"), ("1", None), (None, None)):
        for a, a0 in zip(outs[key], outs["0", None]):
            np.testing.assert_array_equal(a, a0)
    check("selective_scan", outs["0", None][0], ref.selective_scan(**kw)[0], TOL_SCAN)
    check("causal_conv1d", outs["0", None][2], ref.causal_conv1d(x, w, bias, None, "silu")[0],
          TOL_F32)


# ---- causal conv1d ------------------------------------------------------------------------------

@pytest.mark.parametrize("K", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("b,L,E", [(1, 1, 1), (2, 2, 7), (3, 40, 130), (1, 257, 33)])
@pytest.mark.parametrize("variant", ["full", "bare", "w3d"])
def test_causal_conv1d(K, b, L, E, variant):
    rng = rng_for("conv", K, b, L, E, variant)
    x, w, bias, cs = f32(rng, b, L, E), f32(rng, E, K), f32(rng, E), f32(rng, b, K - 1, E)
    act = None if variant == "bare" else "silu"
    if variant == "bare":
        bias = cs = None
    wd = D(w.reshape(E, 1, K)) if variant == "w3d" else D(w)
    y, fin = ops.causal_conv1d(D(x), wd, Dopt(bias), Dopt(cs), act)
    yr, finr = ref.causal_conv1d(x, w, bias, cs, act)
    check("causal_conv1d", H(y), yr, TOL_F32)
    np.testing.assert_array_equal(H(fin), finr.astype(np.float32))  # a copy of inputs: exact


@pytest.mark.parametrize("K", [4, 8])
def test_causal_conv1d_large(K):
    # 2 x 1031 x 8195 = 16.9M elements: over conv.cu's CONV_SMALL (16M), so the 32-step chunks
    # (the small-problem chunks of 8 steps are what every case above runs); odd L and E
    b, L, E = 2, 1031, 8195
    rng = rng_for("conv-large", K)
    x, w, bias, cs = f32(rng, b, L, E), f32(rng, E, K), f32(rng, E), f32(rng, b, K - 1, E)
    y, fin = ops.causal_conv1d(D(x), D(w), D(bias), D(cs), "silu")
    yr, finr = ref.causal_conv1d(x, w, bias, cs, "silu")
    check("causal_conv1d", H(y), yr, TOL_F32)
    np.testing.assert_array_equal(H(fin), finr.astype(np.float32))


@pytest.mark.parametrize("K", [2, 4, 7])
@pytest.mark.parametrize("b,E", [(1, 1), (3, 130), (2, 33)])
def test_causal_conv1d_update_in_place(K, b, E):
    rng = rng_for("conv-step", K, b, E)
    x, w, bias, cs = f32(rng, b, E), f32(rng, E, K), f32(rng, E), f32(rng, b, K - 1, E)
    csd = D(cs)
    y = ops.causal_conv1d_update(D(x), csd, D(w), D(bias), "silu")
    yr, csr = ref.causal_conv1d_update(x, cs, w, bias, "silu")
    check("causal_conv1d_update", H(y), yr, TOL_F32)
    np.testing.assert_array_equal(H(csd), csr.astype(np.float32))


# ---- norms --------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 33), (4, 2947), (2, 20000), (0, 8)])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm(shape, residual):
    rng = rng_for("rms", shape, residual)
    x, w, r = f32(rng, *shape), f32(rng, shape[-1]), f32(rng, *shape) if residual else None
    out, rout = ops.rms_norm(D(x), D(w), Dopt(r), eps=1e-5)
    assert out.shape == shape and rout.shape == shape
    if x.size:
        o_ref, r_ref = ref.rms_norm(x, w, r, 1e-5)
        check("rms_norm", H(out), o_ref, TOL_F32)
        # x + residual in float32 on both sides: bit for bit
        np.testing.assert_array_equal(H(rout), x if r is None else x + r)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 33), (4, 2947)])
@pytest.mark.parametrize("bias,residual", [(False, False), (True, True)])
def test_layer_norm(shape, bias, residual):
    rng = rng_for("ln", shape, bias, residual)
    x, w = f32(rng, *shape), f32(rng, shape[-1])
    b = f32(rng, shape[-1]) if bias else None
    r = f32(rng, *shape) if residual else None
    out = ops.layer_norm(D(x), D(w), Dopt(b), Dopt(r), 1e-5)
    check("layer_norm", H(out), ref.layer_norm(x, w, b, r, 1e-5), TOL_F32)


# ---- MoE ----------------------------------------------------------------------------------------

def near_tie(logits, tol=1e-4):
    """Rows whose two largest logits are within tol (float32 order may differ there)."""
    s = np.sort(np.asarray(logits, np.float64), axis=-1)
    return (s[:, -1] - s[:, -2] if s.shape[1] > 1 else np.full(len(s), np.inf)) < tol


@pytest.mark.parametrize("T,d,X", [(1, 5, 1), (7, 64, 8), (300, 67, 33), (40, 16, 256)])
@pytest.mark.parametrize("wdt", ["f32", "bf16"])
def test_route_top1(T, d, X, wdt):
    rng = rng_for("route", T, d, X, wdt)
    x, rw, rb = f32(rng, T, d), f32(rng, X, d), f32(rng, X)
    if wdt == "bf16":
        rw = ref.f32_to_bf16(rw)
    ids, gates, logits = ops.route_top1(D(x), D(rw), D(rb), return_logits=True)
    ids_r, gates_r, logits_r = ref.route_top1(x, rw, rb)
    assert ids.dtype == np.int32 and ids.shape == (T,) and logits.shape == (T, X)
    check("route_top1", H(logits), logits_r, TOL_F32)
    ok = ~near_tie(logits_r)
    np.testing.assert_array_equal(H(ids)[ok], ids_r[ok])
    check("route_top1", H(gates)[ok], gates_r[ok], TOL_F32)
    ids2, gates2 = ops.route_top1(D(x.reshape(1, T, d)), D(rw), D(rb))
    np.testing.assert_array_equal(H(ids2), H(ids))


@pytest.mark.parametrize("T,X", [(0, 3), (1, 1), (7, 8), (5000, 8), (999, 256)])
@pytest.mark.parametrize("idt", [np.int32, np.int64])
def test_moe_dispatch(T, X, idt):
    rng = rng_for("dispatch", T, X, idt)
    ids = rng.integers(0, X, T).astype(idt)
    counts, offsets, perm = ops.moe_dispatch(D(ids), X)
    want = ops.moe_dispatch(ids, X)                        # the CPU op: int64, stable
    for got, w in zip((counts, offsets, perm), want):
        assert got.dtype == np.int64
        np.testing.assert_array_equal(H(got), w)
    if T:
        bad = ids.copy()
        bad[T // 2] = X
        with pytest.raises(ValueError, match=r"ids has 1 value\(s\) outside \[0, %d\)" % X):
            ops.moe_dispatch(D(bad), X)


@pytest.mark.parametrize("T", [1, 5, 64, 65, 300])   # <= 64: gathered GEMV; beyond: cuBLAS
@pytest.mark.parametrize("X,d,F", [(1, 8, 5), (4, 33, 16), (8, 64, 24)])
@pytest.mark.parametrize("wdt", ["f32", "bf16"])
def test_moe_experts(T, X, d, F, wdt):
    rng = rng_for("experts", T, X, d, F, wdt)
    x, g = f32(rng, T, d), rng.uniform(0.1, 1.0, T).astype(np.float32)
    ids = rng.integers(0, X, T).astype(np.int64)
    fc1, fc2 = f32(rng, X, 2 * F, d, scale=0.3), f32(rng, X, d, F, scale=0.3)
    if wdt == "bf16":
        fc1, fc2 = ref.f32_to_bf16(fc1), ref.f32_to_bf16(fc2)
    want = ref.moe_experts(x, ids, g, fc1, fc2, "gelu")
    out = ops.moe_experts(D(x), D(ids), D(g), D(fc1), D(fc2))
    assert out.shape == (T, d)
    path = "gemv" if T <= 64 else "cublas"
    # fp32 GEMMs/GEMV, erf GELU
    check(f"moe_experts {path} w={wdt}", H(out), want, 2e-5)
    for act in ("silu", "gelu_tanh"):
        o = ops.moe_experts(D(x), D(ids.astype(np.int32)), None, D(fc1), D(fc2), act)
        check(f"moe_experts {path} {act}", H(o), ref.moe_experts(x, ids, None, fc1, fc2, act), 2e-5)
    if T > 64:
        for math, tol in (("tf32", TOL_TF32), ("bf16", TOL_BF16 if wdt == "bf16" else TOL_TF32),
                          ("bf16x2", TOL_BF16X2 if wdt == "bf16" else TOL_TF32)):
            o = ops.moe_experts(D(x), D(ids), D(g), D(fc1), D(fc2), math=math)
            check(f"moe_experts math={math} w={wdt}", H(o), want, tol)
    bad = ids.copy()
    bad[0] = -1
    with pytest.raises(ValueError, match="outside"):
        ops.moe_experts(D(x), D(bad), D(g), D(fc1), D(fc2))


@pytest.mark.parametrize("T", [3, 200])
@pytest.mark.parametrize("wdt", ["f32", "bf16"])
def test_moe_and_mlp(T, wdt):
    rng = rng_for("moe", T, wdt)
    X, d, F = 8, 40, 24
    x, rw, rb = f32(rng, 2, T, d), f32(rng, X, d), f32(rng, X)
    fc1, fc2 = f32(rng, X, 2 * F, d, scale=0.3), f32(rng, X, d, F, scale=0.3)
    if wdt == "bf16":
        fc1, fc2 = ref.f32_to_bf16(fc1), ref.f32_to_bf16(fc2)
    out, ids, gates, logits = ops.moe(D(x), D(rw), D(rb), D(fc1), D(fc2), return_routing=True)
    o_cpu, ids_cpu, g_cpu, l_cpu = ops.moe(x, rw, rb, fc1, fc2, return_routing=True)
    assert out.shape == (2, T, d) and ids.shape == (2 * T,)
    if not near_tie(l_cpu).any():
        np.testing.assert_array_equal(H(ids), ids_cpu)
        check("moe", H(out), o_cpu, 2e-5)
        check("moe", H(out), ref.moe(x.reshape(-1, d), rw, rb, fc1, fc2)[0].reshape(x.shape), 2e-5)
    check("moe gates/logits", H(gates), g_cpu, TOL_F32)
    check("moe gates/logits", H(logits), l_cpu, TOL_F32)
    assert ops.moe(D(x), D(rw), D(rb), D(fc1), D(fc2)).shape == (2, T, d)
    # the dense gated MLP: one expert
    m = ops.mlp(D(x), D(fc1[0]), D(fc2[0]), "silu")
    check("mlp", H(m), ref.gated_mlp(x, fc1[0], fc2[0], "silu"), 2e-5)
    m0 = ops.mlp(D(x), D(fc1[1]), D(fc2[1]), None)
    check("mlp", H(m0), ref.gated_mlp(x, fc1[1], fc2[1], None), 2e-5)


# ---- sinkhorn -----------------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["blackmamba", "uniform"])
@pytest.mark.parametrize("T,X,scale", [(1, 1, 1.0), (7, 3, 1.0), (512, 8, 3.0), (20000, 8, 1.0),
                                       (300, 64, 0.5), (513, 8, 1.0), (4096, 8, 3.0),
                                       (16384, 8, 3.0), (2048, 64, 2.0), (1500, 13, 1.0),
                                       (60000, 8, 1.0), (9000, 33, 1.0)])
def test_sinkhorn(T, X, scale, init):
    # sums in float64 in the kernel (SPEC 3.2): equal iteration counts, P to float32 rounding.
    # The kernel cuts the rows over a cluster of up to 8 blocks (513 rows: 2 blocks; 4096 x 8
    # and up: 8), C in shared memory padded to 8, 16, 32 or 64 columns (X = 13: 16), or in
    # global memory when a block's rows do not fit (60000 x 8, 9000 x 33).
    rng = rng_for("sinkhorn", T, X, scale, init)
    S = f32(rng, T, X, scale=scale)
    P, it = ops.sinkhorn(D(S), init=init)
    Pr, itr = ref.sinkhorn(S, init=init)
    assert isinstance(it, int) and it == itr
    check("sinkhorn", H(P), Pr, TOL_F32)


@pytest.mark.parametrize("init,out_key,it_key", [("blackmamba", "sinkhorn_out", "sinkhorn_iters"),
                                                 ("uniform", "sinkhorn_uniform_out",
                                                  "sinkhorn_uniform_iters")])
def test_sinkhorn_golden(golden, init, out_key, it_key):
    P, it = ops.sinkhorn(D(golden["sinkhorn_cost"]), init=init)
    assert it == int(golden[it_key])
    want = golden[out_key].astype(np.float64)
    assert np.abs(H(P) - want).max() / np.abs(want).max() < 2e-6
    np.testing.assert_array_equal(H(P).argmax(1), want.argmax(1))


# ---- DeviceArray ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dt", [np.float32, np.float64, np.float16, np.int8, np.int16, np.int32,
                                np.int64, np.uint8, np.uint16, np.uint32, np.uint64, np.bool_])
def test_device_array_round_trip(dt):
    rng = rng_for("rt", np.dtype(dt).str)
    a = (rng.standard_normal((3, 5, 7)) * 50).astype(dt)
    d = D(a)
    assert d.dtype == np.dtype(dt) and d.shape == a.shape and d.ndim == 3 and d.size == a.size
    assert d.nbytes == a.nbytes and d.ptr != 0 and d.base is None
    np.testing.assert_array_equal(d.numpy(), a)
    c = d.copy()
    assert c.ptr != d.ptr
    np.testing.assert_array_equal(c.numpy(), a)


def test_device_array_shapes_and_views():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    d = D(a[:, ::2, ::-1])                       # a non-contiguous host array: copied compactly
    np.testing.assert_array_equal(d.numpy(), a[:, ::2, ::-1])
    s = D(np.float32(3.5))
    assert s.shape == () and s.size == 1 and s.numpy() == np.float32(3.5)
    e = D(np.zeros((0, 5), np.float32))
    assert e.ptr == 0 and e.size == 0 and e.numpy().shape == (0, 5)
    assert e.__cuda_array_interface__["data"] == (0, False)
    v = D(a).reshape(4, -1)
    np.testing.assert_array_equal(v.numpy(), a.reshape(4, 6))
    assert D(a, dtype=np.float64).numpy().dtype == np.float64
    w = cuda.empty((3, 4), "int32")
    assert w.shape == (3, 4) and w.dtype == np.int32
    with pytest.raises(TypeError, match="numpy"):
        np.asarray(D(a))
    cai = D(a).__cuda_array_interface__
    assert cai["version"] == 3 and cai["stream"] == 1 and cai["strides"] is None
    assert cai["typestr"] == "<f4" and cai["shape"] == (2, 3, 4)
    # results outlive their inputs
    x = D(a)
    out, _ = ops.rms_norm(x, D(np.ones(4, np.float32)))
    del x
    gc.collect()
    cuda.synchronize()
    assert rel_err(out.numpy(), ref.rms_norm(a, np.ones(4))[0]) < TOL_F32


def test_allocator_modes():
    mode = C.cuda_allocator()
    assert mode in ("async", "sync")
    rng = rng_for("alloc")
    x, w = f32(rng, 50, 64), f32(rng, 64)
    want = ref.rms_norm(x, w)[0]
    try:
        for m in ("sync", "async"):
            assert C.cuda_allocator(m) == m or m == "async"   # async falls back without pools
            out, _ = ops.rms_norm(D(x), D(w))
            assert rel_err(out.numpy(), want) < TOL_F32
    finally:
        C.cuda_allocator(mode)


# ---- errors ----------------------------------------------------------------------------------------

def test_out_of_memory_is_memory_error_and_process_stays_usable():
    free, total = cuda.mem_info()
    assert 0 < free <= total
    with pytest.raises(MemoryError, match=r"cannot allocate 10000000000000 bytes .* free of"):
        cuda.empty((10 ** 13,), "uint8")
    # an op whose output cannot be allocated: a (fake) 4 TB input over a real small buffer
    # (never read: the allocation of the output fails before any launch)
    small = D(np.ones(16, np.float32))

    class Huge:
        __cuda_array_interface__ = {"shape": (2 ** 26, 2 ** 14), "typestr": "<f4",
                                    "data": (small.ptr, False), "version": 3}
    with pytest.raises(MemoryError, match=r"rms_norm: out of GPU memory: cannot allocate 4398046511104 bytes"):
        ops.rms_norm(Huge(), D(np.ones(2 ** 14, np.float32)))
    x = np.ones((4, 8), np.float32)
    out, _ = ops.rms_norm(D(x), D(np.ones(8, np.float32)))
    np.testing.assert_allclose(out.numpy(), np.ones((4, 8)), rtol=1e-5)


def test_launcher_error_is_runtime_error_and_process_stays_usable():
    # conv kernels index the batch on grid.z (<= 65535): refused by the launcher, not here
    x = D(np.zeros((65536, 1, 1), np.float32))
    with pytest.raises(RuntimeError, match=r"causal_conv1d: CUDA launcher failed .*size too large"):
        ops.causal_conv1d(x, D(np.ones((1, 4), np.float32)))
    y, _ = ops.causal_conv1d(D(np.ones((2, 3, 1), np.float32)), D(np.ones((1, 4), np.float32)),
                             activation=None)
    np.testing.assert_array_equal(y.numpy()[:, :, 0], [[1, 2, 3], [1, 2, 3]])
    cuda.synchronize()


def test_mixing_host_and_device_is_type_error():
    x, w = np.ones((3, 8), np.float32), np.ones(8, np.float32)
    with pytest.raises(TypeError, match="weight is a host array .*mixing host and device"):
        ops.rms_norm(D(x), w)
    with pytest.raises(TypeError, match="x is a host array"):
        ops.rms_norm(x, D(w))
    with pytest.raises(TypeError, match="residual is a host array"):
        ops.rms_norm(D(x), D(w), residual=x)


def test_threads_share_the_device():
    rng = rng_for("threads")
    X, d, F, T = 4, 48, 32, 200
    jobs = []
    for i in range(6):
        x, W = f32(rng, 100, 96), f32(rng, 80, 96)
        ids = rng.integers(0, X, T)
        xe, fc1, fc2 = f32(rng, T, d), f32(rng, X, 2 * F, d, scale=0.3), f32(rng, X, d, F, scale=0.3)
        jobs.append(((x, W), (xe, ids, fc1, fc2)))
    results, errors = [None] * len(jobs), []

    def work(i):
        try:
            (x, W), (xe, ids, fc1, fc2) = jobs[i]
            for _ in range(5):
                y = ops.linear(D(x), D(W))
                o = ops.moe_experts(D(xe), D(ids), None, D(fc1), D(fc2))
            results[i] = (y.numpy(), o.numpy())
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    for ((x, W), (xe, ids, fc1, fc2)), (y, o) in zip(jobs, results):
        assert rel_err(y, ref.linear(x, W)) < TOL_F32
        assert rel_err(o, ref.moe_experts(xe, ids, None, fc1, fc2)) < 2e-5


def test_memory_flat_over_many_calls():
    rng = rng_for("mem")
    x, w, r = D(f32(rng, 64, 512)), D(f32(rng, 512)), D(f32(rng, 64, 512))
    nref = sys.getrefcount(x)
    for _ in range(20):
        ops.rms_norm(x, w, r)
        ops.linear(x, D(f32(rng, 16, 512)))
    cuda.synchronize()
    free0 = cuda.mem_info()[0]
    for _ in range(500):
        out, rout = ops.rms_norm(x, w, r)
        ops.linear(x, D(f32(rng, 16, 512)))
    del out, rout
    gc.collect()
    cuda.synchronize()
    assert sys.getrefcount(x) == nref
    assert cuda.mem_info()[0] > free0 - (64 << 20)


# ---- interop: CuPy ---------------------------------------------------------------------------------

class DLOnly:
    """Exposes only the DLPack protocol of `a` (forces our DLPack import path)."""

    def __init__(self, a):
        self.a = a

    def __dlpack__(self, stream=None, **kw):
        return self.a.__dlpack__(stream=stream)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


def test_cupy_in_and_out():
    cp = pytest.importorskip("cupy")
    rng = rng_for("cupy")
    xh, wh, rh = f32(rng, 6, 33), f32(rng, 33), f32(rng, 6, 33)
    o_ref, r_ref = ref.rms_norm(xh, wh, rh)
    x, w, r = cp.asarray(xh), cp.asarray(wh), cp.asarray(rh)
    nx = sys.getrefcount(x)
    out, rout = ops.rms_norm(x, w, r)                          # in through CAI
    assert isinstance(out, DA) and rel_err(out.numpy(), o_ref) < TOL_F32
    out2, _ = ops.rms_norm(DLOnly(x), DLOnly(w), DLOnly(r))     # in through DLPack
    assert rel_err(out2.numpy(), o_ref) < TOL_F32
    gc.collect()
    assert sys.getrefcount(x) == nx
    c = cp.asarray(out)                                         # out through CAI: no copy
    assert c.data.ptr == out.ptr and c.dtype == cp.float32 and c.shape == (6, 33)
    c2 = cp.from_dlpack(rout)                                   # out through DLPack: no copy
    assert c2.data.ptr == rout.ptr
    del out, rout
    gc.collect()
    cp.cuda.runtime.deviceSynchronize()
    assert rel_err(cp.asnumpy(c), o_ref) < TOL_F32              # views keep the memory alive
    assert rel_err(cp.asnumpy(c2), r_ref) < 1e-6
    # cupy work on our result, then our op on cupy's result, no syncs in between
    y = ops.linear(cp.asarray(xh) * 2, D(f32(rng, 5, 33)))
    z = cp.asarray(y) + 1
    z2 = ops.linear(z, cp.ones((4, 5), cp.float32))
    np.testing.assert_allclose(z2.numpy(), np.repeat(cp.asnumpy(z).sum(1, keepdims=True), 4, 1),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="non-contiguous"):
        ops.rms_norm(cp.asarray(xh).T, w[:6])
    with pytest.raises(ValueError, match="non-contiguous"):
        ops.rms_norm(DLOnly(cp.asarray(f32(rng, 6, 66))[:, ::2]), w)


# ---- interop: PyTorch -------------------------------------------------------------------------------

def test_torch_in_and_out():
    torch = pytest.importorskip("torch")
    rng = rng_for("torch")
    xh, Wh, bh = f32(rng, 20, 64), f32(rng, 48, 64), f32(rng, 48)
    want = ref.linear(xh, Wh, bh)
    x, W, b = (torch.from_numpy(a).cuda() for a in (xh, Wh, bh))
    y = ops.linear(x, W, b)                                      # CAI
    assert isinstance(y, DA) and rel_err(y.numpy(), want) < TOL_F32
    y2 = ops.linear(DLOnly(x), DLOnly(W), DLOnly(b))             # DLPack
    assert rel_err(y2.numpy(), want) < TOL_F32
    t = torch.from_dlpack(y)                                     # out through DLPack: no copy
    assert t.data_ptr() == y.ptr and t.dtype == torch.float32 and t.is_cuda
    t2 = torch.as_tensor(y2, device="cuda")                      # out through CAI: no copy
    assert t2.data_ptr() == y2.ptr
    del y, y2
    gc.collect()
    torch.cuda.synchronize()
    assert rel_err(t.cpu().numpy(), want) < TOL_F32
    assert rel_err(t2.cpu().numpy(), want) < TOL_F32
    # bf16 weights straight from torch (DLPack kDLBfloat -> the uint16 bf16-bits convention)
    Wbf = W.to(torch.bfloat16)
    yb = ops.linear(x, DLOnly(Wbf), b)
    Wbits = Wbf.view(torch.int16).cpu().numpy().view(np.uint16)
    assert rel_err(yb.numpy(), ref.linear(xh, Wbits, bh)) < TOL_F32
    # torch work on our output feeding our op again, on the default stream
    z = torch.relu(torch.from_dlpack(ops.linear(x, W)))
    out, _ = ops.rms_norm(z, torch.ones(48, device="cuda"))
    zr = np.maximum(ref.linear(xh, Wh), 0)
    assert rel_err(out.numpy(), ref.rms_norm(zr, np.ones(48))[0]) < TOL_F32
    with pytest.raises(ValueError, match="non-contiguous"):
        ops.linear(x[:, ::2], W[:, :32])
    with pytest.raises(ValueError, match="non-contiguous"):
        ops.linear(DLOnly(x.t()), W[:, :20])
    with pytest.raises(TypeError, match="host array"):
        ops.linear(x, W.cpu())
