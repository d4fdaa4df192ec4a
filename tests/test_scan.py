"""Selective scan (csrc/scan.c) against the float64 reference (blackmamba/ref.py), on the
AVX-512, the AVX2+FMA and the portable C path (BLACKMAMBA_NO_AVX512=1 and
BLACKMAMBA_NO_AVX2=1 step down a level at run time; the `path` fixture runs all three).
The AVX2 path is the AVX-512 code in 8 lanes and must give its results bit for bit.

Tolerance TOL = 1e-5, normwise (‖got - ref‖ / ‖ref‖) and as max |got - ref| / max |ref|.
The kernel computes in float32 from the same float32 inputs as the reference, so only float32
rounding differs: each step rounds exp(dt A) (~1.5 ulp for the polynomial with FMA, a little
more on the portable path, which evaluates the same polynomial without FMA), the update and the
sum over N; the recurrence is a contraction (|exp(dt A)| <= 1), so these errors do not grow
beyond the state's memory. Measured: up to 2e-6 on the realistic long-memory cases (dt ~ 0.01,
A = -1: exp(dt A) ~ 0.99, ~100 tokens of memory), ~1e-7 to 5e-7 elsewhere, on every path (the
portable path 1.0-1.3x the AVX-512 path's error on the cases of test_scan_realistic). 1e-5
leaves 5x headroom while a wrong term, channel or token (errors >= 1e-3) fails.
"""
import itertools

import numpy as np
import pytest

from blackmamba import ops, ref

from conftest import rel_err, use_simd_level

TOL = 1e-5

@pytest.fixture
def path(simd):
    """Run the test once on each code path (conftest.simd); cpu.c reads the variables at
    every call."""
    return simd


def make_inputs(seed, b, L, E, N, D=True, z=True, delta_bias=True, state=True,
                delta_softplus=True, realistic=False):
    """float32 inputs for selective_scan, as a kwargs dict."""
    rng = np.random.default_rng(seed)

    def f32(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    if realistic:
        # the released models: A_log = log(1..N) per channel; dt_proj.bias = softplus^-1 of
        # dt ~ logU(1e-3, 1e-1) (mamba_ssm's init); delta around dt_proj's output range
        A = -np.exp(np.log(np.arange(1, N + 1, dtype=np.float32)))[None].repeat(E, 0)
        dt0 = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), E))
        bias = (dt0 + np.log(-np.expm1(-dt0))).astype(np.float32)
        delta = f32(b, L, E)
    else:
        A = -np.exp(f32(E, N))                      # |A| from e^-3 to e^3
        bias = f32(E, scale=0.5)
        delta = f32(b, L, E)
    if not delta_softplus:
        # delta is used as dt as is: keep it positive like a softplus output, or the state
        # grows as exp(|dt A|) per token and overflows float32
        delta = np.log1p(np.exp(delta)).astype(np.float32)
        bias = np.abs(bias) * 0.1
    kw = dict(u=f32(b, L, E), delta=delta, A=A.astype(np.float32), B=f32(b, L, N),
              C=f32(b, L, N), delta_softplus=delta_softplus)
    if D:
        kw["D"] = f32(E)
    if z:
        kw["z"] = f32(b, L, E)
    if delta_bias:
        kw["delta_bias"] = bias.astype(np.float32)
    if state:
        kw["state"] = f32(b, E, N)
    return kw


def assert_close(got, want, what, tol=TOL):
    assert got.dtype == np.float32 and got.shape == want.shape, what
    assert np.isfinite(got).all() == np.isfinite(want).all(), f"{what}: non-finite values"
    err = rel_err(got, want)
    assert err <= tol, f"{what}: normwise relative error {err:.2e} > {tol:.0e}"
    if want.size:
        worst = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
        assert worst <= tol, f"{what}: max abs error {worst:.2e} of max |ref| > {tol:.0e}"


def check_scan(kw, tol=TOL):
    y, h = ops.selective_scan(**kw)
    y_ref, h_ref = ref.selective_scan(**kw)
    assert_close(y, y_ref, "y", tol)
    assert_close(h, h_ref, "final state", tol)
    return y, h


