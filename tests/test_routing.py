"""blackmamba.routing: tracing, streaming statistics, Sinkhorn study, figures, CLI.

The golden model (tiny-a) anchors the tracer to the released code's router logits; the
statistics are checked against direct NumPy computations on random routing produced by a
stand-in model (it reports routing through the same `_tracer` hook as Model, so collect()
runs over large corpora in milliseconds).
"""
import json
import os
import pathlib
import sys
import types

import numpy as np
import pytest

import blackmamba as bm
from blackmamba import routing

from conftest import DATA, GOLDEN


# ---- a stand-in model: routing only, deterministic per (layer, token, position) -----------

class FakeModel:
    """Reports routing like Model._mlp does: tracer(layer, ids (T,), gates (T,), logits (T, X))
    once per MoE layer per prefill chunk, tokens row-major (batch, position). Logits are a
    fixed function of (layer, token, absolute position), so any batching of the same
    sequences must give the same routing."""

    def __init__(self, kinds=("r", "8", "r", "8", "r", "4"), vocab=300, seed=0, chunk=16,
                 skew=2.0):
        rng = np.random.default_rng(seed)
        self.config = types.SimpleNamespace(layer_kinds=list(kinds))
        self.vocab_size, self.name, self.chunk = vocab, "fake", chunk
        self.tokenizer = bm_byte_tokenizer() if vocab >= 256 else None
        self._tracer = None
        self.tok = {}      # layer -> (V, X) per-token logits
        self.pos = {}      # layer -> (64, X) per-position logits (positions >= 64 share row 63)
        for i, k in enumerate(kinds):
            if k.isdigit() and int(k) >= 2:
                X = int(k)
                self.tok[i] = rng.standard_normal((vocab, X)).astype(np.float32)
                self.pos[i] = (skew * rng.standard_normal((64, X)) / (1 + np.arange(64))[:, None]
                               ).astype(np.float32)
        self.calls = 0

    def new_state(self, batch_size=1):
        return types.SimpleNamespace(seqlen=0, batch_size=batch_size)

    def prefill(self, ids, state, logits="all"):
        assert logits is None
        B, L = ids.shape
        for s in range(0, L, self.chunk):           # chunks along L, like Model.prefill
            c = ids[:, s:s + self.chunk]
            pos = np.minimum(state.seqlen + np.arange(c.shape[1]), 63)
            for li in self.tok:
                lg = self.tok[li][c] + self.pos[li][pos][None]          # (B, l, X)
                lg = np.ascontiguousarray(lg.reshape(-1, lg.shape[-1]))  # (T, X) row-major
                e = lg.argmax(1).astype(np.int32)
                g = (1 / (1 + np.exp(-lg[np.arange(len(e)), e]))).astype(np.float32)
                if self._tracer is not None:
                    self._tracer(li, e, g, lg)
            state.seqlen += c.shape[1]
            self.calls += 1
        return None


def bm_byte_tokenizer():
    class Byte:                       # the byte tokenizer's contract (tokenizer.py)
        vocab_size = 256

        def encode(self, text):
            return list(text.encode("utf-8"))

        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")
    return Byte()


def direct(model, ids):
    """Routing of ids (B, L) computed directly from the stand-in's tables (NumPy)."""
    B, L = ids.shape
    pos = np.minimum(np.arange(L), 63)
    out = {}
    for li in model.tok:
        lg = (model.tok[li][ids] + model.pos[li][pos][None]).reshape(B * L, -1)
        out[li] = lg
    return out


@pytest.fixture(scope="module")
def tiny():
    return bm.load(GOLDEN, tokenizer=False)


# ---- golden: the tracer sees exactly the released router ----------------------------------

