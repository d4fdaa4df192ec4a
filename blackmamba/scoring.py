"""Log-likelihood of token continuations over the recurrent state (no lm-eval needed).

The scorer behind the lm-eval adapter (blackmamba.lm_eval) and `blackmamba perplexity`.
What an SSM makes cheap: the whole past is a fixed-size State, so a context shared by several
continuations (the 4 endings of a HellaSwag question, the 2 options of PIQA) is run once,
and its State is copied for each continuation instead of re-running the context. Nor is there
a context window: a document of any length is one recurrent pass, in chunks.

    ctx (n tokens) --prefill once--> State_ctx, logits after ctx (predict cont[0])
    for each continuation c:  State_ctx.copy() --prefill c[:-1]--> logits predicting c[1:]

Exact: log p(c_i | ...) = logit[c_i] - logsumexp(logits) over the model's whole vocabulary V
(as HF models are scored by lm-eval), from the same float32 logits a full forward pass
gives; is_greedy = every c_i is the argmax (ties -> lowest id) of the logits that predict it.

Batching. Contexts are sorted by length and taken `batch_size` at a time; a batch of
contexts of unequal lengths is run in segments [0, n_0), [n_0, n_1), ... with the rows that
are done dropped after each segment, so no context is padded (padding a context would change
its State). Continuations need no final State, only their logits, so they are right-padded
(causal: padding after a token cannot change its logits) and batched `batch_size` rows at a
time, longest first, rows dropped as they end. Each model call sees at most `max_tokens`
tokens (rows x positions): this bounds the (rows, positions, V) float32 logits in memory.
"""
import time

import numpy as np

from .generation import EOS_ID

DEFAULT_MAX_TOKENS = 2048    # tokens per model call: logits of 2048 x 50304 floats = 412 MB


def log_softmax_at(logits, targets):
    """log_softmax(logits)[..., target] and whether target is the argmax.

    logits (..., V) float32; targets (...) int. Returns (float64 (...), bool (...)). The
    exponentials are float32 (relative error 1e-7 each) summed in float64.
    """
    m = logits.max(axis=-1, keepdims=True)                            # (..., 1)
    e = logits - m                                                    # (..., V) one temporary
    np.exp(e, out=e)
    lse = m[..., 0].astype(np.float64) + np.log(e.sum(axis=-1, dtype=np.float64))
    tgt = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return tgt.astype(np.float64) - lse, logits.argmax(axis=-1) == targets


