"""Decode graphs kept per state (cuda/engine.cu ensure_graph, session 26): a decode graph holds
its state's buffer addresses, so each state that steps gets its own graph (and each set of
BLACKMAMBA_* switch values), up to BLACKMAMBA_DECODE_GRAPHS a batch size (default 8; the least
recently used is replaced). Before, one graph a batch size was captured again whenever another
state stepped. Everything here is bit-identical to stepping eagerly (graph=False): the same
kernels in the same order."""
import numpy as np
import pytest

from blackmamba import model_cuda
from blackmamba.model import random_tensors

from conftest import LAYER_KIND_CONFIGS, native_count, small_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not model_cuda.is_available(),
                                 reason="no CUDA device, or blackmamba built without CUDA")]


def captures():
    return native_count("bm_cuda_decode_graph_captures")


def model(ci=0, dtype="bfloat16"):
    cfg = small_config(**LAYER_KIND_CONFIGS[ci])
    return model_cuda.CudaModel(cfg, random_tensors(cfg, seed=60 + ci), dtype=dtype)


def states(g, n, B, seed):
    """n states of B rows, each prefilled with its own prompt, and eager copies of them."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        st = g.new_state(B)
        g.prefill(rng.integers(0, g.vocab_size, (B, 5 + i)), st, logits=None)
        out.append((st, st.copy()))
    return out


def step_both(g, pair, tok):
    """One step of the graph-run state and of its eager twin: the logits must be equal."""
    st, twin = pair
    got = g.step(tok, st)
    want = g.step(tok, twin, graph=False)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("ci,dtype,B", [(0, "bfloat16", 1), (1, "bfloat16", 3),
                                        (0, "float16", 1), (3, "float32", 2)])
def test_alternating_states_capture_once(monkeypatch, ci, dtype, B):
    monkeypatch.delenv("BLACKMAMBA_DECODE_GRAPHS", raising=False)
    g = model(ci, dtype)
    pairs = states(g, 3, B, seed=B + ci)
    rng = np.random.default_rng(7)
    c0 = captures()
    for k in range(12):                        # A B C A B C ...: one capture a state
        step_both(g, pairs[k % 3], rng.integers(0, g.vocab_size, B))
    assert captures() == c0 + 3
    assert g.memory()["graphs"] == 3
    # the old behaviour (one graph a batch size): every switch of state captures again
    monkeypatch.setenv("BLACKMAMBA_DECODE_GRAPHS", "1")
    c1 = captures()
    for k in range(6):
        step_both(g, pairs[k % 2], rng.integers(0, g.vocab_size, B))
    assert captures() == c1 + 6
    assert g.memory()["graphs"] == 1           # the lowered cap drops the others


def test_lru_replacement_and_switch_values(monkeypatch):
    monkeypatch.setenv("BLACKMAMBA_DECODE_GRAPHS", "2")
    g = model()
    pairs = states(g, 3, 1, seed=11)
    rng = np.random.default_rng(8)
    tok = lambda: rng.integers(0, g.vocab_size, 1)  # noqa: E731
    c0 = captures()
    step_both(g, pairs[0], tok())
    step_both(g, pairs[1], tok())
    step_both(g, pairs[0], tok())              # kept: A is now the most recent
    assert captures() == c0 + 2
    step_both(g, pairs[2], tok())              # C replaces B (the least recently used)
    step_both(g, pairs[0], tok())
    assert captures() == c0 + 3
    step_both(g, pairs[1], tok())              # B again: captured anew, replacing C
    assert captures() == c0 + 4
    assert g.memory()["graphs"] == 2
    # a switch's value is part of the key: the same state captures again, and its old
    # graph comes back when the value does
    monkeypatch.setenv("BLACKMAMBA_CUDA_PDL", "0")
    step_both(g, pairs[1], tok())
    assert captures() == c0 + 5
    monkeypatch.delenv("BLACKMAMBA_CUDA_PDL")
    step_both(g, pairs[1], tok())
    assert captures() == c0 + 5


def test_freed_state_and_other_batch_sizes(monkeypatch):
    monkeypatch.delenv("BLACKMAMBA_DECODE_GRAPHS", raising=False)
    g = model(1)
    rng = np.random.default_rng(9)
    # a state freed and a new one (perhaps at the same address): a new serial, a new graph,
    # never the freed state's
    for i in range(3):
        (pair,) = states(g, 1, 2, seed=20 + i)
        c0 = captures()
        for _ in range(3):
            step_both(g, pair, rng.integers(0, g.vocab_size, 2))
        assert captures() == c0 + 1
        del pair
    # each batch size keeps its own graphs
    p1 = states(g, 2, 1, seed=30)
    p4 = states(g, 2, 4, seed=31)
    c0 = captures()
    for k in range(8):
        step_both(g, p1[k % 2], rng.integers(0, g.vocab_size, 1))
        step_both(g, p4[k % 2], rng.integers(0, g.vocab_size, 4))
    assert captures() == c0 + 4


def test_greedy_and_sample_on_alternating_states(monkeypatch):
    # the device loops take the same graphs: two conversations in turn give the tokens each
    # gives alone, with one capture a state
    monkeypatch.delenv("BLACKMAMBA_DECODE_GRAPHS", raising=False)
    g = model()
    rng = np.random.default_rng(12)
    pa, pb = rng.integers(0, g.vocab_size, (1, 6)), rng.integers(0, g.vocab_size, (1, 9))

    def turn(kind, ids, st):
        if kind == "a":
            return g.greedy(ids, 3, state=st)
        return g.sample(ids, 3, temperature=0.8, seed=4, state=st)

    alone = {}
    for kind, p in (("a", pa), ("b", pb)):
        st = g.new_state(1)
        first = turn(kind, p, st)
        alone[kind] = (first, turn(kind, first[:, -1:], st))
    sa, sb = g.new_state(1), g.new_state(1)
    c0 = captures()
    fa = turn("a", pa, sa)
    fb = turn("b", pb, sb)
    na = turn("a", fa[:, -1:], sa)
    nb = turn("b", fb[:, -1:], sb)
    for kind, got in (("a", (fa, na)), ("b", (fb, nb))):
        for x, y in zip(got, alone[kind]):
            np.testing.assert_array_equal(x, y)
    assert captures() == c0 + 2
    for _ in range(3):                         # a fresh state each call: one capture each
        g.greedy(pa, 2)
    assert captures() == c0 + 5
