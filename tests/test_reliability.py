"""Reliability of the CPU side under abuse: leaks over thousands of calls, threads, Ctrl-C,
bad runtime input, very long prompts. (Hostile files: tests/test_fuzz.py.)

Every bound below carries its reason. Timing and memory tests skip under ASan
(tests/sanitize.sh), whose allocator makes RSS and speed meaningless.
"""
import gc
import itertools
import json
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc

import numpy as np
import pytest

import blackmamba as bm
from blackmamba import ops, ref
from blackmamba.config import Config
from blackmamba.generation import SamplingParams, sample_next
from blackmamba.model import Model, random_tensors

import conftest
from conftest import SANITIZED, hammer, rss_kb

# children import the blackmamba this process imported (installed, or the source tree)
ROOT = pathlib.Path(bm.__file__).resolve().parent.parent
no_asan = pytest.mark.skipif(SANITIZED, reason="RSS and timing are not meaningful under ASan")


def make_model(seed=0, dtype="float32", **over):
    base = dict(num_layers=4, hidden_size=24, state_size=8, conv_dimension=4, vocab_size=97,
                ffn_hidden_size=40, mamba_moe_layers=["r", "8", "r2", "1"])
    base.update(over)
    base["num_layers"] = len(base["mamba_moe_layers"])
    cfg = Config.from_dict(base)
    return Model(cfg, random_tensors(cfg, seed=seed), dtype=dtype)


@pytest.fixture(scope="module")
def tiny():
    return bm.load(conftest.GOLDEN, tokenizer=False)


# ================================================================================ leaks: ops

def every_op_case(rng):
    """{name: callable} calling every public op once on small awkward shapes (odd sizes,
    batch > 1, bf16 weights), plus calls that fail validation (their error paths must
    release what they took too). Returns the cases and every array they use."""
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    b, L, E, N, K, d, X, F, T = 2, 9, 11, 5, 4, 13, 4, 6, 7
    A = -np.exp(f(E, N))
    u, dt, z, B, C, D, db = f(b, L, E), f(b, L, E), f(b, L, E), f(b, L, N), f(b, L, N), f(E), f(E)
    st, w, bias, cs = f(b, E, N), f(E, K), f(E), f(b, K - 1, E)
    x1, ssm1, conv1 = f(b, E), f(b, E, N), f(b, K - 1, E)
    x2, nw, res = f(T, d), f(d), f(T, d)
    rw, rb, fc1, fc2 = f(X, d), f(X), f(X, 2 * F, d), f(X, d, F)
    fc1b, fc2b = ops.f32_to_bf16(fc1), ops.f32_to_bf16(fc2)
    W, Wb = f(33, d), ops.f32_to_bf16(f(33, d))
    ids = rng.integers(0, X, T).astype(np.int64)
    gates = f(T)
    S = f(T, X)
    bits = ops.f32_to_bf16(f(3, 17))
    cases = {
        "selective_scan": lambda: ops.selective_scan(u, dt, A, B, C, D, z, db, True, st),
        "selective_state_update": lambda: ops.selective_state_update(ssm1, x1, x1, A, B[:, 0],
                                                                     C[:, 0], D, x1, db, True),
        "causal_conv1d": lambda: ops.causal_conv1d(u, w, bias, cs, "silu"),
        "causal_conv1d_update": lambda: ops.causal_conv1d_update(x1, conv1, w, bias, "silu"),
        "rms_norm": lambda: ops.rms_norm(x2, nw, res),
        "layer_norm": lambda: ops.layer_norm(x2, nw, nw, res),
        "linear": lambda: ops.linear(x2, W, None),
        "linear bf16": lambda: ops.linear(x2[::2], Wb, None),          # strided input too
        "bf16_to_f32": lambda: ops.bf16_to_f32(bits),
        "f32_to_bf16": lambda: ops.f32_to_bf16(x2),
        "route_top1": lambda: ops.route_top1(x2, rw, rb, return_logits=True),
        "moe_dispatch": lambda: ops.moe_dispatch(ids, X),
        "moe_experts": lambda: ops.moe_experts(x2, ids, gates, fc1, fc2),
        "moe_experts bf16": lambda: ops.moe_experts(x2, ids, gates, fc1b, fc2b, "silu"),
        "moe": lambda: ops.moe(x2, rw, rb, fc1, fc2, return_routing=True),
        "mlp": lambda: ops.mlp(x2, fc1[0], fc2[0], "gelu", True),
        "mlp bf16": lambda: ops.mlp(x2, fc1b[0], fc2b[0], "gelu_tanh", True),
        "sinkhorn": lambda: ops.sinkhorn(S, init="uniform"),
        "cpu_info": lambda: ops.cpu_info(),
        "get_num_threads": lambda: ops.get_num_threads(),
        "set_num_threads": lambda: ops.set_num_threads(ops.get_num_threads()),
    }
    errors = {   # each raises after taking some references: the fail: paths
        "linear bad weight": lambda: ops.linear(x2, np.zeros((4, d), np.int32)),
        "moe_experts bad ids": lambda: ops.moe_experts(x2, ids + X, gates, fc1, fc2),
        "mlp mixed dtypes": lambda: ops.mlp(x2, fc1[0], fc2b[0]),
        "scan bad B": lambda: ops.selective_scan(u, dt, A, C[:, :3], C),
        "conv update strided": lambda: ops.causal_conv1d_update(x1, cs[:, :, ::2], w),
        "sinkhorn bad init": lambda: ops.sinkhorn(S, init="x"),
    }
    arrays = [A, u, dt, z, B, C, D, db, st, w, bias, cs, x1, ssm1, conv1, x2, nw, res, rw, rb,
              fc1, fc2, fc1b, fc2b, W, Wb, ids, gates, S, bits]
    return cases, errors, arrays


