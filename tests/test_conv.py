"""ops.causal_conv1d / ops.causal_conv1d_update (csrc/conv.c) against ref.py (float64).

Tolerance: |y - y_ref| <= CONV_RTOL * m + 1e-36 per element, m = |bias| + sum_k |w_k x_k| (the
magnitude of the pre-activation sum). Why: float32 sums K <= 8 products and the bias, each
rounding at most 2^-24 of m (<= 9 * 6e-8 = 5.4e-7 m); SiLU has slope <= 1.1 and adds its own
~2 ulp (exp polynomial, one division), <= 3e-7 m. Normalising by m rather than |y| keeps
cancellation (y near 0) from flagging correct results. The 1e-36 covers SiLU flushing outputs
below 1.1e-36 (inputs < -87.33) to zero.
"""
import numpy as np
import pytest

from blackmamba import ops, ref

from conftest import assert_levels_bitwise_equal

CONV_RTOL = 1e-6
SEEDS = (0, 1)


def _rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _check(y, x, w, bias, state, activation):
    """Compare y (b, L, E) with ref.causal_conv1d; returns the reference final state."""
    y_ref, fin_ref = ref.causal_conv1d(x, w, bias, state, activation)
    b, L, E = x.shape
    K = w.reshape(E, -1).shape[1]
    w64 = w.reshape(E, K).astype(np.float64)
    prev = np.zeros((b, K - 1, E)) if state is None else state.astype(np.float64)
    xp = np.concatenate([prev, x.astype(np.float64)], axis=1)
    m = sum(np.abs(w64[:, k] * xp[:, k:k + L]) for k in range(K))
    if bias is not None:
        m = m + np.abs(bias.astype(np.float64))
    assert y.shape == y_ref.shape and y.dtype == np.float32
    err = np.abs(y - y_ref)
    bound = CONV_RTOL * m + 1e-36
    assert np.all(err <= bound), f"max err/m {np.max(err / (m + 1e-30)):.3g}"
    return fin_ref


def _forward_cases(K, E, full):
    """(seed, L, b, has_bias, has_state, act) to run. The full product for small E; for the
    wide E (slow in float64) a quarter of it, which still meets every L, b and option (the
    full product runs under -m slow)."""
    combos = [(hb, hs, act) for hb in (0, 1) for hs in (0, 1) for act in (None, "silu")]
    cases = []
    for L in sorted({0, 1, 2, K - 2, K - 1, K, 50, 130}):     # 130: three row blocks of 64
        for seed in SEEDS:
            for b in (1, 3):
                for i, c in enumerate(combos):
                    if full or (seed == 0 and (i + L + b) % 4 == 0):
                        cases.append((seed, L, b) + c)
    return cases


def _run_forward(K, E, full):
    for seed, L, b, hb, hs, act in _forward_cases(K, E, full):
        rng = np.random.default_rng([seed, K, E, L, b, hb, hs, act is None])
        x = _rand(rng, b, L, E)
        w = _rand(rng, E, K)
        bias = _rand(rng, E) if hb else None
        state = _rand(rng, b, K - 1, E) if hs else None
        given = [a for a in (x, w, bias, state) if a is not None]
        copies = [a.copy() for a in given]
        y, fin = ops.causal_conv1d(x, w, bias, state, act)
        fin_ref = _check(y, x, w, bias, state, act)
        # the final state is made of copied inputs: exact
        assert fin.shape == (b, K - 1, E) and fin.dtype == np.float32
        np.testing.assert_array_equal(fin, fin_ref.astype(np.float32))
        for a, c in zip(given, copies):                       # inputs left unmodified
            np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("K", range(2, 9))
@pytest.mark.parametrize("E", (1, 7, 33, 2947))
def test_conv_forward_matches_ref(K, E, simd):
    _run_forward(K, E, full=E < 1000)


@pytest.mark.slow
@pytest.mark.parametrize("K", range(2, 9))
def test_conv_forward_matches_ref_wide_full(K, simd):
    _run_forward(K, 2947, full=True)


def test_final_state_short_sequences():
    """L < K-1: the new state is the tail of the old one followed by x, in time order."""
    K, E, b = 6, 3, 2
    rng = np.random.default_rng(7)
    w = _rand(rng, E, K)
    state = _rand(rng, b, K - 1, E)
    for L in range(0, K + 1):
        x = _rand(rng, b, L, E)
        _, fin = ops.causal_conv1d(x, w, None, state)
        np.testing.assert_array_equal(fin, np.concatenate([state, x], axis=1)[:, L:L + K - 1])
        _, fin0 = ops.causal_conv1d(x, w)        # no state: zeros before x
        want = np.concatenate([np.zeros((b, K - 1, E), np.float32), x], axis=1)[:, L:]
        np.testing.assert_array_equal(fin0, want)