def test_golden_counts_equal_argmax_of_router_logits(tiny, golden):
    tr = routing.trace(tiny, golden["input_ids"], keep_logits=True)
    assert tr.layers == [1, 3] and tr.shape == (2, 37)
    st = routing.Stats.from_trace(tr, vocab_size=tiny.vocab_size)
    for li in (1, 3):
        ref = golden[f"router_logits/decoder.layers.{li}.mixer"]          # (74, 8) row-major
        np.testing.assert_array_equal(tr.expert_ids[li], ref.argmax(1))
        want = np.bincount(ref.argmax(1), minlength=8)
        np.testing.assert_array_equal(st.counts[li], want)
        np.testing.assert_allclose(st.fractions(li), want / 74, rtol=0, atol=0)
        # gate = sigmoid(winning logit); fp32 vs the reference's fp32: 1e-4 relative as in
        # test_model's golden tolerance
        np.testing.assert_allclose(tr.gates[li], 1 / (1 + np.exp(-ref.max(1))), rtol=1e-4)
        np.testing.assert_allclose(tr.router_logits[li], ref, rtol=1e-4, atol=1e-4)
        assert tr.router_logits[li].shape == (74, 8)
    assert tiny._tracer is None                     # removed after the pass
    s = st.summary()
    assert [r["layer"] for r in s] == [1, 3] and s[0]["tokens"] == 74


def test_trace_text_and_long_inputs_chunked(tiny, golden, monkeypatch):
    # prefill runs long inputs in chunks along L: the trace must stitch them back row-major
    ids = golden["input_ids"]
    whole = routing.trace(tiny, ids)
    monkeypatch.setattr(bm.model, "PREFILL_CHUNK", 5)
    monkeypatch.setattr(tiny, "prefill", lambda i, s, logits: bm.Model.prefill(
        tiny, i, s, logits=logits, chunk_size=5))
    chunked = routing.trace(tiny, ids)
    for li in (1, 3):
        np.testing.assert_array_equal(chunked.expert_ids[li], whole.expert_ids[li])
    fake = FakeModel(chunk=7)
    tr = routing.trace(fake, ["hello routing", "HELLO ROUTING"], keep_logits=True)
    assert fake.calls == 2 and tr.shape == (2, 13)
    ref = direct(fake, tr.ids)
    for li in tr.layers:
        np.testing.assert_array_equal(tr.router_logits[li], ref[li])
        np.testing.assert_array_equal(tr.expert_ids[li], ref[li].argmax(1))
    with pytest.raises(ValueError, match="different lengths"):
        routing.trace(fake, ["a", "bb"])
    with pytest.raises(ValueError, match="no tokenizer"):
        routing.trace(tiny, "text")


def test_tracer_chains_and_restores():
    fake = FakeModel()
    seen = []
    fake._tracer = lambda li, e, g, lg: seen.append(li)
    routing.trace(fake, np.arange(10)[None])
    assert seen == [1, 3, 5]
    assert fake._tracer is not None and fake._tracer.__name__ == "<lambda>"


# ---- statistics against direct NumPy ------------------------------------------------------

def np_entropy(c):
    f = c / c.sum()
    f = f[f > 0]
    return -(f * np.log(f)).sum() / np.log(len(c))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balance_against_numpy(seed):
    rng = np.random.default_rng(seed)
    for X in (2, 7, 8):
        c = rng.integers(0, 50, X)
        c[rng.integers(X)] = 0                          # an idle expert: 0 log 0 = 0
        b = routing.balance(c)
        mean = c.sum() / X
        np.testing.assert_allclose(b["entropy"], np_entropy(c.astype(float)), rtol=1e-12)
        np.testing.assert_allclose(b["cv"], np.sqrt(((c - mean) ** 2).mean()) / mean,
                                   rtol=1e-12)
        np.testing.assert_allclose(b["max_over_mean"], c.max() / mean, rtol=1e-12)
        np.testing.assert_allclose(b["min_over_mean"], c.min() / mean, rtol=1e-12)
    assert routing.balance([5, 5, 5, 5])["entropy"] == pytest.approx(1.0)
    assert routing.balance([5, 5, 5, 5])["cv"] == 0.0
    assert routing.balance([0, 9, 0])["entropy"] == 0.0
    assert np.isnan(routing.balance([0, 0])["cv"])


