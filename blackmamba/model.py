"""The BlackMamba model on the CPU: weights, recurrent state, forward / prefill / step.

SPEC section 1 is the whole model; each method below names the SPEC lines it implements.
Every number-crunching step is a blackmamba.ops kernel (C core); this file only wires them.
Letters: B batch, L length, T = B*L tokens, d hidden, E d_inner, N state, K conv width,
R dt rank, X experts, F ffn hidden, V vocab.
"""

import numpy as np

from . import ops
from .checkpoint import release_pages
from .config import Config, has_mamba, num_experts

DTYPES = ("float32", "bfloat16")
PREFILL_CHUNK = 2048        # tokens per prefill chunk: memory independent of prompt length
# Python sees Ctrl-C only between C calls (the kernels run with the GIL released), so the
# longest single call bounds how late a KeyboardInterrupt arrives. Measured on 2 cores at
# the 2.8B shape (benchmarks/bench_op_latency.py): a 2048-token chunk spends 0.17-0.25 s in
# in_proj, ~0.1 s per expert (0.4 s if one expert got every token), and 1.6 s in one
# vocabulary projection of logits="all". Shorter calls cost throughput, since every call
# re-packs its weight matrix (500-token chunks: +30% CPU time; 1000: +10%), so a call may
# do up to OP_BUDGET multiply-adds: one prompt keeps 2048-token chunks, a batch shares
# ~4000 tokens a chunk, and the vocabulary projection runs in calls of ~930 tokens (~0.8 s).
OP_BUDGET = 1 << 36


class WeightError(ValueError):
    """A checkpoint whose tensors do not fit its config: names the tensor."""


# ---- weights ------------------------------------------------------------------------------

def _expected_shapes(cfg):
    """name -> shape of every tensor the config needs (SPEC 5 key names)."""
    d, E, N, K, R, F = (cfg.hidden_size, cfg.d_inner, cfg.state_size, cfg.conv_dimension,
                        cfg.dt_rank, cfg.ffn_hidden_size)
    shapes = {"embedding.word_embeddings.weight": (cfg.vocab_size, d),
              "decoder.final_layernorm.weight": (d,), "decoder.final_layernorm.bias": (d,)}
    for i, kind in enumerate(cfg.layer_kinds):
        p = f"decoder.layers.{i}."
        shapes[p + "norm.weight"] = (d,)
        parallel = len(kind) == 2
        if has_mamba(kind):
            m = p + "mixer."
            shapes.update({m + "in_proj.weight": (2 * E, d), m + "conv1d.weight": (E, 1, K),
                           m + "x_proj.weight": (R + 2 * N, E), m + "dt_proj.weight": (E, R),
                           m + "dt_proj.bias": (E,), m + "A_log": (E, N), m + "D": (E,),
                           m + "out_proj.weight": (d, E)})
            if cfg.conv_bias:
                shapes[m + "conv1d.bias"] = (E,)
            if cfg.bias:
                shapes[m + "in_proj.bias"] = (2 * E,)
                shapes[m + "out_proj.bias"] = (d,)
        X = num_experts(kind)
        if X:
            m = p + ("moe." if parallel else "mixer.")
            if parallel:
                shapes[p + "norm_moe.weight"] = (d,)
            G = 2 * F if cfg.swiglu else F
            if X == 1:
                shapes[m + "linear_fc1.weight"] = (G, d)
                shapes[m + "linear_fc2.weight"] = (d, F)
            else:
                shapes[m + "router.weight"] = (X, d)
                shapes[m + "router.bias"] = (X,)
                for e in range(X):
                    shapes[f"{m}local_experts.{e}.linear_fc1.weight"] = (G, d)
                    shapes[f"{m}local_experts.{e}.linear_fc2.weight"] = (d, F)
    return shapes


def check_weights(cfg, tensors):
    """Raise WeightError naming any missing, unexpected or mis-shaped tensor."""
    want = _expected_shapes(cfg)
    missing = [k for k in want if k not in tensors]
    if missing:
        raise WeightError(f"checkpoint lacks {len(missing)} tensor(s) the config needs, e.g. "
                          f"{missing[:5]}")
    extra = [k for k in tensors if k not in want]
    if extra:
        raise WeightError(f"checkpoint has {len(extra)} tensor(s) this config does not use, "
                          f"e.g. {extra[:5]} (does config.json match the weights?)")
    for k, shape in want.items():
        got = tuple(tensors[k].shape)
        if got != shape:
            raise WeightError(f"tensor {k} has shape {got}, the config needs {shape}")


