"""The BlackMamba model on the GPU: CudaModel and CudaState, the same API as model.Model/State.

The whole forward pass runs in the C/CUDA engine (cuda/engine.cu, bound in csrc/module.c as
_C.cuda_model_*): weights and the recurrent state stay on the device; ids go in and logits
come out as NumPy arrays. Decoding replays one CUDA graph per batch size (captured on the
first step of a state), so a step is one launch from Python.

Precision (the `math` argument): the residual stream, activations and the state are always
float32. Matrix products of at most 8 rows (decode at batch <= 8) multiply bf16 or fp32
weights with fp32 activations (exact). Larger products (prefill, decode at batch > 8) follow
`math`: "fp32" (exact float32; bf16 weights expanded to fp32 per product), "tf32", "bf16"
(activations rounded to bf16 for the tensor cores, ~3e-3 relative per product) or "bf16x2"
(activations split into bf16 hi + lo and two bf16 GEMMs accumulated in fp32: ~1e-5 relative,
twice the tensor-core work of "bf16"). Under "bf16", prefills (MoE layers, products) of at
most `bf16_split_rows` tokens (default 128; 0: never) run as "bf16x2": bf16 noise
(~0.003 RMS per logit) flips near-ties, and at those sizes the products are bound by launches
and weight reads, not by the tensor cores (benchmarks/RESULTS.md, GPU precision). The
default is "fp32" for float32 weights and "bf16" for bfloat16 weights (the fast path).

dtype="float16": the matrices (embedding / LM head, the Mamba projections, the experts) are
stored on the device as IEEE half (2 bytes a weight, like bf16, with 11 significant bits
against bf16's 8), rounded to nearest even on the host; a finite weight beyond fp16's range
(one that would round to inf: |w| >= 65520, the largest half being 65504) raises ValueError
naming the tensor. Norms, biases, conv, A, D and the router stay float32 as with every dtype.
Products multiply the half weights with fp32 activations and accumulate in fp32 (the GEMVs
read them as stored; larger products expand them to fp32 exactly): the fp32 model's math on
the rounded weights, so no activation is ever rounded to fp16 or can overflow its range.
math is "fp32" (default) or "tf32" (larger products on the tensor cores in tf32); "bf16" and
"bf16x2" need bfloat16 weights and raise ValueError.
"""
import threading

import numpy as np

from . import _lib
from .config import Config, has_mamba, num_experts
from .model import (PREFILL_CHUNK, State, TokenModel, _enter, check_weights,
                    count_parameters)

DTYPES = ("float32", "bfloat16", "float16")
MATHS = ("fp32", "tf32", "bf16", "bf16x2")


def device_count():
    """Number of CUDA devices this build can use: 0 without a CUDA build, driver or GPU."""
    try:
        return _lib.C().cuda_device_count()
    except ImportError:
        return 0


def is_available():
    return device_count() > 0


def require():
    """Raise RuntimeError saying why the GPU path cannot run, or return None."""
    C = _lib.C()
    if not hasattr(C, "cuda_model_create"):
        raise RuntimeError("device='cuda' needs blackmamba built with CUDA (nvcc was not found "
                           "at install time, or BLACKMAMBA_CUDA=0): reinstall with nvcc on PATH")
    if C.cuda_device_count() < 1:
        raise RuntimeError("device='cuda': no CUDA device is visible (check nvidia-smi and "
                           "CUDA_VISIBLE_DEVICES)")


# ---- weights: NumPy host arrays for the engine --------------------------------------------

def _host(t):
    """A stored tensor -> C-contiguous float32, or uint16 holding bf16 bits (kept as is: the
    device converts). NumPy uint16 arrays are taken as bf16 bits, as everywhere in blackmamba."""
    if isinstance(t, np.ndarray):
        if t.dtype == np.uint16:
            return np.ascontiguousarray(t)
        return np.ascontiguousarray(t, dtype=np.float32)
    if getattr(t, "dtype", None) == "bfloat16":
        return np.ascontiguousarray(t.array)
    return np.ascontiguousarray(t.to_numpy("float32"))


