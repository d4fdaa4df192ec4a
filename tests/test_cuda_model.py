"""The whole model on the GPU (blackmamba.model_cuda, cuda/engine.cu) against the released
reference (golden files), against itself (prefill + step == one forward; graph replay ==
eager step; batch == alone) and against the CPU model on the same random weights.

Tolerances (relative L2, float64 norms):
  TOL_F32 1e-4: float32 compute from the same weights as the reference or the CPU model; the
    GPU sums in other orders (cuBLAS, warp reductions) and its prefill scan takes exp through
    the MUFU ex2 unit (~2 ulp) while the step uses expf, so results agree to float32 rounding
    accumulated over a few layers, far below 1e-4 (measured values: BM_MEASURE_OUT).
  TOL_BF16_MATH 0.05 (the issue's bound for bf16 against the fp32 golden): activations are
    rounded to bf16 before the tensor-core GEMMs of the prefill (~3e-3 per product).
  TOL_SPLIT 1e-4: math "bf16x2" (and "bf16" on products of at most bf16_split_rows rows): the
    activations split into bf16 hi + lo keep 16 significant bits (~1e-5 per product; the
    NumPy emulation tools/bf16_emulate.py gives 1.0e-5 on the golden).
Set BM_MEASURE_OUT=path.json to record every measured error.
"""
import json
import os

import numpy as np
import pytest

import blackmamba as bm
from blackmamba import model_cuda
from blackmamba.config import load_config
from blackmamba.model import Model, random_tensors

from conftest import (GOLDEN, LAYER_KIND_CONFIGS, native_count, rel_err, small_config,
                      teacher_forced)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not model_cuda.is_available(),
                                 reason="no CUDA device, or blackmamba built without CUDA")]

TOL_F32 = 1e-4
TOL_BF16_MATH = 0.05
TOL_SPLIT = 1e-4

MEASURED = {}


def record(name, value):
    MEASURED[name] = float(value)
    return value


@pytest.fixture(scope="module", autouse=True)
def _write_measured():
    yield
    path = os.environ.get("BM_MEASURE_OUT")
    if path:
        with open(path, "w") as f:
            json.dump(MEASURED, f, indent=1, sort_keys=True)


def golden_tensors():
    from blackmamba.checkpoint import load_tensors
    return load_config(GOLDEN), load_tensors(os.path.join(GOLDEN, "pytorch_model.bin"))


@pytest.fixture(scope="module")
def gold_parts():
    return golden_tensors()


def gold_model(parts, dtype, math=None):
    cfg, t = parts
    return model_cuda.CudaModel(cfg, t, dtype=dtype, math=math)


# ---- golden (tiny-a, the released reference in float32) -----------------------------------

@pytest.mark.parametrize("dtype,math", [("float32", "fp32"), ("bfloat16", "fp32")])
def test_golden_forward_exact(gold_parts, golden, dtype, math):
    # tiny-a's weights are bf16 in the file: bf16 storage with fp32 activations is exact too
    m = gold_model(gold_parts, dtype, math)
    seen = {}
    m._tracer = lambda li, ids, gates, logits: seen.setdefault(li, (ids.copy(), logits.copy()))
    logits = m(golden["input_ids"])
    m._tracer = None
    assert logits.shape == golden["logits"].shape and logits.dtype == np.float32
    assert record(f"golden_forward_{dtype}_{math}", rel_err(logits, golden["logits"])) < TOL_F32
    assert sorted(seen) == [1, 3]
    for li in (1, 3):
        ref = golden[f"router_logits/decoder.layers.{li}.mixer"]
        ids, rl = seen[li]
        assert rel_err(rl, ref) < TOL_F32
        np.testing.assert_array_equal(ids, ref.argmax(-1))


