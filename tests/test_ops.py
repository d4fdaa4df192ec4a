"""Cross-cutting properties of every op: argument checking, non-contiguous inputs, inputs
left unmodified, reference counts and memory flat over many calls, concurrency."""
import gc
import sys
import threading

import numpy as np
import pytest

from blackmamba import ops, ref

from conftest import SANITIZED, rel_err, rss_kb


def op_cases(rng):
    """(name, callable, reference) for one small random case of every op."""
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    b, L, E, N, K, d, X, F, T = 2, 9, 11, 5, 4, 13, 4, 6, 7
    A = -np.exp(f(E, N))
    u, dt, z, B, C, D, db = f(b, L, E), f(b, L, E), f(b, L, E), f(b, L, N), f(b, L, N), f(E), f(E)
    st = f(b, E, N)
    w, bias, cs = f(E, K), f(E), f(b, K - 1, E)
    x2, nw, res = f(T, d), f(d), f(T, d)
    rw, rb, fc1, fc2 = f(X, d), f(X), f(X, 2 * F, d), f(X, d, F)
    S = f(T, X)
    return [
        ("selective_scan", lambda: ops.selective_scan(u, dt, A, B, C, D, z, db, True, st),
         lambda: ref.selective_scan(u, dt, A, B, C, D, z, db, True, st)),
        ("causal_conv1d", lambda: ops.causal_conv1d(u, w, bias, cs, "silu"),
         lambda: ref.causal_conv1d(u, w, bias, cs, "silu")),
        ("rms_norm", lambda: ops.rms_norm(x2, nw, res), lambda: ref.rms_norm(x2, nw, res)),
        ("layer_norm", lambda: ops.layer_norm(x2, nw, nw, res),
         lambda: ref.layer_norm(x2, nw, nw, res)),
        ("linear", lambda: ops.linear(x2, rw, rb), lambda: ref.linear(x2, rw, rb)),
        ("moe", lambda: ops.moe(x2, rw, rb, fc1, fc2), lambda: ref.moe(x2, rw, rb, fc1, fc2)[0]),
        ("sinkhorn", lambda: ops.sinkhorn(S)[0], lambda: ref.sinkhorn(S)[0]),
    ], [u, dt, z, B, C, st, w, cs, x2, res, rw, fc1, S]


def _flat(r):
    return [np.asarray(a) for a in (r if isinstance(r, tuple) else (r,))
            if isinstance(a, np.ndarray)]


def test_every_op_matches_reference_and_leaves_inputs_unmodified():
    rng = np.random.default_rng(0)
    cases, inputs = op_cases(rng)
    before = [a.copy() for a in inputs]
    for name, fn, reference in cases:
        for got, want in zip(_flat(fn()), _flat(reference())):
            assert rel_err(got, want) < 1e-5, name
    for a, b in zip(inputs, before):
        np.testing.assert_array_equal(a, b)


def test_non_contiguous_inputs_are_read_correctly():
    rng = np.random.default_rng(1)
    big = rng.standard_normal((3, 20, 16)).astype(np.float32)
    x = big[:, ::2, 1:12]                      # strided in two dims
    w = rng.standard_normal((11, 5)).astype(np.float32)[:, ::-1]   # negative stride
    y, _ = ops.causal_conv1d(x, w, None, None, None)
    yr, _ = ref.causal_conv1d(x, w, None, None, None)
    assert rel_err(y, yr) < 1e-6
    xt = rng.standard_normal((9, 6)).astype(np.float32).T        # Fortran order
    W = rng.standard_normal((4, 9)).astype(np.float32)
    assert rel_err(ops.linear(xt, W), ref.linear(xt, W)) < 1e-6