def prefill_contexts(model, contexts, max_tokens=DEFAULT_MAX_TOKENS):
    """Run each context (a non-empty list of ids) from a fresh State, unpadded.

    Returns (State with row i after contexts[i], logits (W, V) after each context's last
    token). Rows are run together in segments of equal length (see the module docstring).
    """
    W = len(contexts)
    lens = np.array([len(c) for c in contexts])
    if W == 0 or lens.min() < 1:
        raise ValueError("every context needs at least one token (prefix the EOS id 0)")
    order = np.argsort(lens, kind="stable")                           # shortest first
    done = model.new_state(W)
    last = np.empty((W, model.vocab_size), np.float32)
    active = list(order)                  # contexts still running, shortest first
    state = model.new_state(W)            # row j <-> active[j]
    pos = 0
    while active:
        end = int(lens[active[0]])
        ids = np.array([contexts[i][pos:end] for i in active], np.int64)   # (rows, end - pos)
        chunk = max(1, max_tokens // len(active))
        lg = model.prefill(ids, state, logits="last", chunk_size=chunk)   # (rows, V)
        keep = []
        for j, i in enumerate(active):
            if lens[i] == end:
                done.set_row(i, state, j)
                last[i] = lg[j]
            else:
                keep.append(j)
        if keep and len(keep) < len(active):
            state = state.select(keep)
        active = [active[j] for j in keep]
        pos = end
    done.seqlen = -1 if lens.min() != lens.max() else int(lens[0])
    return done, last


def score_continuations(model, state, first_logits, conts, max_tokens=DEFAULT_MAX_TOKENS,
                        on_tokens=None):
    """Per-token log-probabilities of continuations run from given States.

    state: a State whose row r has consumed some context; first_logits (R, V): the logits
    after that context (they predict conts[r][0]); conts: R non-empty lists of ids. `state`
    is consumed (pass a copy to keep it). on_tokens(n) is called as tokens are scored.
    Returns [(logprobs float64 (len(c),), greedy bool (len(c),)) for c in conts].
    """
    R = len(conts)
    lens = np.array([len(c) for c in conts])
    if R == 0:
        return []
    if lens.min() < 1:
        raise ValueError("continuations must be non-empty here (an empty one scores 0)")
    out = [(np.empty(n), np.empty(n, bool)) for n in lens]
    first = np.array([c[0] for c in conts], np.int64)
    lp, gr = log_softmax_at(np.asarray(first_logits, np.float32), first)
    for r in range(R):
        out[r][0][0], out[r][1][0] = lp[r], gr[r]
    if on_tokens:
        on_tokens(R)
    # inputs c[:-1] predict targets c[1:]; rows longest first so live rows are a prefix
    order = np.argsort(-lens, kind="stable")
    n_in = lens[order] - 1                                             # (R,) inputs per row
    L = int(n_in[0])
    if L == 0:
        return out
    inp = np.zeros((R, L), np.int64)                                   # right-padded with 0
    tgt = np.zeros((R, L), np.int64)
    for j, r in enumerate(order):
        c = conts[r]
        inp[j, :len(c) - 1] = c[:-1]
        tgt[j, :len(c) - 1] = c[1:]
    state = state.select(order) if R > 1 else state
    live, s = R, 0
    while s < L:
        now = int(np.sum(n_in > s))                                    # rows with tokens left
        if now < live:
            state, live = state.select(np.arange(now)), now
        e = min(L, s + max(1, max_tokens // live))
        lg = model.prefill(inp[:live, s:e], state, logits="all")       # (live, e - s, V)
        lp, gr = log_softmax_at(lg, tgt[:live, s:e])
        for j in range(live):
            k = min(e, int(n_in[j])) - s                               # valid positions
            r = order[j]
            out[r][0][1 + s:1 + s + k] = lp[j, :k]
            out[r][1][1 + s:1 + s + k] = gr[j, :k]
        if on_tokens:
            on_tokens(int((np.minimum(n_in[:live], e) - s).sum()))
        s = e
    return out


def loglikelihoods(model, requests, batch_size=16, max_tokens=DEFAULT_MAX_TOKENS,
                   progress=False, desc="loglikelihood"):
    """Log-likelihood of each continuation given its context, sharing contexts' States.

    requests: (context_ids, continuation_ids) pairs of lists of token ids. An empty context
    is the EOS id 0 (a document start, as lm-eval does); an empty continuation scores
    (0.0, True). Returns [(sum log p(continuation | context), is_greedy)] in request order.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    results = [None] * len(requests)
    groups = {}                                                        # context -> [request]
    for k, (ctx, cont) in enumerate(requests):
        ctx = tuple(_ids(model, ctx)) or (EOS_ID,)
        cont = _ids(model, cont)
        if not cont:
            results[k] = (0.0, True)
            continue
        groups.setdefault(ctx, []).append((k, cont))
    bar = _bar(progress, len(requests), desc)
    bar.update(sum(r is not None for r in results))
    contexts = sorted(groups, key=len, reverse=True)    # longest first: memory peaks early
    for w in range(0, len(contexts), batch_size):
        window = contexts[w:w + batch_size]
        ctx_state, ctx_last = prefill_contexts(model, [list(c) for c in window], max_tokens)
        rows = [(i, k, cont) for i, c in enumerate(window) for k, cont in groups[c]]
        rows.sort(key=lambda row: -len(row[2]))
        for b in range(0, len(rows), batch_size):
            part = rows[b:b + batch_size]
            ci = np.array([i for i, _, _ in part])
            scored = score_continuations(model, ctx_state.select(ci), ctx_last[ci],
                                         [cont for _, _, cont in part], max_tokens)
            for (_, k, _), (lp, gr) in zip(part, scored):
                results[k] = (float(lp.sum()), bool(gr.all()))
            bar.update(len(part))
    bar.close()
    return results


def perplexity(model, ids, max_tokens=DEFAULT_MAX_TOKENS, progress=False, num_bytes=None):
    """Token-level perplexity of one token sequence, in one recurrent pass (any length).

    The sequence is preceded by the EOS id 0 (a document start), so every token is scored:
    ppl = exp(-mean log p(t_i | 0, t_<i)). With num_bytes (the UTF-8 size of the text),
    bits_per_byte = -sum log p / (num_bytes ln 2), lm-eval's definition.
    Returns a dict: tokens, nll (nats, summed), ppl, accuracy (argmax == next token),
    seconds, tokens_per_s, and bytes + bits_per_byte when num_bytes is given.
    """
    ids = _ids(model, ids)
    if not ids:
        raise ValueError("perplexity needs at least one token")
    bar = _bar(progress, len(ids), "perplexity", unit="tok")
    t0 = time.perf_counter()
    state, last = prefill_contexts(model, [[EOS_ID]], max_tokens)
    (lp, gr), = score_continuations(model, state, last, [ids], max_tokens, on_tokens=bar.update)
    dt = time.perf_counter() - t0
    bar.close()
    nll = -float(lp.sum())
    out = {"tokens": len(ids), "nll": nll, "ppl": float(np.exp(nll / len(ids))),
           "accuracy": float(gr.mean()), "seconds": dt, "tokens_per_s": len(ids) / dt}
    if num_bytes is not None:
        out["bytes"] = int(num_bytes)
        out["bits_per_byte"] = nll / (num_bytes * np.log(2.0)) if num_bytes else float("nan")
    return out


def _ids(model, ids):
    """A list of int ids, each checked against the model's vocabulary: a target id is
    never an input, so the model's own check would not see a bad last token."""
    out = [int(t) for t in ids]
    bad = [t for t in out if not 0 <= t < model.vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside [0, {model.vocab_size})")
    return out


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _bar(progress, total, desc, unit="req"):
    if not progress:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