def test_golden_forward_bf16_math(gold_parts, golden):
    # The default math for bf16 weights, "bf16". The golden's 74 tokens are at most
    # bf16_split_rows (128), so its products split the activations into bf16 hi + lo
    # (two tensor-core GEMMs): fp32-class error and every argmax. Rounding the activations
    # to bf16 instead (test_golden_forward_bf16_rounded) flips one position of 74.
    m = gold_model(gold_parts, "bfloat16")          # default math for bf16: "bf16"
    assert m.math == "bf16" and m.dtype == "bfloat16"
    logits = m(golden["input_ids"])
    err = record("golden_forward_bf16_bf16math", rel_err(logits, golden["logits"]))
    agree = record("golden_argmax_agreement_bf16math",
                   np.mean(logits.argmax(-1) == golden["logits"].argmax(-1)))
    assert err < TOL_SPLIT and agree >= 0.99      # the issue: < 0.05 and >= 99%
    assert err > 0      # not the exact fp32 path (rounded hi + lo parts, tensor cores)
    # generation: the prompt's prefill (12 tokens) splits, and so do the decode steps at
    # batch 2 (the batched path's bf16 hi + lo products since session 18; the GEMVs' fp32
    # activations before)
    prompt, want = golden["gen_prompt"], golden["gen_tokens"]
    steps = teacher_forced(m, prompt, want)
    assert record("golden_gen_logits_bf16math", rel_err(steps, golden["gen_logits"])) \
        < TOL_SPLIT
    np.testing.assert_array_equal(steps.argmax(-1), want)


@pytest.mark.parametrize("math,split_rows", [("bf16", 0), ("bf16x2", None)])
def test_golden_forward_bf16_rounded_and_split(gold_parts, golden, math, split_rows):
    cfg, t = gold_parts
    m = model_cuda.CudaModel(cfg, t, dtype="bfloat16", math=math, bf16_split_rows=split_rows)
    logits = m(golden["input_ids"])
    err = record(f"golden_forward_bf16_{math}_split{split_rows}",
                 rel_err(logits, golden["logits"]))
    agree = record(f"golden_argmax_agreement_{math}_split{split_rows}",
                   np.mean(logits.argmax(-1) == golden["logits"].argmax(-1)))
    if math == "bf16x2":    # split everywhere
        assert err < TOL_SPLIT and agree == 1.0
        return
    # bf16_split_rows=0: every product of more than 8 rows rounds its activations to bf16,
    # except x_proj and dt_proj, which run in tf32 (the large-prefill path). Its error, 6.39e-3
    # (H200, and the NumPy emulation of this path, tools/bf16_emulate.py, to 7 digits), is 20x
    # below the released bf16 reference's 0.13, but two of the golden's 74 positions have
    # top-2 logit gaps (0.0033, 0.0036) and layer 3's router one top-2 gap (0.0037) within
    # that noise (0.003 RMS per logit, ~0.01 per router logit): position (0, 14) keeps its
    # argmax by a margin of 0.0003 (74/74; with x_proj and dt_proj in bf16, as before session
    # 3, it flipped: 73/74, 6.58e-3). So this path is held to 98%; no choice of a few exact
    # products fixes it robustly (the emulation: the noise comes from in_proj, out_proj, fc1
    # and fc2 together, not from the LM head or the router, which is fp32 already).
    assert err < TOL_BF16_MATH and agree >= 0.98
    assert err > 1e-3   # activations really were rounded


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_golden_greedy_generation(gold_parts, golden, dtype):
    m = gold_model(gold_parts, dtype, "fp32")
    prompt, want = golden["gen_prompt"], golden["gen_tokens"]
    st = m.new_state(prompt.shape[0])
    logits = m.prefill(prompt, st, logits="last")
    toks, steps = [], []
    for _ in range(want.shape[1]):
        steps.append(logits)
        nxt = logits.argmax(-1)
        toks.append(nxt)
        logits = m.step(nxt, st)
    np.testing.assert_array_equal(np.stack(toks, 1), want)
    assert record(f"golden_gen_logits_{dtype}",
                  rel_err(np.stack(steps, 1), golden["gen_logits"])) < TOL_F32
    assert st.seqlen == prompt.shape[1] + want.shape[1]
    # greedy decoding on the device (graph replay + device argmax) gives the same tokens
    np.testing.assert_array_equal(m.greedy(prompt, want.shape[1]), want)
    # and so does generate() (it stops a row at EOS = 0)
    got = m.generate([list(p) for p in prompt], max_new_tokens=want.shape[1], return_tokens=True)
    for row, w in zip(got, want):
        w = list(w)
        assert row == (w[:w.index(0)] if 0 in w else w)