# (b, L, E, N): every L in {1, 2, 37, 300}, N in {1, 4, 16, 64}, E in {1, 7, 33, 64, 2947}
# (2947 = 2944 + 3: the 2.8B model's d_inner plus a masked tail), b in {1, 3}
SHAPES = [
    (1, 1, 1, 1), (1, 2, 7, 4), (3, 37, 33, 16), (1, 300, 64, 16), (3, 19, 2947, 16),
    (1, 300, 7, 64), (3, 2, 64, 64), (1, 37, 33, 1), (3, 300, 33, 4), (1, 1, 2947, 64),
    (3, 1, 33, 16), (1, 37, 64, 15),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b%d-L%d-E%d-N%d" % s)
def test_scan_matches_ref(path, shape, seed):
    check_scan(make_inputs(seed, *shape))


@pytest.mark.parametrize("shape", [(1, 300, 2947, 16), (3, 37, 64, 64), (2, 37, 33, 4)],
                         ids=lambda s: "b%d-L%d-E%d-N%d" % s)
def test_scan_realistic(path, shape):
    check_scan(make_inputs(10, *shape, realistic=True))


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=5)),
                         ids=lambda f: "".join("DZBSP"[i] if on else "-" for i, on in enumerate(f)))
def test_scan_optional_arguments(path, flags):
    D, z, bias, state, softplus = flags
    seed = int("".join("1" if f else "0" for f in flags), 2)
    for shape in [(2, 37, 33, 16), (1, 5, 7, 5)]:
        check_scan(make_inputs(seed, *shape, D=D, z=z, delta_bias=bias, state=state,
                               delta_softplus=softplus))


def test_scan_extreme_values(path):
    """softplus on both sides of its v > 20 switch and deep in the tail, dt A down to -1e5
    (exp underflows to exactly 0), silu at +-80, A = 0 (no decay)."""
    rng = np.random.default_rng(5)
    b, L, E, N = 2, 29, 37, 16
    kw = make_inputs(5, b, L, E, N)
    kw["delta"] = rng.choice([-90.0, -30.0, -5.0, 0.0, 19.99, 20.0, 20.01, 40.0],
                             (b, L, E)).astype(np.float32)
    kw["z"] = rng.choice([-80.0, -10.0, 0.0, 10.0, 80.0], (b, L, E)).astype(np.float32)
    kw["A"][:, 0] = -1e5
    kw["A"][:, 1] = 0.0
    kw["A"][:3, 2] = -1e30
    check_scan(kw)


# Elementwise accuracy of the three transcendental pieces, each isolated through the scan
# with N = 1, L = 1 and one test value per channel (bounds in float32 ulps, 1 ulp <= 1.2e-7):
#   exp(dt A):  state 1, u = 0        -> final state = exp(dt A)
#   softplus:   state 0, u = B = C = 1 -> y = dt = softplus(delta)
#   silu:       A = 0, state 1, C = 1 -> y = silu(z)
# exp's argument dt*A is itself rounded to float32 (and the AVX-512 path rounds A log2(e) once
# more), which costs |dt A| * 2^-24 relative per rounding even with an exact exp; on top of
# that 2 ulp for the polynomial. softplus and silu: 2.5 ulp (exp, a division, a final add).
def test_scan_elementwise_accuracy(path):
    rng = np.random.default_rng(15)
    E = 4000
    one, zero = np.ones((1, 1, 1), np.float32), np.zeros((1, 1, 1), np.float32)

    dt = np.exp(rng.uniform(np.log(1e-4), np.log(10), E)).astype(np.float32)
    A = -np.exp(rng.uniform(np.log(1e-3), np.log(30), (E, 1))).astype(np.float32)
    _, h = ops.selective_scan(np.zeros((1, 1, E), np.float32), dt[None, None], A, zero, zero,
                              delta_softplus=False, state=np.ones((1, E, 1), np.float32))
    x = dt.astype(np.float64) * A[:, 0]
    want = np.exp(x)
    normal = want > 1e-30
    rel = np.abs(h[0, :, 0] - want) / want
    assert (rel[normal] <= 2.5e-7 + 1.2e-7 * np.abs(x[normal])).all(), rel.max()
    assert (np.abs(h[0, :, 0] - want)[~normal] <= 1e-36).all()

    v = np.concatenate([np.linspace(-100, 40, 3001), 5 * rng.standard_normal(999)])
    v = v.astype(np.float32)
    y, _ = ops.selective_scan(np.ones((1, 1, E), np.float32), v[None, None],
                              -np.ones((E, 1), np.float32), one, one)
    want = ref.softplus(v)
    normal = want > 1e-30
    assert (np.abs(y[0, 0] - want)[normal] <= 3e-7 * want[normal]).all()
    assert (np.abs(y[0, 0] - want)[~normal] <= 1e-36).all()
    np.testing.assert_array_equal(y[0, 0][v > 20], v[v > 20])   # softplus(v) = v for v > 20

    zz = np.concatenate([np.linspace(-95, 95, 3001), 5 * rng.standard_normal(999)])
    zz = zz.astype(np.float32)
    y, _ = ops.selective_scan(np.zeros((1, 1, E), np.float32), np.ones((1, 1, E), np.float32),
                              np.zeros((E, 1), np.float32), zero, one, z=zz[None, None],
                              delta_softplus=False, state=np.ones((1, E, 1), np.float32))
    want = ref.silu(zz)
    normal = np.abs(want) > 1e-30
    assert (np.abs(y[0, 0] - want)[normal] <= 3e-7 * np.abs(want[normal])).all()
    assert (np.abs(y[0, 0] - want)[~normal] <= 1e-36).all()


