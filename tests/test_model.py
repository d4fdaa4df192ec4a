"""The CPU model against the released reference (golden files) and against itself
(prefill + step == one full forward, for every layer kind)."""
import os

import numpy as np
import pytest

import blackmamba as bm
from blackmamba.config import Config
from blackmamba.model import Model, random_tensors

from conftest import GOLDEN, LAYER_KIND_CONFIGS, rel_err, small_config

# fp32 compute from the same bf16 weights as the reference: only float32 rounding differs
# (the reference ran in float32 with TF32 off), so 1e-4 relative L2 is a loose bound.
TOL_GOLDEN = 1e-4


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def tiny(request):
    return bm.load(GOLDEN, dtype=request.param, tokenizer=False)


def test_golden_forward(tiny, golden):
    # tiny-a's weights are bf16 in the file, so bf16 mode holds exactly the same values and
    # must meet the same tolerance as float32 mode.
    logits = tiny(golden["input_ids"])
    assert logits.shape == golden["logits"].shape and logits.dtype == np.float32
    assert rel_err(logits, golden["logits"]) < TOL_GOLDEN


def test_golden_router_argmax(tiny, golden):
    seen = {}
    tiny._tracer = lambda li, ids, gates, logits: seen.setdefault(li, (ids.copy(), logits.copy()))
    try:
        tiny(golden["input_ids"])
    finally:
        tiny._tracer = None
    assert sorted(seen) == [1, 3]
    for li in (1, 3):
        ref_logits = golden[f"router_logits/decoder.layers.{li}.mixer"]
        ids, logits = seen[li]
        assert rel_err(logits, ref_logits) < TOL_GOLDEN
        np.testing.assert_array_equal(ids, ref_logits.argmax(-1))


def test_golden_greedy_generation(tiny, golden):
    prompt, want = golden["gen_prompt"], golden["gen_tokens"]
    state = tiny.new_state(prompt.shape[0])
    logits = tiny.prefill(prompt, state, logits="last")
    toks, steps = [], []
    for _ in range(want.shape[1]):
        steps.append(logits)
        nxt = logits.argmax(-1)
        toks.append(nxt)
        logits = tiny.step(nxt, state)
    np.testing.assert_array_equal(np.stack(toks, 1), want)
    assert rel_err(np.stack(steps, 1), golden["gen_logits"]) < TOL_GOLDEN
    # the generate() API gives the same tokens, row by row and as a batch
    got = tiny.generate([list(p) for p in prompt], max_new_tokens=want.shape[1],
                        return_tokens=True)
    for row, w in zip(got, want):
        w = list(w)
        assert row == (w[:w.index(0)] if 0 in w else w)


CONFIGS = LAYER_KIND_CONFIGS


def make_model(seed, dtype="float32", **over):
    cfg = small_config(**over)
    return Model(cfg, random_tensors(cfg, seed=seed), dtype=dtype)


@pytest.mark.parametrize("ci", range(len(CONFIGS)))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefill_then_step_equals_forward(ci, dtype):
    m = make_model(ci, dtype, **CONFIGS[ci])
    rng = np.random.default_rng(100 + ci)
    ids = rng.integers(0, m.vocab_size, (3, 23))
    full = m(ids)
    for split in (1, 2, 7):
        st = m.new_state(3)
        part = m.prefill(ids[:, :split], st)
        steps = [m.step(ids[:, t], st) for t in range(split, ids.shape[1])]
        got = np.concatenate([part, np.stack(steps, 1)], axis=1)
        # float32 rounding only: chunked/stepped and whole paths sum in different orders
        assert rel_err(got, full) < 1e-5, split


def test_chunked_prefill_equals_whole():
    m = make_model(7, **CONFIGS[0])
    ids = np.random.default_rng(1).integers(0, m.vocab_size, (2, 40))
    full = m(ids)
    st = m.new_state(2)
    chunked = m.prefill(ids, st, chunk_size=9)
    assert rel_err(chunked, full) < 1e-5
    st2 = m.new_state(2)
    last = m.prefill(ids, st2, logits="last", chunk_size=16)
    assert rel_err(last, full[:, -1]) < 1e-5
    assert st2.seqlen == 40


def test_state_copy_save_restore(tmp_path):
    m = make_model(3, **CONFIGS[1])
    ids = np.random.default_rng(2).integers(0, m.vocab_size, (2, 12))
    st = m.new_state(2)
    m.prefill(ids, st, logits=None)
    cached = st.copy()
    st.save(tmp_path / "s.npz")
    a = [m.step(ids[:, i], st) for i in range(4)]
    b = [m.step(ids[:, i], cached) for i in range(4)]
    loaded = bm.State.load(tmp_path / "s.npz", m.config)
    c = [m.step(ids[:, i], loaded) for i in range(4)]
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    np.testing.assert_array_equal(np.stack(a), np.stack(c))
    row = cached.select([1])
    assert row.batch_size == 1