def test_load_device_cuda(golden):
    m = bm.load(GOLDEN, device="cuda", tokenizer=False)
    assert isinstance(m, model_cuda.CudaModel)
    assert m.device == "cuda" and m.dtype == "bfloat16"      # the GPU default
    assert m.num_parameters() == Model.num_parameters(m)      # same counting as the CPU
    logits = m(golden["input_ids"][:1, :8])
    assert rel_err(logits, golden["logits"][:1, :8]) < TOL_BF16_MATH


# ---- random models: every layer kind ---------------------------------------------------------

CONFIGS = LAYER_KIND_CONFIGS
make_cfg = small_config


def make_pair(seed, dtype="float32", math="fp32", **over):
    """(CudaModel, CPU Model) on the same random weights."""
    cfg = make_cfg(**over)
    t = random_tensors(cfg, seed=seed)
    return model_cuda.CudaModel(cfg, t, dtype=dtype, math=math), Model(cfg, t, dtype=dtype)


@pytest.mark.parametrize("ci", range(len(CONFIGS)))
def test_prefill_then_step_equals_forward(ci):
    g, _ = make_pair(ci, **CONFIGS[ci])
    ids = np.random.default_rng(100 + ci).integers(0, g.vocab_size, (3, 23))
    full = g(ids)                   # T = 69: the cuBLAS expert path (more than 64 tokens)
    for split in (1, 2, 7):
        st = g.new_state(3)
        part = g.prefill(ids[:, :split], st)
        steps = [g.step(ids[:, t], st) for t in range(split, ids.shape[1])]
        got = np.concatenate([part, np.stack(steps, 1)], axis=1)
        assert record(f"prefill_step_c{ci}_s{split}", rel_err(got, full)) < TOL_F32, split


@pytest.mark.parametrize("ci", range(len(CONFIGS)))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_equals_cpu(ci, dtype):
    g, c = make_pair(10 + ci, dtype=dtype, math="fp32", **CONFIGS[ci])
    ids = np.random.default_rng(7 + ci).integers(0, g.vocab_size, (2, 40))
    assert record(f"gpu_cpu_forward_c{ci}_{dtype}", rel_err(g(ids), c(ids))) < TOL_F32
    sg, sc = g.new_state(2), c.new_state(2)
    lg, lc = g.prefill(ids[:, :9], sg, logits="last"), c.prefill(ids[:, :9], sc, logits="last")
    assert rel_err(lg, lc) < TOL_F32
    for t in range(9, 15):
        lg, lc = g.step(ids[:, t], sg), c.step(ids[:, t], sc)
        assert record(f"gpu_cpu_step_c{ci}_{dtype}", rel_err(lg, lc)) < TOL_F32
    # routing of a decode step (the eager path with the trace), layer by layer
    seen = {}
    g._tracer = lambda li, i, gt, lo: seen.setdefault(("g", li), (i.copy(), gt.copy(), lo.copy()))
    c._tracer = lambda li, i, gt, lo: seen.setdefault(("c", li), (i.copy(), gt.copy(), lo.copy()))
    try:
        g.step(ids[:, 15], sg)
        c.step(ids[:, 15], sc)
    finally:
        g._tracer = c._tracer = None
    layers = [li for (who, li) in seen if who == "c"]
    assert sorted(li for (who, li) in seen if who == "g") == sorted(layers)
    for li in layers:
        (gi, gg, gl), (ci_, cg, cl) = seen[("g", li)], seen[("c", li)]
        np.testing.assert_array_equal(gi, ci_)
        assert rel_err(gl, cl) < TOL_F32 and rel_err(gg, cg) < TOL_F32
    # the recurrent state itself, brought back to the host
    cs = sg.to_cpu()
    for a, b in zip(cs.conv + cs.ssm, sc.conv + sc.ssm):
        if b is not None:
            assert rel_err(a, b) < TOL_F32
    assert cs.seqlen == sc.seqlen == 16