def _f32(t):
    """float32 contiguous copy-or-view of a stored tensor or array. A stored tensor is copied
    out of the mapped file, whose pages then leave the resident set (release_pages)."""
    if isinstance(t, np.ndarray):
        return np.ascontiguousarray(t, dtype=np.float32)
    out = np.ascontiguousarray(t.to_numpy("float32"))
    release_pages(t)
    return out


def _matrix(t, dtype):
    """A weight matrix for ops.linear: float32, or bf16 bits (uint16) used in place."""
    if dtype == "float32":
        return _f32(t)
    if not isinstance(t, np.ndarray) and t.dtype == "bfloat16":
        return np.ascontiguousarray(t.array)          # a view of the mapped file
    return ops.f32_to_bf16(_f32(t))


class _Mamba:
    __slots__ = ("in_w", "in_b", "conv_w", "conv_b", "x_w", "dt_w", "dt_b", "A", "D", "out_w",
                 "out_b")

    def __init__(self, t, m, dtype):
        self.in_w = _matrix(t[m + "in_proj.weight"], dtype)          # (2E, d)
        self.in_b = _f32(t[m + "in_proj.bias"]) if m + "in_proj.bias" in t else None
        w = _f32(t[m + "conv1d.weight"])
        self.conv_w = np.ascontiguousarray(w.reshape(w.shape[0], w.shape[-1]))  # (E, K)
        self.conv_b = _f32(t[m + "conv1d.bias"]) if m + "conv1d.bias" in t else None
        self.x_w = _matrix(t[m + "x_proj.weight"], dtype)            # (R + 2N, E)
        self.dt_w = _matrix(t[m + "dt_proj.weight"], dtype)          # (E, R)
        self.dt_b = _f32(t[m + "dt_proj.bias"])                      # (E)
        self.A = np.ascontiguousarray(-np.exp(_f32(t[m + "A_log"])))   # (E, N), float32
        self.D = _f32(t[m + "D"])                                    # (E)
        self.out_w = _matrix(t[m + "out_proj.weight"], dtype)        # (d, E)
        self.out_b = _f32(t[m + "out_proj.bias"]) if m + "out_proj.bias" in t else None


class _MLP:
    """A dense gated MLP ("1") or a top-1 MoE ("2".."9"); experts kept as separate matrices
    so bf16 weights stay views of the checkpoint file (no stacked copy)."""
    __slots__ = ("X", "router_w", "router_b", "fc1", "fc2")

    def __init__(self, t, m, X, dtype):
        self.X = X
        if X == 1:
            self.router_w = self.router_b = None
            self.fc1 = [_matrix(t[m + "linear_fc1.weight"], dtype)]   # (2F, d)
            self.fc2 = [_matrix(t[m + "linear_fc2.weight"], dtype)]   # (d, F)
        else:
            self.router_w = _f32(t[m + "router.weight"])             # (X, d)
            self.router_b = _f32(t[m + "router.bias"])               # (X)
            self.fc1 = [_matrix(t[f"{m}local_experts.{e}.linear_fc1.weight"], dtype)
                        for e in range(X)]
            self.fc2 = [_matrix(t[f"{m}local_experts.{e}.linear_fc2.weight"], dtype)
                        for e in range(X)]


class _Layer:
    __slots__ = ("kind", "norm_w", "norm_moe_w", "mamba", "mlp")

    def __init__(self, cfg, t, i, kind, dtype):
        p = f"decoder.layers.{i}."
        self.kind = kind
        self.norm_w = _f32(t[p + "norm.weight"])
        parallel = len(kind) == 2
        self.norm_moe_w = _f32(t[p + "norm_moe.weight"]) if parallel else None
        self.mamba = _Mamba(t, p + "mixer.", dtype) if has_mamba(kind) else None
        X = num_experts(kind)
        self.mlp = _MLP(t, p + ("moe." if parallel else "mixer."), X, dtype) if X else None


# ---- recurrent state ----------------------------------------------------------------------

_INTERRUPTED = ("an update of this state was interrupted (KeyboardInterrupt or an error "
                "inside prefill/step), so some layers hold the new tokens and some do not")