def test_scan_nan_stays_in_its_channel(path):
    kw = make_inputs(6, 1, 9, 40, 16)
    kw["u"][0, 3, 17] = np.nan
    y, h = ops.selective_scan(**kw)
    assert np.isnan(y[0, 3:, 17]).all() and np.isnan(h[0, 17]).all()
    y[0, 3:, 17] = 0
    kw["u"][0, 3, 17] = 0
    y0, _ = ops.selective_scan(**kw)
    y0[0, 3:, 17] = 0
    np.testing.assert_array_equal(y, y0)


@pytest.mark.parametrize("shape", [(1, 300, 2947, 16), (2, 37, 33, 64), (3, 20, 7, 1)],
                         ids=lambda s: "b%d-L%d-E%d-N%d" % s)
def test_scan_paths_agree(shape, monkeypatch):
    kw = make_inputs(7, *shape, realistic=True)
    use_simd_level(monkeypatch, "avx512")
    y_v, h_v = ops.selective_scan(**kw)
    use_simd_level(monkeypatch, "portable")
    y_s, h_s = ops.selective_scan(**kw)
    # both are within TOL of float64; against each other the same float32 rounding bound holds
    assert_close(y_v, y_s.astype(np.float64), "y avx512 vs scalar")
    assert_close(h_v, h_s.astype(np.float64), "state avx512 vs scalar")
    assert not np.array_equal(y_v, y_s)  # the dispatch really switched paths