def _call(fn):
    try:
        return fn()
    except (TypeError, ValueError):
        return None


def test_every_public_op_is_covered():
    cases, _, _ = every_op_case(np.random.default_rng(0))
    covered = {name.split()[0] for name in cases}
    assert covered == set(ops.__all__)


def test_every_op_returns_fresh_objects():
    """An output with an extra reference would never be freed: each result object must be
    held by the caller alone (getrefcount counts its own argument: 2)."""
    cases, _, _ = every_op_case(np.random.default_rng(1))
    for name, fn in cases.items():
        out = fn()
        if isinstance(out, np.ndarray):
            rc = sys.getrefcount(out)
            assert rc == 2, (name, rc)
        elif isinstance(out, tuple):
            for i in range(len(out)):        # (no enumerate: it keeps the last item alive)
                if isinstance(out[i], np.ndarray):
                    rc = sys.getrefcount(out[i])
                    assert rc == 2, (name, i, rc)    # the tuple's and getrefcount's own
            rc = sys.getrefcount(out)
            assert rc == 2, (name, rc)
        del out


@no_asan
def test_refcounts_and_memory_flat_over_thousands_of_calls_of_every_op():
    rng = np.random.default_rng(2)
    cases, errors, arrays = every_op_case(rng)
    calls = list(cases.values()) + list(errors.values())
    refs = [sys.getrefcount(a) for a in arrays]
    singletons = [sys.getrefcount(o) for o in (None, True, False)]
    for fn in calls:                   # warm up allocator pools and lazy initialisation
        for _ in range(30):
            _call(fn)
    gc.collect()
    rss0 = rss_kb()
    tracemalloc.start()
    n = 2000
    for _ in range(n):
        for fn in calls:
            _call(fn)
    gc.collect()
    grown_py, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    grown_rss = rss_kb() - rss0
    assert [sys.getrefcount(a) for a in arrays] == refs
    # None/True/False are shared by everything: a missing DECREF of one shows up here as n
    assert all(abs(sys.getrefcount(o) - r) < n // 2
               for o, r in zip((None, True, False), singletons))
    # tracemalloc sees every NumPy buffer: a leaked output of 100 bytes x 54000 calls = 5 MB
    assert grown_py < 256 << 10, f"{grown_py} bytes still traced after {n * len(calls)} calls"
    # RSS also sees C-side mallocs (kernel scratch): 8 MB slack for allocator noise
    assert grown_rss < 8 * 1024, f"RSS grew {grown_rss} kB over {n * len(calls)} calls"


# =========================================================================== leaks: generate

@no_asan
def test_generate_memory_flat(tiny):
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(1, 300, 5)) for _ in range(4)]

    def work():
        for p in prompts:
            tiny.generate(p, max_new_tokens=10, temperature=0.8, seed=1, return_tokens=True)
        st = tiny.new_state(2)
        tiny.prefill(np.array([prompts[0], prompts[1]]), st, logits="last")
        for t in range(10):
            tiny.step(np.array([t, t + 1]), st)

    for _ in range(20):
        work()
    gc.collect()
    rss0 = rss_kb()
    tracemalloc.start()
    for _ in range(150):               # 150 x (4 generates + 10 batch steps) ~ 8000 steps
        work()
    gc.collect()
    grown_py, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    grown_rss = rss_kb() - rss0
    assert grown_py < 256 << 10, grown_py
    assert grown_rss < 8 * 1024, grown_rss


# ============================================================================== concurrency

def test_threads_on_separate_states_give_the_same_tokens_as_alone(tiny):
    rng = np.random.default_rng(4)
    jobs = [(list(rng.integers(1, 300, n)), dict(temperature=t, top_k=k, seed=s))
            for n, t, k, s in ((3, 0.0, None, 0), (9, 0.9, 20, 1), (5, 1.3, None, 2),
                               (17, 0.7, 5, 3), (1, 0.0, None, 4), (30, 1.0, 50, 5))]
    alone = [tiny.generate(p, max_new_tokens=24, return_tokens=True, **kw) for p, kw in jobs]
    full = tiny(np.array([jobs[3][0]]))
    results, errors = {}, []

    def work(i):
        try:
            for rep in range(4):
                p, kw = jobs[i]
                results[(i, rep)] = tiny.generate(p, max_new_tokens=24, return_tokens=True,
                                                  **kw)
                results[(i, rep, "full")] = tiny(np.array([jobs[3][0]]))
        except BaseException as exc:   # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (i, rep, *full_), got in results.items():
        if full_:
            np.testing.assert_array_equal(got, full)       # bit for bit: same kernels, order
        else:
            assert got == alone[i], (i, rep)