def _f32(t):
    a = _host(t)
    if a.dtype == np.uint16:    # bf16 bits -> float32 exactly
        a = (a.astype(np.uint32) << 16).view(np.float32)
    return a


F16_MAX = 65504.0      # the largest finite IEEE half


def _f16(t, name):
    """A weight matrix as C-contiguous float16 (dtype="float16"): float32, float64 or bf16 values
    rounded to nearest even (NumPy's cast, from the stored values: float64 not via float32). A finite weight that would become +-inf (|w| >= 65520)
    raises ValueError naming the tensor; NaN / inf already in the checkpoint stay as they are
    (as with the other dtypes)."""
    if isinstance(t, np.ndarray) and t.dtype == np.float16:
        return np.ascontiguousarray(t)
    if getattr(t, "dtype", None) == "float16":      # a float16 checkpoint tensor: as stored
        return np.ascontiguousarray(t.to_numpy("float16"))
    if isinstance(t, np.ndarray) and t.dtype == np.float64:
        f = np.ascontiguousarray(t)                 # one rounding, f64 -> f16, and a value
    elif getattr(t, "dtype", None) == "float64":    # past float32's range is still named
        f = t.to_numpy("float64")
    else:
        f = _f32(t)
    with np.errstate(over="ignore"):
        h = f.astype(np.float16)
    if not np.isfinite(h).all():
        bad = np.isfinite(f) & ~np.isfinite(h)
        if bad.any():
            worst = float(np.abs(f[bad]).max())
            raise ValueError(f"{name}: weight {worst:g} is outside float16's range (|w| <= "
                             f"{F16_MAX:g}): load it with dtype='bfloat16' or 'float32'")
    return h


def _engine_weights(cfg, t, dtype="bfloat16"):
    """The engine's weight dict (csrc/module.c py_cuda_model_create) from checkpoint names.
    The matrices the engine keeps in its dtype go as float16 where dtype is "float16" (a
    checked host conversion, _f16), else as stored (float32 or bf16 bits: the device converts);
    every other tensor as float32 / bf16 bits (the engine keeps those in float32)."""
    if dtype == "float16":
        def mat(name):
            return _f16(t[name], name)
    else:
        def mat(name):
            return _host(t[name])
    w = {"emb": mat("embedding.word_embeddings.weight"),
         "final_w": _host(t["decoder.final_layernorm.weight"]),
         "final_b": _host(t["decoder.final_layernorm.bias"]), "layers": []}
    for i, kind in enumerate(cfg.layer_kinds):
        p = f"decoder.layers.{i}."
        parallel = len(kind) == 2
        lw = {"norm_w": _host(t[p + "norm.weight"])}
        if parallel:
            lw["norm_moe_w"] = _host(t[p + "norm_moe.weight"])
        if has_mamba(kind):
            m = p + "mixer."
            lw.update(in_w=mat(m + "in_proj.weight"), conv_w=_host(t[m + "conv1d.weight"]),
                      x_w=mat(m + "x_proj.weight"), dt_w=mat(m + "dt_proj.weight"),
                      dt_b=_host(t[m + "dt_proj.bias"]), D=_host(t[m + "D"]),
                      out_w=mat(m + "out_proj.weight"),
                      # A = -exp(A_log) in float32 on the host, exactly as the CPU model
                      A=np.ascontiguousarray(-np.exp(_f32(t[m + "A_log"]))))
            for k, name in (("conv_b", "conv1d.bias"), ("in_b", "in_proj.bias"),
                            ("out_b", "out_proj.bias")):
                if m + name in t:
                    lw[k] = _host(t[m + name])
        X = num_experts(kind)
        if X:
            m = p + ("moe." if parallel else "mixer.")
            if X == 1:
                lw["fc1"] = [mat(m + "linear_fc1.weight")]
                lw["fc2"] = [mat(m + "linear_fc2.weight")]
            else:
                lw["router_w"] = _host(t[m + "router.weight"])
                lw["router_b"] = _host(t[m + "router.bias"])
                lw["fc1"] = [mat(f"{m}local_experts.{e}.linear_fc1.weight") for e in range(X)]
                lw["fc2"] = [mat(f"{m}local_experts.{e}.linear_fc2.weight") for e in range(X)]
        w["layers"].append(lw)
    return w