@pytest.mark.parametrize("ci", [0, 1, 3])
@pytest.mark.parametrize("math", ["bf16", "bf16x2"])
def test_bf16_math_against_cpu(ci, math):
    g, c = make_pair(21 + ci, dtype="bfloat16", math=math, **CONFIGS[ci])
    ids = np.random.default_rng(3).integers(0, g.vocab_size, (12, 20))
    # "bf16": 240 tokens > bf16_split_rows: bf16-rounded activations in every large product
    lo, hi = (0, TOL_SPLIT) if math == "bf16x2" else (1e-4, 2e-2)
    err = record(f"gpu_{math}math_vs_cpu_bf16_c{ci}", rel_err(g(ids), c(ids)))
    assert lo < err < hi
    # decode at batch 12 > 8: cuBLAS bf16 products and the all-experts batched GEMMs (split
    # too under bf16x2; decode never splits under "bf16")
    sg, sc = g.new_state(12), c.new_state(12)
    g.prefill(ids, sg, logits=None)
    c.prefill(ids, sc, logits=None)
    for t in range(3):
        tok = ids[:, t]
        err = record(f"gpu_{math}math_step_B12_c{ci}", rel_err(g.step(tok, sg), c.step(tok, sc)))
        assert lo < err < hi


@pytest.mark.parametrize("ci", [0, 1])
def test_bf16_split_rows_rule(ci):
    # math "bf16": prefills of at most bf16_split_rows tokens split (fp32-class error), longer
    # ones round; 120 tokens against limits 128 (default), 100 and 0 (never)
    ids = np.random.default_rng(4).integers(0, 90, (10, 12))        # 120 tokens
    cfg = make_cfg(**CONFIGS[ci])
    t = random_tensors(cfg, seed=31 + ci)
    want = Model(cfg, t, dtype="bfloat16")(ids)
    errs = {}
    for rows in (None, 120, 119, 0):
        g = model_cuda.CudaModel(cfg, t, dtype="bfloat16", math="bf16", bf16_split_rows=rows)
        errs[rows] = record(f"split_rows_c{ci}_{rows}", rel_err(g(ids), want))
    assert errs[None] < TOL_SPLIT and errs[120] < TOL_SPLIT
    assert 1e-4 < errs[119] < 2e-2 and 1e-4 < errs[0] < 2e-2
    with pytest.raises(TypeError, match="bf16_split_rows"):
        model_cuda.CudaModel(cfg, t, dtype="bfloat16", bf16_split_rows=1.5)


def native_counters():
    """(sequence-parallel scans, K-split x_proj products, tf32 x_proj / dt_proj products) so
    far in this process."""
    return (native_count("bm_cuda_scan_segmented_calls"),
            native_count("bm_cuda_xproj_ksplit_calls"), native_count("bm_cuda_small_tf32_calls"))