def test_silu_values(simd):
    """SiLU through the conv with weight (0, 1): y = silu(x), including the edges of exp."""
    v = np.array([-1e4, -100, -88, -87.3, -87, -50, -20, -1, -1e-3, 0, 1e-3, 1, 20, 50, 100,
                  1e4, 3.4e38, -3.4e38], np.float32)
    w = np.array([[0.0, 1.0]], np.float32)
    y, _ = ops.causal_conv1d(v.reshape(1, -1, 1), w, activation="silu")
    with np.errstate(over="ignore"):                  # exp(1e4) in the float64 reference
        want = ref.silu(v.astype(np.float64))
    np.testing.assert_allclose(y.ravel(), want, rtol=1e-6, atol=1.1e-36)
    rng = np.random.default_rng(3)
    v = (rng.standard_normal(100000) * 30).astype(np.float32)
    y, _ = ops.causal_conv1d(v.reshape(1, -1, 1), w, activation="silu")
    # away from the flush-to-zero range SiLU alone is within 2 ulp (~2.4e-7) of float64
    keep = v > -87
    np.testing.assert_allclose(y.ravel()[keep], ref.silu(v[keep]), rtol=3e-7, atol=0)


@pytest.mark.parametrize("K", (2, 4, 8))
def test_chaining_equals_one_pass(K, simd):
    """conv over [0:a] then over [a:L] with the carried state == conv over [0:L], bit for bit:
    every output sees the same inputs in the same order, whichever call computes it."""
    E, b, L = 33, 3, 20
    for seed in SEEDS:
        rng = np.random.default_rng([seed, K])
        x, w, bias = _rand(rng, b, L, E), _rand(rng, E, K), _rand(rng, E)
        state0 = _rand(rng, b, K - 1, E)
        y_full, fin_full = ops.causal_conv1d(x, w, bias, state0)
        for a in (0, 1, K - 2, K - 1, K, L - 1, L):
            y1, s1 = ops.causal_conv1d(x[:, :a], w, bias, state0)
            y2, s2 = ops.causal_conv1d(x[:, a:], w, bias, s1)
            np.testing.assert_array_equal(np.concatenate([y1, y2], axis=1), y_full)
            np.testing.assert_array_equal(s2, fin_full)


@pytest.mark.parametrize("K", range(2, 9))
def test_update_equals_forward(K, simd):
    """Repeated causal_conv1d_update == causal_conv1d, bit for bit, state included."""
    for E in (1, 7, 2947):
        for seed in SEEDS:
            rng = np.random.default_rng([seed, K, E])
            b, L = 3, K + 2
            x, w = _rand(rng, b, L, E), _rand(rng, E, K)
            bias = _rand(rng, E) if seed else None
            state0 = _rand(rng, b, K - 1, E)
            for act in (None, "silu"):
                y_full, fin = ops.causal_conv1d(x, w, bias, state0, act)
                st = state0.copy()
                ys = []
                for t in range(L):
                    xt = x[:, t].copy()
                    ys.append(ops.causal_conv1d_update(xt, st, w, bias, act))
                    np.testing.assert_array_equal(xt, x[:, t])
                np.testing.assert_array_equal(np.stack(ys, axis=1), y_full)
                np.testing.assert_array_equal(st, fin)
                y_ref, st_ref = ref.causal_conv1d_update(x[:, 0], state0, w, bias, act)
                y0 = ops.causal_conv1d_update(x[:, 0].copy(), state0.copy(), w, bias, act)
                _check(y0[:, None], x[:, :1], w, bias, state0, act)


def test_weight_e1k_and_defaults():
    rng = np.random.default_rng(11)
    b, L, E, K = 2, 9, 7, 4
    x, w, bias = _rand(rng, b, L, E), _rand(rng, E, K), _rand(rng, E)
    y2, s2 = ops.causal_conv1d(x, w, bias)
    y3, s3 = ops.causal_conv1d(x, w.reshape(E, 1, K), bias)
    np.testing.assert_array_equal(y2, y3)
    np.testing.assert_array_equal(s2, s3)
    # default activation is SiLU
    y_silu, _ = ops.causal_conv1d(x, w, bias, activation="silu")
    np.testing.assert_array_equal(y2, y_silu)
    y_none, _ = ops.causal_conv1d(x, w, bias, activation=None)
    assert not np.array_equal(y_none, y2)
    _check(y_none, x, w, bias, None, None)
    st = _rand(rng, b, K - 1, E)
    st3 = st.copy()
    u2 = ops.causal_conv1d_update(x[:, 0], st, w, bias)
    u3 = ops.causal_conv1d_update(x[:, 0], st3, w.reshape(E, 1, K), bias)
    np.testing.assert_array_equal(u2, u3)
    np.testing.assert_array_equal(st, st3)


def test_noncontiguous_inputs():
    """Strided views are copied at the boundary; results equal those of contiguous copies."""
    rng = np.random.default_rng(5)
    b, L, E, K = 2, 11, 9, 4
    xbig = _rand(rng, b, 2 * L, E)
    wT = _rand(rng, K, E)
    x, w = xbig[:, ::2], wT.T
    y, s = ops.causal_conv1d(x, w)
    y_c, s_c = ops.causal_conv1d(np.ascontiguousarray(x), np.ascontiguousarray(w))
    np.testing.assert_array_equal(y, y_c)
    np.testing.assert_array_equal(s, s_c)


