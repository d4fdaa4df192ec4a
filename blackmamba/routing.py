"""Routing research harness: where the top-1 router sends tokens, how balanced that is, and
what Sinkhorn balancing (SPEC 3.2) would change.

    import blackmamba as bm
    model = bm.load("Zyphra/BlackMamba-2.8B", dtype="bfloat16")
    tr = bm.routing.trace(model, "The capital of France is")      # one forward pass
    tr.expert_ids[1], tr.gates[1]                  # (T,) per MoE layer, row-major (batch, position)
    st = bm.routing.collect(model, ["corpus.txt"], max_tokens=50_000)
    print(st.summary()); st.plot_expert_distribution("experts.png")
    study = bm.routing.sinkhorn_study(st); print(study.summary()); study.plot("sinkhorn.png")

How it hooks in: the model calls `model._tracer(layer_index, ids (T,), gates (T,), logits (T, X))`
once per MoE layer per forward chunk when the attribute is set, and costs nothing when it is
None. trace() installs a recorder for one prefill (no LM head computed) and removes it after.
collect() streams a corpus through trace() batch by batch and folds each batch into a Stats
whose size depends on the model (layers, experts, caps), never on the corpus length.

Letters: B batch, L length, T = B*L tokens, X experts of a layer, V vocab, P position buckets,
R reservoir rows, K top-token counter capacity per expert.
"""
import json
import math
import os
import csv

import numpy as np

from . import ops
from .config import num_experts

__all__ = ["Trace", "Stats", "SinkhornStudy", "trace", "collect", "sinkhorn_study",
           "moe_layers", "balance", "agreement_stats", "sinkhorn_curve",
           "sinkhorn_marginal_curve", "add_cli"]


# ---- statistics of one count vector (pure functions; the tests compare them to NumPy) ---------

def balance(counts):
    """Balance of one layer's token counts (X,) -> dict.

    entropy: Shannon entropy of the fractions over log(X): 1 = perfectly even, 0 = one expert.
    cv: coefficient of variation std/mean of the counts (population std): 0 = even.
    max_over_mean / min_over_mean: the busiest / idlest expert's load over the mean load.
    NaN where there are no tokens.
    """
    c = np.asarray(counts, dtype=np.float64)
    X, n = c.size, c.sum()
    if n <= 0 or X == 0:
        nan = float("nan")
        return {"entropy": nan, "cv": nan, "max_over_mean": nan, "min_over_mean": nan}
    f = c / n
    nz = f[f > 0]
    H = float(-(nz * np.log(nz)).sum())
    mean = n / X
    return {"entropy": H / math.log(X) if X > 1 else 1.0,
            "cv": float(c.std() / mean),
            "max_over_mean": float(c.max() / mean),
            "min_over_mean": float(c.min() / mean)}


def agreement_stats(joint):
    """Statistics of a joint histogram (Xa, Xb) of (expert in layer a, expert in layer b).

    same_index: fraction of tokens routed to the same expert index in both layers (only
      meaningful as a baseline: expert indices of different layers are unrelated labels).
    nmi: mutual information / sqrt(H(a) H(b)) (0 independent, 1 one determines the other).
    predictability: fraction of tokens whose layer-b expert is the most common one given their
      layer-a expert (1 = layer a's choice fixes layer b's).
    """
    J = np.asarray(joint, dtype=np.float64)
    n = J.sum()
    if n <= 0:
        nan = float("nan")
        return {"same_index": nan, "nmi": nan, "predictability": nan}
    p = J / n
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum())
    ha = float(-(pa[pa > 0] * np.log(pa[pa > 0])).sum())
    hb = float(-(pb[pb > 0] * np.log(pb[pb > 0])).sum())
    k = min(J.shape)
    return {"same_index": float(np.trace(J[:k, :k]) / n),
            "nmi": mi / math.sqrt(ha * hb) if ha > 0 and hb > 0 else 0.0,
            "predictability": float(J.max(1).sum() / n)}


def default_position_edges(seq_len):
    """Bucket starts 0, 1, 2, 4, 8, ... < seq_len: fine near the start of a sequence, where a
    recurrent model's state is still filling, coarse later."""
    edges = [0]
    while edges[-1] * 2 < seq_len or (edges[-1] == 0 and seq_len > 1):
        edges.append(max(1, edges[-1] * 2))
    return np.asarray(edges, dtype=np.int64)


def bucket_labels(edges):
    """'0', '1', '2-3', ..., '1024+' for bucket starts `edges` (the last bucket is open)."""
    e = [int(v) for v in edges]
    out = []
    for i, a in enumerate(e):
        if i + 1 == len(e):
            out.append(f"{a}+")
        else:
            b = e[i + 1] - 1
            out.append(str(a) if b == a else f"{a}-{b}")
    return out


# ---- tracing -------------------------------------------------------------------------------

def moe_layers(model):
    """{layer index: number of experts} of the model's routed (X >= 2) layers, in order."""
    out = {}
    for i, kind in enumerate(model.config.layer_kinds):
        X = num_experts(kind)
        if X and X >= 2:
            out[i] = X
    return out


class Trace:
    """Routing of one forward pass over ids (B, L).

    expert_ids[layer] int32 (T,), gates[layer] float32 (T,), router_logits[layer] float32
    (T, X) (only with keep_logits=True, else empty); T = B*L tokens in row-major (batch,
    position) order, i.e. token t is ids[t // L, t % L]. Layers are keyed by their index in
    the model (BlackMamba's "r,8,r,8,..." gives 1, 3, 5, ...).
    """

    def __init__(self, ids, expert_ids, gates, router_logits, num_experts, tokenizer=None,
                 model_name=""):
        self.ids = ids                          # (B, L) int64
        self.expert_ids = expert_ids            # {layer: (T,) int32}
        self.gates = gates                      # {layer: (T,) float32}
        self.router_logits = router_logits      # {layer: (T, X) float32} or {}
        self.num_experts = num_experts          # {layer: X}
        self.tokenizer, self.model_name = tokenizer, model_name

    @property
    def layers(self):
        return list(self.num_experts)

    @property
    def shape(self):
        return self.ids.shape

    @property
    def num_tokens(self):
        return int(self.ids.size)

    @property
    def tokens(self):
        """Token ids (T,) in the same order as expert_ids."""
        return self.ids.reshape(-1)

    def positions(self):
        """Position in its sequence of every token (T,)."""
        B, L = self.ids.shape
        return np.tile(np.arange(L, dtype=np.int64), B)

    def counts(self, layer):
        """Tokens per expert (X,) of one layer."""
        return np.bincount(self.expert_ids[layer], minlength=self.num_experts[layer])

    def stats(self, **kw):
        """A Stats holding this pass alone (keywords as for Stats)."""
        return Stats.from_trace(self, **kw)

    def __repr__(self):
        B, L = self.ids.shape
        return (f"<blackmamba.routing.Trace batch={B} length={L} moe_layers={self.layers} "
                f"logits={'kept' if self.router_logits else 'not kept'}>")