class _Gate:
    """A routing tracer (called inside every MoE layer) that parks the calling thread."""

    def __init__(self):
        self.inside, self.release = threading.Event(), threading.Event()

    def __call__(self, li, ids, gates, logits):
        self.inside.set()
        assert self.release.wait(10)


def test_a_state_used_from_two_threads_raises_instead_of_racing(tiny):
    ids = np.array([[5, 6, 7, 8]])
    want_state = tiny.new_state(1)
    want = tiny.prefill(ids, want_state, logits="last")
    st = tiny.new_state(1)
    gate, out = _Gate(), {}
    tiny._tracer = gate
    try:
        t = threading.Thread(target=lambda: out.setdefault("a", tiny.prefill(ids, st, "last")))
        t.start()
        assert gate.inside.wait(10)            # thread A is inside the update of `st`
        for call in (lambda: tiny.step(np.array([1]), st),
                     lambda: tiny.prefill(ids, st),
                     lambda: tiny.generate([1, 2], max_new_tokens=2, state=st,
                                           return_tokens=True),
                     st.copy, lambda: st.select([0]), st.reset):
            with pytest.raises(RuntimeError, match="in use|while a prefill/step"):
                call()
        gate.release.set()
        t.join(10)
    finally:
        tiny._tracer = None
        gate.release.set()
    # the refused calls did not disturb A: its result and the state are exactly right
    np.testing.assert_array_equal(out["a"], want)
    assert not st.invalid and st.seqlen == 4
    np.testing.assert_array_equal(tiny.step(np.array([9]), st),
                                  tiny.step(np.array([9]), want_state))


def test_a_state_hammered_from_two_threads_never_tears(tiny):
    """Both threads step the same token on one state as fast as they can: each call either
    runs alone or raises RuntimeError, so the final state must equal stepping that token as
    many times as calls succeeded, whatever the interleaving."""
    st = tiny.new_state(8)
    tok = np.full(8, 11)
    done = hammer(lambda: tiny.step(tok, st), iters=300)
    assert not st.invalid and st.seqlen == done
    ref_state = tiny.new_state(8)
    for _ in range(done):
        tiny.step(tok, ref_state)
    for a, b in zip(st.conv + st.ssm, ref_state.conv + ref_state.ssm):
        if a is not None:
            np.testing.assert_array_equal(a, b)


def _gil_free_ticks(fn, min_seconds=0.05):
    """Run fn() (a C call) while a pure-Python thread counts; return (seconds, ticks the
    counter made in the middle 80% of the call). A call that holds the GIL lets no Python
    code run at all: ~0 ticks."""
    stamps, stop = [], threading.Event()

    def counter():
        while not stop.is_set() and len(stamps) < 1_000_000:
            stamps.append(time.perf_counter())
            for _ in range(200):     # a little pure-Python work between stamps
                pass

    th = threading.Thread(target=counter, daemon=True)
    th.start()
    try:
        time.sleep(0.02)
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
    finally:
        stop.set()
        th.join()
    lo, hi = t0 + 0.1 * (t1 - t0), t1 - 0.1 * (t1 - t0)
    return t1 - t0, sum(lo < s < hi for s in stamps)


@no_asan
def test_c_work_releases_the_gil():
    rng = np.random.default_rng(5)
    f = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
    x, W = f(1024, 512), f(2048, 512)
    Wb = ops.f32_to_bf16(W)
    u, dt = f(4, 8192, 128), f(4, 8192, 128)
    A, B, C = -np.exp(f(128, 16)), f(4, 8192, 16), f(4, 8192, 16)
    fc1, fc2 = f(4, 2048, 512), f(4, 512, 1024)
    ids = rng.integers(0, 4, 1024)
    xc, wc, nw = f(1, 65536, 256), f(256, 4), f(256)
    big = f(32 << 20)
    bits = ops.f32_to_bf16(big)
    S, rw, rb = f(20000, 64), f(64, 256), f(64)
    long_ops = {       # one C call each (a second call would let Python in between)
        "linear": lambda: ops.linear(x, W),
        "linear bf16": lambda: ops.linear(x, Wb),
        "selective_scan": lambda: ops.selective_scan(u, dt, A, B, C),
        "causal_conv1d": lambda: ops.causal_conv1d(xc, wc),
        "rms_norm": lambda: ops.rms_norm(xc, nw),
        "route_top1": lambda: ops.route_top1(xc, rw, rb),
        "mlp": lambda: ops.mlp(x, fc1[0], fc2[0]),
        "moe_experts": lambda: ops.moe_experts(x, ids, None, fc1, fc2),
        "moe": lambda: ops.moe(x, rw[:4, :1].repeat(512, 1), rb[:4], fc1, fc2),
        "sinkhorn": lambda: ops.sinkhorn(S, tol=0.0, max_iters=50),
        "f32_to_bf16": lambda: ops.f32_to_bf16(big),
        "bf16_to_f32": lambda: ops.bf16_to_f32(bits),
    }
    threads = ops.get_num_threads()
    ops.set_num_threads(1)          # leave a core to the counter even on a busy machine
    try:
        # control: sorting floats is C code that holds the GIL throughout
        floats = rng.standard_normal(2_000_000).tolist()
        secs, ticks = _gil_free_ticks(lambda: sorted(floats))
        assert secs > 0.05 and ticks <= 2, (secs, ticks)
        for name, fn in long_ops.items():
            for attempt in range(3):     # a loaded machine may starve the counter once
                secs, ticks = _gil_free_ticks(fn)
                if ticks >= 5:
                    break
            assert secs > 0.005, f"{name}: {secs:.4f} s is too short to tell"
            assert ticks >= 5, f"{name}: {ticks} Python ticks during {secs:.3f} s of C work"
            print(f"{name}: {ticks} Python ticks during {secs * 1e3:.0f} ms of C work")
    finally:
        ops.set_num_threads(threads)


