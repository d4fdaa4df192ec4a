"""BlackMamba as a model of EleutherAI's LM Evaluation Harness (lm-eval >= 0.4.10), no torch.

Importing this module registers the model class under the name "blackmamba":

    import blackmamba.lm_eval                 # registers "blackmamba" with lm-eval
    import lm_eval
    out = lm_eval.simple_evaluate(model="blackmamba",
                                  model_args="pretrained=Zyphra/BlackMamba-2.8B,dtype=bfloat16",
                                  tasks=["hellaswag", "piqa"], batch_size=16)

From the shell: `blackmamba eval --model M --tasks hellaswag,piqa` (our options), or
`blackmamba lm-eval --model blackmamba --model_args pretrained=M ...` (lm-eval's own command
line, every option of it, with this model registered). lm-eval finds only its built-in
models by itself: it has no plugin entry point for models, so plain `lm_eval --model
blackmamba` cannot work without this import. See docs/eval.md.

model_args: pretrained (folder, weights file or hub id), device ("cpu"/"cuda"), dtype
("float32"/"bfloat16"), batch_size (contexts, and continuation rows, per model call),
tokenizer (None: the checkpoint's; "byte"; a tokenizer.json path), threads, seed (sampling
in generate_until; request i uses seed + i), max_tokens (tokens per model call: bounds the
logits in memory), max_gen_toks (default 256, as HF models).

Scoring is blackmamba.scoring: contexts run once and shared by their continuations, no
context window (nothing is truncated, a document is one recurrent pass), log-softmax over
the whole vocabulary from the model's float32 logits, exact is_greedy. Requests with an
empty context are scored after the EOS id 0, like lm-eval does with HF models.
"""
# This file is blackmamba/lm_eval.py: every import of `lm_eval` below is absolute and
# resolves to the lm-eval package, never to this module.
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

import blackmamba
from blackmamba import scoring
from blackmamba.generation import EOS_ID

DEFAULT_BATCH_SIZE = 16          # 2.8B, 2 cores: 16-32 rows per call is ~30 % faster than 8
DEFAULT_MAX_GEN_TOKS = 256


def _int_arg(name, value, default):
    """lm-eval passes numbers from --model_args/--batch_size as int or str ("auto", "8")."""
    if value is None or value == "auto" or (isinstance(value, str) and value.startswith("auto")):
        return default
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if v < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return v


def _cuda_usable():
    try:
        from blackmamba import cuda
        cuda.require()
        return True
    except (ImportError, RuntimeError, OSError):
        return False