@pytest.mark.parametrize("call,exc,match", [
    (lambda: ops.rms_norm(np.zeros((2, 3), np.float64), np.ones(3, np.float32)), TypeError, "x must be float32"),
    (lambda: ops.rms_norm(np.zeros((2, 3), np.float32), np.ones(4, np.float32)), ValueError, "weight must have shape"),
    (lambda: ops.selective_scan(*[np.zeros((1, 2, 3), np.float32)] * 2, np.zeros((3, 4), np.float32),
                                np.zeros((1, 2, 5), np.float32), np.zeros((1, 2, 4), np.float32)), ValueError, "B must have shape"),
    (lambda: ops.causal_conv1d(np.zeros((1, 2, 3), np.float32), np.zeros((3, 9), np.float32)), ValueError, "K must be in 2..8"),
    (lambda: ops.causal_conv1d(np.zeros((1, 2, 3), np.float32), np.zeros((3, 4), np.float32), activation="relu"), ValueError, "activation"),
    (lambda: ops.moe_dispatch(np.array([0, 5]), 4), ValueError, "outside"),
    (lambda: ops.moe_dispatch(np.array([0.5]), 4), TypeError, "integer"),
    (lambda: ops.sinkhorn(np.zeros((0, 4), np.float32)), ValueError, "at least one"),
    (lambda: ops.sinkhorn(np.zeros((3, 4), np.float32), init="other"), ValueError, "init"),
    (lambda: ops.linear(np.zeros((2, 3), np.float32), np.zeros((4, 3), np.int32)), TypeError, "weight must be float32 or uint16"),
    (lambda: ops.selective_state_update(np.zeros((1, 3, 2), np.float32)[:, ::-1], np.zeros((1, 3), np.float32), np.zeros((1, 3), np.float32),
                                        np.zeros((3, 2), np.float32), np.zeros((1, 2), np.float32), np.zeros((1, 2), np.float32)), ValueError, "in place"),
    (lambda: ops.set_num_threads(0), ValueError, "n must be"),
    (lambda: ops.rms_norm("abc", np.ones(3, np.float32)), TypeError, "float32"),
])
def test_bad_arguments_raise_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_empty_inputs_give_empty_outputs():
    e = np.zeros((0, 5, 3), np.float32)
    y, st = ops.selective_scan(e, e, np.zeros((3, 2), np.float32), np.zeros((0, 5, 2), np.float32),
                               np.zeros((0, 5, 2), np.float32))
    assert y.shape == (0, 5, 3) and st.shape == (0, 3, 2)
    y, st = ops.causal_conv1d(np.zeros((2, 0, 3), np.float32), np.ones((3, 4), np.float32))
    assert y.shape == (2, 0, 3) and st.shape == (2, 3, 3) and not st.any()
    out, r = ops.rms_norm(np.zeros((0, 4), np.float32), np.ones(4, np.float32))
    assert out.shape == (0, 4)


def test_nan_propagates_without_crash():
    x = np.full((2, 8), np.nan, np.float32)
    out, _ = ops.rms_norm(x, np.ones(8, np.float32))
    assert np.isnan(out).all()
    y, _ = ops.selective_scan(np.full((1, 3, 4), np.nan, np.float32), np.ones((1, 3, 4), np.float32),
                              -np.ones((4, 2), np.float32), np.ones((1, 3, 2), np.float32),
                              np.ones((1, 3, 2), np.float32))
    assert np.isnan(y).all()


@pytest.mark.skipif(SANITIZED, reason="RSS under ASan is not meaningful")
def test_refcounts_and_memory_flat_over_many_calls():
    rng = np.random.default_rng(2)
    cases, inputs = op_cases(rng)
    refs = [sys.getrefcount(a) for a in inputs]
    for name, fn, _ in cases:        # warm up allocator pools
        for _ in range(50):
            fn()
    gc.collect()
    rss0 = rss_kb()
    for _ in range(1000):
        for name, fn, _ in cases:
            fn()
    gc.collect()
    grown = rss_kb() - rss0
    assert [sys.getrefcount(a) for a in inputs] == refs
    assert grown < 8 * 1024, f"RSS grew by {grown} kB over 7000 op calls"


def test_concurrent_calls_on_separate_data_match_serial():
    rng = np.random.default_rng(3)
    jobs = []
    for i in range(6):
        u = rng.standard_normal((1, 300, 64)).astype(np.float32)
        dt = rng.standard_normal((1, 300, 64)).astype(np.float32)
        A = -np.exp(rng.standard_normal((64, 16))).astype(np.float32)
        B = rng.standard_normal((1, 300, 16)).astype(np.float32)
        C = rng.standard_normal((1, 300, 16)).astype(np.float32)
        jobs.append((u, dt, A, B, C))
    serial = [ops.selective_scan(*j)[0] for j in jobs]
    results = [None] * len(jobs)

    def work(i):
        for _ in range(5):
            results[i] = ops.selective_scan(*jobs[i])[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(results, serial):
        np.testing.assert_array_equal(a, b)
