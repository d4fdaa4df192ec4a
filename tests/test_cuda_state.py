"""CudaState's concurrency and interruption rules (blackmamba/model_cuda.py), without a GPU.

The rules are model.State's (tests/test_reliability.py checks them on the CPU model): a
state used by two calls at once raises RuntimeError ("in use") instead of waiting and then
advancing twice; an update that does not complete marks the state invalid until reset().
They live in Python, around the engine calls, so these tests drive CudaModel/CudaState over a
fake engine (FakeEngine below: the _C.cuda_* functions they call, on host arrays, with hooks
to block or fail inside a call). tests/test_cuda_model.py repeats the key cases on a GPU.
"""
import threading

import numpy as np
import pytest

from blackmamba import model_cuda
from blackmamba.config import Config
from conftest import hammer


def make_cfg():
    return Config.from_dict(dict(num_layers=2, hidden_size=8, state_size=2, conv_dimension=3,
                                 vocab_size=11, ffn_hidden_size=8,
                                 mamba_moe_layers=["r", "2"]))


class FakeEngine:
    """The engine functions CudaModel/CudaState call. A state is a dict of host arrays; a
    prefill/step adds the tokens to every layer's SSM state (so a doubled or torn update is
    visible) and counts the tokens. `hook(kind, n)` runs inside each prefill/step call (the
    n-th of the test), to block or raise there."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.hook = None
        self.calls = 0

    def _new(self, B):
        c = self.cfg
        return {"B": B, "n": np.zeros(B, np.int64),
                "conv": {i: np.zeros((B, c.conv_dimension - 1, c.d_inner), np.float32)
                         for i in (0,)},
                "ssm": {i: np.zeros((B, c.d_inner, c.state_size), np.float32) for i in (0,)}}

    def cuda_state_new(self, eng, B):
        return self._new(B)

    def cuda_state_copy(self, eng, h, rows=None):
        rows = np.arange(h["B"]) if rows is None else np.asarray(rows)
        new = self._new(len(rows))
        new["n"][:] = h["n"][rows]
        for k in ("conv", "ssm"):
            for i in h[k]:
                new[k][i][...] = h[k][i][rows]
        return new

    def cuda_state_set_row(self, eng, dst, i, src, j):
        dst["n"][i] = src["n"][j]
        for k in ("conv", "ssm"):
            for li in dst[k]:
                dst[k][li][i] = src[k][li][j]

    def cuda_state_io(self, eng, h, layer, which, array=None):
        a = h["conv" if which == 0 else "ssm"][layer]
        if array is None:
            return a.copy()
        a[...] = array
        if which == 1:
            h["n"][:] = 0 if not array.any() else h["n"]
        return None

    def _advance(self, h, ids):
        self.calls += 1
        if self.hook:
            self.hook(self.calls)
        h["n"] += ids.shape[1] if ids.ndim == 2 else 1
        h["ssm"][0] += ids.reshape(ids.shape[0], -1).sum(1)[:, None, None]

    def cuda_model_prefill(self, eng, h, ids, mode, trace):
        self._advance(h, ids)
        V = self.cfg.vocab_size
        B, L = ids.shape
        out = (np.zeros((B, L, V), np.float32) if mode == 2 else
               np.zeros((B, V), np.float32) if mode == 1 else None)
        return out, None

    def cuda_model_step(self, eng, h, tokens, graph, logits, argmax, trace):
        self._advance(h, tokens[:, None])
        return np.zeros((tokens.shape[0], self.cfg.vocab_size), np.float32), None, None

    def cuda_model_greedy(self, eng, h, first, n):
        for _ in range(n):
            self._advance(h, np.zeros((first.shape[0], 1), np.int64))
        return np.zeros((first.shape[0], n), np.int64)


@pytest.fixture
def fake(monkeypatch):
    """(CudaModel over a FakeEngine, the engine)."""
    cfg = make_cfg()
    eng = FakeEngine(cfg)
    monkeypatch.setattr(model_cuda._lib, "C", lambda: eng)
    m = model_cuda.CudaModel.__new__(model_cuda.CudaModel)
    m.config, m.dtype, m.math, m.name, m.tokenizer = cfg, "bfloat16", "bf16", "", None
    m._tracer = None
    m._lock = threading.Lock()
    m._eng = object()
    return m, eng


def test_fake_engine_round_trip(fake):
    m, eng = fake
    st = m.new_state(2)
    m.prefill(np.array([[1, 2], [3, 4]]), st)
    m.step(np.array([5, 6]), st)
    assert st.seqlen == 3 and not st.invalid
    np.testing.assert_array_equal(st._h["n"], [3, 3])
    np.testing.assert_array_equal(st.to_cpu().ssm[0][:, 0, 0], [8, 13])


def test_a_state_used_by_two_calls_raises_instead_of_waiting(fake):
    m, eng = fake
    st, dst, other = m.new_state(1), m.new_state(1), m.new_state(1)
    inside, release = threading.Event(), threading.Event()

    def hook(n):                    # thread A's call blocks inside the engine
        if n == 1:
            inside.set()
            assert release.wait(10)
    eng.hook = hook
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("a", m.prefill(np.array([[1, 2]]), st)))
    t.start()
    try:
        assert inside.wait(10)
        for call in (lambda: m.step(np.array([1]), st),
                     lambda: m.prefill(np.array([[3]]), st),
                     lambda: m.greedy(np.array([[3]]), 2, state=st),
                     lambda: m.generate([1, 2], max_new_tokens=2, state=st, return_tokens=True),
                     st.copy, lambda: st.select([0]), st.reset, st.to_cpu,
                     lambda: st.save("/nonexistent"),
                     lambda: dst.set_row(0, st, 0), lambda: st.set_row(0, dst, 0)):
            with pytest.raises(RuntimeError, match="in use|while a prefill/step"):
                call()
        # another state of the same model is not refused: it waits for the model's lock
        t2 = threading.Thread(target=lambda: out.setdefault("b", m.step(np.array([4]), other)))
        t2.start()
    finally:
        release.set()
        t.join(10)
    t2.join(10)
    assert "a" in out and "b" in out
    # the refused calls changed nothing: A's one update, exactly
    assert not st.invalid and st.seqlen == 2
    np.testing.assert_array_equal(st._h["n"], [2])
    assert other.seqlen == 1 and not other.invalid


def test_a_state_hammered_from_two_threads_never_doubles(fake):
    m, eng = fake
    st = m.new_state(3)
    eng.hook = lambda n: None if n % 7 else threading.Event().wait(0.001)
    done = hammer(lambda: m.step(np.array([1, 1, 1]), st), iters=200)
    assert not st.invalid and st.seqlen == done == eng.calls
    np.testing.assert_array_equal(st._h["n"], [done] * 3)


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("CUDA error: boom")])
@pytest.mark.parametrize("where", ["chunked prefill", "step", "greedy"])
def test_an_interrupted_update_invalidates_the_state(fake, exc, where):
    m, eng = fake
    st = m.new_state(1)
    m.prefill(np.array([[1, 2]]), st)
    saved = st.copy()
    start = eng.calls

    def hook(n):                    # the second engine call of the update fails
        if n == start + 2:
            raise exc
    eng.hook = hook
    with pytest.raises(type(exc)):
        if where == "chunked prefill":
            m.prefill(np.array([[3, 4, 5, 6]]), st, chunk_size=2)    # 2 chunks: 1 runs
        elif where == "step":
            eng.hook = lambda n: (_ for _ in ()).throw(exc)
            m.step(np.array([1]), st)
        else:
            m.greedy(np.array([[3]]), 3, state=st)   # the prefill, then the greedy call
    eng.hook = None
    assert st.invalid
    for call in (lambda: m.step(np.array([1]), st), lambda: m.prefill(np.array([[1]]), st),
                 lambda: m.greedy(np.array([[1]]), 2, state=st), st.copy,
                 lambda: st.select([0]), st.to_cpu, lambda: st.save("/nonexistent"),
                 lambda: m.generate([1], max_new_tokens=1, state=st, return_tokens=True)):
        with pytest.raises(RuntimeError, match="invalid|interrupted"):
            call()
    # a copy taken before resumes; reset() gives a fresh, valid state
    m.step(np.array([7]), saved)
    assert saved.seqlen == 3 and not saved.invalid
    st.reset()
    assert not st.invalid and st.seqlen == 0
    np.testing.assert_array_equal(st._h["n"], [0])
    m.prefill(np.array([[1, 2]]), st)
    assert st.seqlen == 2


def test_rejected_calls_leave_the_state_valid(fake):
    m, eng = fake
    st = m.new_state(1)
    m.prefill(np.array([[1, 2]]), st)
    for bad in (lambda: m.step(np.array([10 ** 6]), st),
                lambda: m.step(np.array([1, 2]), st),
                lambda: m.prefill(np.zeros((1, 0), np.int64), st),
                lambda: m.prefill(np.array([[1]]), st, logits="some"),
                lambda: m.prefill(np.array([[1]]), st, chunk_size=0)):
        with pytest.raises((ValueError, TypeError)):
            bad()
    assert not st.invalid and st.seqlen == 2 and eng.calls == 1


def test_a_callback_may_use_the_model_on_another_state(fake):
    # the tracer runs outside the model's lock: using the model from it does not deadlock,
    # and using the same state from it raises "in use"
    m, eng = fake
    st, other = m.new_state(1), m.new_state(1)
    seen = []

    def tracer(li, ids, gates, logits):
        seen.append(m.step(np.array([1]), other).shape)
        with pytest.raises(RuntimeError, match="in use"):
            m.step(np.array([1]), st)
    m._tracer = tracer
    eng.cuda_model_prefill_orig = eng.cuda_model_prefill

    def prefill_traced(eng_, h, ids, mode, trace):
        out, _ = eng.cuda_model_prefill_orig(eng_, h, ids, mode, trace)
        return out, [None, (np.zeros(1, np.int32), np.ones(1, np.float32),
                            np.zeros((1, 2), np.float32))] if trace else None
    eng.cuda_model_prefill = prefill_traced
    done = []
    t = threading.Thread(target=lambda: done.append(m.prefill(np.array([[1]]), st)))
    t.start()
    t.join(10)
    assert done and seen and not st.invalid and st.seqlen == 1 and other.seqlen == 1
