"""Text generation over the recurrent state: greedy and sampling, stop strings, EOS,
streaming, batches of prompts of different lengths. Memory is constant in the number of
generated tokens: only the state (fixed size) and the tokens themselves are kept.
"""
import math
import numbers

import numpy as np

EOS_ID = 0   # <|endoftext|>: also the BOS that an empty prompt starts from


class SamplingParams:
    """Validated sampling settings. temperature 0 = greedy (argmax, ties -> lowest id)."""

    def __init__(self, temperature=0.0, top_k=None, top_p=None, seed=0):
        if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if top_k is not None and (not _is_integer(top_k) or top_k < 1):
            raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
        if top_p is not None and (not _is_real(top_p) or not math.isfinite(top_p)
                                  or not 0 < top_p <= 1):
            raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
        if seed is not None and (not _is_integer(seed) or seed < 0):
            raise ValueError(f"seed must be None or an integer >= 0, got {seed!r}")
        self.temperature = float(temperature)
        self.top_k = None if top_k is None else int(top_k)
        self.top_p = None if top_p is None else float(top_p)
        self.seed = None if seed is None else int(seed)


def _is_integer(v):
    """Python or NumPy integers; bool is not a count."""
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _is_real(v):
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def sample_probs(logits, params, vocab_limit):
    """The distribution sample_next draws from, float64 (vocab_limit,), or the greedy id (an
    int) at temperature 0. See sample_next for the non-finite rules."""
    lg = np.asarray(logits[:vocab_limit], dtype=np.float64)
    if not np.all(np.isfinite(lg)):
        if np.isnan(lg).any():
            raise FloatingPointError("the model produced NaN logits: check the weights/input")
        if np.isposinf(lg).any():
            lg = np.where(np.isposinf(lg), 0.0, -np.inf)
        elif np.isneginf(lg).all():
            raise FloatingPointError("every logit is -inf: no token can be sampled")
    if params.temperature == 0.0:
        return int(np.argmax(lg))
    # shift first: a tiny temperature then sends the others to -inf, never inf - inf = NaN
    with np.errstate(over="ignore"):           # -> -inf: probability 0, as it should be
        lg = (lg - lg.max()) / params.temperature
    if params.top_k is not None and params.top_k < lg.size:
        kth = np.partition(lg, -params.top_k)[-params.top_k]
        lg = np.where(lg < kth, -np.inf, lg)
    p = np.exp(lg - lg.max())
    p /= p.sum()
    if params.top_p is not None and params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[:int(np.searchsorted(cum, params.top_p) + 1)]   # smallest set >= top_p
        mask = np.zeros_like(p)
        mask[keep] = p[keep]
        p = mask / mask.sum()
    return p


def sample_next(logits, params, rng, vocab_limit):
    """One token id from logits (V,) float32. Ids >= vocab_limit are never chosen.

    Non-finite logits: NaN raises FloatingPointError; -inf is probability 0; if any logit is
    +inf the choice is among the +inf ones (the limit of softmax: greedy takes the lowest
    id, sampling is uniform); all -inf raises FloatingPointError."""
    p = sample_probs(logits, params, vocab_limit)
    if isinstance(p, int):
        return p
    return int(rng.choice(p.size, p=p))


# ---- the device sampler's twin (cuda/sample.cu) ---------------------------------------------
# A GPU draw takes its uniform u from Philox4x32-10 (Salmon et al., SC'11; Random123's
# philox4x32 with 10 rounds) keyed by the seed, at the counter (step, row): reproducible from
# the seed, independent of the batch's launch order. This twin recomputes the same u, and
# sample_next_u draws from sample_probs's distribution with it, exactly as rng.choice does
# (first id whose normalised CDF exceeds u), so a test can recompute the device's token.