@pytest.mark.parametrize("seed", [3, 4])
def test_stats_against_numpy_on_random_traces(seed):
    fake = FakeModel(seed=seed)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, fake.vocab_size, (5, 41))
    tr = routing.trace(fake, ids, keep_logits=True)
    st = routing.Stats.from_trace(tr, vocab_size=fake.vocab_size)
    T = ids.size
    e = {li: direct(fake, ids)[li].argmax(1) for li in fake.tok}
    pos = np.tile(np.arange(41), 5)
    edges = routing.default_position_edges(41)
    np.testing.assert_array_equal(edges, [0, 1, 2, 4, 8, 16, 32])
    for li, X in st.num_experts.items():
        np.testing.assert_array_equal(st.counts[li], np.bincount(e[li], minlength=X))
        row = next(r for r in st.summary() if r["layer"] == li)
        c = np.bincount(e[li], minlength=X).astype(float)
        np.testing.assert_allclose(row["entropy"], np_entropy(c), rtol=1e-12)
        np.testing.assert_allclose(row["cv"], c.std() / c.mean(), rtol=1e-12)
        np.testing.assert_allclose(row["max_over_mean"], c.max() / c.mean(), rtol=1e-12)
        # position buckets: a Python loop over tokens
        want = np.zeros((len(edges), X), np.int64)
        for t in range(T):
            b = max(i for i, s in enumerate(edges) if pos[t] >= s)
            want[b, e[li][t]] += 1
        np.testing.assert_array_equal(st.position_counts[li], want)
        # mean gate per expert
        g = tr.gates[li]
        for x in range(X):
            if c[x]:
                np.testing.assert_allclose(st.mean_gate(li)[x], g[e[li] == x].mean(),
                                           rtol=1e-6)
        # top tokens: exact here (capacity 256 > distinct tokens per expert)
        top = st.top_tokens(li, k=3)
        for x in range(X):
            toks = ids.reshape(-1)[e[li] == x]
            if toks.size:
                u, n = np.unique(toks, return_counts=True)
                assert [cnt for _, _, cnt in top[x]] == sorted(n, reverse=True)[:3]
                for tid, text, cnt in top[x]:
                    assert cnt == n[u == tid][0]
                    assert text == bytes([tid]).decode("utf-8", "replace") if tid < 256 \
                        else text is None
    # agreement: joint histograms of consecutive MoE layers (1->3 has 8x8, 3->5 has 8x4)
    assert list(st.agreement) == [(1, 3), (3, 5)]
    for (a, b), J in st.agreement.items():
        want = np.zeros_like(J)
        np.add.at(want, (e[a], e[b]), 1)
        np.testing.assert_array_equal(J, want)
        ag = routing.agreement_stats(J)
        k = min(J.shape)
        assert ag["same_index"] == pytest.approx((e[a] == e[b]).mean())
        p = want / T
        pa, pb = p.sum(1), p.sum(0)
        mi = sum(p[i, j] * np.log(p[i, j] / (pa[i] * pb[j]))
                 for i in range(J.shape[0]) for j in range(J.shape[1]) if p[i, j] > 0)
        ha = -(pa[pa > 0] * np.log(pa[pa > 0])).sum()
        hb = -(pb[pb > 0] * np.log(pb[pb > 0])).sum()
        assert ag["nmi"] == pytest.approx(mi / np.sqrt(ha * hb), rel=1e-10)
        assert ag["predictability"] == pytest.approx(want.max(1).sum() / T)
        assert 0 <= ag["nmi"] <= 1 and k <= 8
    # a layer always agrees with itself
    ag = routing.agreement_stats(np.diag([3, 4, 5]))
    assert ag["same_index"] == 1.0 and ag["nmi"] == pytest.approx(1.0)
    # the reservoir (capacity 4096 > 205 tokens) holds every token's logits in order
    assert st.reservoir_filled == T
    np.testing.assert_array_equal(st.reservoir_token_ids[:T], ids.reshape(-1))
    for li in st.layers:
        np.testing.assert_array_equal(st.router_logits(li), tr.router_logits[li])