def extreme_inputs(seed, b, L, E, N):
    """Inputs at the edges of every transcendental: softplus on both sides of its v > 20
    switch and deep in the tail, dt A down to -1e30 (exp underflows through the denormals to
    0), silu at +-80 and beyond exp's clamp, A = 0 (no decay), and a NaN."""
    rng = np.random.default_rng(seed)
    kw = make_inputs(seed, b, L, E, N)
    kw["delta"] = rng.choice([-200.0, -90.0, -30.0, -5.0, 0.0, 0.3, 19.99, 20.0, 20.01, 40.0],
                             (b, L, E)).astype(np.float32)
    kw["z"] = rng.choice([-200.0, -80.0, -10.0, 0.0, 10.0, 80.0, 200.0],
                         (b, L, E)).astype(np.float32)
    kw["A"][:, 0] = -1e5
    kw["A"][:, -1] = 0.0
    kw["A"][: E // 2, N // 2] = -1e30
    kw["A"][E // 2:, N // 2] = -60.0   # dt A * log2 e near -126..-149: denormal exp
    kw["u"][0, L // 2, E // 3] = np.nan
    return kw


@pytest.mark.parametrize("shape", [(1, 30, 2947, 16), (2, 37, 33, 64), (3, 20, 7, 1),
                                   (2, 9, 13, 5)], ids=lambda s: "b%d-L%d-E%d-N%d" % s)
def test_scan_extreme_matches_ref(path, shape):
    """extreme_inputs against float64, prefill and step: the NaN stays in its channel from its
    token on (the same positions as the reference), everything else within TOL."""
    kw = extreme_inputs(4, *shape)
    y, h = ops.selective_scan(**kw)
    y_ref, h_ref = ref.selective_scan(**kw)
    step = {k: v[:, 0] if k in ("u", "delta", "B", "C", "z") else v for k, v in kw.items()}
    state = step.pop("state").copy()
    x = step.pop("u")
    ys_ref, hs_ref = ref.selective_state_update(state, x, **step)
    ys = ops.selective_state_update(state, x, **step)
    for got, want, what in ((y, y_ref, "y"), (h, h_ref, "state"), (ys, ys_ref, "step y"),
                            (state, hs_ref, "step state")):
        nan = np.isnan(want)
        np.testing.assert_array_equal(np.isnan(got), nan, err_msg=what)
        assert_close(np.where(nan, 0, got), np.where(nan, 0, want), what)
    assert np.isnan(y).any()


def test_scan_transcendentals_full_range(path):
    """exp(dt A), softplus and silu (isolated as in test_scan_elementwise_accuracy) over their
    whole float32 range: denormal and zero exps, overflow to inf, +-inf and NaN arguments, the
    softplus switch and tail, silu's limits; against float64 on every level (the portable path
    has its own, non-FMA, rounding of the same polynomials)."""
    rng = np.random.default_rng(16)
    one, zero = np.ones((1, 1, 1), np.float32), np.zeros((1, 1, 1), np.float32)
    special = [np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-40, -1e-40]

    # exp(x), dt = 1 so x = A exactly: results from inf through the normals and the
    # denormals (x from -87.3 to -103.3) to 0
    x = np.concatenate([np.linspace(-110, 90, 4001), -np.exp(rng.uniform(-20, 80, 999)),
                        special]).astype(np.float32)
    E = x.size
    _, h = ops.selective_scan(np.zeros((1, 1, E), np.float32), np.ones((1, 1, E), np.float32),
                              x[:, None], zero, zero, delta_softplus=False,
                              state=np.ones((1, E, 1), np.float32))
    got, want = h[0, :, 0].astype(np.float64), np.exp(x.astype(np.float64))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    big = want > np.finfo(np.float32).max
    assert np.isinf(got[big]).all() and np.isfinite(got[~big & ~np.isnan(want)]).all()
    ok = ~big & ~np.isnan(want)
    xa = np.abs(x.astype(np.float64))
    tol = (2.5e-7 + 1.2e-7 * np.where(np.isinf(xa), 0, xa)) * want + 2.0 ** -149  # + 1 denormal ulp
    err = np.abs(got[ok] - want[ok])
    assert (err <= tol[ok]).all(), err.max()
    assert ((got > 0) & (got < 1.17e-38)).any() and (got[x < -104] == 0).all()

    # softplus(v): y = dt with u = B = C = 1, state 0
    v = np.concatenate([np.linspace(-200, 200, 4001), special]).astype(np.float32)
    E = v.size
    y, _ = ops.selective_scan(np.ones((1, 1, E), np.float32), v[None, None],
                              -np.ones((E, 1), np.float32), one, one)
    got, want = y[0, 0].astype(np.float64), ref.softplus(v)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got[np.isinf(want)], want[np.isinf(want)])
    ok = np.isfinite(want)
    assert (np.abs(got[ok] - want[ok]) <= 3e-7 * want[ok] + 1e-36).all()

    # silu(z): y = silu(z) with A = 0, state 1, C = 1
    z = np.concatenate([np.linspace(-200, 200, 4001), special]).astype(np.float32)
    E = z.size
    y, _ = ops.selective_scan(np.zeros((1, 1, E), np.float32), np.ones((1, 1, E), np.float32),
                              np.zeros((E, 1), np.float32), zero, one, z=z[None, None],
                              delta_softplus=False, state=np.ones((1, E, 1), np.float32))
    with np.errstate(invalid="ignore"):                         # -inf / inf
        want = ref.silu(z)
    got = y[0, 0].astype(np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))     # silu(-inf) = NaN
    np.testing.assert_array_equal(got[np.isinf(want)], want[np.isinf(want)])
    ok = np.isfinite(want)
    assert (np.abs(got[ok] - want[ok]) <= 3e-7 * np.abs(want[ok]) + 1e-36).all()


@pytest.mark.parametrize("shape", [(1, 300, 2947, 16), (2, 37, 33, 64), (3, 20, 7, 1),
                                   (2, 9, 13, 5), (1, 4, 8, 16)],
                         ids=lambda s: "b%d-L%d-E%d-N%d" % s)
@pytest.mark.parametrize("kind", ["realistic", "random", "extreme"])
def test_scan_avx2_equals_avx512(shape, kind, monkeypatch):
    """The AVX2 twin (8 lanes, 2^k in two exact factors instead of vscalefps) computes the same
    float32 operations as the AVX-512 path, so the results are identical, bit for bit, also
    for denormal, zero, infinite and NaN exps, for the prefill and for the step."""
    if kind == "extreme":
        kw = extreme_inputs(3, *shape)
    else:
        kw = make_inputs(3, *shape, realistic=kind == "realistic")
    step = {k: v[:, 0] if k in ("u", "delta", "B", "C", "z") else v for k, v in kw.items()}
    step["x"] = step.pop("u")
    out = {}
    for level in ("avx512", "avx2"):
        use_simd_level(monkeypatch, level)
        y, h = ops.selective_scan(**kw)
        st = step["state"].copy()
        ys = ops.selective_state_update(st, **{k: v for k, v in step.items() if k != "state"})
        out[level] = (y, h, ys, st)
    for a, b, what in zip(out["avx512"], out["avx2"], ("y", "state", "step y", "step state")):
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32), err_msg=what)


