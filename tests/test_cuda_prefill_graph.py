"""Prefill graphs (cuda/engine.cu prefill_graph, session 25): a prefill of a (B, L) seen before
under the same BLACKMAMBA_* switches replays a captured forward on a shadow state. Everything
here is bit-identical to the eager prefill (BLACKMAMBA_PREFILL_GRAPH=0): the same kernels in the
same order; the caller's state is copied in and out, so any state of the batch size can use a
graph, and a graph captured on a smaller workspace is never replayed on a grown one."""
import numpy as np
import pytest

from blackmamba import model_cuda
from blackmamba.model import random_tensors

from conftest import LAYER_KIND_CONFIGS, native_count, small_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not model_cuda.is_available(),
                                 reason="no CUDA device, or blackmamba built without CUDA")]


def counts():
    return (native_count("bm_cuda_prefill_graph_captures"),
            native_count("bm_cuda_prefill_graph_replays"))


def model(ci, dtype):
    cfg = small_config(**LAYER_KIND_CONFIGS[ci])
    return model_cuda.CudaModel(cfg, random_tensors(cfg, seed=40 + ci), dtype=dtype)


def run(g, ids, state=None, **kw):
    st = state if state is not None else g.new_state(ids.shape[0])
    out = g.prefill(ids, st, **kw)
    cpu = st.to_cpu()
    return out, [a for a in cpu.conv + cpu.ssm if a is not None]


def same(a, b):
    np.testing.assert_array_equal(a[0], b[0])
    for x, y in zip(a[1], b[1]):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("ci,dtype", [(0, "bfloat16"), (1, "bfloat16"), (0, "float32"),
                                      (3, "float16")])
@pytest.mark.parametrize("B,L", [(1, 1), (3, 1), (1, 8), (2, 37), (1, 300)])
def test_replay_equals_eager(monkeypatch, ci, dtype, B, L):
    g = model(ci, dtype)
    ids = np.random.default_rng(B * L + ci).integers(0, g.vocab_size, (B, L))
    monkeypatch.setenv("BLACKMAMBA_PREFILL_GRAPH", "0")
    eager = run(g, ids)
    c0, r0 = counts()
    monkeypatch.delenv("BLACKMAMBA_PREFILL_GRAPH")
    got = [run(g, ids)]                       # first sight: eager
    assert counts() == (c0, r0)
    got += [run(g, ids) for _ in range(3)]    # captured, then replayed (or eager throughout)
    for x in got:
        same(x, eager)
    # float32 weights from 65 tokens take the cuBLAS expert path, which reads the routing on
    # the host: its capture fails once, and the key stays eager (no second attempt)
    host_sync = dtype == "float32" and B * L > 64
    assert counts() == ((c0, r0) if host_sync else (c0 + 1, r0 + 3))


def test_state_in_and_out(monkeypatch):
    # chunks of one length: the second chunk of the first run is that key's second sight, so
    # its capture replays from the state the first chunk left (copied into the shadow state)
    g = model(1, "bfloat16")
    ids = np.random.default_rng(3).integers(0, g.vocab_size, (2, 48))
    monkeypatch.setenv("BLACKMAMBA_PREFILL_GRAPH", "0")
    eager = run(g, ids, chunk_size=16)
    monkeypatch.delenv("BLACKMAMBA_PREFILL_GRAPH")
    c0, r0 = counts()
    same(run(g, ids, chunk_size=16), eager)
    assert counts() == (c0 + 1, r0 + 2)
    # another state of the batch size, and one started by a prefill of another length
    st = g.new_state(2)
    g.prefill(ids[:, :5], st, logits=None)
    g.prefill(ids[:, 5:21], st, logits=None)
    same(run(g, ids[:, 21:37], state=st), run_eager(monkeypatch, g, ids))


def run_eager(monkeypatch, g, ids):
    monkeypatch.setenv("BLACKMAMBA_PREFILL_GRAPH", "0")
    st = g.new_state(2)
    g.prefill(ids[:, :5], st, logits=None)
    g.prefill(ids[:, 5:21], st, logits=None)
    out = run(g, ids[:, 21:37], state=st)
    monkeypatch.delenv("BLACKMAMBA_PREFILL_GRAPH")
    return out


def test_switches_grown_workspace_and_eviction(monkeypatch):
    g = model(0, "bfloat16")
    rng = np.random.default_rng(5)
    ids = rng.integers(0, g.vocab_size, (1, 12))
    monkeypatch.setenv("BLACKMAMBA_PREFILL_GRAPH", "0")
    eager = run(g, ids)
    monkeypatch.delenv("BLACKMAMBA_PREFILL_GRAPH")
    run(g, ids)
    run(g, ids)
    c0, r0 = counts()
    # a switch's value is part of the key: first sight again (eager), the switch read anew
    monkeypatch.setenv("BLACKMAMBA_SCAN_PDL_SPREAD", "0")
    same(run(g, ids), eager)
    assert counts() == (c0, r0)
    monkeypatch.delenv("BLACKMAMBA_SCAN_PDL_SPREAD")
    same(run(g, ids), eager)                  # the first key's graph again
    assert counts() == (c0, r0 + 1)
    # a longer prompt grows the workspace: every graph goes, the next 12 tokens run eagerly
    run(g, rng.integers(0, g.vocab_size, (1, 700)))
    c1, r1 = counts()
    same(run(g, ids), eager)
    assert counts() == (c1, r1)
    same(run(g, ids), eager)
    assert counts() == (c1 + 1, r1 + 1)
    # at most 16 graphs: 17 more lengths captured evict the 12 tokens' graph
    for L in range(20, 37):
        x = rng.integers(0, g.vocab_size, (1, L))
        run(g, x)
        run(g, x)
    c2, r2 = counts()
    assert c2 == c1 + 1 + 17
    assert g.memory()["graphs"] == 16               # (no decode graph in this model)
    same(run(g, ids), eager)                  # evicted and forgotten: first sight, eager
    assert counts() == (c2, r2)