@register_model("blackmamba")
class BlackMambaLM(TemplateLM):
    """lm-eval model: loglikelihood, loglikelihood_rolling, generate_until on BlackMamba."""

    def __init__(self, pretrained=None, device="cpu", dtype=None, batch_size=None,
                 max_batch_size=None, tokenizer=None, threads=None, seed=1234,
                 max_tokens=scoring.DEFAULT_MAX_TOKENS, max_gen_toks=DEFAULT_MAX_GEN_TOKS,
                 model=None, **unused):
        super().__init__()
        if unused:
            raise ValueError(f"blackmamba: unknown model_args {sorted(unused)}; known: "
                             "pretrained, device, dtype, batch_size, tokenizer, threads, "
                             "seed, max_tokens, max_gen_toks")
        device = "cpu" if device is None else str(device)
        if device.startswith("cuda"):          # lm-eval speaks torch: "cuda:0"
            device = "cuda"
        if threads is not None:
            blackmamba.ops.set_num_threads(_int_arg("threads", threads, None))
        if model is None:
            if pretrained is None:
                raise ValueError("blackmamba: model_args needs pretrained=PATH_OR_HUB_ID")
            model = blackmamba.load(str(pretrained), device=device, dtype=dtype,
                                    tokenizer=tokenizer)
        if model.tokenizer is None:
            raise ValueError(f"blackmamba: no tokenizer for {pretrained}: "
                             f"{getattr(model, 'tokenizer_error', '')}; pass tokenizer=...")
        self.model = model
        self.tokenizer = model.tokenizer
        self.batch_size = _int_arg("batch_size", batch_size, DEFAULT_BATCH_SIZE)
        self.max_tokens = _int_arg("max_tokens", max_tokens, scoring.DEFAULT_MAX_TOKENS)
        self.max_gen_toks = _int_arg("max_gen_toks", max_gen_toks, DEFAULT_MAX_GEN_TOKS)
        self.seed = int(seed)
        self._name = str(pretrained or model.name)

    # -- construction from lm-eval's command line / simple_evaluate -----------------------
    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        from lm_eval.utils import simple_parse_args_string
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string or ""),
                                       additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        """model_args win over lm-eval's own settings (its command line always sends
        batch_size, 1 unless --batch_size is given, and device, "cuda:0" unless --device is
        given). A device that only comes from lm-eval falls back to the CPU, with a
        warning, where blackmamba's CUDA backend is not usable (as lm-eval's HF model
        does); device=... in model_args is never overridden."""
        args = dict(arg_dict or {})
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if "device" not in args and str(extra.get("device", "cpu")).startswith("cuda") \
                and not _cuda_usable():
            import logging
            logging.getLogger(__name__).warning(
                "blackmamba: device %s requested by lm-eval, but the CUDA backend is not "
                "usable here: running on the CPU (pass --device cpu to silence this)",
                extra["device"])
            extra["device"] = "cpu"
        for k, v in extra.items():
            args.setdefault(k, v)
        return cls(**args)

    # -- what lm-eval asks of a TemplateLM ------------------------------------------------
    @property
    def eot_token_id(self):
        return EOS_ID

    @property
    def prefix_token_id(self):
        return EOS_ID

    @property
    def max_length(self):
        """No context window: a recurrent state carries any length (reported for logs)."""
        return self.model.config.max_sequence_length

    @property
    def tokenizer_name(self):
        return getattr(self.tokenizer, "name", type(self.tokenizer).__name__)

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return list(self.tokenizer.encode(string))

    def tok_decode(self, tokens, **kwargs):
        return self.tokenizer.decode(list(tokens))

    # -- loglikelihood --------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm=False):
        """(context, continuation) -> (log p(continuation | context), is_greedy).

        Our own encoding step (lm-eval's varies between versions, and fails on an empty
        continuation after an empty context): an empty context becomes [EOS]; otherwise
        lm-eval's _encode_pair (trailing spaces of the context move to the continuation;
        context + continuation encoded whole, then split).
        """
        new = []
        for context, continuation in (r.args for r in requests):
            if context == "":
                ctx, cont = [EOS_ID], self.tok_encode(continuation)
            else:
                ctx, cont = self._encode_pair(context, continuation)
            new.append(((context, continuation), ctx, cont))
        return self._loglikelihood_tokens(new, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        """[((context, continuation), context_ids, continuation_ids)] -> [(float, bool)]."""
        out = scoring.loglikelihoods(self.model, [(c, t) for _, c, t in requests],
                                     batch_size=self.batch_size, max_tokens=self.max_tokens,
                                     progress=not disable_tqdm,
                                     desc="blackmamba loglikelihood")
        for (key, _, _), res in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """Log-likelihood of whole documents: after [EOS], every token, one recurrent pass
        per document (no windows: each token sees the whole document before it)."""
        texts = [r.args[0] for r in requests]
        reqs = [([EOS_ID], self.tok_encode(t)) for t in texts]
        out = scoring.loglikelihoods(self.model, reqs, batch_size=self.batch_size,
                                     max_tokens=self.max_tokens, progress=not disable_tqdm,
                                     desc="blackmamba loglikelihood_rolling")
        lls = [ll for ll, _ in out]
        for t, ll in zip(texts, lls):
            self.cache_hook.add_partial("loglikelihood_rolling", (t,), ll)
        return lls

    # -- generation -----------------------------------------------------------------------
    def _gen_settings(self, gen_kwargs):
        """lm-eval generation kwargs -> (until, max_new_tokens, temperature, top_k, top_p).

        Sampling only with do_sample=True (and temperature > 0; default 1.0), as HF models
        run under lm-eval; otherwise greedy."""
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        until = [u for u in until if u]
        n = self.max_gen_toks
        for alias in ("max_gen_toks", "max_new_tokens", "max_tokens"):
            if kw.get(alias) is not None:
                n = int(kw.pop(alias))
                break
        do_sample = kw.pop("do_sample", False)
        temperature = float(kw.pop("temperature", 1.0 if do_sample else 0.0) or 0.0)
        top_k, top_p = kw.pop("top_k", None), kw.pop("top_p", None)
        if not do_sample:
            temperature, top_k, top_p = 0.0, None, None
        return until, n, temperature, (int(top_k) if top_k else None), \
            (float(top_p) if top_p else None)

    def generate_until(self, requests, disable_tqdm=False):
        """Generate from each context until a stop string, EOS or max_gen_toks tokens.

        Greedy requests with the same settings run as one batch of prompts; sampled ones
        run one by one with seed + (request index), reproducible whatever the batching."""
        args = [r.args for r in requests]
        res = [None] * len(args)
        groups = {}
        for i, (context, gen_kwargs) in enumerate(args):
            key = self._gen_settings(gen_kwargs)
            groups.setdefault(repr(key), (key, []))[1].append(i)
        bar = tqdm(total=len(args), desc="blackmamba generate_until", disable=disable_tqdm)
        for (until, n, temperature, top_k, top_p), idx in groups.values():
            prompts = [self.tok_encode(args[i][0]) or [EOS_ID] for i in idx]
            if temperature == 0.0:
                order = sorted(range(len(idx)), key=lambda j: -len(prompts[j]))
                for b in range(0, len(order), self.batch_size):
                    part = order[b:b + self.batch_size]
                    toks = self.model.generate([prompts[j] for j in part], max_new_tokens=n,
                                               stop=until or None, return_tokens=True)
                    for j, t in zip(part, toks):
                        res[idx[j]] = self._finish(t, until)
                    bar.update(len(part))
            else:
                for j, i in enumerate(idx):
                    t = self.model.generate(prompts[j], max_new_tokens=n,
                                            temperature=temperature, top_k=top_k,
                                            top_p=top_p, seed=self.seed + i, stop=until or None,
                                            return_tokens=True)
                    res[i] = self._finish(t, until)
                    bar.update(1)
        bar.close()
        for (context, gen_kwargs), text in zip(args, res):
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return res

    def _finish(self, tokens, until):
        """Decoded text cut before the first stop string (as lm-eval cuts HF outputs)."""
        text = self.tok_decode(tokens)
        for u in until:
            text = text.split(u)[0]
        return text

    def __repr__(self):
        return f"<BlackMambaLM {self._name} batch_size={self.batch_size} {self.model!r}>"
