"""ops.rms_norm / ops.layer_norm (csrc/norm.c) against ref.py (float64).

Tolerances and why:
- rms_norm: res_out = x + residual must equal NumPy's float32 x + residual exactly (one float32
  add: it IS the residual stream). out is compared with ref.rms_norm(res_out) (the math of the
  float32 stream) at RMS_RTOL = 1e-6 relative per element: the mean square is summed in
  double, so the only float32 roundings are the scale (0.5 ulp) and two products (1 ulp),
  <= 1.8e-7 relative.
- layer_norm: everything up to the output is in double (x + residual, mean, deviations), one
  rounding to float32 at the end, so out is compared with ref.layer_norm(x, ..., residual) at
  LN_RTOL = 1e-6 times |(r - mean) * rstd * w| + |bias| (the terms of the last addition: their
  cancellation can make |out| arbitrarily small, and relative to |out| nothing would pass).
"""
import numpy as np
import pytest

from blackmamba import ops, ref

RMS_RTOL = 1e-6
LN_RTOL = 1e-6
SEEDS = (0, 1, 2)
DIMS = (1, 7, 64, 1472, 2947)


def _rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _check_rms(x, w, residual, eps):
    given = [a for a in (x, w, residual) if a is not None]
    copies = [a.copy() for a in given]
    out, res = ops.rms_norm(x, w, residual, eps)
    for a, c in zip(given, copies):
        np.testing.assert_array_equal(a, c)
    assert out.shape == x.shape and res.shape == x.shape
    assert out.dtype == np.float32 and res.dtype == np.float32
    np.testing.assert_array_equal(res, x if residual is None else x + residual)
    want, _ = ref.rms_norm(res, w, None, eps)
    assert np.all(np.abs(out - want) <= RMS_RTOL * np.abs(want) + 1e-38), \
        f"max rel err {np.max(np.abs(out - want) / (np.abs(want) + 1e-38)):.3g}"
    return out


def _check_ln(x, w, bias, residual, eps):
    given = [a for a in (x, w, bias, residual) if a is not None]
    copies = [a.copy() for a in given]
    out = ops.layer_norm(x, w, bias, residual, eps)
    for a, c in zip(given, copies):
        np.testing.assert_array_equal(a, c)
    assert out.shape == x.shape and out.dtype == np.float32
    want = ref.layer_norm(x, w, bias, residual, eps)
    mag = np.abs(ref.layer_norm(x, w, None, residual, eps))
    if bias is not None:
        mag = mag + np.abs(bias.astype(np.float64))
    assert np.all(np.abs(out - want) <= LN_RTOL * mag + 1e-38), \
        f"max err/mag {np.max(np.abs(out - want) / (mag + 1e-38)):.3g}"
    return out


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("lead", [(1,), (5,), (2, 3), (70,), ()])    # 70 x 2947: threaded path
def test_rms_norm_matches_ref(d, lead):
    for seed in SEEDS:
        rng = np.random.default_rng([seed, d, len(lead), sum(lead)])
        x, w = _rand(rng, *lead, d), _rand(rng, d)
        for residual in (None, _rand(rng, *lead, d)):
            _check_rms(x, w, residual, 1e-5)


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("lead", [(1,), (5,), (2, 3), (70,), ()])
def test_layer_norm_matches_ref(d, lead):
    for seed in SEEDS:
        rng = np.random.default_rng([seed, d, len(lead), sum(lead), 1])
        x, w, bias = _rand(rng, *lead, d), _rand(rng, d), _rand(rng, d)
        for residual in (None, _rand(rng, *lead, d)):
            for b in (None, bias):
                _check_ln(x, w, b, residual, 1e-5)


@pytest.mark.parametrize("d", DIMS)
def test_magnitudes(d):
    """Rows of size 1e4 and 1e-4 (where eps dominates rms), a large mean over a small spread
    (a one-pass float32 variance would lose every digit), all in one array."""
    rng = np.random.default_rng([d, 42])
    T = 6
    scale = np.array([1e4, 1e-4, 1.0, 1e4, 1e-4, 1.0], np.float32)[:, None]
    offset = np.array([0, 0, 0, 3e4, 3e-4, 1e3], np.float32)[:, None]
    x = (rng.standard_normal((T, d)) * scale + offset).astype(np.float32)
    residual = (rng.standard_normal((T, d)) * scale).astype(np.float32)
    w, bias = _rand(rng, d), _rand(rng, d)
    for r in (None, residual):
        _check_rms(x, w, r, 1e-5)
        if d > 1:                      # d = 1: var = 0, out = bias (checked in test_layer_norm_d1)
            _check_ln(x, w, bias, r, 1e-5)


def test_layer_norm_d1_and_constant_rows():
    """var = 0: out = bias exactly (r - mean = 0 in double), for d = 1 and constant rows."""
    w, bias = np.array([2.0], np.float32), np.array([0.5], np.float32)
    x = np.array([[3.0], [-1e4]], np.float32)
    np.testing.assert_array_equal(ops.layer_norm(x, w, bias), [[0.5], [0.5]])
    x = np.full((3, 7), 1e4, np.float32)
    np.testing.assert_array_equal(ops.layer_norm(x, np.ones(7, np.float32)), np.zeros((3, 7)))