_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def philox4x32(counter, key, rounds=10):
    """Philox4x32 of counters (..., 4) and keys (..., 2), uint32 words -> (..., 4) uint32."""
    c = [np.asarray(w, np.uint64) & 0xFFFFFFFF for w in np.moveaxis(np.asarray(counter), -1, 0)]
    k = [np.asarray(w, np.uint64) & 0xFFFFFFFF for w in np.moveaxis(np.asarray(key), -1, 0)]
    m0, m1 = np.uint64(_PHILOX_M[0]), np.uint64(_PHILOX_M[1])
    lo32 = np.uint64(0xFFFFFFFF)
    for r in range(rounds):
        if r:
            k = [(k[0] + np.uint64(_PHILOX_W[0])) & lo32, (k[1] + np.uint64(_PHILOX_W[1])) & lo32]
        p0, p1 = m0 * c[0], m1 * c[2]          # 32 x 32 -> 64 bits: exact in uint64
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k[0], p1 & lo32,
             (p0 >> np.uint64(32)) ^ c[3] ^ k[1], p0 & lo32]
    return np.stack(c, -1).astype(np.uint32)


def sample_uniform(seed, step, row=0):
    """The device sampler's u in [0, 1) for (seed, step, row) (arrays broadcast): Philox4x32-10
    with key (seed low 32 bits, seed high 32 bits) and counter (step low, step high, row, 0);
    u = (x0 * 2^21 + (x1 >> 11)) * 2^-53, 53 random bits, float64."""
    seed, step, row = np.broadcast_arrays(np.asarray(seed, np.uint64), np.asarray(step, np.uint64),
                                          np.asarray(row, np.uint64))
    lo32, s32 = np.uint64(0xFFFFFFFF), np.uint64(32)
    ctr = np.stack([step & lo32, step >> s32, row & lo32, np.zeros_like(row)], -1)
    key = np.stack([seed & lo32, seed >> s32], -1)
    x = philox4x32(ctr, key).astype(np.uint64)
    bits = (x[..., 0] << np.uint64(21)) | (x[..., 1] >> np.uint64(11))
    return bits.astype(np.float64) * 2.0 ** -53


def sample_next_u(logits, params, u, vocab_limit):
    """sample_next with the uniform u given (the device sampler's rule): the first id whose
    CDF, normalised to end at 1, exceeds u (rng.choice's rule)."""
    p = sample_probs(logits, params, vocab_limit)
    if isinstance(p, int):
        return p
    cdf = np.cumsum(p)
    cdf /= cdf[-1]
    return int(np.searchsorted(cdf, u, side="right"))


def _encode(model, prompt):
    """A prompt (str or list of ids) -> non-empty list of ids."""
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass token ids, or load it with "
                             "tokenizer=...")
        ids = list(model.tokenizer.encode(prompt))
    else:
        a = np.asarray(prompt)
        if a.size and a.dtype.kind not in "iu":
            raise TypeError(f"prompt token ids must be integers, got dtype {a.dtype}")
        ids = [int(t) for t in a.reshape(-1)]
    if not ids:
        ids = [EOS_ID]   # documented: an empty prompt starts from <|endoftext|>
    bad = [t for t in ids if not 0 <= t < model.vocab_size]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is outside [0, {model.vocab_size})")
    return ids


