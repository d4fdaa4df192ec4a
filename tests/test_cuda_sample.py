"""The device sampler (cuda/sample.cu: blackmamba.cuda.sample, CudaModel.sample, generate on a
CudaModel) against its float64 twin (generation.sample_probs + sample_next_u) given the same
uniforms (generation.sample_uniform: Philox4x32-10 at (seed, step, row)).

Tolerance (TOL_CDF = 5e-5, on the normalised CDF / top-p scale): the device computes each
weight exp((v - vmax) / T) in float32 (one rounding of v - vmax, one of the division, expf's
2 ulp), i.e. within (|x| + 2) * 2.4e-7 relative of the twin's float64 value (x = (v - vmax)/T);
every sum is float64. The CDF (and the top-p cumulative mass) is then within
2.4e-7 * (E_p|x| + 2) of the twin's, a few 1e-6 for these logits (weights of |x| > 100 are
below 1e-43). So the device's token must equal the twin's, except when u (or top_p) lies
within TOL_CDF of a boundary of the twin's cumulative distribution: such a draw is allowed to
differ, and the tests also bound how many do. The uniforms must match the twin bit for bit.
"""
import numpy as np
import pytest

from blackmamba import cuda, generation, model_cuda
from blackmamba.generation import SamplingParams, sample_next_u, sample_probs, sample_uniform

_GPU = [pytest.mark.gpu, pytest.mark.skipif(not model_cuda.is_available(),
                                            reason="no CUDA device, or blackmamba built without CUDA")]


def gpu(f):
    """GPU tests (the twin's own tests below run everywhere)."""
    for m in _GPU:
        f = m(f)
    return f

TOL_CDF = 5e-5
V_BIG = 50304       # the 2.8B model's padded vocabulary
PATH_GREEDY, PATH_DIRECT, PATH_LIST, PATH_GENERIC = 1, 2, 3, 4


def C():
    from blackmamba import _lib
    return _lib.C()


def dev_sample(logits, T, k=None, p=None, seed=0, step=0, limit=None, path=0, row_streams=True):
    """(tokens (B,), status (B,), u (B,)) from the device."""
    d = cuda.to_device(np.ascontiguousarray(logits, np.float32))
    tok, status, u = C().cuda_sample(d, T, k, p, seed, step, limit, row_streams, path, True)
    return tok.numpy(), status, u


def twin_margin(row, params, u, limit):
    """(token, margin): the twin's token for uniform u, and how close u (or top_p) is to a
    boundary of its cumulative distribution (the tolerance applies below TOL_CDF)."""
    tok = sample_next_u(row, params, u, limit)
    p = sample_probs(row, params, limit)
    if isinstance(p, int):
        return tok, np.inf
    cdf = np.cumsum(p)
    cdf /= cdf[-1]
    margin = np.min(np.abs(cdf - u))
    if params.top_p is not None and params.top_p < 1.0:
        q = sample_probs(row, SamplingParams(params.temperature, params.top_k, None), limit)
        cum = np.cumsum(q[np.argsort(-q, kind="stable")])
        margin = min(margin, np.min(np.abs(cum - params.top_p)))
    return tok, margin