class State:
    """Recurrent state of a batch: per Mamba layer the conv window (B, K-1, E) and the SSM
    state (B, E, N), both float32 (SPEC 2). Reusable: copy() a prefilled prompt to cache it.

    A State is updated in place, one call at a time: a second prefill/step on it while one
    runs (another thread, or a callback inside the first) raises RuntimeError instead of
    racing. A call that does not complete (Ctrl-C, an error) leaves the layers out of step
    with each other: the State is then marked invalid (`state.invalid`) and every later use
    raises RuntimeError until reset(); restoring a copy() taken before is the way to resume.
    """

    def __init__(self, cfg, batch_size):
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        B, E, N, K = int(batch_size), cfg.d_inner, cfg.state_size, cfg.conv_dimension
        self.batch_size = B
        self.conv = [np.zeros((B, K - 1, E), np.float32) if has_mamba(k) else None
                     for k in cfg.layer_kinds]
        self.ssm = [np.zeros((B, E, N), np.float32) if has_mamba(k) else None
                    for k in cfg.layer_kinds]
        self.seqlen = 0                  # tokens consumed so far (same for every row)
        self._users = {}                 # calls inside prefill/step now (see _Using)
        self._invalid = None             # why the contents cannot be used, or None

    @property
    def invalid(self):
        """True after an interrupted update (see the class doc); reset() clears it."""
        return self._invalid is not None

    def _check_idle(self, what):
        if self._users:
            raise RuntimeError(f"cannot {what} a state while a prefill/step is using it")
        if self._invalid is not None:
            raise RuntimeError(f"cannot {what} this state: {self._invalid}; reset() it or "
                               "use a copy taken before")

    def reset(self):
        """Back to the empty state (zeros, seqlen 0), valid again."""
        if self._users:
            raise RuntimeError("cannot reset a state while a prefill/step is using it")
        for a in self.conv + self.ssm:
            if a is not None:
                a[...] = 0
        self.seqlen, self._invalid = 0, None

    def copy(self):
        self._check_idle("copy")
        new = State.__new__(State)
        new.batch_size, new.seqlen, new._users, new._invalid = (self.batch_size, self.seqlen,
                                                                {}, None)
        new.conv = [None if c is None else c.copy() for c in self.conv]
        new.ssm = [None if s is None else s.copy() for s in self.ssm]
        return new

    def select(self, rows):
        """A new State holding the given batch rows (e.g. [2] or [0, 0, 1])."""
        self._check_idle("select rows of")
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size == 0 or rows.min() < 0 or rows.max() >= self.batch_size:
            raise IndexError(f"rows {rows.tolist()} outside a batch of {self.batch_size}")
        new = self.copy()
        new.batch_size = int(rows.size)
        new.conv = [None if c is None else np.ascontiguousarray(c[rows]) for c in self.conv]
        new.ssm = [None if s is None else np.ascontiguousarray(s[rows]) for s in self.ssm]
        return new

    def set_row(self, i, other, j=0):
        """Copy row j of State `other` into row i of this one."""
        self._check_idle("set a row of")
        other._check_idle("copy a row of")
        for mine, theirs in ((self.conv, other.conv), (self.ssm, other.ssm)):
            for a, b in zip(mine, theirs):
                if a is not None:
                    a[i] = b[j]

    def save(self, path):
        self._check_idle("save")
        arrays = {f"conv{i}": c for i, c in enumerate(self.conv) if c is not None}
        arrays.update({f"ssm{i}": s for i, s in enumerate(self.ssm) if s is not None})
        np.savez(path, seqlen=np.int64(self.seqlen), num_layers=np.int64(len(self.conv)),
                 **arrays)

    @classmethod
    def load(cls, path, cfg):
        """Load a State saved by save() for a model with config `cfg` (shapes checked)."""
        with np.load(path, allow_pickle=False) as f:
            if int(f["num_layers"]) != cfg.num_layers:
                raise ValueError(f"{path}: state of a {int(f['num_layers'])}-layer model, "
                                 f"this model has {cfg.num_layers}")
            first = next(i for i, k in enumerate(cfg.layer_kinds) if has_mamba(k))
            st = cls(cfg, f[f"ssm{first}"].shape[0])
            for i in range(cfg.num_layers):
                for name, lst in (("conv", st.conv), ("ssm", st.ssm)):
                    if lst[i] is not None:
                        a = f[f"{name}{i}"]
                        if a.shape != lst[i].shape or a.dtype != np.float32:
                            raise ValueError(f"{path}: {name}{i} has shape {a.shape} "
                                             f"{a.dtype}, expected {lst[i].shape} float32")
                        lst[i][...] = a
            st.seqlen = int(f["seqlen"])
        return st