# ========================================================================= state lifecycle

class _Boom:
    """A tracer that raises inside the n-th MoE layer call: an interrupted update."""

    def __init__(self, exc, after=0):
        self.exc, self.after = exc, after

    def __call__(self, *a):
        if self.after == 0:
            raise self.exc
        self.after -= 1


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), ValueError("boom")])
@pytest.mark.parametrize("where", ["prefill", "step"])
def test_an_interrupted_update_invalidates_the_state(tiny, exc, where):
    ids = np.array([[3, 4, 5, 6, 7]])
    st = tiny.new_state(1)
    tiny.prefill(ids[:, :2], st)
    saved = st.copy()
    tiny._tracer = _Boom(exc, after=1)     # the second MoE layer: the first already ran
    try:
        with pytest.raises(type(exc)):
            if where == "prefill":
                tiny.prefill(ids, st)
            else:
                tiny.step(np.array([1]), st)
    finally:
        tiny._tracer = None
    assert st.invalid
    for call in (lambda: tiny.step(np.array([1]), st), lambda: tiny.prefill(ids, st),
                 st.copy, lambda: st.save("/nonexistent"),
                 lambda: tiny.generate([1], max_new_tokens=1, state=st,
                                       return_tokens=True)):
        with pytest.raises(RuntimeError, match="invalid|interrupted"):
            call()
    # a copy taken before resumes exactly; reset() gives a fresh state
    a = tiny.step(np.array([8]), saved)
    b_state = tiny.new_state(1)
    tiny.prefill(ids[:, :2], b_state)
    np.testing.assert_array_equal(a, tiny.step(np.array([8]), b_state))
    st.reset()
    assert not st.invalid and st.seqlen == 0
    np.testing.assert_array_equal(tiny.prefill(ids, st), tiny(ids))


def test_rejected_calls_leave_the_state_valid(tiny):
    st = tiny.new_state(1)
    tiny.prefill(np.array([[1, 2]]), st)
    for bad in (lambda: tiny.step(np.array([10 ** 6]), st),
                lambda: tiny.step(np.array([1, 2]), st),
                lambda: tiny.prefill(np.zeros((1, 0), np.int64), st),
                lambda: tiny.prefill(np.array([[1]]), st, logits="some"),
                lambda: tiny.prefill(np.array([[1]]), st, chunk_size=0)):
        with pytest.raises((ValueError, TypeError)):
            bad()
    assert not st.invalid and st.seqlen == 2


def test_generate_interrupted_between_rows_invalidates_a_callers_state(tiny):
    st = tiny.new_state(3)
    tiny._tracer = _Boom(KeyboardInterrupt(), after=2)     # inside the second row's prefill
    try:
        with pytest.raises(KeyboardInterrupt):
            tiny.generate([[1, 2], [3, 4, 5], [6]], max_new_tokens=3, state=st,
                          return_tokens=True)
    finally:
        tiny._tracer = None
    assert st.invalid
    with pytest.raises(RuntimeError, match="one by one"):
        tiny.step(np.array([1, 2, 3]), st)


# =============================================================================== interrupts