def test_scan_exp_avx2_equals_avx512(monkeypatch):
    """exp(dt A) alone (u = 0, state 1, one token: the final state is exp(dt A)), over the
    whole float32 range of its argument including the denormal results (dt A from -87.3 to
    -103.3) and the underflow to 0, bit for bit between the two vector paths; and softplus
    and silu alone (y = softplus(delta) with u = B = C = 1; y = silu(z) with A = 0)."""
    rng = np.random.default_rng(21)
    E = 5003
    x = np.concatenate([-np.linspace(0, 120, 4000), -np.exp(rng.uniform(-20, 80, 1003))])
    dt = np.exp(rng.uniform(-3, 3, E))
    A = (x / dt).astype(np.float32)[:, None]
    v = np.concatenate([np.linspace(-200, 200, 4000), 10 * rng.standard_normal(1003)])
    v = v.astype(np.float32)[None, None]
    one, zero = np.ones((1, 1, 1), np.float32), np.zeros((1, 1, 1), np.float32)
    out = {}
    for level in ("avx512", "avx2"):
        use_simd_level(monkeypatch, level)
        _, h = ops.selective_scan(np.zeros((1, 1, E), np.float32),
                                  dt.astype(np.float32)[None, None], A, zero, zero,
                                  delta_softplus=False, state=np.ones((1, E, 1), np.float32))
        sp, _ = ops.selective_scan(np.ones((1, 1, E), np.float32), v, -np.ones((E, 1), np.float32),
                                   one, one)
        si, _ = ops.selective_scan(np.zeros((1, 1, E), np.float32), np.ones((1, 1, E), np.float32),
                                   np.zeros((E, 1), np.float32), zero, one, z=v,
                                   delta_softplus=False, state=np.ones((1, E, 1), np.float32))
        out[level] = (h, sp, si)
    h = out["avx2"][0][0, :, 0]
    assert (h > 0).any() and (h == 0).any() and ((h > 0) & (h < 1.17e-38)).any()  # denormals
    for a, b, what in zip(out["avx512"], out["avx2"], ("exp", "softplus", "silu")):
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32), err_msg=what)


# Chaining and stepping are exact, not just close: the step is the scan kernel run on one
# token, each channel block walks its tokens in order with the state held in float32, and
# nothing depends on how the channels are split among threads. So the carried float32 state
# is bit for bit the state inside one long scan. (A chunked-parallel scan would break this;
# then compare at TOL instead.)
@pytest.mark.parametrize("shape", [(2, 37, 33, 16), (1, 20, 2947, 16), (3, 12, 7, 5)],
                         ids=lambda s: "b%d-L%d-E%d-N%d" % s)