@pytest.mark.parametrize("eps", (0.0, 1e-6, 1e-5, 0.1, 1.0))
def test_eps(eps):
    rng = np.random.default_rng(int(eps * 1e6))
    x = _rand(rng, 4, 64, scale=1e-2)                 # mean square 1e-4: eps matters
    w, bias = _rand(rng, 64), _rand(rng, 64)
    _check_rms(x, w, None, eps)
    _check_ln(x, w, bias, None, eps)
    if eps >= 1e-5:
        a, _ = ops.rms_norm(x, w, eps=eps)
        b, _ = ops.rms_norm(x, w, eps=eps / 2)
        assert not np.array_equal(a, b)


def test_residual_sum_exact_and_res_out_is_float32_stream():
    """res_out is float32 x + residual bit for bit, including cancellation and overflow."""
    x = np.array([[1.0, 1e8, 3.4e38, -2.5, 1e-30]], np.float32)
    residual = np.array([[2 ** -24, 1.0, 3.4e38, 2.5, -1e-30]], np.float32)
    _, res = ops.rms_norm(x, np.ones(5, np.float32), residual)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(res, x + residual)


def test_threads_do_not_change_results():
    rng = np.random.default_rng(3)
    x, r, w, b = _rand(rng, 64, 2947), _rand(rng, 64, 2947), _rand(rng, 2947), _rand(rng, 2947)
    n0 = ops.get_num_threads()
    try:
        ops.set_num_threads(1)
        one = ops.rms_norm(x, w, r) + (ops.layer_norm(x, w, b, r),)
        ops.set_num_threads(2)
        two = ops.rms_norm(x, w, r) + (ops.layer_norm(x, w, b, r),)
    finally:
        ops.set_num_threads(n0)
    for a, c in zip(one, two):
        np.testing.assert_array_equal(a, c)


def test_empty():
    w = np.ones(4, np.float32)
    out, res = ops.rms_norm(np.zeros((0, 4), np.float32), w)
    assert out.shape == (0, 4) and res.shape == (0, 4)
    assert ops.layer_norm(np.zeros((2, 0, 4), np.float32), w).shape == (2, 0, 4)
    out, res = ops.rms_norm(np.zeros((3, 0), np.float32), np.zeros(0, np.float32))
    assert out.shape == (3, 0)


def test_nan_stays_in_its_row():
    rng = np.random.default_rng(8)
    x, w, b = _rand(rng, 4, 33), _rand(rng, 33), _rand(rng, 33)
    x[2, 5] = np.nan
    out, res = ops.rms_norm(x, w)
    assert np.isnan(out[2]).all() and np.isfinite(out[[0, 1, 3]]).all()
    assert np.isnan(res[2, 5]) and np.isfinite(np.delete(res.ravel(), 2 * 33 + 5)).all()
    out = ops.layer_norm(x, w, b)
    assert np.isnan(out[2]).all() and np.isfinite(out[[0, 1, 3]]).all()
    r = np.zeros_like(x)
    r[0, 0] = np.nan
    out, _ = ops.rms_norm(np.nan_to_num(x), w, r)
    assert np.isnan(out[0]).all() and np.isfinite(out[1:]).all()


def _raises(exc, words, fn, *args, **kw):
    with pytest.raises(exc) as info:
        fn(*args, **kw)
    for word in words:
        assert word in str(info.value), str(info.value)


@pytest.mark.parametrize("fn", ("rms_norm", "layer_norm"))
def test_bad_inputs(fn):
    f = getattr(ops, fn)
    x = np.zeros((2, 3, 8), np.float32)
    w = np.ones(8, np.float32)
    _raises(TypeError, ["x", "float32"], f, x.astype(np.float64), w)
    _raises(TypeError, ["weight", "float32"], f, x, w.astype(np.float64))
    _raises(ValueError, ["weight"], f, x, np.ones(7, np.float32))
    _raises(ValueError, ["weight"], f, x, np.ones((1, 8), np.float32))
    _raises(ValueError, ["x"], f, np.float32(1.0), w)
    _raises(ValueError, ["residual"], f, x, w, residual=np.zeros((3, 2, 8), np.float32))
    _raises(ValueError, ["residual"], f, x, w, residual=np.zeros((6, 8), np.float32))
    _raises(ValueError, ["residual"], f, x, w, residual=np.zeros((2, 3, 7), np.float32))
    _raises(TypeError, ["residual"], f, x, w, residual=np.zeros((2, 3, 8), np.float16))
    _raises(ValueError, ["eps", "-1.5"], f, x, w, eps=-1.5)
    _raises(ValueError, ["eps", "2.0"], f, x, w, eps=2.0)
    _raises(ValueError, ["eps"], f, x, w, eps=float("nan"))
    if fn == "layer_norm":
        _raises(ValueError, ["bias"], f, x, w, np.ones(9, np.float32))
        _raises(TypeError, ["bias"], f, x, w, np.ones(8, np.int32))