class _Recorder:
    """Installed as model._tracer for one forward pass; keeps each MoE layer's routing.

    The model may call it several times per layer (prefill runs long inputs in chunks along
    L), each call holding (B, l_chunk) tokens row-major; finish() stitches chunks back into
    (B, L) row-major order. A tracer that was already installed keeps being called.
    """

    def __init__(self, model, keep_logits):
        self.model, self.keep_logits = model, keep_logits
        self.chunks = {}                 # layer -> [(ids, gates, logits|None), ...]

    def __call__(self, layer, ids, gates, logits):
        ids, gates = np.array(ids, dtype=np.int32), np.array(gates, dtype=np.float32)
        lg = np.array(logits, dtype=np.float32) if self.keep_logits else None
        self.chunks.setdefault(layer, []).append((ids, gates, lg))
        if self.prev is not None:
            self.prev(layer, ids, gates, logits)

    def __enter__(self):
        self.prev = getattr(self.model, "_tracer", False)
        if self.prev is False:
            raise TypeError(f"{type(self.model).__name__} has no routing hook (_tracer): "
                            "tracing needs a blackmamba Model")
        self.model._tracer = self
        return self

    def __exit__(self, *exc):
        self.model._tracer = self.prev

    def finish(self, ids, layers):
        B = ids.shape[0]
        eids, gates, logits = {}, {}, {}
        for li, X in layers.items():
            parts = self.chunks.get(li)
            if not parts:
                raise RuntimeError(f"the model did not report routing for MoE layer {li}")
            eids[li] = np.concatenate([p[0].reshape(B, -1) for p in parts], 1).reshape(-1)
            gates[li] = np.concatenate([p[1].reshape(B, -1) for p in parts], 1).reshape(-1)
            if self.keep_logits:
                logits[li] = np.concatenate([p[2].reshape(B, -1, X) for p in parts],
                                            1).reshape(-1, X)
            if eids[li].size != ids.size:
                raise RuntimeError(f"layer {li}: routing for {eids[li].size} tokens, the "
                                   f"input has {ids.size}")
        return Trace(ids, eids, gates, logits, dict(layers),
                     tokenizer=getattr(self.model, "tokenizer", None),
                     model_name=getattr(self.model, "name", ""))


def _encode(model, text):
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("this model has no tokenizer: pass token ids, or load it with "
                         "tokenizer='byte' or a tokenizer.json path")
    return tok.encode(text)


def _as_ids(model, ids_or_text):
    """str | [str, ...] | ids (L,) | ids (B, L) -> int64 (B, L)."""
    x = ids_or_text
    if isinstance(x, str):
        rows = [_encode(model, x)]
    elif isinstance(x, (list, tuple)) and x and all(isinstance(s, str) for s in x):
        rows = [_encode(model, s) for s in x]
    else:
        a = np.asarray(x)
        if a.ndim == 1:
            a = a[None, :]
        rows = a
    if isinstance(rows, list):
        lens = sorted({len(r) for r in rows})
        if len(lens) > 1:
            raise ValueError(f"the texts tokenize to different lengths {lens}: trace them one "
                             "at a time, or use routing.collect() for a corpus")
        rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 2 or rows.shape[1] == 0:
        raise ValueError(f"need at least one token, as ids (L,) or (B, L); got shape {rows.shape}")
    if rows.dtype.kind not in "iu":
        raise TypeError(f"token ids must be integers, got dtype {rows.dtype}")
    return rows.astype(np.int64, copy=False)


def trace(model, ids_or_text, keep_logits=False):
    """Run one forward pass and record every MoE layer's routing -> Trace.

    ids_or_text: a string, a list of strings that tokenize to the same length, token ids
      (L,) or (B, L). Each row starts from a fresh recurrent state.
    keep_logits: also keep the router logits (T, X) per layer (needed for Sinkhorn studies).
    Works on any backend whose model reports routing through `_tracer` (CPU and GPU models).
    The recorder sits on the model object for the duration of the pass: do not run the same
    model from another thread meanwhile (its routing would be recorded too).
    """
    ids = _as_ids(model, ids_or_text)
    layers = moe_layers(model)
    with _Recorder(model, keep_logits) as rec:
        model.prefill(ids, model.new_state(ids.shape[0]), logits=None)
    return rec.finish(ids, layers)


# ---- streaming statistics ------------------------------------------------------------------

