"""The grouped-GEMM expert MLPs (cuda/grouped.cu, bm_cuda_moe_grouped) on the GPU: against
blackmamba.ref in float64 (exact, and with the bf16 roundings of BM_CUDA_MATH_BF16 emulated),
against the cuBLAS path it replaces, through ops.moe_experts and the engine's decode.
Skipped where no GPU is visible.

The launcher is called through ctypes on blackmamba._C (its C symbols are exported), so that
every T from 1 up can be tested: ops.moe_experts sends T <= 64 to the GEMV path.
BLACKMAMBA_MOE_GROUPED=force makes an unsupported case fail instead of falling back, which
is how the tests below assert that the grouped path was the one taken.
"""
import ctypes
import os
import zlib

import numpy as np
import pytest

from blackmamba import cuda, ops, ref

from conftest import rel_err

pytestmark = pytest.mark.gpu

if not cuda.is_available():
    pytest.skip("no CUDA GPU visible (or blackmamba built without CUDA)", allow_module_level=True)

from blackmamba import _lib  # noqa: E402

D = cuda.to_device
ACTS = {"gelu": 0, "gelu_tanh": 1, "silu": 2}
LEGACY_STREAM = ctypes.c_void_p(1)   # cudaStreamLegacy: the stream blackmamba.ops uses

# bf16 math against float64: x and the hidden rounded to bf16 (8-bit mantissas, ~3e-3 each)
TOL_BF16 = 1.5e-2
# bf16x2: x and the hidden split into hi + lo (16 significant bits), fp32 accumulate
TOL_BF16X2 = 5e-5
# bf16 math against float64 with the same bf16 roundings emulated: what is left is fp32
# accumulation (~1e-6 relative on a cancelling sum of d terms) and the hidden values it moves
# across a bf16 rounding boundary, each off by one bf16 ulp (2^-8): measured up to 3.5e-4
# (T = 7: few values, one flip weighs more), against ~5e-3 for no emulation at all
TOL_EMULATED = 1e-3
# the grouped path against the cuBLAS path it replaces: the same roundings and fp32 sums in
# another order (measured 3e-6 on the 2.8B shape)
TOL_SAME_ROUNDING = 1e-4


def _lib_c():
    lib = ctypes.CDLL(_lib.C().__file__)
    P, I64, I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.bm_cuda_moe_grouped.argtypes = [P, P, P, P, P, I32, I32, P, I64, I64, I64, I64, P,
                                        ctypes.c_size_t, P]
    lib.bm_cuda_moe_grouped.restype = I32
    lib.bm_cuda_moe_grouped_workspace.argtypes = [I64, I64, I64, I64, I32]
    lib.bm_cuda_moe_grouped_workspace.restype = ctypes.c_size_t
    lib.bm_cuda_last_error.restype = ctypes.c_char_p
    lib.bm_cuda_moe_grouped_wgmma_launches.restype = ctypes.c_longlong
    lib.bm_cuda_moe_grouped_tma_launches.restype = ctypes.c_longlong
    lib.bm_cuda_moe_grouped_dec_launches.restype = ctypes.c_longlong
    lib.bm_cuda_moe_grouped_pdl_launches.restype = ctypes.c_longlong
    lib.bm_cuda_moe_grouped_plain_tile_calls.restype = ctypes.c_longlong
    lib.bm_cuda_mlp_path_calls.argtypes = [I32]
    lib.bm_cuda_mlp_path_calls.restype = ctypes.c_longlong
    return lib


LIB = _lib_c()