@pytest.mark.parametrize("math", ["fp32", "bf16x2", "bf16"])
def test_sequence_parallel_scan_and_xproj_ksplit(math, monkeypatch):
    # hidden 128 -> E = 256: a batch-1 prefill of 800 tokens has 8 scan blocks per segment, so
    # the scan runs in 12 segments (cuda/scan.cu; none under 768 steps since session 23); under
    # bf16 math x_proj (256 deep) runs K-split in 2 (engine.cu x_proj), in prefill and in
    # decode at batch 12; under bf16 (unsplit at 800 rows) x_proj and dt_proj run in tf32 on
    # float32 weight copies (tf32_small()).
    # Against the CPU model with each math's tolerance (module docstring). The decode's
    # cuBLAS products, that is: BLACKMAMBA_XDT_DEC=0 (by default, batched decode runs them
    # through cuda/xdt.cu's kernels: tests/test_cuda_xdt.py).
    monkeypatch.setenv("BLACKMAMBA_XDT_DEC", "0")
    cfg = make_cfg(mamba_moe_layers=["r", "8", "r", "8"], hidden_size=128)
    t = random_tensors(cfg, seed=41)
    c = Model(cfg, t, dtype="bfloat16")
    g = model_cuda.CudaModel(cfg, t, dtype="bfloat16", math=math)
    # bf16 (unsplit bf16 products) over 800 tokens: 0.028 measured (0.02 bounded it over the
    # 320 tokens this test took before session 23: more near-tied routes flip over a longer
    # prompt); the bf16 bound, 0.05. fp32 and bf16x2 keep their tight bounds.
    lo, hi = {"fp32": (0, TOL_F32), "bf16x2": (0, TOL_SPLIT), "bf16": (1e-4, 5e-2)}[math]
    ids = np.random.default_rng(5).integers(0, g.vocab_size, (1, 800))
    n_scan, n_x, n_t = native_counters()
    err = record(f"seqpar_prefill_{math}", rel_err(g(ids), c(ids)))
    assert lo < err < hi
    n_scan2, n_x2, n_t2 = native_counters()
    assert n_scan2 == n_scan + 2                       # both Mamba layers segmented
    assert n_x2 == n_x + (0 if math == "fp32" else 2)  # K-split only under bf16 math
    assert n_t2 == n_t + (4 if math == "bf16" else 0)  # x_proj + dt_proj, two layers
    ids12 = np.random.default_rng(6).integers(0, g.vocab_size, (12, 20))
    sg, sc = g.new_state(12), c.new_state(12)
    g.prefill(ids12, sg, logits=None)
    c.prefill(ids12, sc, logits=None)
    for k in range(3):
        tok = ids12[:, k]
        err = record(f"seqpar_step_B12_{math}", rel_err(g.step(tok, sg), c.step(tok, sc)))
        assert (lo if math != "bf16" else 0) < err < (2e-2 if math == "bf16" else hi)
    if math != "fp32":  # the prefill, and the steps' graph capture (replays run no host code)
        assert native_counters()[1] >= n_x2 + 4
    if math == "bf16":  # decode is never split: tf32 x_proj + dt_proj at batch 12 too
        assert native_counters()[2] >= n_t2 + 4


def test_chunked_prefill_equals_whole():
    g, _ = make_pair(7, **CONFIGS[0])
    ids = np.random.default_rng(1).integers(0, g.vocab_size, (2, 40))
    full = g(ids)
    st = g.new_state(2)
    assert rel_err(g.prefill(ids, st, chunk_size=9), full) < TOL_F32
    st2 = g.new_state(2)
    last = g.prefill(ids, st2, logits="last", chunk_size=16)
    assert rel_err(last, full[:, -1]) < TOL_F32 and st2.seqlen == 40
    assert g.prefill(ids[:, :3], g.new_state(2), logits=None) is None


@pytest.mark.parametrize("B,math", [(3, "fp32"), (12, "bf16"), (12, "fp32")])
def test_graph_replay_equals_eager(B, math):
    # B = 3: GEMV products; B = 12 with bf16 math: cuBLAS bf16 GEMMs inside the graph
    g, _ = make_pair(5, dtype="bfloat16", math=math, **CONFIGS[1])
    rng = np.random.default_rng(B)
    ids = rng.integers(0, g.vocab_size, (B, 11))
    sa = g.new_state(B)
    g.prefill(ids, sa, logits=None)
    sb, sc = sa.copy(), sa.copy()
    for _ in range(6):
        tok = rng.integers(0, g.vocab_size, B)
        ga = g.step(tok, sa, graph=True)
        gc = g.step(tok, sc, graph=True)    # another state: the graph is re-captured each time
        eb = g.step(tok, sb, graph=False)
        assert record(f"graph_vs_eager_B{B}_{math}", rel_err(ga, eb)) <= 1e-6
        np.testing.assert_array_equal(ga, gc)
    assert g.memory()["graphs"] >= 1


