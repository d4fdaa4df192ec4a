"""ops.linear (csrc/gemm.c) and the bf16 conversions against blackmamba.ref in float64.

linear has two paths: the streaming GEMV (few rows: M <= 16 for bf16, <= 8 for fp32) and,
for more rows, one single-threaded OpenBLAS sgemm per thread on its block of output columns
(or of rows, when there are few columns), bf16 weights widened to float32 panel by panel
first. The GEMV and the conversions have AVX-512, AVX2+FMA and portable C kernels;
BLACKMAMBA_NO_AVX512=1 and BLACKMAMBA_NO_AVX2=1 (read at every call) step down a level, so all
three are tested in one process (the `path` fixture, from conftest.simd).
"""
import numpy as np
import pytest

from blackmamba import ops, ref

from conftest import rel_err, use_simd_level

# Relative L2 tolerance for linear against float64 on the same (bf16-rounded) weights: only
# the float32 accumulation differs. Each output sums Kin products with blocked/partial sums;
# its rounding error grows like sqrt(Kin) * 2^-24 (~4e-6 at Kin = 3872 for a plain running
# sum, far less with partial sums; measured worst case ~1.2e-6). 1e-5 still fails any
# bf16-rounded activation (2^-9 ~ 2e-3) or any wrong/missing term.
TOL = 1e-5

KINS = [1, 7, 33, 1472 + 5, 3872]
NOUTS = [1, 3, 17, 300]
MS = [1, 2, 3, 5, 8, 9, 16, 17, 64]   # 8/9 and 16/17 straddle the GEMV -> sgemm switches


@pytest.fixture
def path(simd):
    """Each test taking `path` runs at the three SIMD levels (conftest.simd)."""
    return simd


def _case(seed, M, Nout, Kin, dtype, bias):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, Kin), dtype=np.float32)
    w = rng.standard_normal((Nout, Kin), dtype=np.float32)
    if dtype == "bf16":
        w = ref.f32_to_bf16(w)
    b = rng.standard_normal(Nout, dtype=np.float32) if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("Kin", KINS)
def test_linear_matches_ref(path, dtype, Kin):
    seed = 1000 * Kin + (dtype == "bf16")
    for i, M in enumerate(MS):
        for j, Nout in enumerate(NOUTS):
            bias = (i + j) % 2 == 1          # each M and each Nout seen with and without
            seed += 1
            x, w, b = _case(seed, M, Nout, Kin, dtype, bias)
            y = ops.linear(x, w, b)
            assert y.shape == (M, Nout) and y.dtype == np.float32
            err = rel_err(y, ref.linear(x, w, b))
            assert err < TOL, (M, Nout, Kin, dtype, bias, err)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_linear_leading_dims(path, dtype):
    # x (b, L, Kin) is T = b*L rows; 2*3 = 6 rows takes the GEMV, 4*5 = 20 the sgemm path
    for seed, lead in enumerate([(2, 3), (4, 5), (1, 1, 1)]):
        x, w, b = _case(seed, int(np.prod(lead)), 40, 129, dtype, True)
        x = x.reshape(*lead, 129)
        y = ops.linear(x, w, b)
        assert y.shape == (*lead, 40)
        assert rel_err(y, ref.linear(x, w, b)) < TOL


@pytest.mark.parametrize("Nout", [64, 130])
def test_bf16_many_panels(Nout):
    # Kin = 70001: a thread's 8 MiB float32 panel holds 29 rows. Nout = 130 splits columns
    # across 2 threads (65 rows each: panels of 29, 29, 7); Nout = 64 is too few columns to
    # split, so the rows of x are split and each thread walks all 64 rows (29, 29, 6).
    # M = 20 takes the sgemm path.
    x, w, b = _case(Nout, 20, Nout, 70001, "bf16", True)
    assert rel_err(ops.linear(x, w, b), ref.linear(x, w, b)) < TOL


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_linear_gemm_thread_splits(dtype, threads):
    # the sgemm path's split: by columns (Nout >= 64 * threads) or by rows of x, with thread
    # counts that do not divide the sizes
    n0 = ops.get_num_threads()
    try:
        ops.set_num_threads(threads)
        for seed, (M, Nout, Kin) in enumerate([(13, 200, 77), (50, 7, 300), (31, 129, 33)]):
            x, w, b = _case(seed, M, Nout, Kin, dtype, True)
            assert rel_err(ops.linear(x, w, b), ref.linear(x, w, b)) < TOL, (M, Nout, Kin)
    finally:
        ops.set_num_threads(n0)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_linear_threads_bitwise(path, dtype):
    # GEMV rows are split across threads whole, so the thread count must not change a bit
    x, w, b = _case(11, 3, 301, 1477, dtype, True)
    n0 = ops.get_num_threads()
    try:
        ops.set_num_threads(1)
        y1 = ops.linear(x, w, b)
        ops.set_num_threads(2)
        y2 = ops.linear(x, w, b)
    finally:
        ops.set_num_threads(n0)
    np.testing.assert_array_equal(y1, y2)
    assert rel_err(y1, ref.linear(x, w, b)) < TOL