def check_rows(logits, T, k=None, p=None, seed=0, step=0, limit=None, path=0):
    """Device tokens against the twin for every row; returns the status array. At most 1% of
    the rows (and 2 at least) may differ, each only within TOL_CDF of a boundary."""
    B, V = logits.shape
    lim = V if limit is None else limit
    tok, status, u = dev_sample(logits, T, k, p, seed, step, limit, path)
    np.testing.assert_array_equal(u, sample_uniform(seed, step, np.arange(B)))
    params = SamplingParams(T, k, p, seed)
    off = 0
    for r in range(B):
        want, margin = twin_margin(logits[r], params, u[r], lim)
        if tok[r] != want:
            assert margin < TOL_CDF, (r, tok[r], want, margin, T, k, p)
            off += 1
        assert 0 <= tok[r] < lim
    assert off <= max(2, B // 100), off
    assert np.all(status & 0xFF == 0)
    # rows that fit in shared memory are cached there, unless path | 2 forbids it
    cached = lim * 4 <= 200 * 1024 and not path & 2
    assert np.all((status >> 16) & 1 == int(cached)) or lim * 4 > 200 * 1024
    # up to 16 rows run on the cluster kernel (8 CTAs a row), unless path | 2 or | 4 asks for
    # the one-block kernel
    assert np.all((status >> 17) & 1 == int(cluster_expected(B, lim, k, path)))
    return (status >> 8) & 0xFF


def cluster_expected(B, lim, k, path):
    """Whether bm_cuda_sample runs the cluster kernel: up to 16 rows of up to 98,304 ids, no
    top-k of at most 2048 (the one-block kernel's list path), no path | 2 or | 4."""
    list_k = k is not None and k < lim and k <= 2048
    return B <= 16 and lim <= 8 * 512 * 24 and not list_k and not path & 6


PARAMS = [(0.0, None, None), (1.0, None, None), (0.7, 50, None), (1.0, None, 0.9),
          (1.3, 40, 0.8), (1e-3, None, None), (100.0, None, 0.5), (1.0, 1, None),
          (1.0, 10 ** 6, None), (1.0, None, 1e-6), (1.0, None, 1.0), (0.5, 3, 0.999)]


@gpu
@pytest.mark.parametrize("V", [1, 7, 97, 1001, V_BIG])
@pytest.mark.parametrize("seed", [0, 7, 2 ** 64 - 1])
def test_random_logits_against_twin(V, seed):
    rng = np.random.default_rng(V + seed % 1000)
    B = 6
    logits = (rng.standard_normal((B, V)) * rng.uniform(0.5, 4, (B, 1))).astype(np.float32)
    for T, k, p in PARAMS:
        for limit in (None, max(1, V - 3)):
            paths = check_rows(logits, T, k, p, seed=seed, step=V, limit=limit)
            lim = V if limit is None else limit
            use_k = k is not None and k < lim
            use_p = p is not None and p < 1.0
            if T == 0:
                assert np.all(paths == PATH_GREEDY)
            elif not use_k and not use_p:
                assert np.all(paths == PATH_DIRECT)
            elif cluster_expected(6, lim, k, 0):   # the cluster kernel has no list path
                assert np.all(paths == PATH_GENERIC)
            else:
                assert np.all((paths == PATH_LIST) | (paths == PATH_GENERIC))
            # the one-block kernel at these 6 rows (its list path where the sets are small)
            paths = check_rows(logits, T, k, p, seed=seed, step=V, limit=limit, path=4)
            if use_k or use_p:
                assert np.all((paths == PATH_LIST) | (paths == PATH_GENERIC))
            if use_k or use_p:   # the generic path, forced, agrees too
                assert np.all(check_rows(logits, T, k, p, seed=seed, step=V, limit=limit,
                                         path=1) == PATH_GENERIC)
            if V >= 1001 and seed == 7:   # the uncached kernel (global reads), both paths
                check_rows(logits, T, k, p, seed=seed, step=V, limit=limit, path=2)
                if use_k or use_p:
                    assert np.all(check_rows(logits, T, k, p, seed=seed, step=V, limit=limit,
                                             path=3) == PATH_GENERIC)


@gpu
def test_list_and_generic_paths_taken():
    rng = np.random.default_rng(3)
    # (the one-block kernel, path | 4: the cluster kernel of up to 16 rows has no list path)
    # peaked (LM-like) logits: the top-k / nucleus sets are small -> the list path
    peaked = (rng.standard_normal((8, V_BIG)) * 4).astype(np.float32)
    assert np.all(check_rows(peaked, 0.8, 50, None, seed=1, path=4) == PATH_LIST)
    assert np.all(check_rows(peaked, 1.0, None, 0.9, seed=2, path=4) == PATH_LIST)
    assert np.all(check_rows(peaked, 1.0, 200, 0.95, seed=3, path=4) == PATH_LIST)
    # flat logits: the 0.9 nucleus has tens of thousands of ids -> generic
    flat = (rng.standard_normal((4, V_BIG)) * 0.1).astype(np.float32)
    assert np.all(check_rows(flat, 1.0, None, 0.9, seed=4, path=4) == PATH_GENERIC)
    # top_k beyond the list's capacity -> generic
    assert np.all(check_rows(flat, 1.0, 5000, None, seed=5, path=4) == PATH_GENERIC)
    # top-k on flat logits: the fine levels (within T/32 .. T of the max) -> the list
    assert np.all(check_rows(flat, 1.0, 50, None, seed=6, path=4) == PATH_LIST)
    assert np.all(check_rows(flat, 1.0, 1, 0.5, seed=7, path=4) == PATH_LIST)
    # by default: a top-k of at most 2048 keeps the one-block kernel (its list path), else
    # the cluster kernel (generic) up to 16 rows, and one block a row from 17
    assert np.all(check_rows(peaked, 0.8, 50, None, seed=8) == PATH_LIST)
    assert np.all(check_rows(peaked, 1.0, 200, 0.95, seed=8) == PATH_LIST)
    for lg, k, p in [(peaked, None, 0.9), (flat, None, 0.9), (flat, 5000, None)]:
        assert np.all(check_rows(lg, 1.0, k, p, seed=8) == PATH_GENERIC)
    many = np.concatenate([peaked, peaked, peaked[:1]])   # one block a row: its list path
    assert np.all(check_rows(many, 1.0, None, 0.9, seed=9) == PATH_LIST)


@gpu
def test_ties():
    rng = np.random.default_rng(11)
    for V in (13, 1000, V_BIG):
        logits = rng.integers(0, 6, (8, V)).astype(np.float32)   # many exact ties
        logits[0] = 2.0                                           # all tied
        for T, k, p in [(0.0, None, None), (1.0, 1, None), (1.0, 3, None), (0.3, 2, 0.5),
                        (1.0, None, 0.3), (1.0, None, 0.5), (2.0, 7, 0.9)]:
            check_rows(logits, T, k, p, seed=V, step=1)
            check_rows(logits, T, k, p, seed=V, step=1, path=4)
            if (k is not None and k < V) or p is not None:
                check_rows(logits, T, k, p, seed=V, step=1, path=1)
                check_rows(logits, T, k, p, seed=V, step=1, path=3)
                check_rows(logits, T, k, p, seed=V, step=1, path=5)
        tok, _, _ = dev_sample(logits, 0.0)
        np.testing.assert_array_equal(tok, np.argmax(logits, 1))   # ties -> lowest id
        assert tok[0] == 0


@gpu
def test_tied_top_p_cut_keeps_lowest_ids():
    # four equal weights, top_p 0.5: exactly ids 2 and 5 (the two lowest of the tied max)
    row = np.full(9, -np.inf, np.float32)
    row[[2, 5, 6, 8]] = 1.0
    logits = np.tile(row, (4000, 1))
    tok, _, _ = dev_sample(logits, 1.0, None, 0.5, seed=3)
    assert set(np.unique(tok)) == {2, 5}
    for path in (1, 2, 3):
        tok, _, _ = dev_sample(logits, 1.0, None, 0.5, seed=3, path=path)
        assert set(np.unique(tok)) == {2, 5}
    # the cluster kernel (up to 16 rows a call)
    tok = np.concatenate([dev_sample(logits[:16], 1.0, None, 0.5, seed=3, step=s)[0]
                          for s in range(40)])
    assert set(np.unique(tok)) == {2, 5}


@gpu
def test_infinities_and_nan():
    V = 301
    rng = np.random.default_rng(5)
    lg = rng.standard_normal((6, V)).astype(np.float32)
    lg[0, [3, 100, 250]] = np.inf           # uniform among the +inf ids
    lg[1, :] = -np.inf
    lg[1, 17] = 0.5                         # the only finite one
    lg[2, ::2] = -np.inf
    lg[3, [7, 8]] = np.inf
    lg[3, 299:] = np.nan                    # beyond vocab_limit = 299: never looked at
    lg[4, 40] = np.inf
    lg[5, 5:] = -np.inf
    for T, k, p in [(0.0, None, None), (1.0, None, None), (1.0, 2, None), (1.0, None, 0.5),
                    (3.0, 1, 0.9)]:
        check_rows(lg, T, k, p, seed=9, limit=299)
        check_rows(lg, T, k, p, seed=9, limit=299, path=2)
        check_rows(lg, T, k, p, seed=9, limit=299, path=4)
        if k is not None or p is not None:
            check_rows(lg, T, k, p, seed=9, limit=299, path=1)
            check_rows(lg, T, k, p, seed=9, limit=299, path=3)
    for path in (0, 4):
        tok, _, _ = dev_sample(lg, 0.0, limit=299, path=path)
        assert tok[0] == 3 and tok[1] == 17 and tok[3] == 7 and tok[4] == 40
    # the cluster kernel: uniform among the +inf ids too
    tok = np.concatenate([dev_sample(lg[:1], 1.0, seed=4, step=s)[0] for s in range(600)])
    assert set(np.unique(tok)) == {3, 100, 250}
    many = np.tile(lg[0], (3000, 1))
    tok, _, _ = dev_sample(many, 1.0, seed=4)
    counts = np.bincount(tok, minlength=V)
    assert set(np.flatnonzero(counts)) == {3, 100, 250}
    assert counts[[3, 100, 250]].min() > 850            # 1000 expected each; sd ~26

    nan = lg.copy()
    nan[2, 10] = np.nan
    with pytest.raises(FloatingPointError, match="row 2.*NaN"):
        cuda.sample(cuda.to_device(nan), 1.0, vocab_limit=299)
    with pytest.raises(FloatingPointError, match="NaN"):
        cuda.sample(cuda.to_device(nan), 0.0, vocab_limit=299)
    neg = lg.copy()
    neg[4, :] = -np.inf
    with pytest.raises(FloatingPointError, match="row 4.*-inf"):
        cuda.sample(cuda.to_device(neg), 0.7, top_k=3, vocab_limit=299)
    # -inf everywhere below vocab_limit, a finite logit above it: still an error
    neg[4, 300] = 1.0
    with pytest.raises(FloatingPointError, match="-inf"):
        cuda.sample(cuda.to_device(neg), 0.7, vocab_limit=299)


@gpu
def test_frequencies_chi_square():
    # 40,000 rows of the same logits, each row its own uniform (row_streams): draws from the
    # same distribution. With a fixed seed the statistic is a fixed number: the threshold
    # (a 1e-9 tail at these degrees of freedom) cannot flake, yet a wrong distribution (a
    # weight off by 2% on a 10% token) would exceed it.
    from math import erfc, sqrt
    rng = np.random.default_rng(0)
    V, n = 24, 40000
    row = rng.standard_normal(V).astype(np.float32) * 1.5
    logits = np.tile(row, (n, 1))
    for T, k, p in [(1.0, None, None), (0.6, 5, None), (1.0, None, 0.7), (2.0, 10, 0.9)]:
        tok, status, u = dev_sample(logits, T, k, p, seed=123)
        probs = sample_probs(row, SamplingParams(T, k, p), V)
        counts = np.bincount(tok, minlength=V)
        assert np.all(counts[probs == 0] == 0)            # excluded ids never drawn
        keep = probs > 0
        expect = probs[keep] * n
        chi2 = float(np.sum((counts[keep] - expect) ** 2 / expect))
        dof = int(keep.sum()) - 1
        if dof > 0:
            # Wilson-Hilferty: chi2/dof ~ normal(1 - 2/(9 dof), 2/(9 dof)) ** 3
            z = ((chi2 / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / sqrt(2 / (9 * dof))
            assert 0.5 * erfc(z / sqrt(2)) > 1e-9, (T, k, p, chi2, dof)
        assert abs(u.mean() - 0.5) < 0.01 and u.min() >= 0 and u.max() < 1
        # the cluster kernel (16 rows a call: 2,500 calls of distinct steps)
        if (T, k, p) in [(1.0, None, None), (1.0, None, 0.7)]:
            tok = np.concatenate([dev_sample(logits[:16], T, k, p, seed=123, step=s)[0]
                                  for s in range(2500)])
            counts = np.bincount(tok, minlength=V)
            assert np.all(counts[probs == 0] == 0)
            chi2 = float(np.sum((counts[keep] - expect) ** 2 / expect))
            z = ((chi2 / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / sqrt(2 / (9 * dof))
            assert 0.5 * erfc(z / sqrt(2)) > 1e-9, ("cluster", T, k, p, chi2, dof)


@gpu
def test_same_seed_same_tokens():
    rng = np.random.default_rng(1)
    lg = rng.standard_normal((64, V_BIG)).astype(np.float32) * 3
    d = cuda.to_device(lg)
    a = cuda.sample(d, 0.9, top_k=100, top_p=0.95, seed=42, step=3).numpy()
    b = cuda.sample(d, 0.9, top_k=100, top_p=0.95, seed=42, step=3).numpy()
    c = cuda.sample(d, 0.9, top_k=100, top_p=0.95, seed=43, step=3).numpy()
    e = cuda.sample(d, 0.9, top_k=100, top_p=0.95, seed=42, step=4).numpy()
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.int64 and a.shape == (64,)
    assert (a != c).sum() > 10 and (a != e).sum() > 10
    # row_streams=False: every row draws with row 0's uniform
    same = cuda.sample(cuda.to_device(np.tile(lg[:1], (8, 1))), 1.0, seed=5,
                       row_streams=False).numpy()
    assert np.all(same == same[0])


@gpu
def test_bad_arguments():
    d = cuda.to_device(np.zeros((2, 10), np.float32))
    for kw, name in [(dict(temperature=-1.0), "temperature"), (dict(temperature=np.inf), "temperature"),
                     (dict(top_k=0), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_p=0.0), "top_p"),
                     (dict(top_p=1.5), "top_p"), (dict(seed=-1), "seed"), (dict(step=-1), "step"),
                     (dict(vocab_limit=0), "vocab_limit"), (dict(vocab_limit=11), "vocab_limit")]:
        with pytest.raises(ValueError, match=name):
            cuda.sample(d, **kw)
    with pytest.raises(ValueError, match="seed"):
        C().cuda_sample(d, 1.0, None, None, 2 ** 64)
    with pytest.raises(ValueError, match="logits"):
        cuda.sample(cuda.to_device(np.zeros(10, np.float32)))
    with pytest.raises(TypeError, match="logits"):
        cuda.sample(cuda.to_device(np.zeros((2, 10), np.float64)))
    assert cuda.sample(cuda.to_device(np.zeros((0, 10), np.float32))).numpy().shape == (0,)


# ---- the model: sampled decoding on the device -----------------------------------------------

def tiny_model(vocab=97, real=50, tokenizer=None, seed=9):
    from blackmamba.model import random_tensors
    from test_cuda_model import CONFIGS, make_cfg
    cfg = make_cfg(**CONFIGS[0], vocab_size=vocab)
    cfg.real_vocab_size = real           # ids >= real are padding: never chosen
    t = random_tensors(cfg, seed=seed)
    t["embedding.word_embeddings.weight"][real:] *= 4.0   # make them tempting
    return model_cuda.CudaModel(cfg, t, dtype="float32", tokenizer=tokenizer)


@gpu
def test_model_sample_temperature_zero_is_greedy():
    g = tiny_model()
    ids = np.random.default_rng(2).integers(0, 50, (3, 7))
    np.testing.assert_array_equal(g.sample(ids, 12, temperature=0.0), g.greedy(ids, 12))


@gpu
@pytest.mark.parametrize("T,k,p", [(1.0, None, None), (0.8, 20, 0.9), (1.5, None, 0.6)])
def test_model_sample_equals_host_loop(T, k, p):
    # the device loop against the host path: the same graph's logits copied to the host each
    # step, the twin drawing with the same uniform (row 0's: every row as if alone)
    g = tiny_model()
    ids = np.random.default_rng(4).integers(0, 50, (3, 5))
    seed, n = 31, 16
    dev = g.sample(ids, n, temperature=T, top_k=k, top_p=p, seed=seed)
    assert dev.shape == (3, n) and dev.max() < 50
    np.testing.assert_array_equal(dev, g.sample(ids, n, temperature=T, top_k=k, top_p=p,
                                                seed=seed))
    st = g.new_state(3)
    logits = g.prefill(ids, st, logits="last")
    params = SamplingParams(T, k, p, seed)
    off = 0
    for s in range(n):
        u = float(sample_uniform(seed, s, 0))
        for r in range(3):
            want, margin = twin_margin(logits[r], params, u, 50)
            if want != dev[r, s]:
                assert margin < TOL_CDF
                off += 1
        logits = g.step(dev[:, s], st)    # feed the device's tokens: the paths stay aligned
    assert off <= 1
    assert st.seqlen == 5 + n


@gpu
def test_generate_on_device_paths_agree(monkeypatch):
    # generate() on a CudaModel: chunked device loop (private state), per-token device draws
    # (caller's state), CudaModel.sample: the same tokens (cut at EOS)
    g = tiny_model()
    monkeypatch.setattr(generation, "DEVICE_CHUNK", 5)
    kw = dict(max_new_tokens=13, temperature=1.2, top_k=30, seed=8, return_tokens=True)
    for prompts in ([[1, 2, 3], [4, 5, 6, 7, 8], [9]], [[1, 2, 3], [4, 5, 6], [9, 8, 7]]):
        chunked = g.generate(prompts, **kw)
        per_token = g.generate(prompts, state=g.new_state(3), **kw)
        assert chunked == per_token
    # equal lengths: one batch prefill, as CudaModel.sample does
    full = g.sample(np.array(prompts), 13, temperature=1.2, top_k=30, seed=8)
    for got, f in zip(chunked, full.tolist()):
        assert got == (f[:f.index(0)] if 0 in f else f)
    # temperature 0 through generate: the greedy tokens
    greedy = g.generate(prompts, max_new_tokens=9, return_tokens=True)
    for got, f in zip(greedy, g.greedy(np.array(prompts), 9).tolist()):
        assert got == (f[:f.index(0)] if 0 in f else f)


@gpu
def test_generate_stream_and_stop_on_device():
    from blackmamba.tokenizer import ByteTokenizer
    tk = ByteTokenizer()
    g = tiny_model(vocab=256, real=128, tokenizer=tk, seed=3)   # ASCII only: whole characters
    kw = dict(max_new_tokens=24, temperature=1.0, seed=12)
    text = g.generate("ab", **kw)
    assert "".join(g.generate("ab", stream=True, **kw)) == text
    toks = g.generate("ab", return_tokens=True, **kw)
    assert tk.decode(toks) == text
    if len(text) >= 6:
        stop = text[3:5]
        cut = text[:text.find(stop)]
        assert g.generate("ab", stop=stop, **kw) == cut
        assert "".join(g.generate("ab", stream=True, stop=stop, **kw)) == cut


@gpu
def test_model_sample_nan_raises():
    g = tiny_model()
    st = g.new_state(1)
    g.prefill(np.array([[1, 2]]), st, logits=None)
    bad = np.zeros((1, g.vocab_size), np.float32)
    bad[0, 3] = np.nan
    with pytest.raises(FloatingPointError, match="NaN"):
        g._sample_device(st, 1, SamplingParams(1.0), 0, 0, logits0=bad)
    assert not st.invalid
    with pytest.raises(ValueError, match="temperature"):
        g.sample(np.array([[1]]), 3, temperature=-0.5)


# ---- the twin itself (CPU) ------------------------------------------------------------------

def test_twin_philox_known_answers():
    # Random123's kat_vectors for philox4x32 with 10 rounds
    from blackmamba.generation import philox4x32
    cases = [([0, 0, 0, 0], [0, 0], [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]),
             ([0xffffffff] * 4, [0xffffffff] * 2, [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]),
             ([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0],
              [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1])]
    for ctr, key, want in cases:
        np.testing.assert_array_equal(philox4x32(ctr, key), np.array(want, np.uint32))
    u = sample_uniform(5, np.arange(1000), 3)
    assert u.min() >= 0 and u.max() < 1 and len(set(u.tolist())) == 1000
    assert sample_uniform(5, 7, 3) == u[7]


def test_twin_draw_is_rng_choice():
    # sample_next_u with the generator's next uniform == sample_next with that generator
    rng = np.random.default_rng(0)
    for T, k, p in PARAMS:
        params = SamplingParams(T, k, p)
        for trial in range(5):
            row = (rng.standard_normal(37) * 2).astype(np.float32)
            g = np.random.default_rng(trial)
            u = np.random.default_rng(trial).random() if T > 0 else 0.0
            assert generation.sample_next(row, params, g, 33) == sample_next_u(row, params, u, 33)