def _enter(state, me):
    """Claim `state` for one prefill/step call `me` (any unique object); the caller's finally
    releases it with state._users.pop(me, None). Registering is one dict store, with no point
    between it and the caller's try where Python would run a signal handler, and release is
    one idempotent pop: a Ctrl-C anywhere cannot leave the state claimed for ever, as a
    Lock acquired just before the interrupt would be. Two calls that overlap both register,
    so at least the later one sees the other and raises."""
    state._users[me] = True
    if len(state._users) > 1:
        raise RuntimeError("state is in use by another call (another thread, or a callback "
                           "inside this one): give each thread its own State "
                           "(model.new_state(), or state.copy())")
    if state._invalid is not None:
        raise RuntimeError(f"state is invalid: {state._invalid}. reset() it, or continue "
                           "from a copy() taken before")
    state._invalid = _INTERRUPTED      # until the update completes


# ---- the model ----------------------------------------------------------------------------

class TokenModel:
    """What the CPU and the CUDA model share: vocabulary sizes and token-id checks
    (subclasses set self.config and self.tokenizer)."""

    @property
    def vocab_size(self):
        return self.config.vocab_size

    @property
    def real_vocab_size(self):
        """Ids >= this are embedding padding rows: never sampled."""
        n = self.config.real_vocab_size
        if self.tokenizer is not None:
            n = min(n, self.tokenizer.vocab_size)
        return n

    def _check_ids(self, ids, ndim, what):
        """Integer ids of `ndim` dimensions inside the vocabulary -> C-contiguous int64."""
        a = np.asarray(ids)
        if a.dtype.kind not in "iu":
            if a.size == 0 and a.dtype.kind == "f":
                a = a.astype(np.int64)
            else:
                raise TypeError(f"{what} must be integer token ids, got dtype {a.dtype}")
        if a.ndim != ndim:
            raise ValueError(f"{what} must have {ndim} dimension(s) "
                             f"({'(B, L)' if ndim == 2 else '(B,)'}), got shape {a.shape}")
        if a.size and (a.min() < 0 or a.max() >= self.vocab_size):
            bad = a[(a < 0) | (a >= self.vocab_size)].reshape(-1)[0]
            raise ValueError(f"{what}: token id {int(bad)} is outside [0, {self.vocab_size})")
        return np.ascontiguousarray(a, dtype=np.int64)

    def _check_prefill(self, ids, state, logits, chunk_size):
        """prefill's arguments checked -> (ids as C-contiguous int64 (B, L), chunk_size as
        int); the state check is the subclass's (_check_state)."""
        ids = self._check_ids(ids, 2, "ids")
        self._check_state(state, ids.shape[0])
        if ids.shape[1] == 0:
            raise ValueError("ids has no tokens (L = 0): prompts need at least one token")
        if logits not in ("all", "last", None):
            raise ValueError(f"logits must be 'all', 'last' or None, got {logits!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) \
                or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        return ids, int(chunk_size)

    def __call__(self, ids):
        """Full forward: ids (B, L) -> logits (B, L, V) float32, from a fresh state."""
        ids = self._check_ids(ids, 2, "ids")
        return self.prefill(ids, self.new_state(ids.shape[0]))

    def forward(self, ids):
        return self(ids)


class Model(TokenModel):
    """BlackMamba on the CPU. Thread-safe for concurrent calls on separate States."""

    def __init__(self, config, tensors, dtype="float32", tokenizer=None, name=""):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if not isinstance(config, Config):
            config = Config.from_dict(dict(config))
        check_weights(config, tensors)
        self.config = config
        self.dtype = dtype
        self.device = "cpu"
        self.name = name
        self.tokenizer = tokenizer
        cfg = config
        self.emb = _matrix(tensors["embedding.word_embeddings.weight"], dtype)   # (V, d)
        self.final_w = _f32(tensors["decoder.final_layernorm.weight"])
        self.final_b = _f32(tensors["decoder.final_layernorm.bias"])
        self.layers = [_Layer(cfg, tensors, i, k, dtype) for i, k in enumerate(cfg.layer_kinds)]
        self.act = cfg.activation
        self._tracer = None              # set by blackmamba.routing while tracing

    def new_state(self, batch_size=1):
        return State(self.config, batch_size)

    # -- pieces -------------------------------------------------------------------------
    def _embed(self, ids):
        rows = self.emb[ids]                                          # (..., d)
        return ops.bf16_to_f32(rows) if rows.dtype == np.uint16 else rows.astype(np.float32)

    def _mamba(self, m, x, conv, ssm, li):
        """SPEC 2 for x (B, L, d) from state (conv, ssm), both updated in place."""
        E, R, N = self.config.d_inner, self.config.dt_rank, self.config.state_size
        xz = ops.linear(x, m.in_w, m.in_b)                            # (B, L, 2E)
        xi, z = xz[..., :E], xz[..., E:]
        xc, conv[...] = ops.causal_conv1d(xi, m.conv_w, m.conv_b, conv, "silu")
        dbc = ops.linear(xc, m.x_w)                                   # (B, L, R + 2N)
        dt = ops.linear(dbc[..., :R], m.dt_w)                         # (B, L, E), bias in scan
        y, ssm[...] = ops.selective_scan(xc, dt, m.A, dbc[..., R:R + N], dbc[..., R + N:],
                                         m.D, z, m.dt_b, True, ssm)
        return ops.linear(y, m.out_w, m.out_b)                        # (B, L, d)

    def _mamba_step(self, m, x, conv, ssm):
        """The same for one token x (B, d) through the recurrent kernels."""
        E, R, N = self.config.d_inner, self.config.dt_rank, self.config.state_size
        xz = ops.linear(x, m.in_w, m.in_b)                            # (B, 2E)
        xc = ops.causal_conv1d_update(xz[:, :E], conv, m.conv_w, m.conv_b, "silu")
        dbc = ops.linear(xc, m.x_w)                                   # (B, R + 2N)
        dt = ops.linear(dbc[:, :R], m.dt_w)                           # (B, E)
        y = ops.selective_state_update(ssm, xc, dt, m.A, dbc[:, R:R + N], dbc[:, R + N:], m.D,
                                       xz[:, E:], m.dt_b, True)
        return ops.linear(y, m.out_w, m.out_b)                        # (B, d)

    def _mlp(self, mlp, x, li):
        """SPEC 3 for x (..., d): dense gated MLP, or top-1 routing + experts."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])                                 # (T, d)
        if mlp.X == 1:
            return ops.mlp(x2, mlp.fc1[0], mlp.fc2[0], self.act,
                           self.config.swiglu).reshape(shape)
        ids, gates, logits = ops.route_top1(x2, mlp.router_w, mlp.router_b, return_logits=True)
        if self._tracer is not None:
            self._tracer(li, ids, gates, logits)
        counts, offsets, perm = ops.moe_dispatch(ids, mlp.X)
        out = np.empty_like(x2)
        for e in np.nonzero(counts)[0]:
            rows = perm[offsets[e]:offsets[e + 1]]
            y = ops.mlp(x2[rows], mlp.fc1[e], mlp.fc2[e], self.act, self.config.swiglu)
            out[rows] = y * gates[rows, None]
        return out.reshape(shape)

    def _layers(self, h, state, step):
        """SPEC 1's layer loop over h (B, L, d) or (B, d); returns LayerNorm_final(h + r)."""
        r = None
        for li, layer in enumerate(self.layers):
            xn, r = ops.rms_norm(h, layer.norm_w, r)
            conv, ssm = state.conv[li], state.ssm[li]
            if layer.mamba is not None:
                h = (self._mamba_step(layer.mamba, xn, conv, ssm) if step
                     else self._mamba(layer.mamba, xn, conv, ssm, li))
                if layer.mlp is not None:                             # parallel "rX"
                    xm, _ = ops.rms_norm(r, layer.norm_moe_w)
                    h = h + self._mlp(layer.mlp, xm, li)
            else:
                h = self._mlp(layer.mlp, xn, li)
        return ops.layer_norm(h, self.final_w, self.final_b, r)

    # -- public -------------------------------------------------------------------------
    def prefill(self, ids, state, logits="all", chunk_size=PREFILL_CHUNK):
        """Run ids (B, L) from `state` (updated in place to after the last token).

        logits="all" -> (B, L, V); "last" -> (B, V) (memory independent of L);
        None -> nothing. Long inputs run in chunks of chunk_size tokens carrying the state.
        """
        ids, chunk_size = self._check_prefill(ids, state, logits, chunk_size)
        B, L = ids.shape
        out = np.empty((B, L, self.vocab_size), np.float32) if logits == "all" else None
        n = self._chunk_rows(B, chunk_size)
        me = object()
        try:
            _enter(state, me)
            for s in range(0, L, n):
                chunk = ids[:, s:s + n]
                y = self._layers(self._embed(chunk), state, step=False)  # (B, l, d)
                state.seqlen += chunk.shape[1]
                if logits == "all":
                    self._project(y, out[:, s:s + chunk.shape[1]])
                elif logits == "last" and s + n >= L:
                    out = ops.linear(np.ascontiguousarray(y[:, -1]), self.emb)
            state._invalid = None
        finally:
            state._users.pop(me, None)
        return out

    def step(self, tokens, state):
        """One recurrent step: tokens (B,) -> logits (B, V); `state` advances one token."""
        tokens = self._check_ids(tokens, 1, "tokens")
        self._check_state(state, tokens.shape[0])
        me = object()
        try:
            _enter(state, me)
            y = self._layers(self._embed(tokens), state, step=True)     # (B, d)
            state.seqlen += 1
            state._invalid = None
        finally:
            state._users.pop(me, None)
        return ops.linear(y, self.emb)

    def _chunk_rows(self, B, chunk_size):
        """Tokens per row in one prefill chunk: at most chunk_size, and few enough that the
        biggest matrix product of a chunk (in_proj, or one expert given every token) stays
        within OP_BUDGET multiply-adds whatever the batch size (the Ctrl-C latency)."""
        c = self.config
        per_token = c.hidden_size * max(2 * c.d_inner, (3 if c.swiglu else 2)
                                        * c.ffn_hidden_size)
        return max(1, min(chunk_size, OP_BUDGET // (per_token * B)))

    def _project(self, y, out):
        """out (B, l, V) = y (B, l, d) @ emb^T, in calls of at most OP_BUDGET multiply-adds."""
        step = max(1, OP_BUDGET // (self.vocab_size * self.config.hidden_size))
        for b in range(y.shape[0]):
            for j in range(0, y.shape[1], step):
                out[b, j:j + step] = ops.linear(y[b, j:j + step], self.emb)

    def _check_state(self, state, B):
        if not isinstance(state, State):
            raise TypeError(f"state must be a blackmamba State (model.new_state), got "
                            f"{type(state).__name__}")
        if state.batch_size != B:
            raise ValueError(f"state holds {state.batch_size} rows, the input has {B}")
        if len(state.conv) != len(self.layers):
            raise ValueError("state belongs to a model with a different number of layers")

    def generate(self, prompt, max_new_tokens=64, **kw):
        from .generation import generate
        return generate(self, prompt, max_new_tokens=max_new_tokens, **kw)

    # -- information --------------------------------------------------------------------
    def num_parameters(self):
        """(total, active per token), embeddings counted once (SPEC 4)."""
        return count_parameters(self.config)

    def __repr__(self):
        t, a = self.num_parameters()
        return (f"<blackmamba.Model {self.name or ''} layers={self.config.num_layers} "
                f"d={self.config.hidden_size} params={t:,} active={a:,} dtype={self.dtype} "
                f"device=cpu>")


def count_parameters(cfg):
    """(total, active) parameter counts from the config alone."""
    total = active = 0
    for name, shape in _expected_shapes(cfg).items():
        n = int(np.prod(shape))
        total += n
        # top-1 routing: a token runs one expert, so count expert 0 of each layer only
        if ".local_experts." not in name or ".local_experts.0." in name:
            active += n
    return total, active


def random_tensor(name, shape, rng, scale=0.5):
    """One random float32 weight of a realistic magnitude for the tensor `name`."""
    if name.endswith("A_log"):
        a = np.log(np.broadcast_to(np.arange(1, shape[1] + 1, dtype=np.float32), shape))
    elif name.endswith("norm.weight") or name.endswith("norm_moe.weight") \
            or name.endswith("final_layernorm.weight"):
        a = 1.0 + 0.1 * rng.standard_normal(shape)
    elif name.endswith("dt_proj.bias"):
        a = np.log(np.expm1(rng.uniform(1e-3, 1e-1, shape)))     # softplus^-1(dt)
    elif len(shape) >= 2:
        a = rng.standard_normal(shape) * (scale / np.sqrt(shape[-1]))
    else:
        a = 0.1 * rng.standard_normal(shape)
    return np.ascontiguousarray(a, dtype=np.float32)


def random_tensors(cfg, seed=0, scale=0.5):
    """Random float32 weights for `cfg` (tests, benchmarks): realistic magnitudes."""
    rng = np.random.default_rng(seed)
    return {name: random_tensor(name, shape, rng, scale)
            for name, shape in _expected_shapes(cfg).items()}