def test_scan_state_chaining(path, shape):
    kw = make_inputs(8, *shape)
    y, h = ops.selective_scan(**kw)
    L = shape[1]
    for a in (1, L // 3, L - 1):
        first = {k: (v[:, :a] if k in ("u", "delta", "B", "C", "z") else v) for k, v in kw.items()}
        second = {k: (v[:, a:] if k in ("u", "delta", "B", "C", "z") else v) for k, v in kw.items()}
        y1, h1 = ops.selective_scan(**first)
        second["state"] = h1
        y2, h2 = ops.selective_scan(**second)
        np.testing.assert_array_equal(np.concatenate([y1, y2], axis=1), y)
        np.testing.assert_array_equal(h2, h)


@pytest.mark.parametrize("shape", [(2, 37, 33, 16), (1, 9, 2947, 16), (3, 11, 7, 64),
                                   (1, 4, 1, 1)], ids=lambda s: "b%d-L%d-E%d-N%d" % s)
def test_state_update_matches_scan(path, shape):
    kw = make_inputs(9, *shape)
    y, h = ops.selective_scan(**kw)
    state = kw["state"].copy()
    extra = {k: kw[k] for k in ("D", "delta_bias", "delta_softplus")}
    for t in range(shape[1]):
        yt = ops.selective_state_update(state, kw["u"][:, t], kw["delta"][:, t], kw["A"],
                                        kw["B"][:, t], kw["C"][:, t], z=kw["z"][:, t], **extra)
        np.testing.assert_array_equal(yt, y[:, t])
    np.testing.assert_array_equal(state, h)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("opts", [{}, {"D": False, "z": False, "delta_bias": False},
                                  {"delta_softplus": False}], ids=["all", "bare", "nosoftplus"])
def test_state_update_matches_ref(path, seed, opts):
    kw = make_inputs(seed, 3, 1, 33, 16, **opts)
    args = {k: (v[:, 0] if k in ("u", "delta", "B", "C", "z") else v) for k, v in kw.items()}
    state = args.pop("state")
    x = args.pop("u")
    y_ref, h_ref = ref.selective_state_update(state, x, **args)
    y = ops.selective_state_update(state, x, **args)
    assert_close(y, y_ref, "y")
    assert_close(state, h_ref, "updated state")


def test_inputs_unmodified(path):
    kw = make_inputs(11, 2, 37, 33, 16)
    saved = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    ops.selective_scan(**kw)
    for k, v in saved.items():
        np.testing.assert_array_equal(kw[k], v, err_msg=k)
    step = {k: (v[:, 0].copy() if k in ("u", "delta", "B", "C", "z") else v)
            for k, v in kw.items() if k != "state"}
    saved = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in step.items()}
    state = kw["state"].copy()
    x = step.pop("u")
    ops.selective_state_update(state, x, **step)
    np.testing.assert_array_equal(x, saved["u"])
    for k, v in step.items():
        np.testing.assert_array_equal(v, saved[k], err_msg=k)


def test_empty_sizes(path):
    kw = make_inputs(12, 2, 0, 7, 4)
    y, h = ops.selective_scan(**kw)
    assert y.shape == (2, 0, 7)
    np.testing.assert_array_equal(h, kw["state"])       # no tokens: the state passes through
    kw = make_inputs(12, 0, 5, 7, 4)
    y, h = ops.selective_scan(**kw)
    assert y.shape == (0, 5, 7) and h.shape == (0, 7, 4)
    kw = make_inputs(12, 2, 5, 0, 4)
    y, h = ops.selective_scan(**kw)
    assert y.shape == (2, 5, 0) and h.shape == (2, 0, 4)


def test_bad_inputs():
    kw = make_inputs(13, 2, 5, 7, 4)
    with pytest.raises(ValueError, match="B must have shape"):
        ops.selective_scan(**{**kw, "B": kw["B"][:, :, :3]})
    with pytest.raises(ValueError, match="state must have shape"):
        ops.selective_scan(**{**kw, "state": kw["state"][:1]})
    with pytest.raises(ValueError, match="A must have shape"):
        ops.selective_scan(**{**kw, "A": kw["A"][0]})
    with pytest.raises(TypeError, match="u must be float32"):
        ops.selective_scan(**{**kw, "u": kw["u"].astype(np.float64)})
    with pytest.raises(TypeError, match="delta_bias must be float32"):
        ops.selective_scan(**{**kw, "delta_bias": kw["delta_bias"].astype(np.float16)})
    state = kw["state"].copy()
    args = (kw["u"][:, 0], kw["delta"][:, 0], kw["A"], kw["B"][:, 0], kw["C"][:, 0])
    with pytest.raises(ValueError, match="x must have shape"):
        ops.selective_state_update(state, kw["u"][:, :2], *args[1:])
    with pytest.raises(ValueError, match="state"):    # updated in place: a copy would be lost
        ops.selective_state_update(state[:, ::-1], *args)
    with pytest.raises(TypeError, match="state must be float32"):
        ops.selective_state_update(state.astype(np.float64), *args)


@pytest.mark.slow
def test_scan_benchmark_shape(path):
    """The 2.8B model's shape at full context, b=1."""
    check_scan(make_inputs(14, 1, 2048, 2944, 16, realistic=True))