# ---- state -----------------------------------------------------------------------------------

class CudaState:
    """Recurrent state of a batch on the GPU: per Mamba layer the conv window (B, K-1, E) and
    the SSM state (B, E, N), float32. Same methods as model.State; to_cpu() / from_cpu()
    convert. Every engine call takes the model's lock: the model has one stream, and a decode
    graph may be being captured on it.

    As model.State: updated in place, one call at a time. A second prefill/step/greedy on it
    while one runs (another thread, or a callback inside the first) raises RuntimeError
    ("in use") instead of waiting and then advancing the state twice; copy/select/set_row/
    to_cpu/save/reset refuse too. A call that does not complete (Ctrl-C between the chunks of
    a long prefill, an error) marks the state invalid (`state.invalid`): every later use
    raises RuntimeError until reset(); a copy() taken before resumes."""

    def __init__(self, model, batch_size, _handle=None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model = model
        self.batch_size = int(batch_size)
        self.seqlen = 0
        self._users = {}                 # calls inside prefill/step now (model._enter)
        self._invalid = None             # why the contents cannot be used, or None
        if _handle is None:
            with model._lock:    # the model's one stream: no capture may be in flight
                _handle = _lib.C().cuda_state_new(model._eng, self.batch_size)
        self._h = _handle

    @property
    def invalid(self):
        """True after an interrupted update (see the class doc); reset() clears it."""
        return self._invalid is not None

    # the same checks and messages as model.State
    _check_idle = State._check_idle

    def reset(self):
        """Back to the empty state (zeros, seqlen 0), valid again."""
        if self._users:
            raise RuntimeError("cannot reset a state while a prefill/step is using it")
        cfg = self.model.config
        B, E, N, K = self.batch_size, cfg.d_inner, cfg.state_size, cfg.conv_dimension
        conv, ssm = np.zeros((B, K - 1, E), np.float32), np.zeros((B, E, N), np.float32)
        C = _lib.C()
        with self.model._lock:
            for i, k in enumerate(cfg.layer_kinds):
                if has_mamba(k):
                    C.cuda_state_io(self.model._eng, self._h, i, 0, conv)
                    C.cuda_state_io(self.model._eng, self._h, i, 1, ssm)
        self.seqlen, self._invalid = 0, None

    def _wrap(self, handle, batch_size):
        new = CudaState(self.model, batch_size, _handle=handle)
        new.seqlen = self.seqlen
        return new

    def copy(self):
        self._check_idle("copy")
        with self.model._lock:
            h = _lib.C().cuda_state_copy(self.model._eng, self._h)
        return self._wrap(h, self.batch_size)

    def select(self, rows):
        """A new state holding the given batch rows (e.g. [2] or [0, 0, 1])."""
        self._check_idle("select rows of")
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size == 0 or rows.min() < 0 or rows.max() >= self.batch_size:
            raise IndexError(f"rows {rows.tolist()} outside a batch of {self.batch_size}")
        with self.model._lock:
            h = _lib.C().cuda_state_copy(self.model._eng, self._h, rows)
        return self._wrap(h, rows.size)

    def set_row(self, i, other, j=0):
        """Copy row j of `other` into row i of this state."""
        self._check_idle("set a row of")
        other._check_idle("copy a row of")
        with self.model._lock:
            _lib.C().cuda_state_set_row(self.model._eng, self._h, int(i), other._h, int(j))

    def to_cpu(self):
        """A model.State (host arrays) with the same contents."""
        self._check_idle("read")
        cfg = self.model.config
        st = State(cfg, self.batch_size)
        C = _lib.C()
        with self.model._lock:
            for i, k in enumerate(cfg.layer_kinds):
                if has_mamba(k):
                    st.conv[i][...] = C.cuda_state_io(self.model._eng, self._h, i, 0)
                    st.ssm[i][...] = C.cuda_state_io(self.model._eng, self._h, i, 1)
        st.seqlen = self.seqlen
        return st

    @classmethod
    def from_cpu(cls, model, state):
        """A CudaState holding the contents of a model.State."""
        new = cls(model, state.batch_size)
        C = _lib.C()
        with model._lock:
            for i, k in enumerate(model.config.layer_kinds):
                if has_mamba(k):
                    C.cuda_state_io(model._eng, new._h, i, 0, state.conv[i])
                    C.cuda_state_io(model._eng, new._h, i, 1, state.ssm[i])
        new.seqlen = state.seqlen
        return new

    def save(self, path):
        """The model.State file format (host copies)."""
        self._check_idle("save")
        self.to_cpu().save(path)

    @classmethod
    def load(cls, path, model):
        """Load a state saved by save() (or by model.State.save) for `model`."""
        return cls.from_cpu(model, State.load(path, model.config))


def _seed(params):
    """The device sampler's 64-bit seed: params.seed, or fresh entropy for seed=None."""
    if params.seed is not None:
        return params.seed & (2 ** 64 - 1)
    return int(np.random.SeedSequence().entropy) & (2 ** 64 - 1)


# ---- the model -------------------------------------------------------------------------------

class CudaModel(TokenModel):
    """BlackMamba on the GPU. Engine calls are serialised by a lock (one stream per model):
    calls on separate states from several threads are safe (they take turns); a state used
    by two calls at once raises RuntimeError (see CudaState)."""

    device = "cuda"

    def __init__(self, config, tensors, dtype="bfloat16", tokenizer=None, name="", math=None,
                 bf16_split_rows=None):
        require()
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES} on the GPU, got {dtype!r}")
        if math is None:
            math = "bf16" if dtype == "bfloat16" else "fp32"
        if math not in MATHS:
            raise ValueError(f"math must be one of {MATHS}, got {math!r}")
        if dtype == "float16" and math in ("bf16", "bf16x2"):
            raise ValueError(f"math={math!r} needs bfloat16 weights; float16 weights take "
                             f"math='fp32' (the default) or 'tf32'")
        if bf16_split_rows is not None and (isinstance(bf16_split_rows, bool) or
                                            not isinstance(bf16_split_rows, (int, np.integer))):
            raise TypeError(f"bf16_split_rows must be an integer, got {bf16_split_rows!r}")
        if not isinstance(config, Config):
            config = Config.from_dict(dict(config))
        check_weights(config, tensors)
        self.config = config
        self.dtype = dtype
        self.math = math
        self.name = name
        self.tokenizer = tokenizer
        self._tracer = None            # set by blackmamba.routing while tracing
        self._lock = threading.Lock()
        cfg = config
        ecfg = dict(num_layers=cfg.num_layers, d=cfg.hidden_size, E=cfg.d_inner,
                    N=cfg.state_size, K=cfg.conv_dimension, R=cfg.dt_rank,
                    F=cfg.ffn_hidden_size, V=cfg.vocab_size, real_vocab=self.real_vocab_size,
                    mamba=[int(has_mamba(k)) for k in cfg.layer_kinds],
                    experts=[num_experts(k) for k in cfg.layer_kinds],
                    conv_bias=int(cfg.conv_bias), bias=int(cfg.bias), swiglu=int(cfg.swiglu),
                    act=cfg.activation, wdtype=dtype, math=math)
        if bf16_split_rows is not None:
            ecfg["split_rows"] = max(int(bf16_split_rows), 0) or -1    # 0: never (C: -1)
        self._eng = _lib.C().cuda_model_create(ecfg, _engine_weights(cfg, tensors, dtype))

    def new_state(self, batch_size=1):
        return CudaState(self, batch_size)

    def num_parameters(self):
        """(total, active per token), embeddings counted once (SPEC 4)."""
        return count_parameters(self.config)

    def memory(self):
        """Device bytes: {'weight_bytes', 'workspace_bytes', 'graphs', 'l2_set_aside'}
        ('graphs': the decode graphs kept, one a state stepped (at most 8 a batch size,
        BLACKMAMBA_DECODE_GRAPHS), and the prefill graphs kept, one a prompt shape seen
        twice; 'l2_set_aside': the device's persisting-L2 set-aside, which model creation
        sets to 0 unless BLACKMAMBA_L2_SET_ASIDE says otherwise; -1 where it cannot be
        read)."""
        return _lib.C().cuda_model_info(self._eng)

    # -- checks -----------------------------------------------------------------------------
    def _check_state(self, state, B):
        if not isinstance(state, CudaState):
            raise TypeError(f"state must be a CudaState (model.new_state on the CUDA model), "
                            f"got {type(state).__name__}")
        if state.model is not self:
            raise ValueError("state belongs to another model")
        if state.batch_size != B:
            raise ValueError(f"state holds {state.batch_size} rows, the input has {B}")

    def _trace(self, trace):
        if trace is None or self._tracer is None:
            return
        for li, t in enumerate(trace):
            if t is not None:
                ids, gates, logits = t
                self._tracer(li, ids, gates, logits)

    # -- public -----------------------------------------------------------------------------
    def prefill(self, ids, state, logits="all", chunk_size=PREFILL_CHUNK):
        """Run ids (B, L) from `state` (advanced in place). logits "all" -> (B, L, V),
        "last" -> (B, V), None -> None. Inputs longer than chunk_size run in chunks."""
        ids, chunk_size = self._check_prefill(ids, state, logits, chunk_size)
        B, L = ids.shape
        C = _lib.C()
        trace = self._tracer is not None
        out = None
        # The state is claimed (not locked) for the whole call, so that a second user raises
        # instead of waiting; the model's lock is held per engine call only, and the tracer
        # runs outside it (a callback may use the model on another state).
        me = object()
        try:
            _enter(state, me)
            if L <= chunk_size:
                mode = {"all": 2, "last": 1, None: 0}[logits]
                with self._lock:
                    out, tr = C.cuda_model_prefill(self._eng, state._h, ids, mode, trace)
                state.seqlen += L
                self._trace(tr)
            else:
                if logits == "all":
                    out = np.empty((B, L, self.vocab_size), np.float32)
                for s in range(0, L, chunk_size):
                    chunk = np.ascontiguousarray(ids[:, s:s + chunk_size])
                    last = s + chunk_size >= L
                    mode = 2 if logits == "all" else (1 if logits == "last" and last else 0)
                    with self._lock:
                        got, tr = C.cuda_model_prefill(self._eng, state._h, chunk, mode, trace)
                    state.seqlen += chunk.shape[1]
                    self._trace(tr)
                    if logits == "all":
                        out[:, s:s + chunk.shape[1]] = got
                    elif mode == 1:
                        out = got
            state._invalid = None
        finally:
            state._users.pop(me, None)
        return out

    def step(self, tokens, state, graph=True):
        """One recurrent step: tokens (B,) -> logits (B, V); `state` advances one token.
        graph=False runs the kernels eagerly (the graph replay computes the same)."""
        tokens = self._check_ids(tokens, 1, "tokens")
        self._check_state(state, tokens.shape[0])
        trace = self._tracer is not None
        me = object()
        try:
            _enter(state, me)
            with self._lock:
                logits, _, tr = _lib.C().cuda_model_step(self._eng, state._h, tokens, graph,
                                                         True, False, trace)
            state.seqlen += 1
            self._trace(tr)
            state._invalid = None
        finally:
            state._users.pop(me, None)
        return logits

    def greedy(self, ids, max_new_tokens, state=None):
        """Greedy decoding entirely on the device (argmax over ids < real_vocab_size, ties ->
        lowest; no EOS stop): ids (B, L) -> (B, max_new_tokens) int64. The prompt is
        prefilled (logits of the last position only), then each step feeds the previous
        argmax through the decode graph without a round trip to the host."""
        ids = self._check_ids(ids, 2, "ids")
        B = ids.shape[0]
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if state is None:
            state = self.new_state(B)
        last = self.prefill(ids, state, logits="last")
        if max_new_tokens == 0:
            return np.zeros((B, 0), np.int64)
        first = np.argmax(last[:, :self.real_vocab_size], axis=-1).astype(np.int64)
        if max_new_tokens == 1:
            return first[:, None]
        me = object()
        try:
            _enter(state, me)
            with self._lock:
                rest = _lib.C().cuda_model_greedy(self._eng, state._h, first,
                                                  max_new_tokens - 1)
            state.seqlen += max_new_tokens - 1
            state._invalid = None
        finally:
            state._users.pop(me, None)
        return np.concatenate([first[:, None], rest], axis=1)

    def sample(self, ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=0,
               state=None):
        """Sampled decoding entirely on the device: ids (B, L) -> (B, max_new_tokens) int64.
        The prompt is prefilled (logits of the last position), then each token is drawn by
        the device sampler (cuda/sample.cu: generation.sample_probs's distribution, the
        uniform from Philox4x32-10 at (seed, step)) and fed through the decode graph without
        a round trip to the host. temperature 0 is greedy. Every row draws as if alone (all
        rows use the uniforms of (seed, step), as generate() gives each row its own
        default_rng(seed)); no EOS stop. NaN or all -inf logits: FloatingPointError."""
        from .generation import SamplingParams, _is_integer
        params = SamplingParams(temperature, top_k, top_p, seed)
        ids = self._check_ids(ids, 2, "ids")
        B = ids.shape[0]
        if not _is_integer(max_new_tokens) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if state is None:
            state = self.new_state(B)
        last = self.prefill(ids, state, logits="last")
        if max_new_tokens == 0:
            return np.zeros((B, 0), np.int64)
        return self._sample_device(state, int(max_new_tokens), params, _seed(params), 0,
                                   logits0=last)

    def _sample_device(self, state, n, params, seed, step, logits0=None, tokens=None):
        """n tokens (B, n) drawn on the device, draw k at counter step + k: the first from
        logits0 (B, V) (host; the state then advances n - 1 steps), or after feeding tokens
        (B,) (n steps). A NaN / all -inf row raises FloatingPointError after the n steps ran
        (the state stays valid, advanced)."""
        B = state.batch_size if tokens is None else len(tokens)
        self._check_state(state, B)
        if tokens is not None:
            tokens = self._check_ids(tokens, 1, "tokens")
        me = object()
        advanced = n - (logits0 is not None)
        try:
            _enter(state, me)
            try:
                with self._lock:
                    out = _lib.C().cuda_model_sample(
                        self._eng, state._h, logits0, tokens, n, params.temperature,
                        params.top_k, params.top_p, seed, step)
            except FloatingPointError:
                state.seqlen += advanced
                state._invalid = None
                raise
            state.seqlen += advanced
            state._invalid = None
        finally:
            state._users.pop(me, None)
        return out

    def generate(self, prompt, max_new_tokens=64, **kw):
        from .generation import generate
        return generate(self, prompt, max_new_tokens=max_new_tokens, **kw)

    def __repr__(self):
        t, a = self.num_parameters()
        return (f"<blackmamba.CudaModel {self.name or ''} layers={self.config.num_layers} "
                f"d={self.config.hidden_size} params={t:,} active={a:,} dtype={self.dtype} "
                f"math={self.math} device=cuda>")
