"""The lm-eval adapter (blackmamba.lm_eval) on the golden tiny-a model, byte tokenizer.

Every log-likelihood the adapter returns, directly or through lm-eval's own evaluator on the
local tasks of tests/eval_tasks (offline: YAML + JSONL), must equal the one computed here
from a single full forward pass: sum of log_softmax(logits)[next token] in float64.
"""
import json
import math
import os

import numpy as np
import pytest

# local tasks only: never reach for the hub (read when `datasets` is first imported)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import blackmamba as bm  # noqa: E402
from blackmamba.cli import main  # noqa: E402
from blackmamba.lm_eval import BlackMambaLM  # noqa: E402
from conftest import GOLDEN  # noqa: E402

# the empty choice "" of bm_test_mc makes lm-eval's acc_norm divide 0 by 0 (we check acc)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in divide")

TASKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval_tasks")
# float32 logits: the scorer runs the context and the continuation as separate prefill calls
# in batches, the reference as one (1, L) forward; GEMM blocking differs, ~1e-6 per token.
TOL = 1e-4
ARGS = f"pretrained={GOLDEN},tokenizer=byte,batch_size=3,max_tokens=64"


@pytest.fixture(scope="module")
def model():
    return bm.load(GOLDEN, tokenizer="byte")


@pytest.fixture(scope="module")
def lm(model):
    # batch_size 3 and 64 tokens per call: contexts of several lengths share a batch
    # (segmented prefill), continuations are chunked, and windows of contexts roll over
    return BlackMambaLM(model=model, batch_size=3, max_tokens=64)


def full_logprobs(model, ids):
    """log_softmax of one full forward over ids, float64 (L, V)."""
    lg = model(np.array([ids], np.int64))[0].astype(np.float64)
    m = lg.max(-1, keepdims=True)
    return lg - m - np.log(np.exp(lg - m).sum(-1, keepdims=True)), lg


def ref_loglikelihood(model, ctx_ids, cont_ids):
    """(sum log p(cont | ctx), is_greedy) from one forward over ctx + cont; ctx [] -> [0]."""
    ctx_ids = list(ctx_ids) or [0]
    if not cont_ids:
        return 0.0, True
    lp, lg = full_logprobs(model, ctx_ids + list(cont_ids))
    pos = np.arange(len(ctx_ids) - 1, len(ctx_ids) + len(cont_ids) - 1)
    t = np.array(cont_ids)
    return float(lp[pos, t].sum()), bool((lg[pos].argmax(-1) == t).all())


def b(s):
    """The byte tokenizer, independent of the code under test."""
    return list(s.encode("utf-8"))


def encode_pair(ctx, cont):
    """lm-eval's rule: trailing whitespace of the context goes to the continuation (so
    "Q: " + "A" scores " A"); with the byte tokenizer the rest is plain bytes."""
    n = len(ctx) - len(ctx.rstrip())
    if n and ctx.strip():
        ctx, cont = ctx[:-n], ctx[-n:] + cont
    return b(ctx), b(cont)


def ll_instances(pairs):
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


PAIRS = [
    ("The cat sat on the", " mat"),                   # one context, three continuations
    ("The cat sat on the", " moon"),
    ("The cat sat on the", " idea of a cat"),
    ("", "Once upon a time"),                         # empty context -> EOS id 0 first
    ("", "Z"),
    ("Hi", " there, a continuation much longer than its context"),
    ("Hi", ""),                                       # empty continuation -> (0, True)
    ("", ""),
    ("Trailing space ", "moves"),
    ("Caf\u00e9 na\u00efve:", " \u00fcber"),          # multi-byte characters
    ("x", "y"),
    ("A much longer context that runs past the 64 tokens of one model call, "
     "so its prefill is chunked and carried in the state.", " End."),
]


@pytest.mark.parametrize("batch_size,max_tokens", [(3, 64), (1, 7), (16, 4096)])
def test_loglikelihood_equals_full_forward(model, batch_size, max_tokens):
    lm = BlackMambaLM(model=model, batch_size=batch_size, max_tokens=max_tokens)
    out = lm.loglikelihood(ll_instances(PAIRS), disable_tqdm=True)
    assert len(out) == len(PAIRS)
    for (ctx, cont), (ll, greedy) in zip(PAIRS, out):
        ref_ll, ref_greedy = ref_loglikelihood(model, *encode_pair(ctx, cont))
        assert isinstance(ll, float) and isinstance(greedy, bool)
        assert abs(ll - ref_ll) < TOL, (ctx, cont, ll, ref_ll)
        assert greedy == ref_greedy, (ctx, cont)
    assert out[6] == (0.0, True) and out[7] == (0.0, True)
    assert out[0][0] > -1e9 and out[0][0] < 0