def test_collect_over_batches_equals_one_trace(tiny, golden):
    # the real model: 2 sequences of 37 tokens, one trace vs collect one sequence per batch
    ids = golden["input_ids"]
    one = routing.Stats.from_trace(routing.trace(tiny, ids, keep_logits=True),
                                   vocab_size=tiny.vocab_size, seq_len=37)
    st = routing.collect(tiny, [ids[0], ids[1]], seq_len=37, batch_size=1, progress=False)
    assert st.num_tokens == 74 and st.num_sequences == 2
    for li in (1, 3):
        np.testing.assert_array_equal(st.counts[li], one.counts[li])
        np.testing.assert_array_equal(st.position_counts[li], one.position_counts[li])
        # batches of 1 vs 2 rows change the GEMM blocking: float32 rounding only (3e-5 seen)
        np.testing.assert_allclose(st.router_logits(li), one.router_logits(li), rtol=1e-4,
                                   atol=1e-5)
    np.testing.assert_array_equal(st.agreement[(1, 3)], one.agreement[(1, 3)])
    # the stand-in over a token stream: 7 sequences of 24 (+ a tail of 9), batches of 3
    fake = FakeModel()
    stream = np.random.default_rng(5).integers(0, fake.vocab_size, 7 * 24 + 9)
    st = routing.collect(fake, stream, seq_len=24, batch_size=3, progress=False,
                         top_capacity=1000)
    seqs = stream[:7 * 24].reshape(7, 24)
    full = routing.Stats.from_trace(routing.trace(fake, seqs, keep_logits=True),
                                    vocab_size=fake.vocab_size, seq_len=24, top_capacity=1000)
    full.update(routing.trace(fake, stream[None, 7 * 24:], keep_logits=True))
    assert st.num_tokens == full.num_tokens == stream.size and st.num_sequences == 8
    for li in st.layers:
        np.testing.assert_array_equal(st.counts[li], full.counts[li])
        np.testing.assert_array_equal(st.position_counts[li], full.position_counts[li])
        np.testing.assert_array_equal(st.gate_sum[li], full.gate_sum[li])
        assert st.top_tokens(li, 5, decode=False) == full.top_tokens(li, 5, decode=False)
        np.testing.assert_array_equal(st.router_logits(li), full.router_logits(li))
    for k in st.agreement:
        np.testing.assert_array_equal(st.agreement[k], full.agreement[k])
    # max_tokens stops mid-sequence
    st = routing.collect(fake, stream, seq_len=24, batch_size=3, max_tokens=50, progress=False)
    assert st.num_tokens == 50 and st.num_sequences == 3


def test_memory_bounded_on_a_large_corpus():
    fake = FakeModel(vocab=2000, chunk=256)
    rng = np.random.default_rng(6)
    kw = dict(seq_len=128, batch_size=16, progress=False, top_capacity=32, reservoir_size=512)
    zipf = lambda n: np.minimum(rng.zipf(1.3, n) - 1, 1999)            # heavy-tailed tokens
    small = routing.collect(fake, zipf(4_000), **kw)
    big = routing.collect(fake, [zipf(150_000), zipf(150_000)], **kw)
    assert big.num_tokens == 300_000
    assert big.nbytes() == small.nbytes()
    for li, X in big.num_experts.items():
        assert big._top_keys[li].size <= X * 32          # counters capped per expert
        assert big.reservoir[li].shape == (512, X)
        assert big.position_counts[li].shape == small.position_counts[li].shape
    assert big.reservoir_filled == 512
    # the bounded counters: kept counts are lower bounds within top_error of the truth
    stream = zipf(20_000)
    lo = routing.collect(fake, stream, **kw)
    ex = routing.collect(fake, stream, **{**kw, "top_capacity": 5000})
    checked = 0
    for li in lo.layers:
        truth = {(x, t): c for x, rows in enumerate(ex.top_tokens(li, 5000, decode=False))
                 for t, _, c in rows}
        for x, rows in enumerate(lo.top_tokens(li, 32, decode=False)):
            for t, _, c in rows:
                assert 0 <= truth[(x, t)] - c <= lo.top_error[li][x]
                checked += 1
        # the heaviest token of each expert is found exactly (Zipf head)
        for x, rows in enumerate(lo.top_tokens(li, 1, decode=False)):
            if rows:
                assert rows[0][0] == ex.top_tokens(li, 1, decode=False)[x][0][0]
    assert checked > 100
    # the reservoir is a uniform sample: token ids it holds came from the stream
    assert set(big.reservoir_token_ids.tolist()) <= set(range(2000))


