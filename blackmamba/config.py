"""BlackMamba configuration: `config.json` as released (SPEC 4), validated key by key."""
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import List


class ConfigError(ValueError):
    """A config.json that cannot be run; the message names the key."""


# Keys that change nothing in inference math (SPEC 4: only keys that change the math are errors).
_IGNORED_KEYS = {
    "max_sequence_length", "max_position_embeddings", "architectures", "model_type",
    "torch_dtype", "transformers_version", "use_cache", "tie_word_embeddings",
    "layernorm_epsilon", "rms_norm_eps", "initializer_range", "normalization",
    "rms_norm", "residual_in_fp32", "fused_add_norm", "use_fast_path",
    "hidden_dropout", "attention_dropout", "router_jitter_noise", "capacity_factor",
    "moe_loss_weight", "z_loss_weight", "pad_vocab_size_multiple", "routing", "sinkhorn",
}

_LIMITS = {  # key: (min, max) - anything outside cannot be a real model
    "num_layers": (1, 1024), "hidden_size": (1, 65536), "state_size": (1, 64),
    "conv_dimension": (2, 8), "vocab_size": (1, 1 << 22), "expansion_factor": (1, 64),
    "ffn_hidden_size": (1, 1 << 20), "dt_rank": (1, 65536),
}


@dataclass
class Config:
    num_layers: int
    hidden_size: int                     # d
    state_size: int                      # N
    conv_dimension: int                  # K
    vocab_size: int                      # V (embedding rows, including padding rows)
    expansion_factor: int = 2
    mamba_moe_layers: List[str] = field(default_factory=list)
    ffn_hidden_size: int = 0             # F
    bias: bool = False                   # in_proj / out_proj bias (Mamba)
    add_bias_linear: bool = False        # expert / MLP linear biases
    conv_bias: bool = True
    swiglu: bool = True                  # gated MLP (the activation stays exact GELU)
    activation: str = "gelu"             # SPEC 3: the released code's default
    dt_rank: int = 0                     # R; 0 -> ceil(d / 16)
    max_sequence_length: int = 2048      # informational only: the recurrence has no limit
    real_vocab_size: int = 0             # ids >= this are padding rows never sampled (0 = V)
    tokenizer: str = ""                  # "byte", a tokenizer.json path, or "" (GPT-NeoX-20B)

    @property
    def d_inner(self):
        return self.expansion_factor * self.hidden_size

    @property
    def layer_kinds(self):
        return list(self.mamba_moe_layers)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, raw):
        if not isinstance(raw, dict):
            raise ConfigError("config.json must hold a JSON object")
        known = {f for f in cls.__dataclass_fields__}
        for k in raw:
            if k not in known and k not in _IGNORED_KEYS:
                raise ConfigError(f"config key {k!r} is not supported (it may change the "
                                  f"model's math); remove it if it does not")
        for k in ("num_layers", "hidden_size", "state_size", "conv_dimension", "vocab_size"):
            if k not in raw:
                raise ConfigError(f"config key {k!r} is missing")
        kw = {k: raw[k] for k in known if k in raw}
        cfg = cls(**kw)
        cfg._validate()
        return cfg

    def _validate(self):
        for k in ("num_layers", "hidden_size", "state_size", "conv_dimension", "vocab_size",
                  "expansion_factor", "ffn_hidden_size", "dt_rank", "real_vocab_size",
                  "max_sequence_length"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"config key {k!r} must be an integer, got {_show(v)}")
            lo, hi = _LIMITS.get(k, (0, 1 << 40))
            if k in ("ffn_hidden_size", "dt_rank", "real_vocab_size") and v == 0:
                continue
            if not lo <= v <= hi:
                raise ConfigError(f"config key {k!r} = {_show(v)} is outside [{lo}, {hi}]")
        for k in ("bias", "add_bias_linear", "conv_bias", "swiglu"):
            if not isinstance(getattr(self, k), bool):
                raise ConfigError(f"config key {k!r} must be true or false")
        if not isinstance(self.activation, str) or \
                self.activation not in ("gelu", "gelu_tanh", "silu"):
            raise ConfigError(f"config key 'activation' must be gelu, gelu_tanh or silu, "
                              f"got {_show(self.activation)}")
        if not isinstance(self.tokenizer, str):
            raise ConfigError(f"config key 'tokenizer' must be a string, got "
                              f"{type(self.tokenizer).__name__}")
        if self.dt_rank == 0:
            self.dt_rank = math.ceil(self.hidden_size / 16)
        if self.real_vocab_size == 0 or self.real_vocab_size > self.vocab_size:
            if self.real_vocab_size > self.vocab_size:
                raise ConfigError("config key 'real_vocab_size' exceeds 'vocab_size'")
            self.real_vocab_size = self.vocab_size
        layers = self.mamba_moe_layers
        if layers is None or (isinstance(layers, list) and not layers):    # absent: all Mamba
            layers = self.mamba_moe_layers = ["r"] * self.num_layers
        if not isinstance(layers, list) or len(layers) != self.num_layers:
            shown = (f"{len(layers)} entries" if isinstance(layers, list)
                     else type(layers).__name__)
            raise ConfigError(f"config key 'mamba_moe_layers' must list num_layers = "
                              f"{self.num_layers} entries, got {shown}")
        for i, kind in enumerate(layers):
            if not isinstance(kind, str) or not _valid_kind(kind):
                raise ConfigError(f"config key 'mamba_moe_layers'[{i}] = {_show(kind)}: expected "
                                  f"'r', a digit '1'..'9', or 'r' followed by a digit")
        if any(_mlp_part(k) for k in layers) and self.ffn_hidden_size < 1:
            raise ConfigError("config key 'ffn_hidden_size' must be >= 1 for MoE/MLP layers")
        if self.num_layers * self.hidden_size * max(self.d_inner, self.ffn_hidden_size) > 1 << 40:
            raise ConfigError("config describes an absurdly large model "
                              "(num_layers x hidden_size x width > 2**40)")


def _show(v):
    """A short repr for messages (a hostile config may hold a 10**5000 or a huge list)."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 64:
        return f"an integer of {v.bit_length()} bits"
    r = repr(v) if not isinstance(v, (list, dict)) or len(v) <= 8 else \
        f"<{type(v).__name__} of {len(v)} items>"
    return r if len(r) <= 60 else r[:60] + "..."


def _valid_kind(kind):
    if kind == "r":
        return True
    if len(kind) == 1:
        return kind in "123456789"
    return len(kind) == 2 and kind[0] == "r" and kind[1] in "123456789"


def _mlp_part(kind):
    """Number of experts of a layer kind's MLP part: 0 none, 1 dense, 2..9 MoE."""
    return int(kind[-1]) if kind[-1].isdigit() else 0


def has_mamba(kind):
    return kind[0] == "r"


def num_experts(kind):
    return _mlp_part(kind)


def load_config(path):
    """Read config.json (a file or a directory holding one)."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path, "rb") as f:
            data = f.read((1 << 20) + 1)
    except OSError as exc:
        raise FileNotFoundError(f"cannot read config {path}: {exc}") from exc
    if len(data) > 1 << 20:
        raise ConfigError(f"{path}: config.json larger than 1 MiB")
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from exc
    return Config.from_dict(raw)