def test_batch_of_different_lengths_equals_alone():
    m = make_model(4, **CONFIGS[0])
    rng = np.random.default_rng(5)
    prompts = [list(rng.integers(1, 90, n)) for n in (1, 5, 13)]
    for kw in (dict(temperature=0.0), dict(temperature=0.9, top_k=20, seed=3),
               dict(temperature=1.2, top_p=0.8, seed=11)):
        batch = m.generate(prompts, max_new_tokens=10, return_tokens=True, **kw)
        alone = [m.generate(p, max_new_tokens=10, return_tokens=True, **kw) for p in prompts]
        assert batch == alone, kw
        again = m.generate(prompts, max_new_tokens=10, return_tokens=True, **kw)
        assert again == batch


def test_padding_rows_never_sampled():
    m = make_model(5, **CONFIGS[0])
    m.config.real_vocab_size = 50
    # make the padding rows the most likely tokens: they still must not be chosen
    m.emb = np.ascontiguousarray(m.emb.copy())
    m.emb[50:] = 5.0 * m.emb[50:] + 3.0
    for kw in (dict(temperature=0.0), dict(temperature=2.0, seed=1)):
        toks = m.generate([1, 2, 3], max_new_tokens=30, return_tokens=True, **kw)
        assert toks and max(toks) < 50


def test_bad_inputs():
    m = make_model(6, **CONFIGS[0])
    st = m.new_state(1)
    with pytest.raises(ValueError, match="outside"):
        m(np.array([[1, 2, 97]]))
    with pytest.raises(ValueError, match="outside"):
        m(np.array([[-1, 2]]))
    with pytest.raises(TypeError, match="integer"):
        m(np.array([[1.5, 2.0]]))
    with pytest.raises(ValueError, match="dimension"):
        m(np.array([1, 2]))
    with pytest.raises(ValueError, match="no tokens"):
        m.prefill(np.zeros((1, 0), np.int64), st)
    with pytest.raises(ValueError, match="rows"):
        m.step(np.array([1, 2]), st)
    with pytest.raises(ValueError, match="batch_size"):
        m.new_state(0)
    with pytest.raises(ValueError, match="temperature"):
        m.generate([1], temperature=float("nan"))
    with pytest.raises(ValueError, match="temperature"):
        m.generate([1], temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        m.generate([1], temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        m.generate([1], temperature=1.0, top_k=0)
    # documented: an empty prompt starts from <|endoftext|> (id 0)
    assert m.generate([], max_new_tokens=3, return_tokens=True) == \
        m.generate([0], max_new_tokens=3, return_tokens=True)


def test_weights_config_mismatch():
    cfg = Config.from_dict(dict(num_layers=2, hidden_size=24, state_size=16, conv_dimension=4,
                                vocab_size=97, ffn_hidden_size=40, mamba_moe_layers=["r", "8"]))
    t = random_tensors(cfg)
    bad = dict(t)
    del bad["decoder.layers.1.mixer.router.bias"]
    with pytest.raises(bm.WeightError, match="router.bias"):
        Model(cfg, bad)
    bad = dict(t)
    bad["decoder.layers.0.mixer.A_log"] = np.zeros((3, 3), np.float32)
    with pytest.raises(bm.WeightError, match="A_log"):
        Model(cfg, bad)


@pytest.mark.parametrize("raw,key", [
    (dict(hidden_size=-4), "hidden_size"), (dict(state_size=0), "state_size"),
    (dict(conv_dimension=9), "conv_dimension"), (dict(mamba_moe_layers=["r", "x"]), "mamba_moe_layers"),
    (dict(num_layers=3), "mamba_moe_layers"), (dict(vocab_size="big"), "vocab_size"),
    (dict(rotary=True), "rotary"), (dict(activation="relu"), "activation"),
])
def test_config_errors_name_the_key(raw, key):
    base = dict(num_layers=2, hidden_size=24, state_size=16, conv_dimension=4, vocab_size=97,
                ffn_hidden_size=40, mamba_moe_layers=["r", "8"])
    base.update(raw)
    with pytest.raises(bm.ConfigError, match=key):
        Config.from_dict(base)


@pytest.mark.parametrize("key", ["num_layers", "hidden_size", "state_size", "conv_dimension",
                                 "vocab_size"])
def test_config_missing_key_is_named(key):
    base = dict(num_layers=2, hidden_size=24, state_size=16, conv_dimension=4, vocab_size=97,
                ffn_hidden_size=40, mamba_moe_layers=["r", "8"])
    del base[key]
    with pytest.raises(bm.ConfigError, match=key):
        Config.from_dict(base)