def test_json_csv_roundtrip(tmp_path):
    fake = FakeModel()
    st = routing.collect(fake, ["some text for the routing study\n" * 20], seq_len=32,
                         batch_size=4, progress=False)
    p = st.to_json(tmp_path / "s.json")
    d = json.loads(pathlib.Path(p).read_text())
    assert d["num_tokens"] == st.num_tokens and len(d["layers"]) == 3
    assert d["layers"][0]["top_tokens"][0] == [
        {"id": i, "text": t, "count": c} for i, t, c in st.top_tokens(1, 20)[0]]
    back = routing.Stats.from_json(p, tokenizer=fake.tokenizer)
    for li in st.layers:
        np.testing.assert_array_equal(back.counts[li], st.counts[li])
        np.testing.assert_array_equal(back.position_counts[li], st.position_counts[li])
        np.testing.assert_array_equal(back.router_logits(li), st.router_logits(li))
        assert back.top_tokens(li, 5) == st.top_tokens(li, 5)
    assert str(back.summary()) == str(st.summary())
    for table in ("experts", "layers", "positions", "agreement"):
        lines = pathlib.Path(st.to_csv(tmp_path / f"{table}.csv", table)).read_text().splitlines()
        assert len(lines) > 1
    lines = (tmp_path / "experts.csv").read_text().splitlines()
    assert lines[0] == "layer,expert,count,fraction,mean_gate,load_over_mean"
    assert len(lines) == 1 + 8 + 8 + 4
    assert sum(int(l.split(",")[2]) for l in lines[1:9]) == st.num_tokens
    with pytest.raises(ValueError, match="table must be"):
        st.to_csv(tmp_path / "x.csv", "nope")


# ---- Sinkhorn -----------------------------------------------------------------------------

def test_sinkhorn_study_golden_iterations(golden):
    S = golden["sinkhorn_cost"]
    study = routing.sinkhorn_study(S)
    r = study.results[0]
    assert r["blackmamba"]["iterations"] == int(golden["sinkhorn_iters"]) == 1
    assert r["uniform"]["iterations"] == int(golden["sinkhorn_uniform_iters"]) == 6
    # the Python curve (for plotting) stops at the same iteration as the C kernel
    assert len(r["blackmamba"]["curve"]) == 1 and len(r["uniform"]["curve"]) == 6
    assert r["uniform"]["curve"][-1] <= 1e-4 < r["uniform"]["curve"][-2]
    before = S.argmax(1)
    for init, key in (("blackmamba", "sinkhorn_out"), ("uniform", "sinkhorn_uniform_out")):
        after = golden[key].argmax(1)
        assert r[init]["rerouted"] == pytest.approx((before != after).mean())
        np.testing.assert_array_equal(r[init]["counts_after"], np.bincount(after, minlength=8))
        c = np.bincount(after, minlength=8)
        assert r[init]["after"]["cv"] == pytest.approx(c.std() / c.mean())
    # the scale-free view: row-marginal error of P per iteration; its value after 1 (6)
    # iterations must be that of the reference's own P after 1 (6) iterations
    for init, key in (("blackmamba", "sinkhorn_out"), ("uniform", "sinkhorn_uniform_out")):
        P = golden[key].astype(np.float64)
        m = np.mean(np.abs(P.shape[0] * P.sum(1) - 1))
        curve = r[init]["marginal_curve"]
        assert curve[r[init]["iterations"] - 1] == pytest.approx(m, rel=1e-3)
        assert curve[-1] <= 1e-4 and not r[init]["marginal_stalled"]
    # the released rule stops the BlackMamba init after 1 iteration because its d1 is tiny
    # (1/(X colsum exp 2S)); balancing the marginals to 1e-4 takes 13 iterations (uniform: 6)
    assert r["blackmamba"]["iterations_marginal"] == 13
    assert r["uniform"]["iterations_marginal"] == 6
    assert r["blackmamba"]["marginal_curve"][0] > 0.1
    c = np.bincount(before, minlength=8)
    assert r["blackmamba"]["before"]["max_over_mean"] == pytest.approx(c.max() / c.mean())
    # Sinkhorn balances: the load after is no worse than argmax's on this skewed matrix
    assert r["blackmamba"]["after"]["cv"] < r["blackmamba"]["before"]["cv"]
    s = str(study.summary())
    assert "blackmamba" in s and "uniform" in s
    with pytest.raises(ValueError, match="init must be"):
        routing.sinkhorn_study(S, inits=("vanilla",))