class _StopMatcher:
    """Holds back text that could still become a stop string; finds the first stop."""

    def __init__(self, stop):
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        stop = list(stop)
        if any(not isinstance(s, str) or s == "" for s in stop):
            raise ValueError("stop must be a non-empty string or a list of them")
        self.stop, self.hold = stop, max((len(s) for s in stop), default=1) - 1
        self.text, self.emitted, self.done = "", 0, False

    def feed(self, piece):
        """Add decoded text; return the part that is final now."""
        self.text += piece
        cut = min((i for i in (self.text.find(s, max(0, self.emitted - len(s)))
                               for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.done = True
            end = cut
        else:
            end = max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out

    def flush(self):
        out = "" if self.done else self.text[self.emitted:]
        self.emitted = len(self.text)
        return out


def generate(model, prompt, max_new_tokens=64, temperature=0.0, top_k=None, top_p=None,
             seed=0, stop=None, stream=False, state=None, return_tokens=False):
    """Generate from one prompt (str or ids) or a list of prompts.

    Returns the generated text (a list for a list of prompts), or token ids with
    return_tokens=True. stream=True (one prompt) yields text pieces as they are final.
    `state`: continue from a prefilled State (prompt caching); it is advanced in place.
    """
    params = SamplingParams(temperature, top_k, top_p, seed)
    if not _is_integer(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    max_new_tokens = int(max_new_tokens)
    batch = isinstance(prompt, (list, tuple)) and prompt and \
        all(isinstance(p, (str, list, tuple, np.ndarray)) for p in prompt)
    prompts = list(prompt) if batch else [prompt]
    if stream and len(prompts) != 1:
        raise ValueError("stream=True takes a single prompt")
    if stream:
        return _stream(model, prompts[0], max_new_tokens, params, stop, state)
    ids = [_encode(model, p) for p in prompts]
    if model.tokenizer is None and (stop or not return_tokens):   # say so before the work
        raise ValueError("this model has no tokenizer: pass return_tokens=True for token "
                         "ids (stop strings need a tokenizer), or load it with tokenizer=...")
    outs = _run(model, ids, max_new_tokens, params, stop, state)
    if return_tokens:
        return outs if batch else outs[0]
    texts = [_finish_text(model, toks, stop) for toks in outs]
    return texts if batch else texts[0]


def _finish_text(model, toks, stop):
    m = _StopMatcher(stop)
    text = m.feed(model.tokenizer.decode(toks))
    return text + m.flush()


def _prefill_rows(model, prompts, state):
    """Prefill each prompt alone (exact for any mix of lengths) into one batch State;
    returns the last logits (B, V)."""
    B = len(prompts)
    if state is None:
        state = model.new_state(B)
    elif state.batch_size != B:
        raise ValueError(f"state holds {state.batch_size} rows, there are {B} prompts")
    if len(set(map(len, prompts))) == 1:
        return state, model.prefill(np.array(prompts, np.int64), state, logits="last")
    last = np.empty((B, model.vocab_size), np.float32)
    try:
        for i, ids in enumerate(prompts):
            row = state.select([i])
            last[i] = model.prefill(np.array([ids], np.int64), row, logits="last")[0]
            state.set_row(i, row)
    except BaseException:
        if hasattr(state, "_invalid"):      # model.State: some rows are filled, some not
            state._invalid = ("generate() was interrupted while it prefilled the rows of "
                              "this state one by one")
        raise
    state.seqlen = -1   # rows now differ in length
    return state, last


def _on_device(model):
    """A CudaModel: its tokens are drawn by the device sampler (only ids come back)."""
    return hasattr(model, "_sample_device")


# Tokens per engine call of the device loop when nothing needs per-token host control: long
# enough that the call overhead vanishes, short enough that rows ending at EOS waste little.
DEVICE_CHUNK = 32


def _stop_trackers(model, B, stop):
    """(matchers, decoders) for the stop strings of B rows, or (None, None) without any."""
    if not stop:
        return None, None
    from .tokenizer import StreamDecoder
    return ([_StopMatcher(stop) for _ in range(B)],
            [StreamDecoder(model.tokenizer) for _ in range(B)])


def _accept(cur, out, alive, matchers, decoders):
    """One step of B rows: each live row's token cur[i] is appended to out[i], and the row dies
    at EOS or when its stop string completes. Returns the next step's input (dead rows 0)."""
    nxt = np.zeros(len(out), np.int64)
    for i in range(len(out)):
        if alive[i]:
            nxt[i] = cur[i]
            out[i].append(int(nxt[i]))
            if nxt[i] == EOS_ID:
                alive[i] = False
            elif matchers is not None:
                matchers[i].feed(decoders[i].push(int(nxt[i])))
                alive[i] = not matchers[i].done
    return nxt


def _run_device(model, prompts, max_new, params, stop, state):
    """_run on a CudaModel: the same loop, but each draw happens on the device (the seed's
    Philox uniforms, generation.sample_next_u's rule: tokens differ from the host sampler's
    default_rng draws at temperature > 0, and are reproducible from the seed). Without stop
    strings or a caller's state, DEVICE_CHUNK tokens per engine call (the state is private:
    steps after a row's EOS do not matter); else one call per token, fed the host's choice."""
    from .model_cuda import _seed
    B = len(prompts)
    own = state is None
    state, logits = _prefill_rows(model, prompts, state)
    seed = _seed(params)
    out = [[] for _ in range(B)]
    alive = [True] * B
    matchers, decoders = _stop_trackers(model, B, stop)
    if max_new == 0:
        return out
    if own and not stop:
        done = 0
        toks = model._sample_device(state, min(DEVICE_CHUNK, max_new), params, seed, 0,
                                    logits0=logits)
        while True:
            for i in range(B):
                for t in toks[i]:
                    if not alive[i]:
                        break
                    out[i].append(int(t))
                    alive[i] = int(t) != EOS_ID
            done += toks.shape[1]
            if done >= max_new or not any(alive):
                break
            toks = model._sample_device(state, min(DEVICE_CHUNK, max_new - done), params, seed,
                                        done, tokens=toks[:, -1])
        return [[t for t in r if t != EOS_ID] for r in out]
    # per-token host control: the same steps as _run (dead rows are fed 0)
    cur = model._sample_device(state, 1, params, seed, 0, logits0=logits)[:, 0]
    for k in range(max_new):
        nxt = _accept(cur, out, alive, matchers, decoders)
        if not any(alive):
            break
        cur = model._sample_device(state, 1, params, seed, k + 1, tokens=nxt)[:, 0]
    return [[t for t in toks if t != EOS_ID] for toks in out]


def _run(model, prompts, max_new, params, stop, state):
    if _on_device(model):
        return _run_device(model, prompts, max_new, params, stop, state)
    B = len(prompts)
    state, logits = _prefill_rows(model, prompts, state)
    rngs = [np.random.default_rng(params.seed) for _ in range(B)]   # each row as if alone
    limit = model.real_vocab_size
    out = [[] for _ in range(B)]
    alive = [True] * B
    matchers, decoders = _stop_trackers(model, B, stop)
    for _ in range(max_new):
        cur = [sample_next(logits[i], params, rngs[i], limit) if alive[i] else 0
               for i in range(B)]
        nxt = _accept(cur, out, alive, matchers, decoders)
        if not any(alive):
            break
        logits = model.step(nxt, state)
    return [[t for t in toks if t != EOS_ID] for toks in out]


def _stream(model, prompt, max_new, params, stop, state):
    """Generator of text pieces for one prompt (never splits a UTF-8 character)."""
    from .tokenizer import StreamDecoder
    ids = _encode(model, prompt)
    if model.tokenizer is None:
        raise ValueError("stream=True needs a tokenizer")
    state, logits = _prefill_rows(model, [ids], state)
    rng = np.random.default_rng(params.seed)
    dec = StreamDecoder(model.tokenizer)
    matcher = _StopMatcher(stop)
    device = _on_device(model)      # CudaModel: each draw on the device, only the id back
    if device:
        from .model_cuda import _seed
        seed = _seed(params)
    for n in range(max_new):
        if device:
            t = int(model._sample_device(state, 1, params, seed, n, logits0=logits)[0, 0]
                    if n == 0 else model._sample_device(state, 1, params, seed, n,
                                                        tokens=np.array([t], np.int64))[0, 0])
        else:
            t = sample_next(logits[0], params, rng, model.real_vocab_size)
        if t == EOS_ID:
            break
        piece = matcher.feed(dec.push(t))
        if piece:
            yield piece
        if matcher.done:
            return
        if n + 1 < max_new and not device:
            logits = model.step(np.array([t], np.int64), state)
    piece = matcher.feed(dec.flush()) + matcher.flush()
    if piece:
        yield piece
