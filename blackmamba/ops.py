"""blackmamba.ops: every kernel of the C core, usable on its own on NumPy arrays.

Shapes are token-major, float32 (weights may be bfloat16 kept as uint16). Each op has a
float64 twin in blackmamba.ref with the same signature. Non-finite inputs propagate: NaN in,
NaN out, never a crash. Wrong dtypes raise TypeError and wrong shapes ValueError, naming the
argument and the expected shape.
"""
from ._lib import C as _C_module

_NAMES = ("cpu_info", "set_num_threads", "get_num_threads", "linear", "bf16_to_f32",
          "f32_to_bf16", "selective_scan", "selective_state_update", "causal_conv1d",
          "causal_conv1d_update", "rms_norm", "layer_norm", "route_top1", "moe_dispatch",
          "moe_experts", "moe", "mlp", "sinkhorn")

__all__ = list(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        return getattr(_C_module(), name)
    raise AttributeError(f"module 'blackmamba.ops' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
