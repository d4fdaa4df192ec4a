import os

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("BLACKMAMBA_SHARED", os.path.join(HERE, "..", "..", "shared"))
GOLDEN = os.path.join(SHARED, "golden", "tiny-a")
DATA = os.path.join(SHARED, "data")
SANITIZED = os.environ.get("BLACKMAMBA_SANITIZED") == "1"


def rss_kb():
    """This process's resident set size (VmRSS, Linux /proc) in kB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def hammer(call, threads=2, iters=200):
    """call() `iters` times from each of `threads` threads at once. A call either runs or is
    refused with RuntimeError("... in use ..."); anything else fails the test. Returns how
    many calls ran."""
    import threading
    done, other = [0] * threads, []

    def work(k):
        for _ in range(iters):
            try:
                call()
                done[k] += 1
            except RuntimeError as exc:
                if "in use" not in str(exc):
                    other.append(exc)
            except BaseException as exc:  # noqa: BLE001 - reported below
                other.append(exc)

    pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not other, other
    return sum(done)


# Small configs of every layer kind (MoE "8"/"3"/"2", dense MLP "1", parallel "r2"/"r4",
# ungated MLP, biases, N = 1..64): the CPU and GPU model tests draw random models of these.
LAYER_KIND_CONFIGS = [
    dict(mamba_moe_layers=["r", "8", "r", "8"]),
    dict(mamba_moe_layers=["r", "1", "r2", "3"], state_size=4, conv_dimension=2),
    dict(mamba_moe_layers=["r4", "r", "1"], state_size=1, conv_dimension=6, bias=True,
         conv_bias=False),
    dict(mamba_moe_layers=["r", "2"], swiglu=False, activation="silu", state_size=64,
         expansion_factor=1),
]


def small_config(**over):
    """A tiny Config (d = 24, N = 16, K = 4, V = 97, F = 40) with `over` applied (which must
    name mamba_moe_layers; num_layers follows from it)."""
    from blackmamba.config import Config
    base = dict(hidden_size=24, state_size=16, conv_dimension=4, vocab_size=97,
                ffn_hidden_size=40)
    base.update(over)
    base["num_layers"] = len(base["mamba_moe_layers"])
    return Config.from_dict(base)


def rel_err(a, b):
    """‖a - b‖ / ‖b‖ in float64 (NaN if either has NaN)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@pytest.fixture(scope="session")
def golden():
    if not os.path.exists(os.path.join(GOLDEN, "golden.npz")):
        pytest.fail(f"golden files not found at {GOLDEN} (set BLACKMAMBA_SHARED)")
    return dict(np.load(os.path.join(GOLDEN, "golden.npz")))


# SIMD levels of the C core: kernels pick AVX-512, else AVX2+FMA, else portable C, reading
# BLACKMAMBA_NO_AVX512 / BLACKMAMBA_NO_AVX2 at every call, so one process tests all three. A
# level is skipped when the CPU lacks it or when the outer environment already turned it off
# (valgrind, for one, emulates AVX2 but not AVX-512).
SIMD_LEVELS = ("avx512", "avx2", "portable")
_OUTER_OFF = {"avx512": os.environ.get("BLACKMAMBA_NO_AVX512") == "1",
              "avx2": os.environ.get("BLACKMAMBA_NO_AVX2") == "1"}


def use_simd_level(monkeypatch, level):
    """Make the C core run `level` from now on (monkeypatch restores the environment), or
    skip the test where this CPU cannot run it."""
    from blackmamba import ops
    if _OUTER_OFF.get(level):
        pytest.skip(f"{level} turned off by the environment")
    monkeypatch.setenv("BLACKMAMBA_NO_AVX512", "0" if level == "avx512" else "1")
    monkeypatch.setenv("BLACKMAMBA_NO_AVX2", "1" if level == "portable" else "0")
    info = ops.cpu_info()
    if level != "portable" and not info[level]:
        pytest.skip(f"CPU without {level}")
    # the dispatch really is at this level: exactly the flags the kernels test are on
    assert info["avx512"] == (level == "avx512")
    assert info["avx2"] == (level != "portable")
    return level