def test_threads_do_not_change_results():
    rng = np.random.default_rng(9)
    x, w, bias = _rand(rng, 3, 200, 2947), _rand(rng, 2947, 4), _rand(rng, 2947)
    n0 = ops.get_num_threads()
    try:
        ops.set_num_threads(1)
        y1, s1 = ops.causal_conv1d(x, w, bias)
        ops.set_num_threads(2)
        y2, s2 = ops.causal_conv1d(x, w, bias)
    finally:
        ops.set_num_threads(n0)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(s1, s2)
    _check(y1, x, w, bias, None, "silu")


def test_empty(simd):
    w = np.ones((5, 4), np.float32)
    y, s = ops.causal_conv1d(np.zeros((0, 3, 5), np.float32), w)
    assert y.shape == (0, 3, 5) and s.shape == (0, 3, 5)
    y, s = ops.causal_conv1d(np.zeros((2, 3, 0), np.float32), np.ones((0, 4), np.float32))
    assert y.shape == (2, 3, 0) and s.shape == (2, 3, 0)
    y = ops.causal_conv1d_update(np.zeros((0, 5), np.float32), np.zeros((0, 3, 5), np.float32), w)
    assert y.shape == (0, 5)


def test_nan_propagates_causally(simd):
    """A NaN at time t reaches outputs t .. t+K-1 of its channel only."""
    b, L, E, K = 2, 12, 5, 4
    x = np.ones((b, L, E), np.float32)
    x[1, 3, 2] = np.nan
    w = np.full((E, K), 0.25, np.float32)
    y, s = ops.causal_conv1d(x, w, np.zeros(E, np.float32))
    nan = np.isnan(y)
    want = np.zeros_like(nan)
    want[1, 3:3 + K, 2] = True
    np.testing.assert_array_equal(nan, want)
    st = np.full((b, K - 1, E), np.nan, np.float32)
    y = ops.causal_conv1d_update(np.ones((b, E), np.float32), st, w)
    assert np.isnan(y).all() and np.isnan(st[:, :-1]).all() and (st[:, -1] == 1).all()


def _raises(exc, words, fn, *args, **kw):
    with pytest.raises(exc) as info:
        fn(*args, **kw)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_bad_inputs():
    b, L, E, K = 2, 5, 7, 4
    x = np.zeros((b, L, E), np.float32)
    w = np.zeros((E, K), np.float32)
    st = np.zeros((b, K - 1, E), np.float32)
    f = ops.causal_conv1d
    _raises(TypeError, ["x", "float32"], f, x.astype(np.float64), w)
    _raises(TypeError, ["weight", "float32"], f, x, w.astype(np.float16))
    _raises(TypeError, ["conv_state"], f, x, w, None, st.astype(np.float64))
    _raises(ValueError, ["x"], f, x[0], w)
    _raises(ValueError, ["weight"], f, x, np.zeros((E + 1, K), np.float32))
    _raises(ValueError, ["weight"], f, x, np.zeros((E, 2, K), np.float32))
    _raises(ValueError, ["K", "2..8"], f, x, np.zeros((E, 9), np.float32))
    _raises(ValueError, ["K", "2..8"], f, x, np.zeros((E, 1), np.float32))
    _raises(ValueError, ["bias"], f, x, w, np.zeros(E + 1, np.float32))
    _raises(ValueError, ["conv_state"], f, x, w, None, np.zeros((b, K, E), np.float32))
    _raises(ValueError, ["conv_state"], f, x, w, None, np.zeros((b + 1, K - 1, E), np.float32))
    _raises(ValueError, ["activation"], f, x, w, activation="relu")
    g = ops.causal_conv1d_update
    _raises(TypeError, ["x"], g, x[:, 0].astype(np.float64), st, w)
    _raises(ValueError, ["x"], g, x, st, w)
    _raises(ValueError, ["conv_state"], g, x[:, 0], st[:, :2], w)
    _raises(ValueError, ["conv_state", "in place"], g, x[:, 0], np.zeros((b, E, K - 1),
                                                                         np.float32).swapaxes(1, 2), w)
    ro = st.copy()
    ro.flags.writeable = False
    _raises(ValueError, ["conv_state"], g, x[:, 0], ro, w)
    _raises(TypeError, ["conv_state"], g, x[:, 0], st.tolist(), w)


@pytest.mark.parametrize("K", (2, 4, 7))
def test_simd_levels_bitwise_equal(K, monkeypatch):
    """The sweep is one C source compiled for AVX-512, AVX2+FMA and the baseline ISA with FMA
    contraction off: the three levels must agree bit for bit (SiLU tails, NaN, odd E)."""
    rng = np.random.default_rng(40 + K)
    x = _rand(rng, 3, 37, 2947) * 30
    x[0, 5, 11] = np.nan
    x[1, :, 3] = np.linspace(-120, 120, 37)
    w, bias, state = _rand(rng, 2947, K), _rand(rng, 2947), _rand(rng, 3, K - 1, 2947)
    assert_levels_bitwise_equal(
        monkeypatch, lambda: [ops.causal_conv1d(x, w, bias, state, activation="silu")[0]])