def greedy_tokens(model, ctx, n):
    """n argmax tokens over the whole vocabulary after ctx, by full forwards."""
    ids = list(ctx)
    for _ in range(n):
        ids.append(int(full_logprobs(model, ids)[1][-1].argmax()))
    return ids[len(ctx):]


def test_is_greedy(model, lm):
    ctx = b("Greedy test:")
    g = greedy_tokens(model, ctx, 5)
    second = int(np.argsort(full_logprobs(model, ctx + g[:4])[1][-1])[-2])
    not_greedy = g[:4] + [second]
    g0 = greedy_tokens(model, [0], 3)                 # after an empty context
    reqs = [(None, ctx, g), (None, ctx, not_greedy), (None, ctx, g[:1]), (None, [0], g0),
            (None, ctx, [second])]
    out = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert [greedy for _, greedy in out] == [True, False, True, True,
                                             second == g[0]]
    for (_, c, t), (ll, _) in zip(reqs, out):
        assert abs(ll - ref_loglikelihood(model, c, t)[0]) < TOL
    # the greedy continuation is the likeliest of its length: beats the swapped one
    assert out[0][0] > out[1][0]


def test_loglikelihood_rolling_is_one_pass_over_the_document(model, lm):
    words = "the of and to in a is that for it as was with be by on".split()
    rng = np.random.default_rng(3)
    long = " ".join(rng.choice(words, 500))           # ~2000 bytes: 30+ chunks of 64
    docs = ["Short document.", long, "x", "Two\nlines."]
    out = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (d,), i)
                                    for i, d in enumerate(docs)], disable_tqdm=True)
    for d, ll in zip(docs, out):
        ids = [0] + b(d)
        lp, _ = full_logprobs(model, ids)
        ref = float(lp[np.arange(len(ids) - 1), ids[1:]].sum())
        assert isinstance(ll, float)
        assert abs(ll - ref) < TOL * max(1.0, len(ids) / 100), (d[:20], ll, ref)


def ref_generate(model, prompt, n, until):
    """Greedy (ids < 256: the byte tokenizer's vocabulary), stop at EOS, cut at a stop."""
    ids = b(prompt) or [0]
    out = []
    for _ in range(n):
        t = int(full_logprobs(model, ids + out)[1][-1][:256].argmax())
        if t == 0:
            break
        out.append(t)
    text = bytes(out).decode("utf-8", errors="replace")
    for u in until:
        text = text.split(u)[0]
    return text


def test_generate_until_greedy(model, lm):
    reqs = [("Once upon a time", {"until": ["\n"], "max_gen_toks": 10}),
            ("", {"until": ["e"], "max_gen_toks": 6, "do_sample": False}),
            ("1, 2, 3,", {"until": "zz", "max_gen_toks": 8, "temperature": 0.0}),
            ("abc", {"max_gen_toks": 5}),
            ("Once upon a time", {"until": ["\n"], "max_gen_toks": 10})]
    out = lm.generate_until([Instance("generate_until", {}, r, i) for i, r in enumerate(reqs)],
                            disable_tqdm=True)
    for (ctx, kw), text in zip(reqs, out):
        until = [kw["until"]] if isinstance(kw.get("until"), str) else kw.get("until", [])
        assert text == ref_generate(model, ctx, kw["max_gen_toks"], until)
        assert not any(u in text for u in until)
    assert out[0] == out[4]


def test_generate_until_sampling(model, lm):
    kw = {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": True, "temperature": 0.9,
          "top_p": 0.95}
    reqs = [Instance("generate_until", {}, ("Sample from here", kw), i) for i in range(3)]
    out = lm.generate_until(reqs, disable_tqdm=True)
    assert out == lm.generate_until(reqs, disable_tqdm=True)          # reproducible
    for i, text in enumerate(out):                                    # request i: seed + i
        toks = model.generate(b("Sample from here"), max_new_tokens=12, temperature=0.9,
                              top_p=0.95, seed=lm.seed + i, return_tokens=True)
        assert text == bytes(toks).decode("utf-8", errors="replace").split("\n\n")[0]
    greedy = ref_generate(model, "Sample from here", 12, ["\n\n"])
    assert any(t != greedy for t in out)              # temperature 0.9 does sample