@pytest.mark.parametrize("M", [1, 40])
def test_linear_bf16_equals_widened(path, M):
    # bf16 weights must give what the same weights widened to float32 give (same kernel
    # family, same summation order up to BLAS blocking)
    x, w, b = _case(5, M, 50, 333, "bf16", False)
    y16 = ops.linear(x, w)
    y32 = ops.linear(x, ops.bf16_to_f32(w))
    assert rel_err(y16, y32) < TOL


def _portable_gemv_order(x, w):
    """The portable GEMV's documented float32 summation order (csrc/gemm.c, GEMV_LANES = 16),
    emulated in NumPy: lane j sums the products k = j (mod 16) in increasing k, then the lanes
    are halved pairwise (acc[j] += acc[j + h], h = 8, 4, 2, 1). x (M, Kin); w (Nout, Kin)."""
    w = ref.bf16_to_f32(w) if w.dtype == np.uint16 else w
    M, Kin = x.shape
    acc = np.zeros((M, w.shape[0], 16), np.float32)
    for k in range(Kin):
        acc[:, :, k % 16] += (w[None, :, k] * x[:, None, k]).astype(np.float32)
    for h in (8, 4, 2, 1):
        acc[:, :, :h] += acc[:, :, h:2 * h]
    return acc[:, :, 0]


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_linear_portable_gemv_order(dtype, monkeypatch):
    # The portable GEMV sums in one fixed, documented order, the same for every row whatever
    # M (rows are grouped 1 to 4 per weight pass, each keeping its own partial sums): bit for
    # bit equal to the NumPy emulation, for every M of the GEMV path, Kin with a tail.
    use_simd_level(monkeypatch, "portable")
    for M in (1, 2, 3, 4, 5, 7, 8) + ((16,) if dtype == "bf16" else ()):
        x, w, _ = _case(20 + M, M, 9, 16 * 5 + 11, dtype, False)
        y = ops.linear(x, w)
        np.testing.assert_array_equal(y, _portable_gemv_order(x, w), err_msg=f"M={M}")


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_linear_empty(path, dtype):
    x, w, b = _case(3, 4, 5, 6, dtype, True)
    # M = 0: empty output of the right shape
    y = ops.linear(x[:0], w, b)
    assert y.shape == (0, 5)
    # Nout = 0
    y = ops.linear(x, w[:0], b[:0])
    assert y.shape == (4, 0)
    # Kin = 0: the empty sum, so y = bias (or zeros)
    y = ops.linear(np.zeros((4, 0), np.float32), np.zeros((5, 0), w.dtype), b)
    np.testing.assert_array_equal(y, np.broadcast_to(b, (4, 5)))
    y = ops.linear(np.zeros((4, 0), np.float32), np.zeros((5, 0), w.dtype))
    np.testing.assert_array_equal(y, np.zeros((4, 5), np.float32))


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("M", [1, 5, 40])
def test_linear_nonfinite_propagates(path, dtype, M):
    x, w, b = _case(9, M, 37, 100, dtype, True)
    x[0, 50] = np.nan
    y = ops.linear(x, w, b)
    assert np.isnan(y[0]).all()                  # every output of that row sees the NaN
    assert np.isfinite(y[1:]).all()
    x[0, 50] = np.inf
    w_inf = w.copy()
    w_inf[3, :] = ref.f32_to_bf16(np.zeros(100, np.float32)) if dtype == "bf16" else 0.0
    y = ops.linear(x, w_inf, b)
    assert np.isnan(y[0, 3])                     # inf * 0 = NaN
    assert np.isinf(np.delete(y[0], 3)).all()


