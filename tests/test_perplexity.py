"""blackmamba.scoring (perplexity, state-sharing log-likelihoods) and `blackmamba perplexity`
on the golden tiny-a model with the byte tokenizer; no lm-eval needed."""
import json
import math
import re

import numpy as np
import pytest

import blackmamba as bm
from blackmamba import scoring
from blackmamba.cli import main
from conftest import GOLDEN

# float32 logits: chunked prefill (64-token calls) vs one full forward; ~1e-6 per token
TOL = 1e-4
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\n"
        "Speak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to "
        "famish?\n\nAll:\nResolved. resolved.\n"
        "\u00c0 bient\u00f4t, na\u00efve caf\u00e9 \u2014 fin.\n")          # multi-byte UTF-8


@pytest.fixture(scope="module")
def model():
    return bm.load(GOLDEN, tokenizer="byte")


def direct_nll(model, ids):
    """-log p(ids[i] | 0, ids[:i]) per token, from one full forward over [0] + ids."""
    seq = [0] + list(ids)
    lg = model(np.array([seq], np.int64))[0].astype(np.float64)        # (L+1, V)
    m = lg.max(-1, keepdims=True)
    lp = lg - m - np.log(np.exp(lg - m).sum(-1, keepdims=True))
    pos = np.arange(len(ids))
    return -lp[pos, seq[1:]], lg[pos].argmax(-1) == np.array(ids)


@pytest.mark.parametrize("max_tokens", [64, 7, 4096])
def test_perplexity_equals_full_forward(model, max_tokens):
    ids = list(TEXT.encode("utf-8"))
    nbytes = len(ids)
    res = scoring.perplexity(model, ids, max_tokens=max_tokens, num_bytes=nbytes)
    nll, hit = direct_nll(model, ids)
    assert res["tokens"] == len(ids) and res["bytes"] == nbytes
    assert res["nll"] == pytest.approx(nll.sum(), abs=TOL * len(ids) / 10)
    assert res["ppl"] == pytest.approx(math.exp(nll.mean()), rel=TOL)
    assert res["bits_per_byte"] == pytest.approx(nll.sum() / (nbytes * math.log(2)), rel=TOL)
    assert res["accuracy"] == pytest.approx(hit.mean())
    assert res["tokens_per_s"] > 0 and res["seconds"] > 0
    # random weights on 384 ids: near-uniform, so about V
    assert 50 < res["ppl"] < 5000


def test_perplexity_single_token_and_errors(model):
    res = scoring.perplexity(model, [65])
    assert res["ppl"] == pytest.approx(math.exp(direct_nll(model, [65])[0][0]), rel=TOL)
    assert "bits_per_byte" not in res
    with pytest.raises(ValueError, match="at least one token"):
        scoring.perplexity(model, [])
    with pytest.raises(ValueError, match="outside"):
        scoring.perplexity(model, [1, 384])


def ref_loglikelihood(model, ctx, cont):
    """sum log p(cont | ctx) from one full forward over ctx + cont; ctx [] -> [0]."""
    ctx = list(ctx) or [0]
    seq = ctx + list(cont)
    lg = model(np.array([seq], np.int64))[0].astype(np.float64)
    m = lg.max(-1, keepdims=True)
    lp = lg - m - np.log(np.exp(lg - m).sum(-1, keepdims=True))
    return float(lp[np.arange(len(ctx) - 1, len(seq) - 1), cont].sum())


def test_loglikelihoods_share_context_state(model):
    """Several continuations of one context, and contexts of several lengths in one
    batch: each equals its own full forward."""
    rng = np.random.default_rng(11)
    ctx = list(rng.integers(1, 384, 9))
    conts = [list(rng.integers(1, 384, n)) for n in (1, 2, 5, 17, 0)]
    reqs = [(ctx, c) for c in conts] + [([], [7, 8, 9]), ([5], [6]), (ctx[:4], [1, 2]),
                                        (ctx[:3], [3])]
    out = scoring.loglikelihoods(model, reqs, batch_size=2, max_tokens=16)
    for (c, t), (ll, _) in zip(reqs, out):
        assert ll == (pytest.approx(ref_loglikelihood(model, c, t), abs=TOL) if t else 0.0)
    assert scoring.loglikelihoods(model, []) == []
    with pytest.raises(ValueError, match="batch_size"):
        scoring.loglikelihoods(model, reqs, batch_size=0)


def test_log_softmax_at_matches_float64():
    rng = np.random.default_rng(5)
    lg = (rng.standard_normal((3, 4, 1000)) * 8).astype(np.float32)
    lg[0, 0, 17] = lg[0, 0, 3] = 50.0                                  # a tie: lowest id wins
    t = rng.integers(0, 1000, (3, 4))
    t[0, 0] = 3
    lp, greedy = scoring.log_softmax_at(lg, t)
    x = lg.astype(np.float64)
    ref = np.take_along_axis(x, t[..., None], -1)[..., 0] - np.log(np.exp(x).sum(-1))
    assert np.abs(lp - ref).max() < 1e-5
    assert greedy[0, 0] and greedy.sum() == 1


def test_cli_perplexity(model, tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text(TEXT, encoding="utf-8")
    assert main(["perplexity", "-m", GOLDEN, "--tokenizer", "byte", "--text", str(f),
                 "--json", "-q", "--tokens-per-call", "50"]) == 0
    res = json.loads(capsys.readouterr().out)
    nll, _ = direct_nll(model, list(TEXT.encode("utf-8")))
    assert res["ppl"] == pytest.approx(math.exp(nll.mean()), rel=TOL)
    assert res["bytes"] == len(TEXT.encode("utf-8"))

    assert main(["perplexity", "-m", GOLDEN, "--tokenizer", "byte", "--text", str(f),
                 "--max-tokens", "20", "-q"]) == 0
    out = capsys.readouterr().out
    ppl20 = math.exp(direct_nll(model, list(TEXT.encode("utf-8"))[:20])[0].mean())
    assert "20 tokens" in out and "bits per byte" in out
    # the printed value (4 decimals) against the direct one: a tolerance, not the formatted
    # string (470.28005 printed as 470.2801 once the BLAS summed in another order)
    shown = re.search(r"^perplexity\s+([0-9.]+)", out, re.M)
    assert shown and float(shown.group(1)) == pytest.approx(ppl20, rel=TOL, abs=1e-4)