def rng_for(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def grouped(x, ids, gates, fc1, fc2, act, split, out_fill=None):
    """bm_cuda_moe_grouped on host arrays -> out (T, d) float32."""
    T, d = x.shape
    X, F = fc1.shape[0], fc1.shape[1] // 2
    dx, di = D(np.ascontiguousarray(x, np.float32)), D(np.ascontiguousarray(ids, np.int32))
    dg = D(np.ascontiguousarray(gates, np.float32)) if gates is not None else None
    d1, d2 = D(fc1), D(fc2)
    out = D(np.full((T, d), np.float32(out_fill if out_fill is not None else 0.0)))
    nb = LIB.bm_cuda_moe_grouped_workspace(T, d, X, F, int(split))
    ws = D(np.zeros(max(nb, 1), np.uint8))
    st = LIB.bm_cuda_moe_grouped(dx.ptr, di.ptr, dg.ptr if dg is not None else None, d1.ptr,
                                 d2.ptr, ACTS[act], int(split), out.ptr, T, d, X, F, ws.ptr, nb,
                                 LEGACY_STREAM)
    assert st == 0, LIB.bm_cuda_last_error().decode()
    return out.numpy()


def emulated_bf16(x, ids, gates, fc1, fc2, act):
    """float64 expert MLPs with BM_CUDA_MATH_BF16's roundings: x to bf16, the gated hidden
    to float32 then bf16 (what the fc1 epilogue writes)."""
    xb = ref.bf16_to_f32(ref.f32_to_bf16(x)).astype(np.float64)
    w1, w2 = ref.bf16_to_f32(fc1).astype(np.float64), ref.bf16_to_f32(fc2).astype(np.float64)
    F = w1.shape[1] // 2
    out = np.zeros(x.shape, np.float64)
    for e in range(w1.shape[0]):
        rows = np.nonzero(ids == e)[0]
        if rows.size == 0:
            continue
        a = xb[rows] @ w1[e].T
        h = ref.ACTIVATIONS[act](a[:, :F]) * a[:, F:]
        hb = ref.bf16_to_f32(ref.f32_to_bf16(h.astype(np.float32))).astype(np.float64)
        out[rows] = hb @ w2[e].T
    if gates is not None:
        out *= np.asarray(gates, np.float64)[:, None]
    return out


def make_ids(rng, T, X, kind):
    if kind == "uniform":
        return rng.integers(0, X, T)
    if kind == "skewed":      # ~80% on expert 0, the rest on the odd experts: even ones empty
        ids = np.where(rng.random(T) < 0.8, 0, 2 * rng.integers(0, max(X // 2, 1), T) + 1)
        return np.minimum(ids, X - 1)
    return np.full(T, X - 1)  # "last": one expert takes everything


def case_inputs(tag, T, X, d, F, kind):
    """x, ids, gates, fc1, fc2 and an activation for one case, seeded by its key."""
    rng = rng_for(tag, T, X, d, F, kind)
    x = rng.standard_normal((T, d)).astype(np.float32)
    ids = make_ids(rng, T, X, kind)
    gates = rng.uniform(0.1, 1.0, T).astype(np.float32)
    fc1, fc2 = weights(rng, X, d, F)
    return x, ids, gates, fc1, fc2, list(ACTS)[T % 3]


def weights(rng, X, d, F):
    fc1 = ref.f32_to_bf16((0.3 * rng.standard_normal((X, 2 * F, d))).astype(np.float32))
    fc2 = ref.f32_to_bf16((0.3 * rng.standard_normal((X, d, F))).astype(np.float32))
    return fc1, fc2


# T from 1 to past the 128-row tile choice (T >= 1024 and >= 64 X); d, F not multiples of
# the 64-wide K tiles, nor of the 64/128-wide N tiles (K tails and column tails zero-filled).
CASES = [
    (1, 8, 64, 32, "uniform"), (7, 4, 200, 136, "skewed"), (33, 8, 64, 32, "skewed"),
    (64, 8, 184, 248, "uniform"), (100, 1, 48, 72, "uniform"),
    (300, 4, 200, 136, "last"), (700, 8, 64, 32, "skewed"), (1100, 8, 200, 136, "uniform"),
    (2600, 3, 104, 56, "skewed"),
]


@pytest.mark.parametrize("T,X,d,F,kind", CASES)
@pytest.mark.parametrize("split", [0, 1])
@pytest.mark.parametrize("tiles", ["0000", "1111", "2222", "3333", "4444", "5555"])
def test_grouped_against_reference(monkeypatch, T, X, d, F, kind, split, tiles):
    # every tile variant (BLACKMAMBA_MOE_GROUPED_TILES, grouped.cu gemm_dispatch; 0 = default)
    monkeypatch.setenv("BLACKMAMBA_MOE_GROUPED_TILES", tiles)
    monkeypatch.setenv("BLACKMAMBA_MOE_WGMMA", "0")  # the mma.sync core (wgmma: below)
    rng = rng_for("grouped", T, X, d, F, kind, split)
    x = rng.standard_normal((T, d)).astype(np.float32)
    ids = make_ids(rng, T, X, kind)
    gates = rng.uniform(0.1, 1.0, T).astype(np.float32)
    fc1, fc2 = weights(rng, X, d, F)
    act = list(ACTS)[(T + split) % 3]
    got = grouped(x, ids, gates, fc1, fc2, act, split)
    exact = ref.moe_experts(x, ids, gates, fc1, fc2, act)
    if split:
        assert rel_err(got, exact) < TOL_BF16X2
    else:
        assert rel_err(got, exact) < TOL_BF16
        assert rel_err(got, emulated_bf16(x, ids, gates, fc1, fc2, act)) < TOL_EMULATED


def unrouted_case(key):
    """150 tokens over 4 experts with every 7th id -1 and every 11th from the 4th X: routed
    nowhere. Returns x, ids, fc1, fc2 and check(out): those rows zero (out was filled with
    7.0 before the call), the others the float64 reference's (split products)."""
    rng = rng_for(key)
    T, X, d, F = 150, 4, 64, 40
    x = rng.standard_normal((T, d)).astype(np.float32)
    ids = rng.integers(0, X, T)
    ids[::7] = -1
    ids[3::11] = X
    fc1, fc2 = weights(rng, X, d, F)
    bad = (ids < 0) | (ids >= X)

    def check(got):
        assert np.all(got[bad] == 0)
        want = ref.moe_experts(x[~bad], ids[~bad], None, fc1, fc2, "silu")
        assert rel_err(got[~bad], want) < TOL_BF16X2
    return x, ids, fc1, fc2, check


def test_grouped_no_gates_and_unrouted_rows():
    # ids outside [0, X) are routed nowhere: their rows are zero
    x, ids, fc1, fc2, check = unrouted_case("unrouted")
    check(grouped(x, ids, None, fc1, fc2, "silu", 1, out_fill=7.0))


@pytest.mark.parametrize("T,X,d,F", [(65, 8, 64, 24), (400, 4, 200, 136), (3000, 8, 64, 32)])
@pytest.mark.parametrize("math", ["bf16", "bf16x2"])
def test_ops_moe_experts_grouped_equals_cublas(monkeypatch, T, X, d, F, math):
    # ops.moe_experts (T > 64: bm_cuda_moe_experts) forced onto the grouped path, against
    # the same call forced onto the cuBLAS path: the same roundings, different fp32 sums
    rng = rng_for("ops", T, X, d, F, math)
    x = rng.standard_normal((T, d)).astype(np.float32)
    ids = make_ids(rng, T, X, "skewed")
    g = rng.uniform(0.1, 1.0, T).astype(np.float32)
    fc1, fc2 = weights(rng, X, d, F)
    monkeypatch.setenv("BLACKMAMBA_MOE_GROUPED", "force")
    got = ops.moe_experts(D(x), D(ids), D(g), D(fc1), D(fc2), "gelu", math=math).numpy()
    monkeypatch.setenv("BLACKMAMBA_MOE_GROUPED", "0")
    old = ops.moe_experts(D(x), D(ids), D(g), D(fc1), D(fc2), "gelu", math=math).numpy()
    exact = ref.moe_experts(x, ids, g, fc1, fc2, "gelu")
    tol = TOL_BF16X2 if math == "bf16x2" else TOL_BF16
    assert rel_err(got, exact) < tol and rel_err(old, exact) < tol
    assert rel_err(got, old) < (TOL_BF16X2 if math == "bf16x2" else TOL_SAME_ROUNDING)


def test_ops_moe_experts_fallback(monkeypatch):
    # d % 8 != 0: not supported; "force" fails, the default falls back to cuBLAS (and fp32
    # weights or fp32/tf32 math never take the grouped path)
    rng = rng_for("fallback")
    T, X, d, F = 200, 4, 36, 24
    x = rng.standard_normal((T, d)).astype(np.float32)
    ids = rng.integers(0, X, T)
    fc1, fc2 = weights(rng, X, d, F)
    monkeypatch.setenv("BLACKMAMBA_MOE_GROUPED", "force")
    with pytest.raises(Exception, match="grouped"):
        ops.moe_experts(D(x), D(ids), None, D(fc1), D(fc2), math="bf16")
    got = ops.moe_experts(D(x), D(ids), None, D(fc1), D(fc2), math="fp32").numpy()
    assert rel_err(got, ref.moe_experts(x, ids, None, fc1, fc2)) < 1e-5
    monkeypatch.setenv("BLACKMAMBA_MOE_GROUPED", "1")
    got = ops.moe_experts(D(x), D(ids), None, D(fc1), D(fc2), math="bf16").numpy()
    assert rel_err(got, ref.moe_experts(x, ids, None, fc1, fc2)) < TOL_BF16


@pytest.mark.parametrize("math", ["bf16", "bf16x2"])
def test_engine_decode_and_prefill_grouped(monkeypatch, math):
    # the engine: decode at batch 12 (> 8 rows) and a 240-token prefill, grouped (forced, so
    # the path is asserted) against expert_all / the cuBLAS prefill, both against the CPU
    from blackmamba import model_cuda
    from blackmamba.config import Config
    from blackmamba.model import Model, random_tensors
    cfg = Config.from_dict(dict(num_layers=4, hidden_size=24, state_size=16, conv_dimension=4,
                                vocab_size=97, ffn_hidden_size=40,
                                mamba_moe_layers=["r", "8", "r2", "1"]))
    t = random_tensors(cfg, seed=41)
    cpu = Model(cfg, t, dtype="bfloat16")
    ids = np.random.default_rng(2).integers(0, 90, (12, 20))
    lo, hi = (0, 1e-4) if math == "bf16x2" else (1e-4, 2e-2)
    outs = {}
    for mode in ("force", "0"):
        monkeypatch.setenv("BLACKMAMBA_MOE_GROUPED", mode)
        g = model_cuda.CudaModel(cfg, t, dtype="bfloat16", math=math)
        full = g(ids)
        sg = g.new_state(12)
        g.prefill(ids, sg, logits=None)
        steps = [g.step(ids[:, k], sg, graph=k > 0) for k in range(3)]
        outs[mode] = (full, np.stack(steps))
    sc = cpu.new_state(12)
    want_full = cpu(ids)
    cpu.prefill(ids, sc, logits=None)
    want_steps = np.stack([cpu.step(ids[:, k], sc) for k in range(3)])
    for mode, (full, steps) in outs.items():
        assert lo < rel_err(full, want_full) < hi, mode
        assert lo <= rel_err(steps, want_steps) < hi, mode
    # grouped vs the old paths: under bf16 the same roundings, so far closer than either is
    # to the CPU; under bf16x2 both are within TOL_SPLIT-class error of the CPU
    tol_paths = 2e-3 if math == "bf16" else 1e-4
    assert rel_err(outs["force"][0], outs["0"][0]) < tol_paths
    assert rel_err(outs["force"][1], outs["0"][1]) < tol_paths



def mlp_paths():
    """Layers run so far by the engine's MLP paths: grouped, cuBLAS, expert_all, GEMV."""
    return np.array([LIB.bm_cuda_mlp_path_calls(k) for k in range(4)])


@pytest.mark.parametrize("B,L", [(1, 9), (1, 32), (2, 16), (1, 64), (1, 65), (1, 8), (1, 6),
                                 (2, 3), (1, 5), (1, 4), (1, 2)])
def test_engine_small_prefill_grouped(monkeypatch, B, L):
    # Session 20: a bf16-math prefill of more than 5 tokens (4 since session 23) runs its gated
    # MLP layers through grouped.cu (the gathered GEMV, which read every expert's weights once
    # per 8-token tile, kept 6..64 tokens before: BLACKMAMBA_MOE_GEMV_MAX=64 restores that).
    # Each forward's paths counted, the logits of both against each other and the CPU model
    # (split activations under 128 tokens: fp32-class either way); up to 4 tokens stay on the
    # GEMV. Session 24: the grouped GEMMs of a prefill launch with PDL on the prefill's plain
    # tiles, bit-identical to plain launches (BLACKMAMBA_PREFILL_MOE_PDL=0).
    from blackmamba import model_cuda
    from blackmamba.config import Config
    from blackmamba.model import Model, random_tensors
    cfg = Config.from_dict(dict(num_layers=4, hidden_size=24, state_size=16, conv_dimension=4,
                                vocab_size=97, ffn_hidden_size=40,
                                mamba_moe_layers=["r", "8", "r2", "1"]))
    t = random_tensors(cfg, seed=43)
    ids = np.random.default_rng(B * 100 + L).integers(0, 90, (B, L))
    want = Model(cfg, t, dtype="bfloat16")(ids)
    g = model_cuda.CudaModel(cfg, t, dtype="bfloat16")
    outs, paths, pdl = {}, {}, {}
    for mode in ("", "64", "plain"):
        monkeypatch.setenv("BLACKMAMBA_MOE_GEMV_MAX", "" if mode == "plain" else mode)
        monkeypatch.setenv("BLACKMAMBA_PREFILL_MOE_PDL", "0" if mode == "plain" else "")
        n0, p0 = mlp_paths(), LIB.bm_cuda_moe_grouped_pdl_launches()
        t0 = LIB.bm_cuda_moe_grouped_plain_tile_calls()
        outs[mode] = g(ids)
        paths[mode] = tuple(mlp_paths() - n0)
        pdl[mode] = LIB.bm_cuda_moe_grouped_pdl_launches() - p0
        # every grouped GEMM on the plain tiles, with PDL or not (hidden 24: decode tiles)
        assert LIB.bm_cuda_moe_grouped_plain_tile_calls() - t0 == 2 * paths[mode][0], mode
    # every MLP of a forward ("8", "1" and the parallel one of "r2") on one path
    n = sum(paths[""])
    assert n == 3 and sum(paths["64"]) == n, paths
    grouped_now = B * L > 4
    assert paths[""] == ((n, 0, 0, 0) if grouped_now else (0, 0, 0, n)), paths
    assert paths["64"] == ((n, 0, 0, 0) if B * L > 64 else (0, 0, 0, n)), paths
    for mode, out in outs.items():
        assert out.shape == want.shape
        assert rel_err(out, want) < 1e-4, (mode, rel_err(out, want))
    assert rel_err(outs[""], outs["64"]) < 1e-4
    if not grouped_now or B * L > 64:   # the same path either way
        np.testing.assert_array_equal(outs[""], outs["64"])
    np.testing.assert_array_equal(outs[""], outs["plain"])
    assert paths["plain"] == paths[""]
    # fc1 and fc2 of each grouped layer with PDL (unless BLACKMAMBA_CUDA_PDL is off), none
    # under "0"
    pdl_on = os.environ.get("BLACKMAMBA_CUDA_PDL", "1")[:1] != "0"
    assert pdl[""] == (2 * paths[""][0] if pdl_on else 0) and pdl["plain"] == 0, pdl


# ---- the wgmma core (grouped_wgmma.cuh): prefill tiles on compute capability 9.0 ----------------

def compute_capability():
    """(major, minor) of the current device, through the CUDA runtime _C links."""
    dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    assert LIB.cudaGetDevice(ctypes.byref(dev)) == 0
    assert LIB.cudaDeviceGetAttribute(ctypes.byref(major), 75, dev) == 0  # ...CapabilityMajor
    assert LIB.cudaDeviceGetAttribute(ctypes.byref(minor), 76, dev) == 0
    return major.value, minor.value


HOPPER = compute_capability() == (9, 0)
needs_wgmma = pytest.mark.skipif(not HOPPER, reason="the wgmma core needs compute capability 9.0")


def wgmma_run(monkeypatch, mode, fn):
    """fn() under BLACKMAMBA_MOE_WGMMA=mode, the TMA producer off (the cp.async wgmma core;
    grouped_tma.cuh: below) -> (its result, wgmma GEMM launches it made)."""
    monkeypatch.setenv("BLACKMAMBA_MOE_WGMMA", mode)
    monkeypatch.setenv("BLACKMAMBA_MOE_TMA", "0")
    n0 = LIB.bm_cuda_moe_grouped_wgmma_launches()
    r = fn()
    return r, LIB.bm_cuda_moe_grouped_wgmma_launches() - n0


@needs_wgmma
@pytest.mark.parametrize("T,X,d,F,kind", CASES)
@pytest.mark.parametrize("tiles", ["00", "11", "22", "33", "44", "55", "66", "77", "88", "99"])
def test_wgmma_against_reference(monkeypatch, T, X, d, F, kind, tiles):
    # "force": the wgmma core for every unsplit call, so that the small cases (one partial
    # tile, empty experts, K and column tails) run on it too; every tile variant
    # (BLACKMAMBA_MOE_WGMMA_TILES: fc1, fc2 digits), same tolerances as the mma.sync core
    monkeypatch.setenv("BLACKMAMBA_MOE_WGMMA_TILES", tiles)
    x, ids, gates, fc1, fc2, act = case_inputs("wgmma", T, X, d, F, kind)
    got, n = wgmma_run(monkeypatch, "force",
                       lambda: grouped(x, ids, gates, fc1, fc2, act, 0))
    assert n == 2  # fc1 and fc2 both on the wgmma core
    assert rel_err(got, ref.moe_experts(x, ids, gates, fc1, fc2, act)) < TOL_BF16
    assert rel_err(got, emulated_bf16(x, ids, gates, fc1, fc2, act)) < TOL_EMULATED


@needs_wgmma
@pytest.mark.parametrize("T,X,d,F,kind", [(1100, 8, 200, 136, "uniform"),
                                          (2600, 3, 104, 56, "skewed"),
                                          (4100, 8, 264, 392, "uniform")])
def test_wgmma_default_and_switch(monkeypatch, T, X, d, F, kind):
    # prefill-sized calls (T >= 1024 and >= 64 X) take the wgmma core by default and the
    # mma.sync core under BLACKMAMBA_MOE_WGMMA=0; split calls never take it. The two cores
    # sum the same bf16 products in fp32 in another order: far closer to each other than to
    # float64 (a hidden value moved across a bf16 rounding boundary weighs ~1e-4)
    rng = rng_for("wgmma default", T, X, d, F, kind)
    x = rng.standard_normal((T, d)).astype(np.float32)
    ids = make_ids(rng, T, X, kind)
    gates = rng.uniform(0.1, 1.0, T).astype(np.float32)
    fc1, fc2 = weights(rng, X, d, F)
    monkeypatch.delenv("BLACKMAMBA_MOE_WGMMA_TILES", raising=False)
    new, n_new = wgmma_run(monkeypatch, "", lambda: grouped(x, ids, gates, fc1, fc2, "silu", 0))
    old, n_old = wgmma_run(monkeypatch, "0", lambda: grouped(x, ids, gates, fc1, fc2, "silu", 0))
    _, n_split = wgmma_run(monkeypatch, "force",
                           lambda: grouped(x, ids, gates, fc1, fc2, "silu", 1))
    assert (n_new, n_old, n_split) == (2, 0, 0)
    assert rel_err(new, old) < 1e-3
    assert rel_err(new, emulated_bf16(x, ids, gates, fc1, fc2, "silu")) < TOL_EMULATED


@needs_wgmma
def test_wgmma_small_calls_keep_the_old_core(monkeypatch):
    # below the prefill size (decode batches, T < 1024) the default keeps the mma.sync tiles
    rng = rng_for("wgmma small")
    T, X, d, F = 300, 4, 64, 40
    x = rng.standard_normal((T, d)).astype(np.float32)
    ids = rng.integers(0, X, T)
    fc1, fc2 = weights(rng, X, d, F)
    got, n = wgmma_run(monkeypatch, "", lambda: grouped(x, ids, None, fc1, fc2, "gelu", 0))
    assert n == 0
    assert rel_err(got, ref.moe_experts(x, ids, None, fc1, fc2, "gelu")) < TOL_BF16


# ---- the TMA core (grouped_tma.cuh): the wgmma tiles fed by the copy engine ------------------

def tma_run(monkeypatch, mode, fn):
    """fn() under BLACKMAMBA_MOE_TMA=mode -> (its result, TMA-core launches, cp.async
    wgmma-core launches)."""
    monkeypatch.setenv("BLACKMAMBA_MOE_TMA", mode)
    t0, w0 = LIB.bm_cuda_moe_grouped_tma_launches(), LIB.bm_cuda_moe_grouped_wgmma_launches()
    r = fn()
    return (r, LIB.bm_cuda_moe_grouped_tma_launches() - t0,
            LIB.bm_cuda_moe_grouped_wgmma_launches() - w0)


@needs_wgmma
@pytest.mark.parametrize("T,X,d,F,kind", CASES + [(4100, 8, 264, 392, "uniform"),
                                                  (3000, 5, 1472, 72, "skewed")])
def test_tma_against_wgmma(monkeypatch, T, X, d, F, kind):
    # BLACKMAMBA_MOE_TMA=force (with the wgmma core forced): every unsplit call on the TMA
    # core, whose tile (2 x 64 rows, 256 weight rows) and k order are the cp.async core's
    # "66": bit-identical to it, whatever the tails (K below one tile, K and N tails, one
    # partial row tile, empty experts, rows past T), and against float64 as the other cores
    monkeypatch.setenv("BLACKMAMBA_MOE_WGMMA", "force")
    monkeypatch.setenv("BLACKMAMBA_MOE_WGMMA_TILES", "66")
    x, ids, gates, fc1, fc2, act = case_inputs("tma", T, X, d, F, kind)
    got, n_t, n_w = tma_run(monkeypatch, "force",
                            lambda: grouped(x, ids, gates, fc1, fc2, act, 0, out_fill=7.0))
    assert (n_t, n_w) == (2, 0)
    old, n_t, n_w = tma_run(monkeypatch, "0",
                            lambda: grouped(x, ids, gates, fc1, fc2, act, 0, out_fill=7.0))
    assert (n_t, n_w) == (0, 2)
    np.testing.assert_array_equal(got, old)
    # BLACKMAMBA_MOE_TMA_SKIP=0 (session 24): the second consumer warpgroup of a tile with at
    # most 64 rows multiplies its rows past the tile as before; the stored rows are the same
    # (every case but X = 1 has such a tile: an expert with 1..64 rows in its last row tile)
    counts = np.bincount(ids, minlength=X)
    assert X == 1 or any(0 < c % 128 <= 64 for c in counts)
    monkeypatch.setenv("BLACKMAMBA_MOE_TMA_SKIP", "0")
    full, n_t, _ = tma_run(monkeypatch, "force",
                           lambda: grouped(x, ids, gates, fc1, fc2, act, 0, out_fill=7.0))
    monkeypatch.delenv("BLACKMAMBA_MOE_TMA_SKIP")
    assert n_t == 2
    np.testing.assert_array_equal(got, full)
    assert rel_err(got, ref.moe_experts(x, ids, gates, fc1, fc2, act)) < TOL_BF16
    assert rel_err(got, emulated_bf16(x, ids, gates, fc1, fc2, act)) < TOL_EMULATED


@needs_wgmma
def test_tma_default_and_switch(monkeypatch):
    # unsplit calls from 512 rows (plain ones, as here, from 320) take the TMA core by default
    # (BLACKMAMBA_MOE_TMA unset), the cp.async wgmma core (prefill sizes) or the decode tiles
    # (below) under BLACKMAMBA_MOE_TMA=0; smaller ones and split calls never
    rng = rng_for("tma default")
    T, X, d, F = 2600, 3, 104, 56
    x = rng.standard_normal((T, d)).astype(np.float32)
    ids = make_ids(rng, T, X, "skewed")
    fc1, fc2 = weights(rng, X, d, F)
    for k in ("BLACKMAMBA_MOE_WGMMA", "BLACKMAMBA_MOE_WGMMA_TILES"):
        monkeypatch.delenv(k, raising=False)
    new, n_t, n_w = tma_run(monkeypatch, "", lambda: grouped(x, ids, None, fc1, fc2, "silu", 0))
    assert (n_t, n_w) == (2, 0)
    _, n_t, n_w = tma_run(monkeypatch, "0", lambda: grouped(x, ids, None, fc1, fc2, "silu", 0))
    assert (n_t, n_w) == (0, 2)
    _, n_t, _ = tma_run(monkeypatch, "", lambda: grouped(x, ids, None, fc1, fc2, "silu", 1))
    assert n_t == 0
    _, n_t, _ = tma_run(monkeypatch, "", lambda: grouped(x[:300], ids[:300], None, fc1, fc2,
                                                          "silu", 0))
    assert n_t == 0
    mid, n_t, n_w = tma_run(monkeypatch, "", lambda: grouped(x[:600], ids[:600], None, fc1, fc2,
                                                              "silu", 0))
    assert (n_t, n_w) == (2, 0)
    dec, n_t, n_w = tma_run(monkeypatch, "0", lambda: grouped(x[:600], ids[:600], None, fc1,
                                                               fc2, "silu", 0))
    assert (n_t, n_w) == (0, 0)   # the mma.sync decode tiles
    assert rel_err(mid, dec) < 1e-3
    assert rel_err(new, emulated_bf16(x, ids, None, fc1, fc2, "silu")) < TOL_EMULATED
    # session 23: a plain call (no PDL: the prefill's) from 320 rows (TMA_MIN_ROWS_PLAIN);
    # BLACKMAMBA_MOE_PLAIN_TILES=0 keeps the decode's 512
    monkeypatch.delenv("BLACKMAMBA_MOE_PLAIN_TILES", raising=False)
    for n, want_t in ((319, 0), (320, 2), (400, 2)):
        got, n_t, n_w = tma_run(monkeypatch, "", lambda: grouped(x[:n], ids[:n], None, fc1, fc2,
                                                                  "silu", 0))
        assert (n_t, n_w) == (want_t, 0), n
        monkeypatch.setenv("BLACKMAMBA_MOE_PLAIN_TILES", "0")
        old, n_t, n_w = tma_run(monkeypatch, "", lambda: grouped(x[:n], ids[:n], None, fc1,
                                                                  fc2, "silu", 0))
        monkeypatch.delenv("BLACKMAMBA_MOE_PLAIN_TILES")
        assert (n_t, n_w) == (0, 0), n
        assert rel_err(got, old) < 1e-3, n
        assert rel_err(got, emulated_bf16(x[:n], ids[:n], None, fc1, fc2, "silu")) < TOL_EMULATED


@needs_wgmma
def test_engine_tma_core(monkeypatch):
    # the engine takes the TMA core from 512 rows: a 600-token prefill, and a batch-520 state's
    # prefill and decode steps (captured in a graph: plain launches in stream order there),
    # against BLACKMAMBA_MOE_TMA=0 (the cp.async wgmma core or the mma.sync tiles) and the CPU
    from blackmamba import model_cuda
    from blackmamba.config import Config
    from blackmamba.model import Model, random_tensors
    cfg = Config.from_dict(dict(num_layers=4, hidden_size=24, state_size=16, conv_dimension=4,
                                vocab_size=97, ffn_hidden_size=40,
                                mamba_moe_layers=["r", "8", "r", "1"]))
    t = random_tensors(cfg, seed=43)
    cpu = Model(cfg, t, dtype="bfloat16")
    rng = np.random.default_rng(5)
    long_ids = rng.integers(0, 90, (1, 600))
    ids = rng.integers(0, 90, (520, 4))
    outs, launches = {}, {}
    for mode in ("", "0"):
        monkeypatch.setenv("BLACKMAMBA_MOE_TMA", mode)
        n0 = LIB.bm_cuda_moe_grouped_tma_launches()
        g = model_cuda.CudaModel(cfg, t, dtype="bfloat16")
        full = g(long_ids)
        sg = g.new_state(520)
        g.prefill(ids[:, :2], sg, logits=None)
        steps = np.stack([g.step(ids[:, k], sg, graph=k > 2) for k in (2, 3)])
        launches[mode] = LIB.bm_cuda_moe_grouped_tma_launches() - n0
        outs[mode] = (full, steps)
    # two grouped MoE layers (8 experts and the dense "1"), fc1 and fc2 each: the 600-token
    # forward, the 1040-row prefill and the two 520-row steps
    assert launches == {"": 2 * 2 * 4, "0": 0}
    want_full = cpu(long_ids)
    sc = cpu.new_state(520)
    cpu.prefill(ids[:, :2], sc, logits=None)
    want_steps = np.stack([cpu.step(ids[:, k], sc) for k in (2, 3)])
    for mode, (full, steps) in outs.items():
        assert rel_err(full, want_full) < 2e-2, mode
        assert rel_err(steps, want_steps) < 2e-2, mode
    assert rel_err(outs[""][0], outs["0"][0]) < 2e-3
    assert rel_err(outs[""][1], outs["0"][1]) < 2e-3


# ---- the decode kernel (grouped.cu grouped_dec_kernel): variants 6..9 of the decode roles ------

# T < 1024: the decode roles (digits 3 and 4 of BLACKMAMBA_MOE_GROUPED_TILES). Experts with
# more than 16 / 32 rows (several row tiles: skewed, last), K below one 64-wide k tile (d =
# 48), K and N tails (d = 200, F = 136, 72), one expert (X = 1).
DEC_CASES = [
    (1, 8, 64, 32, "uniform"), (7, 4, 200, 136, "skewed"), (33, 8, 64, 32, "skewed"),
    (64, 8, 184, 248, "uniform"), (100, 1, 48, 72, "uniform"), (300, 4, 200, 136, "last"),
]
# variants whose warps each run the whole K (one warp a CTA: fc1 6, 7, 9; fc2 6) sum every
# output in grouped_gemm_kernel's order: bit-identical to the old tiles ("0022")
DEC_SAME = ["0066", "0076", "0096", "0026", "0062"]
# fc2 on k slices of 2 or 4 warps (7, 8, 9) after the old fc1: the same bf16 hidden, the fp32
# sum over k in another order (~1e-7 relative)
DEC_FC2_SLICED = ["0027", "0028", "0029"]
# fc1 on 2 warps' k slices (8): a hidden value may cross a bf16 rounding boundary (2^-8 on
# one element), as between the mma.sync and wgmma cores
DEC_FC1_SLICED = ["0088", "0087", "0086"]


def grouped_dec(monkeypatch, tiles, *args):
    monkeypatch.setenv("BLACKMAMBA_MOE_GROUPED_TILES", tiles)
    n0 = LIB.bm_cuda_moe_grouped_dec_launches()
    out = grouped(*args)
    return out, LIB.bm_cuda_moe_grouped_dec_launches() - n0


@pytest.mark.parametrize("T,X,d,F,kind", DEC_CASES)
@pytest.mark.parametrize("split", [0, 1])
def test_grouped_dec_kernel(monkeypatch, T, X, d, F, kind, split):
    monkeypatch.setenv("BLACKMAMBA_MOE_WGMMA", "0")
    rng = rng_for("grouped dec", T, X, d, F, kind, split)
    x = rng.standard_normal((T, d)).astype(np.float32)
    ids = make_ids(rng, T, X, kind)
    gates = rng.uniform(0.1, 1.0, T).astype(np.float32)
    fc1, fc2 = weights(rng, X, d, F)
    act = list(ACTS)[(T + split) % 3]
    args = (x, ids, gates, fc1, fc2, act, split)
    old, n = grouped_dec(monkeypatch, "0022", *args)
    assert n == 0
    exact = ref.moe_experts(x, ids, gates, fc1, fc2, act)
    emul = None if split else emulated_bf16(x, ids, gates, fc1, fc2, act)
    for tiles in DEC_SAME + DEC_FC2_SLICED + DEC_FC1_SLICED:
        got, n = grouped_dec(monkeypatch, tiles, *args)
        assert n == sum(c >= "6" for c in tiles[2:]), tiles      # the path was taken
        if tiles in DEC_SAME:
            np.testing.assert_array_equal(got, old, err_msg=tiles)
        elif tiles in DEC_FC2_SLICED:
            assert rel_err(got, old) < 1e-5, tiles
        else:
            assert rel_err(got, old) < (TOL_BF16X2 if split else 1e-3), tiles
        if split:
            assert rel_err(got, exact) < TOL_BF16X2, tiles
        else:
            assert rel_err(got, exact) < TOL_BF16, tiles
            assert rel_err(got, emul) < TOL_EMULATED, tiles


def test_grouped_dec_unrouted_rows(monkeypatch):
    # ids outside [0, X) (rows zeroed by the conversion pass) on the decode kernel
    x, ids, fc1, fc2, check = unrouted_case("dec unrouted")
    got, n = grouped_dec(monkeypatch, "0088", x, ids, None, fc1, fc2, "silu", 1, 7.0)
    assert n == 2
    check(got)