class Stats:
    """Routing statistics aggregated on the fly over any number of traces.

    Per MoE layer (keyed by layer index):
      counts[l] int64 (X,)             tokens per expert
      gate_sum[l] float64 (X,)         sum of the gates of the tokens each expert got
      position_counts[l] int64 (P, X)  tokens per (position bucket, expert); bucket b holds
                                       positions position_edges[b] .. position_edges[b+1]-1
      top tokens per expert            bounded counters (K per expert, see top_tokens())
      reservoir[l] float32 (R, X)      a uniform sample of router logits (Algorithm R); the
                                       same tokens in every layer (reservoir_token_ids (R,))
    Per pair of consecutive MoE layers (a, b):
      agreement[(a, b)] int64 (Xa, Xb) joint histogram of (expert in a, expert in b)
    None of these grows with the corpus: the object's size is fixed at construction.
    """

    def __init__(self, layers, vocab_size, seq_len=2048, position_edges=None, top_capacity=256,
                 reservoir_size=4096, seed=0, tokenizer=None, model_name=""):
        self.num_experts = {int(k): int(v) for k, v in dict(layers).items()}
        if not self.num_experts:
            raise ValueError("the model has no routed MoE layers: nothing to study")
        self.vocab_size = int(vocab_size)
        self.seq_len = int(seq_len)
        self.position_edges = (default_position_edges(self.seq_len) if position_edges is None
                               else np.asarray(position_edges, dtype=np.int64))
        e = self.position_edges
        if e.ndim != 1 or e.size == 0 or e[0] != 0 or np.any(np.diff(e) <= 0):
            raise ValueError(f"position_edges must start at 0 and increase, got {e.tolist()}")
        if top_capacity < 1 or reservoir_size < 0:
            raise ValueError("top_capacity must be >= 1 and reservoir_size >= 0")
        self.top_capacity = int(top_capacity)
        self.reservoir_size = int(reservoir_size)
        self.tokenizer = tokenizer
        self.model_name = model_name
        P = e.size
        L = self.layers
        self.counts = {l: np.zeros(X, np.int64) for l, X in self.num_experts.items()}
        self.gate_sum = {l: np.zeros(X, np.float64) for l, X in self.num_experts.items()}
        self.position_counts = {l: np.zeros((P, X), np.int64)
                                for l, X in self.num_experts.items()}
        self.agreement = {(a, b): np.zeros((self.num_experts[a], self.num_experts[b]), np.int64)
                          for a, b in zip(L[:-1], L[1:])}
        # top-token counters: per layer, keys expert*V + token (n,) with counts (n,), sorted
        # by (expert, count desc); at most K per expert are kept between updates.
        self._top_keys = {l: np.zeros(0, np.int64) for l in L}
        self._top_counts = {l: np.zeros(0, np.int64) for l in L}
        self.top_error = {l: np.zeros(X, np.int64) for l, X in self.num_experts.items()}
        R = self.reservoir_size
        self.reservoir = {l: np.zeros((R, X), np.float32) for l, X in self.num_experts.items()}
        self.reservoir_token_ids = np.zeros(R, np.int64)
        self.reservoir_filled = 0
        self.num_tokens = 0
        self.num_sequences = 0
        self._rng = np.random.default_rng(seed)

    @property
    def layers(self):
        return list(self.num_experts)

    @classmethod
    def for_model(cls, model, **kw):
        kw.setdefault("tokenizer", getattr(model, "tokenizer", None))
        kw.setdefault("model_name", getattr(model, "name", ""))
        return cls(moe_layers(model), model.vocab_size, **kw)

    @classmethod
    def from_trace(cls, tr, vocab_size=None, **kw):
        """Stats of one Trace. vocab_size defaults to max token id + 1."""
        if vocab_size is None:
            vocab_size = int(tr.ids.max()) + 1
        kw.setdefault("seq_len", tr.shape[1])
        kw.setdefault("tokenizer", tr.tokenizer)
        kw.setdefault("model_name", tr.model_name)
        if not tr.router_logits:
            kw.setdefault("reservoir_size", 0)
        st = cls(tr.num_experts, vocab_size, **kw)
        st.update(tr)
        return st

    # -- folding a trace in ------------------------------------------------------------------
    def update(self, tr):
        """Fold one Trace in. Cost O(T + X*K) per layer; nothing kept grows with T."""
        if tr.num_experts != self.num_experts:
            raise ValueError(f"trace has MoE layers {tr.num_experts}, these stats "
                             f"{self.num_experts}")
        T = tr.num_tokens
        if T == 0:
            return self
        tokens = tr.tokens
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise ValueError(f"token ids outside [0, {self.vocab_size})")
        P = self.position_edges.size
        bucket = np.searchsorted(self.position_edges, tr.positions(), side="right") - 1  # (T,)
        for l, X in self.num_experts.items():
            e = tr.expert_ids[l].astype(np.int64)                                          # (T,)
            self.counts[l] += np.bincount(e, minlength=X)
            self.gate_sum[l] += np.bincount(e, weights=tr.gates[l].astype(np.float64),
                                            minlength=X)
            self.position_counts[l] += np.bincount(bucket * X + e,
                                                   minlength=P * X).reshape(P, X)
            self._top_update(l, e, tokens)
        for (a, b), J in self.agreement.items():
            Xb = self.num_experts[b]
            J += np.bincount(tr.expert_ids[a].astype(np.int64) * Xb + tr.expert_ids[b],
                             minlength=J.size).reshape(J.shape)
        if self.reservoir_size:
            if not tr.router_logits:
                raise ValueError("these stats keep a reservoir of router logits: trace with "
                                 "keep_logits=True (or build Stats with reservoir_size=0)")
            self._reservoir_update(tr)
        self.num_tokens += T
        self.num_sequences += tr.shape[0]
        return self

    def _top_update(self, l, e, tokens):
        """Bounded heavy-hitter counters: add this batch's (expert, token) counts, then keep
        the K largest per expert. Whatever a prune drops is at most the largest dropped count,
        so a token's true count exceeds its kept count by at most top_error[l][expert]."""
        V, K, X = self.vocab_size, self.top_capacity, self.num_experts[l]
        k_new, c_new = np.unique(e * V + tokens, return_counts=True)
        keys = np.concatenate([self._top_keys[l], k_new])
        cnts = np.concatenate([self._top_counts[l], c_new])
        keys, inv = np.unique(keys, return_inverse=True)
        cnts = np.bincount(inv, weights=cnts).astype(np.int64)
        expert = keys // V
        order = np.lexsort((-cnts, expert))          # by expert, then count descending
        keys, cnts, expert = keys[order], cnts[order], expert[order]
        rank = np.arange(keys.size) - np.searchsorted(expert, expert, side="left")
        keep = rank < K
        if not keep.all():
            dropped = np.zeros(X, np.int64)
            np.maximum.at(dropped, expert[~keep], cnts[~keep])
            self.top_error[l] += dropped
        self._top_keys[l], self._top_counts[l] = keys[keep], cnts[keep]

    def _reservoir_update(self, tr):
        """Algorithm R over tokens, vectorised: token number s (0-based, over the whole
        stream) fills slot s while s < R, else replaces slot j ~ U[0, s] if j < R. Later
        tokens win a slot drawn twice, as in the sequential algorithm."""
        R, T, s0 = self.reservoir_size, tr.num_tokens, self.num_tokens
        s = s0 + np.arange(T, dtype=np.int64)
        slot = np.where(s < R, s, -1)
        late = s >= R
        if late.any():
            j = self._rng.integers(0, s[late] + 1)
            slot[late] = np.where(j < R, j, -1)
        src = np.nonzero(slot >= 0)[0]
        if src.size == 0:
            return
        # last writer of each slot: unique over the reversed list keeps first = last
        _, first = np.unique(slot[src][::-1], return_index=True)
        src = src[::-1][first]
        dst = slot[src]
        for l in self.layers:
            self.reservoir[l][dst] = tr.router_logits[l][src]
        self.reservoir_token_ids[dst] = tr.tokens[src]
        self.reservoir_filled = min(R, s0 + T)

    # -- reading -----------------------------------------------------------------------------
    def fractions(self, layer):
        c = self.counts[layer]
        n = c.sum()
        return c / n if n else np.full(c.shape, np.nan)

    def mean_gate(self, layer):
        c = self.counts[layer]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(c > 0, self.gate_sum[layer] / np.maximum(c, 1), np.nan)

    def router_logits(self, layer):
        """The reservoir sample of router logits (n, X), n = min(R, tokens seen)."""
        return self.reservoir[layer][:self.reservoir_filled]

    def position_fractions(self, layer):
        """(P, X): fraction of each position bucket's tokens that each expert got."""
        pc = self.position_counts[layer].astype(np.float64)
        tot = pc.sum(1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(tot > 0, pc / np.maximum(tot, 1), np.nan)

    def agreement_summary(self):
        """[{layers: (a, b), same_index, nmi, predictability}] for consecutive MoE layers."""
        return [dict(layers=k, **agreement_stats(J)) for k, J in self.agreement.items()]

    def top_tokens(self, layer, k=10, decode=True):
        """Per expert, its k most frequent tokens: [[(id, text, count), ...] per expert].

        Counts are exact while an expert has seen at most top_capacity distinct tokens;
        beyond that each is a lower bound, short of the truth by at most top_error[layer][e].
        text is the token decoded alone (None without a tokenizer or decode=False).
        """
        V, X = self.vocab_size, self.num_experts[layer]
        keys, cnts = self._top_keys[layer], self._top_counts[layer]
        expert = keys // V
        out = []
        for x in range(X):
            lo, hi = np.searchsorted(expert, [x, x + 1])
            rows = []
            for key, c in zip(keys[lo:min(hi, lo + k)], cnts[lo:min(hi, lo + k)]):
                tid = int(key % V)
                rows.append((tid, self._decode(tid) if decode else None, int(c)))
            out.append(rows)
        return out

    def _decode(self, tid):
        tok = self.tokenizer
        if tok is None or tid >= getattr(tok, "vocab_size", 1 << 62):
            return None
        try:
            return tok.decode([tid])
        except Exception:          # an id the tokenizer cannot show alone: keep the id
            return None

    def summary(self):
        """Per MoE layer: counts, fractions, entropy (normalised), cv, max/mean and min/mean
        load, mean gate, and agreement with the next MoE layer -> Table (a list of dicts that
        prints as a table)."""
        nxt = {a: (b, agreement_stats(J)) for (a, b), J in self.agreement.items()}
        rows = []
        for l, X in self.num_experts.items():
            c = self.counts[l]
            row = {"layer": l, "experts": X, "tokens": int(c.sum()),
                   "counts": c.tolist(), "fractions": self.fractions(l).tolist()}
            row.update(balance(c))
            row["mean_gate"] = self.mean_gate(l).tolist()
            if l in nxt:
                b, ag = nxt[l]
                row.update({"next_layer": b, "same_index_next": ag["same_index"],
                            "nmi_next": ag["nmi"]})
            rows.append(row)
        return Table(rows, ["layer", "experts", "tokens", "entropy", "cv", "max_over_mean",
                            "min_over_mean", "same_index_next", "nmi_next"],
                     title=f"routing over {self.num_tokens:,} tokens"
                           + (f" ({self.model_name})" if self.model_name else ""))

    def nbytes(self):
        """Bytes held by the arrays: fixed by the model and caps, not by the corpus."""
        arrays = [*self.counts.values(), *self.gate_sum.values(),
                  *self.position_counts.values(), *self.agreement.values(),
                  *self.top_error.values(), *self.reservoir.values(), self.reservoir_token_ids]
        n = sum(a.nbytes for a in arrays)
        # counters: at most K entries per expert of (key, count), 16 bytes each
        n += sum(16 * self.top_capacity * X for X in self.num_experts.values())
        return n

    def __repr__(self):
        return (f"<blackmamba.routing.Stats tokens={self.num_tokens:,} "
                f"sequences={self.num_sequences:,} moe_layers={self.layers}>")

    # -- export ------------------------------------------------------------------------------
    def to_dict(self, top_k=20, include_reservoir=True):
        agree = {(a, b): agreement_stats(J) for (a, b), J in self.agreement.items()}
        layers = []
        for l, X in self.num_experts.items():
            d = {"layer": l, "num_experts": X, "counts": self.counts[l].tolist(),
                 "fractions": _nan_none(self.fractions(l).tolist())}
            d.update({k: _nan_none(v) for k, v in balance(self.counts[l]).items()})
            d["mean_gate"] = _nan_none(self.mean_gate(l).tolist())
            d["gate_sum"] = self.gate_sum[l].tolist()
            d["position_counts"] = self.position_counts[l].tolist()
            d["top_tokens"] = [[{"id": i, "text": t, "count": c} for i, t, c in rows]
                               for rows in self.top_tokens(l, top_k)]
            d["top_tokens_max_error"] = self.top_error[l].tolist()
            V = self.vocab_size
            d["top_counters"] = {"expert": (self._top_keys[l] // V).tolist(),
                                 "id": (self._top_keys[l] % V).tolist(),
                                 "count": self._top_counts[l].tolist()}
            layers.append(d)
        out = {"format": "blackmamba.routing.Stats", "version": 1,
               "model": self.model_name, "num_tokens": self.num_tokens,
               "num_sequences": self.num_sequences, "seq_len": self.seq_len,
               "vocab_size": self.vocab_size, "top_capacity": self.top_capacity,
               "position_edges": self.position_edges.tolist(),
               "position_labels": bucket_labels(self.position_edges),
               "layers": layers,
               "agreement": [{"layers": [a, b], "counts": J.tolist(),
                              **{k: _nan_none(v) for k, v in agree[(a, b)].items()}}
                             for (a, b), J in self.agreement.items()]}
        if include_reservoir:
            n = self.reservoir_filled
            out["reservoir"] = {"size": self.reservoir_size, "filled": n,
                                "token_ids": self.reservoir_token_ids[:n].tolist(),
                                "logits": {str(l): self.reservoir[l][:n].tolist()
                                           for l in self.layers}}
        return out

    def to_json(self, path, top_k=20, include_reservoir=True):
        """Everything (counts, positions, agreement, top tokens decoded, the reservoir): enough
        for Stats.from_json to rebuild the object and redraw the figures."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(top_k, include_reservoir), f)
        return path

    @classmethod
    def from_json(cls, path, tokenizer=None):
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if d.get("format") != "blackmamba.routing.Stats":
            raise ValueError(f"{path}: not a routing Stats file")
        res = d.get("reservoir") or {"size": 0, "filled": 0}
        st = cls({x["layer"]: x["num_experts"] for x in d["layers"]}, d["vocab_size"],
                 seq_len=d["seq_len"], position_edges=d["position_edges"],
                 top_capacity=d["top_capacity"], reservoir_size=res["size"],
                 tokenizer=tokenizer, model_name=d.get("model", ""))
        V = st.vocab_size
        for x in d["layers"]:
            l = x["layer"]
            st.counts[l][:] = x["counts"]
            st.gate_sum[l][:] = x["gate_sum"]
            st.position_counts[l][:] = x["position_counts"]
            st.top_error[l][:] = x["top_tokens_max_error"]
            tc = x["top_counters"]
            st._top_keys[l] = np.asarray(tc["expert"], np.int64) * V + np.asarray(tc["id"],
                                                                                 np.int64)
            st._top_counts[l] = np.asarray(tc["count"], np.int64)
            if res["filled"]:
                st.reservoir[l][:res["filled"]] = res["logits"][str(l)]
        for a in d["agreement"]:
            st.agreement[tuple(a["layers"])][:] = a["counts"]
        st.reservoir_token_ids[:res["filled"]] = res.get("token_ids", [])
        st.reservoir_filled = res["filled"]
        st.num_tokens, st.num_sequences = d["num_tokens"], d["num_sequences"]
        return st

    def to_csv(self, path, table="experts"):
        """One tidy table as CSV (a row per observation, for pandas / spreadsheets):
        "experts": layer, expert, count, fraction, mean_gate, load_over_mean
        "layers": the summary (entropy, cv, max/mean, agreement with the next layer)
        "positions": layer, bucket, position_start, position_label, expert, count, fraction
        "agreement": layer_a, layer_b, expert_a, expert_b, count
        """
        rows, head = [], None
        if table == "experts":
            head = ["layer", "expert", "count", "fraction", "mean_gate", "load_over_mean"]
            for l, X in self.num_experts.items():
                f, g = self.fractions(l), self.mean_gate(l)
                for x in range(X):
                    rows.append([l, x, int(self.counts[l][x]), f[x], g[x], f[x] * X])
        elif table == "layers":
            s = self.summary()
            head = s.columns
            rows = [[r.get(c, "") for c in head] for r in s]
        elif table == "positions":
            head = ["layer", "bucket", "position_start", "position_label", "expert", "count",
                    "fraction"]
            labels = bucket_labels(self.position_edges)
            for l, X in self.num_experts.items():
                pf = self.position_fractions(l)
                for b, start in enumerate(self.position_edges):
                    for x in range(X):
                        rows.append([l, b, int(start), labels[b], x,
                                     int(self.position_counts[l][b, x]), pf[b, x]])
        elif table == "agreement":
            head = ["layer_a", "layer_b", "expert_a", "expert_b", "count"]
            for (a, b), J in self.agreement.items():
                for i in range(J.shape[0]):
                    for j in range(J.shape[1]):
                        rows.append([a, b, i, j, int(J[i, j])])
        else:
            raise ValueError("table must be 'experts', 'layers', 'positions' or 'agreement', "
                             f"got {table!r}")
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(head)
            w.writerows([[_fmt_csv(v) for v in r] for r in rows])
        return path

    # -- figures (matplotlib, imported only here) --------------------------------------------
    def plot_expert_distribution(self, path=None, **kw):
        """Heatmap (MoE layers x experts) of load / mean load, and one bar panel per MoE layer
        with the fraction of tokens per expert. Returns the Figure; saves it when path given."""
        from .routing_plots import plot_expert_distribution
        return plot_expert_distribution(self, path, **kw)

    def plot_load_balance(self, path=None, study=None, **kw):
        """Normalised entropy, CV and max/mean load per MoE layer (with a SinkhornStudy:
        also the load after Sinkhorn routing)."""
        from .routing_plots import plot_load_balance
        return plot_load_balance(self, path, study=study, **kw)

    def plot_positions(self, path=None, **kw):
        """One panel per MoE layer: expert fractions per position bucket."""
        from .routing_plots import plot_positions
        return plot_positions(self, path, **kw)

    def plot_agreement(self, path=None, **kw):
        """One panel per consecutive MoE-layer pair: P(expert in b | expert in a)."""
        from .routing_plots import plot_agreement
        return plot_agreement(self, path, **kw)


def _nan_none(v):
    if isinstance(v, list):
        return [_nan_none(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _fmt_csv(v):
    if isinstance(v, (float, np.floating)):
        return "" if not math.isfinite(v) else f"{float(v):.6g}"
    if isinstance(v, (list, tuple)):
        return " ".join(str(x) for x in v)
    return v


class Table(list):
    """A list of row dicts that prints as a fixed-width table (notebooks and terminals)."""

    def __init__(self, rows, columns, title=""):
        super().__init__(rows)
        self.columns, self.title = columns, title

    def __str__(self):
        cols = [c for c in self.columns if any(c in r for r in self)]
        cells = [[_fmt_cell(r.get(c)) for c in cols] for r in self]
        w = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
        lines = [self.title] if self.title else []
        lines.append("  ".join(c.rjust(w[i]) for i, c in enumerate(cols)))
        lines += ["  ".join(v.rjust(w[i]) for i, v in enumerate(row)) for row in cells]
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_pretty_(self, p, cycle):
        p.text(str(self))


def _fmt_cell(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f"{v:.3f}"
    return str(v)


# ---- corpus streaming ----------------------------------------------------------------------

_TEXT_EXTS = (".txt", ".md", ".text", ".json", ".jsonl", ".csv", ".tsv", ".py", ".rst")


def _documents(model, texts_or_files, block_chars=1 << 16):
    """Yield each document as a stream of token-id arrays. A document is a file (read in
    blocks of about block_chars characters cut at a newline, so memory stays bounded and BPE
    merges are split only at line ends), a text, or an integer array of token ids."""
    items = texts_or_files
    if isinstance(items, (str, os.PathLike)) or (isinstance(items, np.ndarray)
                                                 and items.ndim == 1):
        items = [items]
    for it in items:
        if isinstance(it, os.PathLike) or (isinstance(it, str) and os.path.isfile(it)):
            yield _file_blocks(model, os.fspath(it), block_chars)
        elif isinstance(it, str):
            if ("\n" not in it and " " not in it and it.lower().endswith(_TEXT_EXTS)):
                raise FileNotFoundError(f"{it!r}: no such file (pass a pathlib.Path for files, "
                                        "a str holding the text itself for texts)")
            yield iter([np.asarray(_encode(model, it), np.int64)])
        else:
            a = np.asarray(it)
            if a.dtype.kind not in "iu" or a.ndim != 1:
                raise TypeError("corpus items must be texts, file paths, or 1-d integer "
                                f"token-id arrays; got {type(it).__name__}")
            yield iter([a.astype(np.int64)])


def _file_blocks(model, path, block_chars):
    with open(path, encoding="utf-8", errors="replace") as f:
        carry = ""
        while True:
            block = f.read(block_chars)
            if not block:
                break
            text = carry + block
            cut = text.rfind("\n")
            if cut < 0 or cut == len(text) - 1:
                carry, text = "", text
            else:
                carry, text = text[cut + 1:], text[:cut + 1]
            if text:
                yield np.asarray(_encode(model, text), np.int64)
        if carry:
            yield np.asarray(_encode(model, carry), np.int64)


def _sequences(model, texts_or_files, seq_len, max_tokens):
    """Cut each document into sequences of seq_len tokens (the last one shorter), stopping
    once max_tokens tokens have been handed out."""
    left = float("inf") if max_tokens is None else int(max_tokens)
    for doc in _documents(model, texts_or_files):
        buf = np.zeros(0, np.int64)
        for ids in doc:
            buf = np.concatenate([buf, ids])
            while buf.size >= seq_len and left > 0:
                n = int(min(seq_len, left))
                yield buf[:n]
                buf, left = buf[seq_len:], left - n
            if left <= 0:
                return
        if buf.size and left > 0:
            n = int(min(buf.size, left))
            yield buf[:n]
            left -= n
        if left <= 0:
            return


def _batches(seqs, batch_size):
    """Group consecutive sequences of equal length into (b, L) batches of at most
    batch_size rows (a shorter tail sequence runs on its own)."""
    group = []
    for s in seqs:
        if group and (len(group) == batch_size or s.size != group[0].size):
            yield np.stack(group)
            group = []
        group.append(s)
    if group:
        yield np.stack(group)


def collect(model, texts_or_files, max_tokens=None, batch_size=8, seq_len=512, progress=True,
            keep_logits=True, **stats_kw):
    """Stream a corpus through the model and aggregate routing statistics -> Stats.

    texts_or_files: a file path, a text, or a list of them (pathlib.Path or existing path:
      read in blocks; other str: the text itself), or 1-d arrays of token ids. Each document
      is cut into sequences of seq_len tokens, each run from a fresh state; position
      statistics are positions inside these sequences.
    max_tokens: stop after this many tokens (None: the whole corpus).
    batch_size: sequences per forward pass. Memory: one batch's routing (batch_size * seq_len
      tokens) plus the fixed-size Stats.
    keep_logits: fill the Stats' reservoir of router logits (for sinkhorn_study).
    stats_kw: passed to Stats (position_edges, top_capacity, reservoir_size, seed).
    """
    if batch_size < 1 or seq_len < 1:
        raise ValueError("batch_size and seq_len must be >= 1")
    if not keep_logits:
        stats_kw["reservoir_size"] = 0
    st = Stats.for_model(model, seq_len=seq_len, **stats_kw)
    keep = st.reservoir_size > 0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=max_tokens, unit="tok", desc="routing", unit_scale=True)
    try:
        for ids in _batches(_sequences(model, texts_or_files, seq_len, max_tokens), batch_size):
            st.update(trace(model, ids, keep_logits=keep))
            if bar is not None:
                bar.update(ids.size)
    finally:
        if bar is not None:
            bar.close()
    if st.num_tokens == 0:
        raise ValueError("the corpus produced no tokens")
    return st


# ---- Sinkhorn ------------------------------------------------------------------------------

def _sinkhorn_iterate(S, init, max_iters):
    """Yield (d0, d1, d1_prev) after each Sinkhorn iteration on S (T, X), float64, exactly as
    ref.sinkhorn runs it (SPEC 3.2)."""
    T, X = S.shape
    C = np.exp(2.0 * S) if init == "blackmamba" else np.exp(S)
    d1 = 1.0 / (X * C.sum(0)) if init == "blackmamba" else np.ones(X)
    for _ in range(max_iters):
        d1_prev = d1
        d0 = (1.0 / T) / (C @ d1 + 1e-8)
        d1 = (1.0 / X) / (C.T @ d0 + 1e-8)
        yield C, d0, d1, d1_prev


def sinkhorn_curve(logits, init="blackmamba", tol=1e-4, max_iters=1000):
    """mean |d1 - d1_prev| after each Sinkhorn iteration (float64 twin of ref.sinkhorn), up
    to and including the first one <= tol: the convergence curve under the released stopping
    rule. Its length is the iteration count (ops.sinkhorn is authoritative for that count;
    this twin exists to expose the per-iteration residual)."""
    S = np.asarray(logits, dtype=np.float64)
    out = []
    for _, _, d1, d1_prev in _sinkhorn_iterate(S, init, max_iters):
        out.append(float(np.mean(np.abs(d1 - d1_prev))))
        if out[-1] <= tol:
            break
    return out


def sinkhorn_marginal_curve(logits, init="blackmamba", tol=1e-4, max_iters=1000):
    """A scale-free view of the same iteration -> (curve, expert ids (T,), stalled).

    curve: mean_t |T * sum_i P[t, i] - 1| after each iteration (the row-marginal error; the
      columns are exact right after the d1 update), up to the first value <= tol.
    Why: the released rule tests mean |d1 - d1_prev| in absolute terms, and the BlackMamba
      init scales d1 by 1/(X colsum exp(2S)) (about 1e-5 for thousands of tokens), so that
      rule stops after one iteration whatever the balance. The marginal error says how far
      P is from balanced. It can floor above 0 because of the + 1e-8 in both updates (small
      against C @ d1 at the BlackMamba scale); stalled=True when it stops falling (less
      than 1% per iteration) before reaching tol. The expert ids are argmax P at the stop.
    """
    S = np.asarray(logits, dtype=np.float64)
    T = S.shape[0]
    curve, stalled = [], False
    for C, d0, d1, _ in _sinkhorn_iterate(S, init, max_iters):
        curve.append(float(np.mean(np.abs(T * d0 * (C @ d1) - 1.0))))
        if curve[-1] <= tol:
            break
        if len(curve) > 1 and curve[-1] > 0.99 * curve[-2]:
            stalled = True
            break
    return curve, np.argmax(d0[:, None] * C * d1[None, :], 1), stalled


class SinkhornStudy:
    """What Sinkhorn balancing does to each layer's routing, per initialisation.

    results[layer][init] = {
      iterations        ops.sinkhorn's count under the released rule mean|d1 - d1_prev| <= tol
      curve             mean |d1 - d1_prev| per iteration (float64 twin)
      counts_before/after (X,), before/after {entropy, cv, max_over_mean, min_over_mean}:
                        argmax of the logits vs argmax of ops.sinkhorn's P
      rerouted          fraction of tokens whose expert differs between the two
      marginal_curve, iterations_marginal, marginal_stalled, counts_converged, converged,
      rerouted_converged:
                        the same iteration run until the row-marginal error of P is <= tol
                        (see sinkhorn_marginal_curve): what full balancing would do}
    """

    def __init__(self, results, num_tokens, tol, inits):
        self.results, self.num_tokens, self.tol, self.inits = results, num_tokens, tol, inits

    @property
    def layers(self):
        return list(self.results)

    def summary(self):
        rows = []
        for l, per in self.results.items():
            for init, r in per.items():
                rows.append({"layer": l, "init": init, "tokens": self.num_tokens[l],
                             "iterations": r["iterations"],
                             "cv_before": r["before"]["cv"], "cv_after": r["after"]["cv"],
                             "max_over_mean_before": r["before"]["max_over_mean"],
                             "max_over_mean_after": r["after"]["max_over_mean"],
                             "rerouted": r["rerouted"],
                             "iterations_marginal": r["iterations_marginal"],
                             "stalled": "yes" if r["marginal_stalled"] else "",
                             "cv_converged": r["converged"]["cv"]})
        return Table(rows, ["layer", "init", "tokens", "iterations", "cv_before", "cv_after",
                            "max_over_mean_before", "max_over_mean_after", "rerouted",
                            "iterations_marginal", "stalled", "cv_converged"],
                     title=f"Sinkhorn (tol {self.tol:g})")

    def to_dict(self):
        return {"format": "blackmamba.routing.SinkhornStudy", "tol": self.tol,
                "inits": list(self.inits),
                "layers": [{"layer": l, "tokens": self.num_tokens[l],
                            **{init: _nan_none_dict(r) for init, r in per.items()}}
                           for l, per in self.results.items()]}

    def to_json(self, path):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f)
        return path

    def plot(self, path=None, **kw):
        """Convergence (mean |d1 - d1_prev| per iteration, log axis) for every layer and init,
        iterations per layer, and max/mean load before and after. Returns the Figure."""
        from .routing_plots import plot_sinkhorn
        return plot_sinkhorn(self, path, **kw)

    def __repr__(self):
        return f"<blackmamba.routing.SinkhornStudy layers={self.layers} inits={self.inits}>"


def _nan_none_dict(r):
    out = {}
    for k, v in r.items():
        if isinstance(v, dict):
            out[k] = _nan_none_dict(v)
        elif isinstance(v, np.ndarray):
            out[k] = v.tolist()
        else:
            out[k] = _nan_none(v)
    return out


def _logits_by_layer(source):
    if isinstance(source, Stats):
        if source.reservoir_filled == 0:
            raise ValueError("these Stats hold no router logits (collect with keep_logits=True "
                             "and reservoir_size > 0)")
        return {l: source.router_logits(l) for l in source.layers}
    if isinstance(source, Trace):
        if not source.router_logits:
            raise ValueError("this Trace has no router logits: trace with keep_logits=True")
        return dict(source.router_logits)
    if isinstance(source, dict):
        return {int(k): v for k, v in source.items()}
    return {0: source}               # one (T, X) array: reported as layer 0


def sinkhorn_study(source, inits=("blackmamba", "uniform"), tol=1e-4, max_iters=1000):
    """Run Sinkhorn (ops.sinkhorn, the C kernel) on router logits, per layer and init.

    source: Stats (its reservoir sample), a Trace with router logits, {layer: (T, X)}, or
      one (T, X) array (reported as layer 0). inits: "blackmamba" (C = exp(2S),
      d1 = 1/(X colsum C): the released code) and/or "uniform" (vanilla Megatron).
    """
    for init in inits:
        if init not in ("blackmamba", "uniform"):
            raise ValueError(f"init must be 'blackmamba' or 'uniform', got {init!r}")
    results, ntok = {}, {}
    for l, S in _logits_by_layer(source).items():
        S = np.ascontiguousarray(S, dtype=np.float32)
        if S.ndim != 2 or S.shape[0] == 0 or S.shape[1] < 2:
            raise ValueError(f"layer {l}: router logits must be (T >= 1, X >= 2), got {S.shape}")
        X = S.shape[1]
        before = np.argmax(S, 1)
        cb = np.bincount(before, minlength=X)
        per = {}
        for init in inits:
            P, iters = ops.sinkhorn(S, tol=tol, init=init, max_iters=max_iters)
            after = np.argmax(P, 1)
            ca = np.bincount(after, minlength=X)
            marg, conv, stalled = sinkhorn_marginal_curve(S, init, tol, max_iters)
            cc = np.bincount(conv, minlength=X)
            per[init] = {"iterations": int(iters),
                         "curve": sinkhorn_curve(S, init, tol, max_iters),
                         "counts_before": cb, "counts_after": ca,
                         "before": balance(cb), "after": balance(ca),
                         "rerouted": float(np.mean(before != after)),
                         "marginal_curve": marg, "iterations_marginal": len(marg),
                         "marginal_stalled": stalled,
                         "counts_converged": cc, "converged": balance(cc),
                         "rerouted_converged": float(np.mean(before != conv))}
        results[l], ntok[l] = per, int(S.shape[0])
    return SinkhornStudy(results, ntok, tol, tuple(inits))


# ---- command line --------------------------------------------------------------------------

def add_cli(subparsers):
    """Register `blackmamba routing` on the CLI's subparsers."""
    from .cli import _add_model
    p = subparsers.add_parser(
        "routing", help="expert routing statistics, load balance, Sinkhorn study, figures",
        description="Run a corpus through the model, record where the router sends every "
                    "token, and write JSON/CSV statistics and PNG figures to --out.")
    _add_model(p, required=False)
    p.add_argument("--text", "-t", nargs="+", default=None,
                   help="text file(s) to run (default: the held-out Tiny Shakespeare text "
                        "shipped with the default model)")
    p.add_argument("--out", "-o", default="blackmamba-routing",
                   help="output folder (default ./blackmamba-routing)")
    p.add_argument("--max-tokens", "-n", type=int, default=50_000,
                   help="stop after this many tokens (default 50000; 0 = the whole corpus)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--reservoir", type=int, default=4096,
                   help="router-logit rows sampled per layer for the Sinkhorn study")
    p.add_argument("--top-k", type=int, default=20, help="top tokens per expert in the JSON")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(fn=_cmd_routing)
    return p


def _cmd_routing(args):
    from .cli import _load
    if args.text is None:
        from .hub import embedded_heldout_text
        args.text = [str(embedded_heldout_text())]
    for t in args.text:
        if not os.path.isfile(t):
            raise FileNotFoundError(f"--text {t}: no such file")
    model = _load(args)
    if model.tokenizer is None:
        raise SystemExit("error: the model has no tokenizer (pass --tokenizer)")
    os.makedirs(args.out, exist_ok=True)
    import pathlib
    st = collect(model, [pathlib.Path(t) for t in args.text],
                 max_tokens=args.max_tokens or None, batch_size=args.batch_size,
                 seq_len=args.seq_len, progress=not args.quiet,
                 reservoir_size=args.reservoir)
    study = sinkhorn_study(st) if st.reservoir_size else None
    out = args.out
    written = [st.to_json(os.path.join(out, "routing_stats.json"), top_k=args.top_k)]
    for table in ("experts", "layers", "positions", "agreement"):
        written.append(st.to_csv(os.path.join(out, f"routing_{table}.csv"), table))
    if study is not None:
        written.append(study.to_json(os.path.join(out, "sinkhorn.json")))
    if not args.no_plots:
        figs = [("expert_distribution.png", st.plot_expert_distribution),
                ("load_balance.png", lambda p: st.plot_load_balance(p, study=study)),
                ("positions.png", st.plot_positions)]
        if st.agreement:
            figs.append(("agreement.png", st.plot_agreement))
        if study is not None:
            figs.append(("sinkhorn_convergence.png", study.plot))
        for name, fn in figs:
            fn(os.path.join(out, name))
            written.append(os.path.join(out, name))
    _print_table(st, study)
    print(f"\nwrote {len(written)} files to {out}: "
          + ", ".join(os.path.basename(w) for w in written))
    return 0


def _print_table(st, study):
    iters = {}
    if study is not None:
        for l, per in study.results.items():
            iters[l] = "/".join(str(per[i]["iterations"]) for i in study.inits)
    rows = []
    for r in st.summary():
        row = {k: r.get(k) for k in ("layer", "experts", "entropy", "cv", "max_over_mean",
                                     "same_index_next", "nmi_next")}
        if iters:
            row["sinkhorn_iters"] = iters[r["layer"]]
        rows.append(row)
    cols = ["layer", "experts", "entropy", "cv", "max_over_mean", "same_index_next",
            "nmi_next"] + (["sinkhorn_iters"] if iters else [])
    title = st.summary().title
    if study is not None:
        title += f"; sinkhorn_iters = {'/'.join(study.inits)} init"
    print(Table(rows, cols, title=title))