def test_sinkhorn_study_from_stats():
    fake = FakeModel(skew=6.0)
    st = routing.collect(fake, np.random.default_rng(7).integers(0, 300, 600), seq_len=60,
                         batch_size=5, progress=False, reservoir_size=256)
    study = routing.sinkhorn_study(st)
    assert study.layers == [1, 3, 5]
    for li in study.layers:
        assert study.num_tokens[li] == 256
        for init in ("blackmamba", "uniform"):
            r = study.results[li][init]
            P, it = bm.ops.sinkhorn(np.ascontiguousarray(st.router_logits(li)), init=init)
            assert r["iterations"] == it >= 1
            assert abs(len(r["curve"]) - it) <= 1      # fp64 twin vs fp32 kernel at tol
            assert r["rerouted"] == pytest.approx(
                (P.argmax(1) != st.router_logits(li).argmax(1)).mean())
    with pytest.raises(ValueError, match="no router logits"):
        routing.sinkhorn_study(routing.collect(fake, np.arange(50), progress=False,
                                               keep_logits=False))


# ---- figures ------------------------------------------------------------------------------

def _labels(fig):
    return [ax.get_label() for ax in fig.axes]


def test_figures(tmp_path):
    pytest.importorskip("matplotlib")
    fake = FakeModel()
    st = routing.collect(fake, np.random.default_rng(8).integers(0, 300, 2000), seq_len=100,
                         batch_size=4, progress=False)
    study = routing.sinkhorn_study(st)
    figs = {"experts": st.plot_expert_distribution(tmp_path / "experts.png"),
            "balance": st.plot_load_balance(tmp_path / "balance.png", study=study),
            "positions": st.plot_positions(tmp_path / "positions.png"),
            "agreement": st.plot_agreement(tmp_path / "agreement.png"),
            "sinkhorn": study.plot(tmp_path / "sinkhorn.png")}
    for name in figs:
        data = (tmp_path / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    labels = _labels(figs["experts"])
    # one heatmap row and one bar panel per MoE layer
    assert [l for l in labels if l.startswith("bars:")] == ["bars:1", "bars:3", "bars:5"]
    heat = next(ax for ax in figs["experts"].axes if ax.get_label() == "heatmap")
    assert heat.images[0].get_array().shape == (3, 8)
    assert heat.get_xlabel() == "expert" and heat.get_ylabel() and heat.get_title()
    assert [t.get_text() for t in heat.get_yticklabels()] == ["1", "3", "5"]
    assert figs["experts"]._suptitle.get_text().startswith("Expert token distribution")
    assert sum(1 for l in labels if l == "<colorbar>") == 1
    bars = [ax for ax in figs["experts"].axes if ax.get_label().startswith("bars:")]
    assert all(ax.get_ylabel() for ax in bars) and bars[-1].get_xlabel() == "expert"
    assert [len(ax.patches) for ax in bars] == [8, 8, 4]
    assert [l for l in _labels(figs["positions"]) if l.startswith("positions:")] == \
        ["positions:1", "positions:3", "positions:5"]
    assert [l for l in _labels(figs["agreement"]) if l.startswith("agreement:")] == \
        ["agreement:1-3", "agreement:3-5"]
    for name, fig in figs.items():
        for ax in fig.axes:
            if ax.get_label() != "<colorbar>" and not ax.get_label().startswith("bars:"):
                assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title(), (name, ax)
        assert fig._suptitle is not None and fig._suptitle.get_text()
    conv = next(ax for ax in figs["sinkhorn"].axes if ax.get_label() == "convergence")
    assert conv.get_yscale() == "log"
    # 3 layers x 2 inits curves + the tolerance line
    assert len(conv.get_lines()) == 3 * 2 + 1


def test_import_does_not_load_matplotlib():
    import subprocess
    code = ("import sys, blackmamba as bm; bm.routing; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'")
    subprocess.run([sys.executable, "-c", code], check=True,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_cli_routing(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from blackmamba.cli import main
    text = os.path.join(DATA, "tinyshakespeare.txt")
    out = tmp_path / "out"
    rc = main(["routing", "--model", GOLDEN, "--tokenizer", "byte", "--text", text,
               "--out", str(out), "--max-tokens", "600", "--seq-len", "128", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "routing over 600 tokens" in printed and "sinkhorn_iters" in printed
    for name in ("routing_stats.json", "routing_experts.csv", "routing_layers.csv",
                 "routing_positions.csv", "routing_agreement.csv", "sinkhorn.json",
                 "expert_distribution.png", "load_balance.png", "positions.png",
                 "agreement.png", "sinkhorn_convergence.png"):
        assert (out / name).stat().st_size > 0, name
    d = json.loads((out / "routing_stats.json").read_text())
    assert d["num_tokens"] == 600 and [x["layer"] for x in d["layers"]] == [1, 3]
    assert sum(d["layers"][0]["counts"]) == 600
    # no --model: the shipped default model (tests/test_default_model.py); a missing --text
    # file is an error line and exit 2
    assert main(["routing", "--text", str(out / "missing.txt"), "--out", str(out)]) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_trace_and_collect_on_gpu_match_cpu(golden, dtype):
    from blackmamba import model_cuda
    if not model_cuda.is_available():
        pytest.skip("no CUDA GPU")
    gpu = bm.load(GOLDEN, device="cuda", dtype=dtype, tokenizer=False)
    cpu = bm.load(GOLDEN, dtype="float32", tokenizer=False)
    # float32 weights run exact float32 math; bf16 weights default to bf16 tensor-core math
    # for products of more than 8 rows (activations rounded to bf16: ~1e-2 relative), so
    # their router logits are held to that and their choices to >= 95% agreement.
    tol, agree = (1e-4, 1.0) if dtype == "float32" else (2e-2, 0.95)
    tr = routing.trace(gpu, golden["input_ids"], keep_logits=True)
    for li in (1, 3):
        ref = golden[f"router_logits/decoder.layers.{li}.mixer"]
        assert np.mean(tr.expert_ids[li] == ref.argmax(-1)) >= agree
        err = np.linalg.norm(tr.router_logits[li] - ref) / np.linalg.norm(ref)
        assert err < tol, (li, err)
    ids = np.random.default_rng(0).integers(0, 256, (3, 50))
    st_gpu = routing.collect(gpu, list(ids), batch_size=2, seq_len=50, progress=False)
    st_cpu = routing.collect(cpu, list(ids), batch_size=2, seq_len=50, progress=False)
    for a, b in zip(st_gpu.summary(), st_cpu.summary()):
        diff = np.abs(np.array(a["counts"]) - np.array(b["counts"])).sum()
        assert diff <= (1 - agree) * 2 * sum(b["counts"]), (a["counts"], b["counts"])


def test_example_routing_study_runs(tmp_path):
    """examples/routing_study.py end to end on the shipped model (few tokens)."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(bm.__file__)),
               MPLBACKEND="Agg")
    r = subprocess.run([sys.executable, os.path.join(root, "examples", "routing_study.py"),
                        "--tokens", "3000", "--out", str(tmp_path)], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "routing over 3,000 tokens (shakespeare)" in r.stdout
    for name in ("expert_distribution.png", "load_balance.png", "sinkhorn_convergence.png",
                 "routing_stats.json", "sinkhorn.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    st = json.loads((tmp_path / "routing_stats.json").read_text())
    assert st["num_tokens"] == 3000 and len(st["layers"]) == 4