def test_batch_of_different_lengths_equals_alone():
    g, _ = make_pair(4, **CONFIGS[0])
    rng = np.random.default_rng(5)
    prompts = [list(rng.integers(1, 90, n)) for n in (1, 5, 13)]
    for kw in (dict(temperature=0.0), dict(temperature=0.9, top_k=20, seed=3)):
        batch = g.generate(prompts, max_new_tokens=10, return_tokens=True, **kw)
        alone = [g.generate(p, max_new_tokens=10, return_tokens=True, **kw) for p in prompts]
        assert batch == alone, kw


def test_greedy_on_device_equals_host_loop():
    cfg = make_cfg(**CONFIGS[0])
    cfg.real_vocab_size = 50          # ids >= 50 are padding: never chosen
    t = random_tensors(cfg, seed=9)
    t["embedding.word_embeddings.weight"][50:] *= 4.0   # make them tempting
    g = model_cuda.CudaModel(cfg, t, dtype="float32")
    ids = np.random.default_rng(2).integers(0, 50, (2, 7))
    dev = g.greedy(ids, 12)
    st = g.new_state(2)
    logits = g.prefill(ids, st, logits="last")
    host = []
    for _ in range(12):
        nxt = logits[:, :50].argmax(-1)
        host.append(nxt)
        logits = g.step(nxt, st)
    np.testing.assert_array_equal(dev, np.stack(host, 1))
    assert dev.max() < 50


def test_state_ops(tmp_path):
    g, c = make_pair(3, **CONFIGS[1])
    ids = np.random.default_rng(2).integers(0, g.vocab_size, (3, 12))
    st = g.new_state(3)
    g.prefill(ids, st, logits=None)
    cached = st.copy()
    st.save(tmp_path / "s.npz")
    a = [g.step(ids[:, i], st) for i in range(4)]
    b = [g.step(ids[:, i], cached) for i in range(4)]
    loaded = model_cuda.CudaState.load(tmp_path / "s.npz", g)
    cpu_state = bm.State.load(tmp_path / "s.npz", g.config)      # same file format
    d = [g.step(ids[:, i], loaded) for i in range(4)]
    e = [c.step(ids[:, i], cpu_state) for i in range(4)]
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    np.testing.assert_array_equal(np.stack(a), np.stack(d))
    assert rel_err(np.stack(a), np.stack(e)) < TOL_F32
    # select / set_row move whole rows
    sel = cached.select([2, 0])
    assert sel.batch_size == 2
    x = sel.to_cpu()
    y = cached.to_cpu()
    for i, kind in enumerate(g.config.layer_kinds):
        if y.ssm[i] is not None:
            np.testing.assert_array_equal(x.ssm[i], y.ssm[i][[2, 0]])
            np.testing.assert_array_equal(x.conv[i], y.conv[i][[2, 0]])
    sel.set_row(1, cached, 1)
    z = sel.to_cpu()
    for i in range(g.config.num_layers):
        if y.ssm[i] is not None:
            np.testing.assert_array_equal(z.ssm[i][1], y.ssm[i][1])
    with pytest.raises(IndexError):
        cached.select([3])


