"""MoE routing, dispatch, expert MLPs and the dense MLP (csrc/moe.c) against blackmamba.ref.

Tolerances. Every case compares float32 kernels with the float64 reference on the same
weights (bf16 weights are rounded once with ref.f32_to_bf16 and both sides read the same
bits), so the only difference is float32 arithmetic: dot products of up to 2F = 192 or
d = 130 terms (error ~ sqrt(K) * 6e-8 * sum|terms|) and erff/tanhf/expf (1-2 ulp). Errors are
measured relative to the largest |reference| value of the output; the bound 5e-6 sits about
10x above the worst case measured (~5e-7). A wrong index, a missing gate or a swapped half of
fc1 give errors of order 1; exact vs tanh GELU differ by ~1e-4, still 20x above the bound.
"""
import math

import numpy as np
import pytest

from blackmamba import ops, ref

from conftest import assert_levels_bitwise_equal

ACTS = ["gelu", "gelu_tanh", "silu"]
REL = 5e-6  # see module docstring


def rel_err(got, want):
    want = np.asarray(want, dtype=np.float64)
    scale = max(np.abs(want).max(initial=0.0), 1e-30)
    return np.abs(np.asarray(got, dtype=np.float64) - want).max(initial=0.0) / scale


def make_moe(seed, T, d, X, F, bf16=False):
    """Random MoE layer with the released model's scales (outputs of order 1)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, d)).astype(np.float32)
    rw = (rng.standard_normal((X, d)) / np.sqrt(d)).astype(np.float32)
    rb = (0.1 * rng.standard_normal(X)).astype(np.float32)
    fc1 = (rng.standard_normal((X, 2 * F, d)) / np.sqrt(d)).astype(np.float32)
    fc2 = (rng.standard_normal((X, d, F)) / np.sqrt(F)).astype(np.float32)
    if bf16:
        fc1, fc2 = ref.f32_to_bf16(fc1), ref.f32_to_bf16(fc2)
    return x, rw, rb, fc1, fc2


# ---- router ------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("T,d,X", [(1, 7, 2), (5, 64, 8), (74, 130, 8), (513, 64, 2)])
def test_route_top1(seed, T, d, X):
    x, rw, rb, _, _ = make_moe(seed, T, d, X, 3)
    ids, gates, logits = ops.route_top1(x, rw, rb, return_logits=True)
    rids, rgates, rlogits = ref.route_top1(x, rw, rb)
    assert ids.dtype == np.int32 and ids.shape == (T,) and gates.shape == (T,)
    assert rel_err(logits, rlogits) < REL
    # A near-tie could legitimately flip between float32 and float64 logits: only demand
    # agreement where the reference's top two logits are further apart than float32 noise.
    top2 = np.sort(rlogits, axis=1)[:, -2:] if X > 1 else np.zeros((T, 2))
    clear = (top2[:, 1] - top2[:, 0]) > 1e-4
    np.testing.assert_array_equal(ids[clear], rids[clear])
    # the gate must be the sigmoid of the chosen logit, whatever was chosen
    np.testing.assert_allclose(gates, ref.sigmoid(logits[np.arange(T), ids]), rtol=1e-6)
    np.testing.assert_allclose(gates[clear], rgates[clear], rtol=1e-5)


def test_route_top1_return_pair_and_batched_x():
    x, rw, rb, _, _ = make_moe(3, 12, 16, 4, 3)
    ids, gates = ops.route_top1(x.reshape(3, 4, 16), rw, rb)
    rids, rgates, _ = ref.route_top1(x, rw, rb)
    np.testing.assert_array_equal(ids, rids)
    np.testing.assert_allclose(gates, rgates, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_route_top1_ties_go_to_lowest_index(seed):
    # Small integers make every logit exact in float32 whatever the summation order, so
    # ties are real ties and argmax must take the lowest index, like numpy.argmax.
    rng = np.random.default_rng(seed)
    T, d, X = 200, 9, 8
    x = rng.integers(-2, 3, (T, d)).astype(np.float32)
    rw = rng.integers(-1, 2, (X, d)).astype(np.float32)
    rw[5] = rw[2]  # experts 2 and 5 always tie: 5 must never win over 2
    rb = rng.integers(-1, 2, X).astype(np.float32)
    rb[5] = rb[2]
    ids, gates, logits = ops.route_top1(x, rw, rb, return_logits=True)
    rids, rgates, rlogits = ref.route_top1(x, rw, rb)
    np.testing.assert_array_equal(logits, rlogits)  # exact by construction
    n_ties = np.sum((rlogits == rlogits.max(axis=1, keepdims=True)).sum(axis=1) > 1)
    assert n_ties > 20  # the case really exercises ties
    np.testing.assert_array_equal(ids, rids)
    assert not np.any(ids == 5)
    np.testing.assert_allclose(gates, rgates, rtol=1e-6)


def test_route_top1_all_equal_logits_pick_expert_0():
    x = np.ones((3, 4), np.float32)
    ids, gates = ops.route_top1(x, np.zeros((6, 4), np.float32), np.zeros(6, np.float32))
    np.testing.assert_array_equal(ids, [0, 0, 0])
    np.testing.assert_allclose(gates, 0.5)


def test_route_top1_nan_logits():
    # Documented behaviour (moe.c argmax_first): like numpy.argmax the first NaN wins, so the
    # id stays in range and the gate is NaN.
    x = np.ones((4, 3), np.float32)
    x[1, 0] = np.nan  # every logit of token 1 is NaN -> expert 0
    rw = np.eye(5, 3, dtype=np.float32)
    rb = np.array([0, 0, 0, np.nan, 9], np.float32)  # expert 3 NaN for every token
    ids, gates, logits = ops.route_top1(x, rw, rb, return_logits=True)
    rids, _, _ = ref.route_top1(x, rw, rb)
    np.testing.assert_array_equal(ids, rids)
    np.testing.assert_array_equal(ids, [3, 0, 3, 3])
    assert np.all(np.isnan(gates))
    assert np.all((ids >= 0) & (ids < 5))


def test_route_top1_saturated_gates():
    x = np.ones((2, 1), np.float32)
    rw = np.array([[1.0], [2.0]], np.float32)
    _, gates = ops.route_top1(x, rw, np.array([-200.0, -300.0], np.float32))
    assert gates[0] == 0.0  # sigmoid(-199) underflows cleanly, no NaN
    _, gates = ops.route_top1(x, rw, np.array([200.0, 100.0], np.float32))
    assert gates[0] == 1.0


# ---- dispatch ----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("T,X", [(1, 2), (5, 8), (74, 8), (513, 2), (1000, 9)])
def test_moe_dispatch(seed, T, X):
    ids = np.random.default_rng(seed).integers(0, X, T)
    counts, offsets, perm = ops.moe_dispatch(ids, X)
    rcounts, roffsets, rperm = ref.moe_dispatch(ids, X)
    assert counts.dtype == offsets.dtype == perm.dtype == np.int64
    np.testing.assert_array_equal(counts, rcounts)
    np.testing.assert_array_equal(offsets, roffsets)
    np.testing.assert_array_equal(perm, rperm)  # stable: argsort(kind="stable")
    for e in range(X):  # the contract spelled out
        seg = perm[offsets[e]:offsets[e + 1]]
        assert np.all(ids[seg] == e) and np.all(np.diff(seg) > 0)


def test_moe_dispatch_empty_experts_and_dtypes():
    ids = np.array([4, 0, 4, 4, 0, 1], np.uint8)
    counts, offsets, perm = ops.moe_dispatch(ids, 7)
    np.testing.assert_array_equal(counts, [2, 1, 0, 0, 3, 0, 0])
    np.testing.assert_array_equal(offsets, [0, 2, 3, 3, 3, 6, 6, 6])
    np.testing.assert_array_equal(perm, [1, 4, 5, 0, 2, 3])
    for dt in (np.int32, np.int64, np.int16):
        np.testing.assert_array_equal(ops.moe_dispatch(ids.astype(dt), 7)[2], perm)


def test_moe_dispatch_no_tokens():
    counts, offsets, perm = ops.moe_dispatch(np.zeros(0, np.int64), 3)
    np.testing.assert_array_equal(counts, [0, 0, 0])
    np.testing.assert_array_equal(offsets, [0, 0, 0, 0])
    assert perm.shape == (0,)


@pytest.mark.parametrize("bad", [[0, 3, 1], [0, -1, 1], [2**40]])
def test_moe_dispatch_ids_out_of_range(bad):
    with pytest.raises(ValueError, match="ids"):
        ops.moe_dispatch(np.array(bad, np.int64), 3)


def test_moe_dispatch_bad_args():
    with pytest.raises(TypeError, match="ids"):
        ops.moe_dispatch(np.zeros(3, np.float32), 3)
    with pytest.raises(ValueError, match="ids"):
        ops.moe_dispatch(np.zeros((3, 1), np.int64), 3)
    with pytest.raises(ValueError, match="num_experts"):
        ops.moe_dispatch(np.zeros(3, np.int64), 0)


# ---- experts -----------------------------------------------------------------------------

SHAPES = [(1, 7, 2, 3), (5, 64, 8, 96), (74, 130, 8, 3), (513, 7, 2, 96), (74, 64, 8, 96)]


@pytest.mark.parametrize("bf16", [False, True], ids=["f32", "bf16"])
@pytest.mark.parametrize("T,d,X,F", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_moe_experts(seed, T, d, X, F, bf16):
    x, _, _, fc1, fc2 = make_moe(seed, T, d, X, F, bf16)
    rng = np.random.default_rng(100 + seed)
    ids = rng.integers(0, X, T)
    gates = rng.uniform(0.1, 1.0, T).astype(np.float32)
    out = ops.moe_experts(x, ids, gates, fc1, fc2)
    assert out.shape == (T, d) and out.dtype == np.float32
    assert rel_err(out, ref.moe_experts(x, ids, gates, fc1, fc2)) < REL


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bf16", [False, True], ids=["f32", "bf16"])
def test_moe_experts_activations(act, bf16):
    x, _, _, fc1, fc2 = make_moe(7, 74, 33, 8, 96, bf16)
    x *= 3  # reach the tails of every activation (silu's e^-v, gelu's erf near +-1)
    ids = np.random.default_rng(8).integers(0, 8, 74)
    gates = np.random.default_rng(9).uniform(0.1, 1.0, 74).astype(np.float32)
    out = ops.moe_experts(x, ids, gates, fc1, fc2, activation=act)
    want = ref.moe_experts(x, ids, gates, fc1, fc2, activation=act)
    assert rel_err(out, want) < REL
    # the activations really differ, so a wrong switch would be caught
    other = ACTS[(ACTS.index(act) + 1) % 3]
    assert rel_err(ref.moe_experts(x, ids, gates, fc1, fc2, activation=other), want) > 5 * REL


def test_moe_experts_default_activation_is_exact_gelu():
    x, _, _, fc1, fc2 = make_moe(4, 40, 16, 4, 32)
    ids = np.arange(40) % 4
    out = ops.moe_experts(x * 3, ids, None, fc1, fc2)
    assert rel_err(out, ref.moe_experts(x * 3, ids, None, fc1, fc2, "gelu")) < REL
    assert rel_err(out, ref.moe_experts(x * 3, ids, None, fc1, fc2, "gelu_tanh")) > 5 * REL


@pytest.mark.parametrize("bf16", [False, True], ids=["f32", "bf16"])
def test_moe_experts_empty_experts_and_no_gates(bf16):
    # Only experts 3 and 6 of 8 get tokens; the rest must be skipped, not read out of range.
    x, _, _, fc1, fc2 = make_moe(5, 37, 64, 8, 96, bf16)
    ids = np.where(np.arange(37) % 3 == 0, 6, 3)
    out = ops.moe_experts(x, ids, None, fc1, fc2)
    assert rel_err(out, ref.moe_experts(x, ids, None, fc1, fc2)) < REL
    ids = np.full(37, 7)  # everything on the last expert: its weights are at the very end
    out = ops.moe_experts(x, ids, None, fc1, fc2)
    assert rel_err(out, ref.moe_experts(x, ids, None, fc1, fc2)) < REL


def test_moe_experts_more_rows_than_one_block():
    # One expert with > 1024 tokens runs in several row blocks (BM_MLP_ROWS in moe.c).
    x, _, _, fc1, fc2 = make_moe(6, 2100, 24, 2, 40)
    ids = (np.arange(2100) % 7 == 0).astype(np.int64)  # expert 0: 1800 tokens
    gates = np.linspace(0.1, 1.0, 2100, dtype=np.float32)
    out = ops.moe_experts(x, ids, gates, fc1, fc2, activation="silu")
    assert rel_err(out, ref.moe_experts(x, ids, gates, fc1, fc2, "silu")) < REL


def test_moe_experts_zero_gate_and_batched_shape():
    x, _, _, fc1, fc2 = make_moe(11, 12, 16, 3, 8)
    ids = np.arange(12) % 3
    gates = np.ones(12, np.float32)
    gates[4] = 0.0
    out = ops.moe_experts(x.reshape(2, 6, 16), ids, gates, fc1, fc2)
    assert out.shape == (2, 6, 16)
    assert np.all(out.reshape(12, 16)[4] == 0.0)
    assert rel_err(out.reshape(12, 16), ref.moe_experts(x, ids, gates, fc1, fc2)) < REL


def test_moe_experts_inputs_unchanged():
    x, _, _, fc1, fc2 = make_moe(12, 20, 8, 4, 6, bf16=True)
    ids = np.arange(20) % 4
    gates = np.ones(20, np.float32)
    copies = [a.copy() for a in (x, ids, gates, fc1, fc2)]
    ops.moe_experts(x, ids, gates, fc1, fc2)
    for a, c in zip((x, ids, gates, fc1, fc2), copies):
        np.testing.assert_array_equal(a, c)


# ---- whole layer -------------------------------------------------------------------------

@pytest.mark.parametrize("bf16", [False, True], ids=["f32", "bf16"])
@pytest.mark.parametrize("T,d,X,F", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_moe(seed, T, d, X, F, bf16):
    x, rw, rb, fc1, fc2 = make_moe(seed, T, d, X, F, bf16)
    out, ids, gates, logits = ops.moe(x, rw, rb, fc1, fc2, return_routing=True)
    rout, rids, rgates, rlogits = ref.moe(x, rw, rb, fc1, fc2)
    assert rel_err(logits, rlogits) < REL
    if not np.array_equal(ids, rids):
        # only a float32 near-tie may route differently; then compare on the same routing
        s = np.sort(rlogits, axis=1)
        diff = ids != rids
        assert np.all(s[diff, -1] - s[diff, -2] < 1e-4)
        rout = ref.moe_experts(x, ids, rgates, fc1, fc2)
    np.testing.assert_allclose(gates, ref.sigmoid(logits[np.arange(T), ids]), rtol=1e-6)
    assert rel_err(out, rout) < REL
    # return_routing=False gives the same output alone
    np.testing.assert_array_equal(ops.moe(x, rw, rb, fc1, fc2), out)


@pytest.mark.parametrize("act", ACTS)
def test_moe_activations_batched(act):
    x, rw, rb, fc1, fc2 = make_moe(21, 74, 64, 8, 96, bf16=True)
    out = ops.moe(x.reshape(2, 37, 64), rw, rb, fc1, fc2, activation=act)
    assert out.shape == (2, 37, 64)
    rout, *_ = ref.moe(x, rw, rb, fc1, fc2, activation=act)
    assert rel_err(out.reshape(74, 64), rout) < REL


def test_moe_no_tokens():
    _, rw, rb, fc1, fc2 = make_moe(0, 1, 8, 4, 5)
    out, ids, gates, logits = ops.moe(np.zeros((0, 8), np.float32), rw, rb, fc1, fc2,
                                      return_routing=True)
    assert out.shape == (0, 8) and ids.shape == (0,) and logits.shape == (0, 4)


# ---- dense MLP ---------------------------------------------------------------------------

@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bf16", [False, True], ids=["f32", "bf16"])
@pytest.mark.parametrize("T,d,F", [(1, 7, 3), (74, 130, 96), (513, 64, 3), (5, 64, 96)])
def test_mlp(T, d, F, bf16, act, gated):
    rng = np.random.default_rng(T * 1000 + d + F)
    x = (2 * rng.standard_normal((T, d))).astype(np.float32)
    fc1 = (rng.standard_normal(((2 if gated else 1) * F, d)) / np.sqrt(d)).astype(np.float32)
    fc2 = (rng.standard_normal((d, F)) / np.sqrt(F)).astype(np.float32)
    if bf16:
        fc1, fc2 = ref.f32_to_bf16(fc1), ref.f32_to_bf16(fc2)
    out = ops.mlp(x, fc1, fc2, activation=act, gated=gated)
    assert out.shape == (T, d)
    assert rel_err(out, ref.gated_mlp(x, fc1, fc2, act, gated)) < REL


def test_mlp_more_rows_than_one_block_and_batched():
    rng = np.random.default_rng(31)
    x = rng.standard_normal((3, 700, 20)).astype(np.float32)  # T = 2100 > BM_MLP_ROWS
    fc1 = (rng.standard_normal((2 * 17, 20)) / 4).astype(np.float32)
    fc2 = (rng.standard_normal((20, 17)) / 4).astype(np.float32)
    out = ops.mlp(x, fc1, fc2)
    assert out.shape == (3, 700, 20)
    assert rel_err(out.reshape(-1, 20), ref.gated_mlp(x.reshape(-1, 20), fc1, fc2)) < REL


@pytest.mark.parametrize("nthreads", [1, 2])
def test_loops_large_enough_to_run_in_parallel(nthreads):
    # moe.c splits a gather/scatter or activation loop over threads only from 1M elements
    # (BM_PAR_MIN): these shapes cross it (1024-row block x d = 1030; x F = 1030).
    rng = np.random.default_rng(51)
    n = ops.get_num_threads()
    try:
        ops.set_num_threads(nthreads)
        x = rng.standard_normal((1100, 1030)).astype(np.float32)
        fc1 = (rng.standard_normal((2, 6, 1030)) / 32).astype(np.float32)
        fc2 = (rng.standard_normal((2, 1030, 3)) / 2).astype(np.float32)
        ids = (np.arange(1100) % 50 == 0).astype(np.int64)  # expert 0: 1078 rows
        gates = rng.uniform(0.1, 1, 1100).astype(np.float32)
        out = ops.moe_experts(x, ids, gates, fc1, fc2, activation="silu")
        assert rel_err(out, ref.moe_experts(x, ids, gates, fc1, fc2, "silu")) < REL
        x = rng.standard_normal((1100, 8)).astype(np.float32)
        w1 = (rng.standard_normal((2060, 8)) / 3).astype(np.float32)
        w2 = (rng.standard_normal((8, 1030)) / 32).astype(np.float32)
        out = ops.mlp(x, w1, w2, activation="silu")
        assert rel_err(out, ref.gated_mlp(x, w1, w2, "silu")) < REL
    finally:
        ops.set_num_threads(n)


def test_mlp_matches_single_expert_moe():
    # A dense gated MLP is a one-expert MoE with unit gates.
    x, _, _, fc1, fc2 = make_moe(41, 30, 16, 1, 12)
    np.testing.assert_allclose(ops.mlp(x, fc1[0], fc2[0]),
                               ops.moe_experts(x, np.zeros(30, np.int64), None, fc1, fc2),
                               rtol=1e-6, atol=1e-7)


# ---- activations alone --------------------------------------------------------------------

@pytest.mark.parametrize("act", ACTS)
def test_activation_accuracy(act, simd):
    # Identity weights make mlp(x) = act(x) exactly up to the activation's own rounding
    # (x @ I is exact), which isolates csrc/act.h from BLAS. Bounds from
    # dev/cpu/act_accuracy.c, with ~2x margin:
    #  - |err| <= 3e-7 |x| everywhere: Phi / sigmoid to ~2.5 ulp of 1;
    #  - relative error <= 1e-5 for |x| <= 8, which includes the negative tails where
    #    the libm form 0.5 x (1 + erff) would be 100% wrong (cancellation in 1 + erf).
    d = 64
    x = np.linspace(-14, 30, 64 * 400, dtype=np.float32).reshape(-1, d)
    x = np.concatenate([x, np.random.default_rng(0).standard_normal((33, d)).astype(np.float32)])
    eye = np.eye(d, dtype=np.float32)
    out = ops.mlp(x, eye, eye, activation=act, gated=False).astype(np.float64)
    xd = x.astype(np.float64)
    # ref.gelu and ref.gelu_tanh compute 1 + erf / 1 + tanh, which cancels in float64 too
    # for x < -6: the truths here are the cancellation-free forms of the same functions.
    if act == "gelu":
        want = 0.5 * xd * np.vectorize(math.erfc)(-xd / math.sqrt(2.0))
    elif act == "gelu_tanh":
        want = xd / (1.0 + np.exp(-2.0 * math.sqrt(2.0 / math.pi) * (xd + 0.044715 * xd**3)))
    else:
        want = ref.silu(xd)
    err = np.abs(out - want)
    assert np.all(err <= 3e-7 * np.abs(xd) + 1e-37)
    mid = (np.abs(xd) <= 8) & (want != 0)
    assert np.all(err[mid] <= 1e-5 * np.abs(want[mid]))


@pytest.mark.parametrize("act", ACTS)
def test_activation_non_finite(act, simd):
    x = np.array([[np.nan], [np.inf], [-np.inf], [0.0], [-0.0], [100.0], [-100.0], [1e30],
                  [-1e30], [1e-30]], np.float32)
    one = np.ones((1, 1), np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        want = ref.ACTIVATIONS[act](x.astype(np.float64))
    out = ops.mlp(x, one, one, activation=act, gated=False)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(want))  # NaN, -inf -> NaN
    ok = ~np.isnan(want)
    np.testing.assert_allclose(out[ok], want[ok], rtol=1e-6, atol=1e-37)  # denormals flush


@pytest.mark.parametrize("act", ACTS)
def test_activation_simd_levels_bitwise_equal(act, monkeypatch):
    """act.h is one C source compiled for AVX-512, AVX2+FMA and the baseline ISA with FMA
    contraction off, so the three levels give the same bits (identity weights: x @ I is
    exact on every GEMV/GEMM path, so only the activation differs). d = 37 and 3 or 40 rows:
    vector tails and both the GEMV and the sgemm path."""
    d = 37
    eye = np.eye(d, dtype=np.float32)
    assert_levels_bitwise_equal(
        monkeypatch, lambda: [ops.mlp(_act_inputs(T, d), eye, eye, activation=act, gated=False)
                              for T in (3, 40)])


def _act_inputs(T, d):
    # finite only: an inf would make its whole row NaN through x @ I (inf * 0); the
    # non-finite inputs are test_activation_non_finite's
    x = np.linspace(-100, 100, T * d, dtype=np.float32).reshape(T, d)
    x[0, :3] = [-0.0, 1e-30, -1e-30]
    return x


# ---- bad inputs --------------------------------------------------------------------------

def test_bad_inputs_name_the_argument():
    x, rw, rb, fc1, fc2 = make_moe(0, 6, 8, 4, 5)
    ids = np.arange(6) % 4
    with pytest.raises(TypeError, match="x"):
        ops.moe(x.astype(np.float64), rw, rb, fc1, fc2)
    with pytest.raises(TypeError, match="fc1"):
        ops.moe(x, rw, rb, fc1.astype(np.float64), fc2)
    with pytest.raises(TypeError, match="router_weight"):
        ops.route_top1(x, rw.astype(np.float16), rb)
    with pytest.raises(ValueError, match="router_bias"):
        ops.moe(x, rw, rb[:3], fc1, fc2)
    with pytest.raises(ValueError, match="router_weight"):
        ops.route_top1(x, rw[:, :7], rb)
    with pytest.raises(ValueError, match="fc1"):
        ops.moe_experts(x, ids, None, fc1[:, :9], fc2)  # odd 2F
    with pytest.raises(ValueError, match="fc2"):
        ops.moe_experts(x, ids, None, fc1, fc2[:, :, :4])
    with pytest.raises(ValueError, match="fc2"):
        ops.moe_experts(x, ids, None, fc1, fc2[:3])  # X mismatch
    with pytest.raises(TypeError, match="dtype"):
        ops.moe_experts(x, ids, None, fc1, ref.f32_to_bf16(fc2))
    with pytest.raises(ValueError, match="gates"):
        ops.moe_experts(x, ids, np.ones(5, np.float32), fc1, fc2)
    with pytest.raises(ValueError, match="ids"):
        ops.moe_experts(x, ids[:5], None, fc1, fc2)
    with pytest.raises(ValueError, match="ids"):
        ops.moe_experts(x, np.array([0, 1, 2, 3, 4, 0]), None, fc1, fc2)  # 4 >= X
    with pytest.raises(ValueError, match="ids"):
        ops.moe_experts(x, np.array([0, 1, -1, 3, 0, 0]), None, fc1, fc2)
    with pytest.raises(ValueError, match="activation"):
        ops.moe(x, rw, rb, fc1, fc2, activation="relu")
    with pytest.raises(ValueError, match="fc1"):
        ops.mlp(x, fc1[0, :9], fc2[0])  # gated needs an even first dimension
    with pytest.raises(ValueError, match="fc2"):
        ops.mlp(x, fc1[0], fc2[0, :7])
