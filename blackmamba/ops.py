"""blackmamba.ops: every kernel of the C core, usable on its own on NumPy or GPU arrays.

Shapes are token-major, float32 (weights may be bfloat16 kept as uint16). Each op has a
float64 twin in blackmamba.ref with the same signature. Non-finite inputs propagate: NaN in,
NaN out, never a crash. Wrong dtypes raise TypeError and wrong shapes ValueError, naming the
argument and the expected shape.

GPU arrays: when any array argument lives in CUDA memory (a blackmamba DeviceArray, or any
object with ``__cuda_array_interface__`` or ``__dlpack__`` on a CUDA device: CuPy, PyTorch,
Numba), the op runs on the GPU (``_C.cuda_<op>``) without copying its inputs and returns
DeviceArrays, with the same signature and results as on the CPU. Mixing host (NumPy) and
device arrays in one call raises TypeError. The GPU ops ``linear``, ``moe_experts``, ``moe``
and ``mlp`` also take ``math='fp32'`` (default, exact float32), ``'tf32'``, ``'bf16'`` (bf16
weights, activations rounded to bf16) or ``'bf16x2'`` (bf16 weights, activations split into
bf16 hi + lo, two GEMMs: about as exact as fp32 at twice the bf16 tensor work) for their
cuBLAS paths. The GPU ``selective_scan`` also takes u, delta and z as float16
or bfloat16 (uint16 bits; all three one dtype; A, B, C, D, delta_bias and the state float32)
and returns y in that dtype, rounded to nearest even from float32 math.
"""
from ._lib import C as _C_module

_NAMES = ("cpu_info", "set_num_threads", "get_num_threads", "linear", "bf16_to_f32",
          "f32_to_bf16", "selective_scan", "selective_state_update", "causal_conv1d",
          "causal_conv1d_update", "rms_norm", "layer_norm", "route_top1", "moe_dispatch",
          "moe_experts", "moe", "mlp", "sinkhorn")

# ops that take arrays: each has a GPU twin _C.cuda_<name> where CUDA is built
_ARRAY_OPS = frozenset(_NAMES[3:])

_KDL_CUDA, _KDL_CUDA_MANAGED = 2, 13

__all__ = list(_NAMES)


def is_gpu_array(a):
    """True if `a` lives in CUDA memory (DeviceArray, CAI, or DLPack on a CUDA device)."""
    if a is None or isinstance(a, (int, float, str, bytes, bool)):
        return False
    if hasattr(a, "__cuda_array_interface__"):
        return True
    dev = getattr(a, "__dlpack_device__", None)
    if dev is None:
        return False
    try:
        return dev()[0] in (_KDL_CUDA, _KDL_CUDA_MANAGED)
    except Exception:  # noqa: BLE001 - a host array whose __dlpack_device__ misbehaves
        return False


def _any_gpu(args, kwargs):
    for a in args:
        if is_gpu_array(a):
            return True
    for a in kwargs.values():
        if is_gpu_array(a):
            return True
    return False


def _make(name):
    C = _C_module()
    cpu = getattr(C, name)
    if name not in _ARRAY_OPS:
        return cpu
    gpu = getattr(C, "cuda_" + name, None)

    def op(*args, **kwargs):
        if not _any_gpu(args, kwargs):
            return cpu(*args, **kwargs)
        if gpu is None:
            raise RuntimeError(f"blackmamba.ops.{name}: got a GPU array, but blackmamba was "
                               "built without CUDA (nvcc was not found at build time)")
        return gpu(*args, **kwargs)

    op.__name__ = op.__qualname__ = name
    op.__module__ = __name__
    op.__doc__ = (cpu.__doc__ or "") + (
        "\n\nRuns on the GPU when an array argument is a GPU array (see blackmamba.ops)."
        if gpu is not None else "")
    return op


def __getattr__(name):
    if name in _NAMES:
        fn = _make(name)
        globals()[name] = fn       # built once; later lookups skip __getattr__
        return fn
    raise AttributeError(f"module 'blackmamba.ops' has no attribute {name!r}")


def __dir__():
    return sorted(__all__ + ["is_gpu_array"])