def test_bad_inputs():
    g, _ = make_pair(6, **CONFIGS[0])
    st = g.new_state(1)
    with pytest.raises(ValueError, match="outside"):
        g(np.array([[1, 2, 97]]))
    with pytest.raises(TypeError, match="integer"):
        g(np.array([[1.5, 2.0]]))
    with pytest.raises(ValueError, match="no tokens"):
        g.prefill(np.zeros((1, 0), np.int64), st)
    with pytest.raises(ValueError, match="rows"):
        g.step(np.array([1, 2]), st)
    with pytest.raises(TypeError, match="CudaState"):
        g.step(np.array([1]), bm.State(g.config, 1))
    other, _ = make_pair(6, **CONFIGS[0])
    with pytest.raises(ValueError, match="another model"):
        g.step(np.array([1]), other.new_state(1))
    with pytest.raises(ValueError, match="dtype"):     # (float16 works: test_cuda_fp16.py)
        model_cuda.CudaModel(g.config, random_tensors(g.config), dtype="float64")
    with pytest.raises(ValueError, match="batch_size"):
        g.new_state(0)
    # a failed cudaMalloc is a MemoryError that names the bytes
    with pytest.raises(MemoryError, match="bytes"):
        g.new_state(1 << 40)
    # the model still works after the failure
    assert np.isfinite(g(np.array([[1, 2, 3]]))).all()


# ---- concurrency and interruption (the rules of model.State; tests/test_cuda_state.py checks
# the Python side over a fake engine) ----------------------------------------------------------

def test_state_in_use_raises_and_interrupted_update_invalidates():
    import threading
    g, _ = make_pair(8, **CONFIGS[0])
    ids = np.random.default_rng(6).integers(0, g.vocab_size, (1, 6))
    want_state = g.new_state(1)
    want = g.prefill(ids, want_state, logits="last")
    st, dst = g.new_state(1), g.new_state(1)
    inside, release, out = threading.Event(), threading.Event(), {}

    def gate(*a):               # the tracer runs inside the update, after the engine call;
        if threading.current_thread() is t:     # (it is the model's: only thread A waits)
            inside.set()
            assert release.wait(20)
    g._tracer = gate
    t = threading.Thread(target=lambda: out.setdefault("a", g.prefill(ids, st, "last")))
    t.start()
    try:
        assert inside.wait(20)
        for call in (lambda: g.step(np.array([1]), st), lambda: g.prefill(ids, st),
                     lambda: g.greedy(ids, 2, state=st), st.copy, lambda: st.select([0]),
                     st.reset, st.to_cpu, lambda: dst.set_row(0, st, 0)):
            with pytest.raises(RuntimeError, match="in use|while a prefill/step"):
                call()
        # other states of the model still work meanwhile (the model's lock is free)
        assert rel_err(g.prefill(ids, g.new_state(1), logits="last"), want) == 0
    finally:
        release.set()
        t.join(20)
        g._tracer = None
    np.testing.assert_array_equal(out["a"], want)
    assert not st.invalid and st.seqlen == 6
    np.testing.assert_array_equal(g.step(np.array([9]), st), g.step(np.array([9]), want_state))

    # an exception between the chunks of a long prefill: the state is invalid until reset()
    st = g.new_state(1)
    g.prefill(ids[:, :2], st)
    saved = st.copy()
    calls = []

    def boom(li, *a):
        calls.append(li)
        if len(calls) == 3:     # 2 MoE layers per chunk: inside the second chunk's trace
            raise KeyboardInterrupt
    g._tracer = boom
    try:
        with pytest.raises(KeyboardInterrupt):
            g.prefill(ids, st, chunk_size=3)
    finally:
        g._tracer = None
    assert st.invalid
    for call in (lambda: g.step(np.array([1]), st), st.copy, st.to_cpu):
        with pytest.raises(RuntimeError, match="invalid|interrupted"):
            call()
    ref_state = g.new_state(1)
    g.prefill(ids[:, :2], ref_state)
    np.testing.assert_array_equal(g.step(np.array([4]), saved), g.step(np.array([4]), ref_state))
    st.reset()
    assert not st.invalid and st.seqlen == 0
    np.testing.assert_array_equal(g.prefill(ids, st, logits="last"), want)