def test_registered_and_model_args(model):
    from lm_eval.api.registry import get_model
    assert get_model("blackmamba") is BlackMambaLM
    lm = BlackMambaLM.create_from_arg_string(ARGS, {"batch_size": 1, "device": "cpu"})
    assert lm.batch_size == 3 and lm.max_tokens == 64 and lm.model.dtype == "float32"
    lm = BlackMambaLM.create_from_arg_string(f"pretrained={GOLDEN},tokenizer=byte,dtype=bfloat16",
                                             {"batch_size": 5, "max_batch_size": None})
    assert lm.batch_size == 5 and lm.model.dtype == "bfloat16"
    assert BlackMambaLM(model=model, batch_size="auto").batch_size == 16
    with pytest.raises(ValueError, match="unknown model_args"):
        BlackMambaLM(model=model, temperature=1.0)
    with pytest.raises(ValueError, match="pretrained"):
        BlackMambaLM()
    with pytest.raises(ValueError, match="batch_size"):
        BlackMambaLM(model=model, batch_size=0)


def test_simple_evaluate_local_tasks(model):
    """lm-eval's evaluator end to end on the three local tasks; every response checked."""
    tm = TaskManager(include_path=TASKS, include_defaults=False)   # ~10 s faster
    out = lm_eval.simple_evaluate(model="blackmamba", model_args=ARGS,
                                  tasks=["bm_test_mc", "bm_test_rolling", "bm_test_gen"],
                                  task_manager=tm, log_samples=True, bootstrap_iters=0)
    samples, results = out["samples"], out["results"]

    mc = samples["bm_test_mc"]
    assert len(mc) == 6
    for s in mc:
        doc = s["doc"]
        refs = [ref_loglikelihood(model, *encode_pair(doc["question"], c))
                for c in doc["choices"]]
        got = [tuple(r) for r in s["filtered_resps"]]
        for (ll, greedy), (rll, rgreedy) in zip(got, refs):
            assert abs(ll - rll) < TOL and greedy == rgreedy
        assert s["acc"] == float(int(np.argmax([r[0] for r in refs])) == doc["answer"])
    assert results["bm_test_mc"]["acc,none"] == pytest.approx(np.mean([s["acc"] for s in mc]))

    rolling = samples["bm_test_rolling"]
    total_ll = total_bytes = 0
    for s in rolling:
        text = s["doc"]["text"]
        ids = [0] + b(text)
        lp, _ = full_logprobs(model, ids)
        ref = float(lp[np.arange(len(ids) - 1), ids[1:]].sum())
        ll = s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) \
            else s["filtered_resps"]
        assert abs(ll - ref) < TOL * max(1.0, len(ids) / 100)
        total_ll += ref
        total_bytes += len(text.encode("utf-8"))
    assert results["bm_test_rolling"]["bits_per_byte,none"] == \
        pytest.approx(-total_ll / (total_bytes * math.log(2)), rel=1e-6)

    for s in samples["bm_test_gen"]:
        text = s["filtered_resps"][0]
        assert text == ref_generate(model, s["doc"]["prompt"], 12, ["\n", "e"])


def test_cli_eval_and_lm_eval_passthrough(tmp_path, capsys):
    out_json = tmp_path / "res.json"
    rc = main(["eval", "-m", GOLDEN, "--tokenizer", "byte", "--tasks", "bm_test_mc",
               "--include-path", TASKS, "--batch-size", "2", "--bootstrap-iters", "0",
               "-o", str(out_json)])
    assert rc == 0
    res = json.loads(out_json.read_text())
    acc = res["results"]["bm_test_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert "bm_test_mc" in capsys.readouterr().out               # the results table

    # lm-eval's command line sends device "cuda:0" and batch_size 1 unless told otherwise:
    # no GPU backend here -> CPU with a warning; batch_size in model_args wins
    main(["lm-eval", "--model", "blackmamba", "--model_args", ARGS, "--tasks", "bm_test_mc",
          "--include_path", TASKS, "--output_path", str(tmp_path)])
    written = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path) for f in fs
               if f.startswith("results") and f.endswith(".json")]
    assert len(written) == 1
    with open(written[0]) as f:
        assert json.load(f)["results"]["bm_test_mc"]["acc,none"] == pytest.approx(acc)