def assert_levels_bitwise_equal(monkeypatch, run):
    """run() at every SIMD level this CPU has; each level's arrays must equal the portable
    level's bit for bit (one C source built per ISA with FMA contraction off). Skips where
    the CPU offers only one level."""
    out = {}
    for level in ("avx512", "avx2", "portable"):
        try:
            use_simd_level(monkeypatch, level)
        except pytest.skip.Exception:
            continue
        out[level] = run()
    if len(out) < 2:
        pytest.skip("only one SIMD level on this CPU")
    base = out.pop("portable")
    for level, ys in out.items():
        for y, y0 in zip(ys, base):
            np.testing.assert_array_equal(y.view(np.uint32), y0.view(np.uint32), err_msg=level)


@pytest.fixture(params=SIMD_LEVELS)
def simd(request, monkeypatch):
    """Run the test once at each SIMD level."""
    return use_simd_level(monkeypatch, request.param)


# Fuzz case counts (tests/test_fuzz.py fills it), printed at the end of the session.
FUZZ_REPORT = {}


def pytest_terminal_summary(terminalreporter):
    if not FUZZ_REPORT:
        return
    tr = terminalreporter
    tr.section("fuzzing")
    total = 0
    for name, r in sorted(FUZZ_REPORT.items()):
        outcomes = ", ".join(f"{k} {v}" for k, v in r.items()
                             if k not in ("target", "examples", "seed", "seconds"))
        tr.write_line(f"{name}: {r['examples']} cases in {r['seconds']} s (seed {r['seed']}): "
                      f"{outcomes}")
        total += r["examples"]
    tr.write_line(f"total: {total} fuzz cases (BLACKMAMBA_FUZZ_EXAMPLES sets cases per target)")


@pytest.fixture
def env(request):
    """env(NAME=value, ...) sets switches (environment variables the engine reads at graph
    capture) for one test: every name in the calling module's SWITCHES is unset first, and
    all of them are restored after the test."""
    switches = request.module.SWITCHES
    saved = {k: os.environ.get(k) for k in switches}

    def set_(**kv):
        for k in switches:
            os.environ.pop(k, None)
        os.environ.update({k: str(v) for k, v in kv.items()})
    yield set_
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def native_count(name):
    """The value of blackmamba._C's native counter `name` (a `long long name(void)`; the
    engine's path counters, counted at launch or graph capture)."""
    import ctypes
    from blackmamba import _lib
    f = getattr(ctypes.CDLL(_lib.C().__file__), name)
    f.restype = ctypes.c_longlong
    return f()


def decode_steps(g, c, ids, n, state=None):
    """Prefill ids (B, L) on the GPU model g (from a copy of `state`, else a fresh state: a
    fresh graph capture, so switches set before apply) and, unless c is None, on the CPU model
    c; then n steps of the same random tokens (seeded by B). Returns the GPU logits (n, B, V)
    and the CPU ones (None without c)."""
    B = ids.shape[0]
    sg = state.copy() if state is not None else g.new_state(B)
    g.prefill(ids, sg, logits=None)
    sc = None
    if c is not None:
        sc = c.new_state(B)
        c.prefill(ids, sc, logits=None)
    rng = np.random.default_rng(B)
    outg, outc = [], []
    for _ in range(n):
        tok = rng.integers(0, g.vocab_size, B)
        outg.append(g.step(tok, sg))
        if c is not None:
            outc.append(c.step(tok, sc))
    return np.stack(outg), (np.stack(outc) if c is not None else None)


def teacher_forced(m, prompt, want):
    """Prefill prompt (B, L) on model m, then step along the reference tokens want (B, n)
    (teacher forcing): the logits before each of them, (B, n, V), as the golden's
    gen_logits."""
    st = m.new_state(prompt.shape[0])
    lg = m.prefill(prompt, st, logits="last")
    steps = []
    for j in range(want.shape[1]):
        steps.append(lg)
        lg = m.step(want[:, j], st)
    return np.stack(steps, 1)