def test_linear_inputs_unmodified():
    x, w, b = _case(4, 3, 17, 33, "bf16", True)
    copies = [a.copy() for a in (x, w, b)]
    ops.linear(x, w, b)
    for a, c in zip((x, w, b), copies):
        np.testing.assert_array_equal(a, c)


def test_linear_bad_inputs():
    x, w, b = _case(2, 2, 3, 4, "f32", True)
    with pytest.raises(TypeError):
        ops.linear(x.astype(np.float64), w, b)
    with pytest.raises(TypeError):
        ops.linear(x, w.astype(np.int32), b)
    with pytest.raises(TypeError):
        ops.linear(x, w, b.astype(np.float16))
    with pytest.raises(ValueError, match="weight"):
        ops.linear(x, w[:, :3], b)
    with pytest.raises(ValueError, match="bias"):
        ops.linear(x, w, b[:2])
    with pytest.raises(ValueError):
        ops.linear(x, w[0], b)


# ---- bf16 conversions -------------------------------------------------------------------

def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


SPECIALS = np.array([
    0x00000000, 0x80000000,                  # +-0
    0x00000001, 0x00007fff, 0x00008000,      # denormals: below, at the rounding tie
    0x00018000, 0x007fffff, 0x807fffff,      # tie rounding to odd -> even; largest denormal
    0x3f808000, 0x3f818000, 0x3f808001,      # ties to even (down, up) and just above a tie
    0x3f80ffff, 0x7f7fffff, 0xff7fffff,      # rounds up a binade; float max -> +-inf
    0x7f7f7fff,                              # largest value that still rounds to finite
    0x7f800000, 0xff800000,                  # +-inf
    0x7fc00000, 0xffc00000, 0x7f800001,      # quiet NaNs and a NaN with only low payload
    0x7fbfffff, 0xff800001, 0x7fff8000,      # signalling NaNs (must stay NaN, not inf)
], dtype=np.uint32).view(np.float32)


def test_f32_to_bf16_specials(path):
    got = ops.f32_to_bf16(SPECIALS)
    np.testing.assert_array_equal(got, ref.f32_to_bf16(SPECIALS))
    back = ops.bf16_to_f32(got)
    assert np.array_equal(np.isnan(back), np.isnan(SPECIALS))
    expect = {0x3f808000: 0x3f80, 0x3f818000: 0x3f82, 0x3f808001: 0x3f81,
              0x7f7fffff: 0x7f80, 0x00008000: 0x0000, 0x00018000: 0x0002, 0x7f7f7fff: 0x7f7f}
    for u, h in expect.items():
        i = int(np.nonzero(_bits(SPECIALS) == u)[0][0])
        assert got[i] == h, hex(u)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_f32_to_bf16_random(path, seed):
    rng = np.random.default_rng(seed)
    # every bit pattern class: random uint32 covers denormals, NaNs and infs too
    # 600_001: three threads' chunks of 2**18 and a tail that is no multiple of 16
    a = rng.integers(0, 2**32, size=600_001, dtype=np.uint32).view(np.float32)
    b = (rng.standard_normal((7, 33)) * 10.0 ** rng.integers(-40, 39, (7, 33))).astype(np.float32)
    for v in (a, b):
        got = ops.f32_to_bf16(v)
        assert got.shape == v.shape and got.dtype == np.uint16
        np.testing.assert_array_equal(got, ref.f32_to_bf16(v))
        np.testing.assert_array_equal(_bits(ops.bf16_to_f32(got)), _bits(ref.bf16_to_f32(got)))


def test_bf16_to_f32_all_patterns(path):
    h = np.arange(2**16, dtype=np.uint16).reshape(256, 256)
    got = ops.bf16_to_f32(h)
    assert got.shape == h.shape and got.dtype == np.float32
    np.testing.assert_array_equal(_bits(got), _bits(ref.bf16_to_f32(h)))
    # and back: every non-NaN bf16 value is exactly representable, so the round trip is exact
    keep = ~np.isnan(got)
    np.testing.assert_array_equal(ops.f32_to_bf16(got)[keep], h[keep])


def test_bf16_conversion_bad_inputs():
    with pytest.raises(TypeError):
        ops.f32_to_bf16(np.zeros(3, np.float64))
    with pytest.raises(TypeError):
        ops.bf16_to_f32(np.zeros(3, np.int16))