_CHILD = textwrap.dedent("""
    import json, os, sys, time, traceback
    import numpy as np
    sys.path.insert(0, {root!r})
    import blackmamba as bm
    from blackmamba.config import Config
    from blackmamba.model import Model, random_tensors
    from blackmamba.checkpoint import save_torch_zip, to_bfloat16
    mode, work = sys.argv[1], sys.argv[2]
    cfg = Config.from_dict(dict(num_layers=4, hidden_size=256, state_size=16,
                                conv_dimension=4, vocab_size=2048, ffn_hidden_size=512,
                                mamba_moe_layers=["r", "8", "r", "8"]))
    tensors = random_tensors(cfg, seed=1)
    if mode == "load":                  # a 17 MB bf16 checkpoint, loaded over and over
        os.makedirs(work, exist_ok=True)
        save_torch_zip(os.path.join(work, "pytorch_model.bin"),
                       {{k: to_bfloat16(v) for k, v in tensors.items()}})
        with open(os.path.join(work, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f)
        m = bm.load(work, tokenizer=False)
    else:
        m = Model(cfg, tensors)
    prompt = [5, 17, 99, 1000, 3]
    want = m.generate(prompt, max_new_tokens=12, return_tokens=True)
    st = m.new_state(1)
    long_prompt = np.random.default_rng(0).integers(1, 2048, (1, 400_000))
    out = {{"mode": mode}}
    print("READY", flush=True)
    try:
        while True:
            if mode == "generate":
                m.generate(prompt, max_new_tokens=100_000, temperature=1.0, state=st,
                           return_tokens=True)
            elif mode == "prefill":
                m.prefill(long_prompt, st, logits="last")
            else:
                bm.load(work, tokenizer=False)
    except KeyboardInterrupt:
        t_caught = time.perf_counter()
        print("CAUGHT", flush=True)
        out["in"] = [f.name for f in traceback.extract_tb(sys.exc_info()[2])]
    out["state_invalid"] = st.invalid
    try:
        m.step(np.array([1]), st)
        out["state_use"] = "ok"
    except RuntimeError as exc:
        out["state_use"] = str(exc)[:80]
    st.reset()
    out["after_reset"] = m.generate(prompt, max_new_tokens=12, return_tokens=True,
                                    state=st) == want
    out["same_tokens"] = m.generate(prompt, max_new_tokens=12, return_tokens=True) == want
    if mode == "load":
        out["reload_same_tokens"] = bm.load(work, tokenizer=False).generate(
            prompt, max_new_tokens=12, return_tokens=True) == want
    print(json.dumps(out), flush=True)
""")


def _interrupt_child(mode, tmp_path, wait=1.0, bound=2.0):
    code = _CHILD.format(root=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", code, mode, str(tmp_path / "m")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
        time.sleep(wait)
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        line = proc.stdout.readline().strip()
        latency = time.perf_counter() - t0
        assert line == "CAUGHT", proc.stderr.read()
        out = json.loads(proc.stdout.readline())
        assert proc.wait(60) == 0, proc.stderr.read()
    finally:
        proc.kill()
    assert latency < bound, f"KeyboardInterrupt took {latency:.2f} s to arrive"
    out["latency"] = latency
    return out


@no_asan
def test_ctrl_c_during_a_long_generate(tmp_path):
    out = _interrupt_child("generate", tmp_path)
    assert out["same_tokens"] and out["after_reset"], out
    # Ctrl-C lands inside a step (the state is then invalid and says so) or between steps
    assert out["state_use"] == "ok" or "invalid" in out["state_use"], out
    assert out["state_invalid"] == (out["state_use"] != "ok")
    print(f"generate: KeyboardInterrupt after {out['latency'] * 1e3:.0f} ms in {out['in']}")


@no_asan
def test_ctrl_c_during_a_long_prefill(tmp_path):
    out = _interrupt_child("prefill", tmp_path)
    assert out["state_invalid"] and "invalid" in out["state_use"], out
    assert out["same_tokens"] and out["after_reset"], out
    print(f"prefill: KeyboardInterrupt after {out['latency'] * 1e3:.0f} ms in {out['in']}")


@no_asan
@pytest.mark.slow
def test_ctrl_c_during_loading(tmp_path):
    for attempt in range(3):     # the loop's own bytecode between two loads can take it too
        out = _interrupt_child("load", tmp_path)
        assert out["same_tokens"] and out["reload_same_tokens"], out
        if "load" in out["in"]:
            break
    assert "load" in out["in"], out
    print(f"load: KeyboardInterrupt after {out['latency'] * 1e3:.0f} ms in {out['in']}")


def test_prefill_chunks_bound_the_longest_call():
    from blackmamba import model as M
    m = make_model(0)
    assert m._chunk_rows(1, M.PREFILL_CHUNK) == M.PREFILL_CHUNK       # small: full chunks
    cfg = Config.from_dict(dict(num_layers=2, hidden_size=1472, state_size=16,
                                conv_dimension=4, vocab_size=50304, ffn_hidden_size=3872,
                                mamba_moe_layers=["r", "8"]))
    big = Model.__new__(Model)
    big.config = cfg
    per_token = 1472 * 3 * 3872                                     # one expert's mlp
    for B in (1, 2, 8, 64, 5000):
        rows = big._chunk_rows(B, M.PREFILL_CHUNK)
        assert rows >= 1 and (rows == 1 or rows * B * per_token <= M.OP_BUDGET), B
    assert big._chunk_rows(1, M.PREFILL_CHUNK) == 2048            # throughput kept at B=1
    assert big._chunk_rows(8, M.PREFILL_CHUNK) < 600              # a batch shares a chunk
    # the logits="all" projection is cut too; values unchanged
    m = make_model(1)
    ids = np.random.default_rng(0).integers(0, m.vocab_size, (2, 50))
    full = m(ids)
    old = M.OP_BUDGET
    try:
        M.OP_BUDGET = 24 * 97 * 7            # 7-token projection calls, 3-token chunks
        assert m._chunk_rows(2, 2048) < 10
        np.testing.assert_allclose(m(ids), full, rtol=1e-5, atol=1e-5)
    finally:
        M.OP_BUDGET = old


# ======================================================================== bad runtime input

def test_token_id_dtypes_and_ranges():
    m = make_model(2)
    good = m(np.array([[1, 2, 3]]))
    for ok in (np.array([[1, 2, 3]], np.uint64), np.array([[1, 2, 3]], np.int8),
               np.array([[1, 2, 3]], np.uint16), [[1, 2, 3]]):
        np.testing.assert_array_equal(m(ok), good)
    for bad, exc, match in [
            (np.array([[1, 2]], dtype=bool), TypeError, "integer token ids"),
            (np.array([[1, 2]], dtype=object), TypeError, "integer token ids"),
            (np.array([[1.0, 2.0]]), TypeError, "integer token ids"),
            ([[2 ** 70]], TypeError, "integer token ids"),                 # object array
            ([[2 ** 64 - 1]], ValueError, "outside"),                     # uint64 max
            (np.array([[-1]], np.int8), ValueError, "outside"),
            (np.array([[97]], np.uint8), ValueError, "outside"),
            (np.array([["a"]]), TypeError, "integer token ids"),
            (np.zeros((0, 4), np.int64), ValueError, "batch_size")]:     # batch 0
        with pytest.raises(exc, match=match):
            m(bad)
    st = m.new_state(1)
    with pytest.raises(TypeError, match="integer"):
        m.step(np.array([1.0]), st)
    with pytest.raises(ValueError, match="outside"):
        m.step(np.array([2 ** 63], np.uint64), st)
    assert not st.invalid and st.seqlen == 0


def test_generate_argument_gaps():
    m = make_model(3)
    base = m.generate([1, 2, 3], max_new_tokens=4, return_tokens=True)
    # NumPy scalars are numbers too
    assert m.generate(np.array([1, 2, 3]), max_new_tokens=np.int64(4),
                      return_tokens=True) == base
    m.generate([1, 2], max_new_tokens=3, temperature=np.float32(0.7), top_k=np.int64(5),
               top_p=np.float64(0.9), seed=np.uint32(3), return_tokens=True)
    for kw, match in [(dict(max_new_tokens=-1), "max_new_tokens"),
                      (dict(max_new_tokens=2.0), "max_new_tokens"),
                      (dict(max_new_tokens=True), "max_new_tokens"),
                      (dict(temperature=float("inf")), "temperature"),
                      (dict(temperature=True), "temperature"),
                      (dict(temperature=1.0, top_p=float("nan")), "top_p"),
                      (dict(temperature=1.0, top_p=1.5), "top_p"),
                      (dict(temperature=1.0, top_k=2.5), "top_k"),
                      (dict(temperature=1.0, top_k=-3), "top_k"),
                      (dict(seed=-1), "seed"), (dict(seed=1.5), "seed")]:
        with pytest.raises(ValueError, match=match):
            m.generate([1, 2], return_tokens=True, **kw)
    for prompt, exc in [([1.5, 2.0], TypeError), ([True, False], TypeError),
                        ([1, 10 ** 6], ValueError), ([-2], ValueError),
                        (["a", 1], TypeError)]:
        with pytest.raises(exc):
            m.generate(prompt, max_new_tokens=2, return_tokens=True)
    with pytest.raises(ValueError, match="tokenizer"):
        m.generate("text without a tokenizer")
    with pytest.raises(ValueError, match="return_tokens=True"):     # before any work
        m.generate([1, 2], max_new_tokens=10 ** 9)
    with pytest.raises(ValueError, match="stop strings"):
        m.generate([1, 2], stop="x", return_tokens=True)
    assert m.generate([1, 2], max_new_tokens=0, return_tokens=True) == []
    # documented: an empty prompt (or an empty row of a batch) starts from <|endoftext|>
    assert m.generate([[], [0]], max_new_tokens=3, return_tokens=True)[0] == \
        m.generate([0], max_new_tokens=3, return_tokens=True)


def test_sampling_with_non_finite_logits():
    rng = np.random.default_rng(0)
    greedy, hot = SamplingParams(0.0), SamplingParams(1.0, seed=0)
    lg = np.array([1.0, np.inf, 3.0, np.inf, -np.inf], np.float32)
    assert sample_next(lg, greedy, rng, 5) == 1                  # lowest of the +inf ids
    picks = {sample_next(lg, hot, rng, 5) for _ in range(200)}
    assert picks == {1, 3}                                       # uniform over the +inf ones
    lg = np.array([-np.inf, 2.0, -np.inf], np.float32)
    assert {sample_next(lg, hot, rng, 3) for _ in range(50)} == {1}
    with pytest.raises(FloatingPointError, match="-inf"):
        sample_next(np.full(4, -np.inf, np.float32), hot, rng, 4)
    with pytest.raises(FloatingPointError, match="NaN"):
        sample_next(np.array([0.0, np.nan], np.float32), hot, rng, 2)
    # extreme temperatures: no inf - inf anywhere
    lg = np.array([0.0, 50.0, -3e38, 3e38], np.float32)
    assert sample_next(lg, SamplingParams(1e-300), rng, 4) == 3
    assert sample_next(lg, SamplingParams(1e-30, top_p=0.5, top_k=2), rng, 4) == 3
    spread = {sample_next(lg[:3], SamplingParams(1e300), rng, 3) for _ in range(200)}
    assert spread == {0, 1, 2}
    # the vocab limit excludes padding ids even when they are +inf
    assert sample_next(np.array([0.0, 1.0, np.inf], np.float32), greedy, rng, 2) == 1


def test_a_model_with_nan_weights_fails_clearly():
    m = make_model(4)
    m.final_w = m.final_w * np.nan
    with pytest.raises(FloatingPointError, match="NaN logits"):
        m.generate([1, 2], max_new_tokens=3, return_tokens=True)


@no_asan
def test_huge_max_new_tokens_allocates_nothing_up_front():
    m = make_model(5)
    m.tokenizer = bm.tokenizer.load_tokenizer("byte")
    m.config.real_vocab_size = 97
    tracemalloc.start()
    gen = m.generate([65, 66], max_new_tokens=10 ** 12, temperature=1.0, seed=0, stream=True)
    pieces = list(itertools.islice(gen, 300))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    gen.close()
    assert pieces
    assert peak < 2 << 20, peak                     # the state and a few logits, no list


def _nan_inf(shape, rng):
    a = rng.standard_normal(shape).astype(np.float32)
    flat = a.reshape(-1)
    k = max(1, flat.size // 5)
    flat[rng.choice(flat.size, k, replace=False)] = rng.choice(
        [np.nan, np.inf, -np.inf, 3e38], k).astype(np.float32)
    return a


def test_every_op_survives_non_finite_inputs():
    """NaN, +-inf and float32-max in every float input of every op: no crash, no hang, no
    out-of-range index; routing still picks an expert in [0, X); NaN in gives NaN out where
    the reference does."""
    rng = np.random.default_rng(7)
    g = lambda *s: _nan_inf(s, rng)  # noqa: E731
    b, L, E, N, K, d, X, F, T = 2, 9, 11, 5, 4, 13, 4, 6, 7
    x2 = g(T, d)
    ids, gates = ops.route_top1(x2, g(X, d), g(X))
    assert ids.dtype == np.int32 and ((0 <= ids) & (ids < X)).all()
    ids, gates, logits = ops.route_top1(np.full((T, d), np.nan, np.float32),
                                        np.ones((X, d), np.float32), np.zeros(X, np.float32),
                                        return_logits=True)
    assert ((0 <= ids) & (ids < X)).all() and np.isnan(logits).all()
    out, ids, gates, _ = ops.moe(x2, g(X, d), g(X), g(X, 2 * F, d), g(X, d, F),
                                 return_routing=True)
    assert out.shape == (T, d) and ((0 <= ids) & (ids < X)).all()
    calls = [
        lambda: ops.selective_scan(g(b, L, E), g(b, L, E), -np.abs(g(E, N)), g(b, L, N),
                                   g(b, L, N), g(E), g(b, L, E), g(E), True, g(b, E, N)),
        lambda: ops.selective_state_update(g(b, E, N), g(b, E), g(b, E), g(E, N), g(b, N),
                                           g(b, N), g(E), g(b, E), g(E), True),
        lambda: ops.causal_conv1d(g(b, L, E), g(E, K), g(E), g(b, K - 1, E), "silu"),
        lambda: ops.causal_conv1d_update(g(b, E), g(b, K - 1, E), g(E, K), g(E), "silu"),
        lambda: ops.rms_norm(x2, g(d), g(T, d)),
        lambda: ops.layer_norm(x2, g(d), g(d), g(T, d)),
        lambda: ops.linear(x2, g(33, d), g(33)),
        lambda: ops.linear(x2, ops.f32_to_bf16(g(33, d))),
        lambda: ops.bf16_to_f32(ops.f32_to_bf16(g(5, 7))),
        lambda: ops.moe_experts(x2, rng.integers(0, X, T), g(T), g(X, 2 * F, d), g(X, d, F)),
        lambda: ops.mlp(x2, g(2 * F, d), g(d, F), "silu", True),
        lambda: ops.sinkhorn(g(T, X), max_iters=50),
        lambda: ops.sinkhorn(np.full((T, X), np.nan, np.float32), max_iters=50),
    ]
    for i, call in enumerate(calls):
        t0 = time.perf_counter()
        res = call()
        assert time.perf_counter() - t0 < 5, i
        assert res is not None, i
    # NaN in -> NaN out, matching the reference, on a case each
    x = np.ones((1, 3, 4), np.float32)
    x[0, 1, 2] = np.nan
    y, _ = ops.causal_conv1d(x, np.ones((4, 2), np.float32), None, None, None)
    yr, _ = ref.causal_conv1d(x, np.ones((4, 2), np.float32), None, None, None)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(yr))
    bits = ops.f32_to_bf16(np.array([np.nan, np.inf, -np.inf, 3.4e38], np.float32))
    back = ops.bf16_to_f32(bits)
    assert np.isnan(back[0]) and back[1] == np.inf and back[2] == -np.inf and back[3] == np.inf


# ============================================================================== long inputs

_LONG = textwrap.dedent("""
    import gc, json, sys, time, tracemalloc
    import numpy as np
    sys.path.insert(0, {root!r})
    from blackmamba.config import Config
    from blackmamba.model import Model, random_tensors

    def status(key):                   # kB; VmHWM is this process's peak RSS (ru_maxrss
        with open("/proc/self/status") as f:      # would carry the parent's over exec)
            return int(next(l for l in f if l.startswith(key)).split()[1])

    cfg = Config.from_dict(dict(num_layers=2, hidden_size=32, state_size=8,
                                conv_dimension=4, vocab_size=64, ffn_hidden_size=32,
                                mamba_moe_layers=["r", "2"]))
    m = Model(cfg, random_tensors(cfg, seed=0))
    rng = np.random.default_rng(0)
    m.prefill(rng.integers(0, 64, (1, 5000)), m.new_state(1), logits="last")   # warm up
    out = {{}}
    for L in (10_000, 100_000):
        ids = rng.integers(0, 64, (1, L))
        st = m.new_state(1)
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")               # reset VmHWM to the current RSS
        rss0 = status("VmRSS:")
        tracemalloc.start()
        t0 = time.perf_counter()
        last = m.prefill(ids, st, logits="last")
        secs = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out[L] = dict(peak=peak, seconds=secs, seqlen=st.seqlen, finite=bool(
            np.isfinite(last).all()), rss_peak_kb=status("VmHWM:") - rss0)
        del ids
    print(json.dumps(out))
""")


@no_asan
def test_a_100k_token_prompt_prefills_in_memory_independent_of_length():
    proc = subprocess.run([sys.executable, "-c", _LONG.format(root=str(ROOT))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    short, long_ = r["10000"], r["100000"]
    assert long_["seqlen"] == 100_000 and long_["finite"]
    # Python-visible peak: one chunk's activations either way (the ids are the caller's)
    assert long_["peak"] < short["peak"] + (64 << 10), r
    # peak RSS above the start of the call (C scratch included): allocator noise of +-1.5 MB
    # (2.2-3.7 MB measured for 10k-300k tokens); memory that grew with the prompt would add
    # > 25 MB here (one (L, 2E) float32 activation of the 90k extra tokens alone)
    assert long_["rss_peak_kb"] < short["rss_peak_kb"] + 4 * 1024, r
    print(f"prefill 10k: {short['seconds']:.2f} s, 100k: {long_['seconds']:.2f} s; "
          f"traced peak {short['peak']} vs {long_['peak']} bytes; "
          f"RSS peak growth {short['rss_peak_kb']} vs {long_['rss_peak_kb']} kB")


# ============================================================================== load memory

_LOAD_RSS = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r})
    import blackmamba as bm

    def status(key):                   # kB
        with open("/proc/self/status") as f:
            return int(next(l for l in f if l.startswith(key)).split()[1])

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                   # VmHWM := VmRSS
    rss0 = status("VmRSS:")
    m = bm.load({path!r}, dtype="float32", tokenizer=False, progress=True)   # reads every page
    print(json.dumps(dict(peak_kb=status("VmHWM:") - rss0)))
""")


@no_asan
def test_float32_load_peaks_near_the_float32_model(tmp_path):
    """The progress bar reads every page of the bf16 file; each tensor's pages leave the
    resident set once it is upcast (checkpoint.release_pages), so the peak is about the
    float32 model, not 1.5x it (measured: 0.98x; 1.46x before)."""
    from blackmamba.checkpoint import save_torch_zip, to_bfloat16
    cfg = dict(num_layers=4, hidden_size=384, state_size=16, conv_dimension=4,
               vocab_size=8192, ffn_hidden_size=1024, mamba_moe_layers=["r", "8"] * 2)
    tensors = random_tensors(Config.from_dict(cfg), seed=0)
    save_torch_zip(str(tmp_path / "pytorch_model.bin"),
                   {k: to_bfloat16(np.asarray(v)) for k, v in tensors.items()})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    f32_kb = sum(np.asarray(v).size for v in tensors.values()) * 4 / 1024
    proc = subprocess.run([sys.executable, "-c", _LOAD_RSS.format(root=str(ROOT),
                                                                  path=str(tmp_path))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_kb"]
    assert peak < 1.15 * f32_kb + 8 * 1024, (peak, f32_kb)
