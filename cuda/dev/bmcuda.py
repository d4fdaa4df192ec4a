"""ctypes view of cuda/dev/libbm_cuda_dev.so (cuda/bm_cuda.h) for the dev harness.

Not part of the package: check_kernels.py and bench_kernels.py use it on the GPU machine,
with PyTorch tensors as device memory (t.data_ptr()) and torch's current stream.
"""
import ctypes
import glob
import importlib.util
import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))

# bm.h / bm_cuda.h enums
BM_F32, BM_BF16 = 0, 1
ACTS = {"gelu": 0, "gelu_tanh": 1, "silu": 2, None: 3}
SINKHORN_INIT = {"blackmamba": 0, "uniform": 1}
MATH_FP32, MATH_TF32, MATH_BF16 = 0, 1, 2
ERR_ARG, ERR_CUBLAS = 10001, 10002

P, I64, I32, F32, SZ = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_size_t

SIGNATURES = {
    "bm_cuda_cublas_create": ([P], I32),
    "bm_cuda_cublas_destroy": ([P], I32),
    "bm_cuda_bf16_to_f32": ([P, P, I64, P], I32),
    "bm_cuda_f32_to_bf16": ([P, P, I64, P], I32),
    "bm_cuda_scan_forward": ([P] * 8 + [I32, P, P, P] + [I64] * 4 + [P], I32),
    "bm_cuda_scan_forward_variant": ([P] * 8 + [I32, P, P, P] + [I64] * 4 + [I32, I32, P], I32),
    "bm_cuda_scan_step": ([P] * 9 + [I32, P] + [I64] * 3 + [P], I32),
    "bm_cuda_conv_forward": ([P] * 6 + [I32] + [I64] * 4 + [P], I32),
    "bm_cuda_conv_step": ([P] * 5 + [I32] + [I64] * 3 + [P], I32),
    "bm_cuda_rms_norm": ([P, P, P, F32, P, P, I64, I64, P], I32),
    "bm_cuda_layer_norm": ([P, P, P, P, F32, P, I64, I64, P], I32),
    "bm_cuda_gemv": ([P, P, I32, P, P, I64, I64, I64, P], I32),
    "bm_cuda_gemv_ks": ([P, P, I32, P, P, I64, I64, I64, I32, P], I32),
    "bm_cuda_route_top1": ([P, P, I32, P, P, P, P, I64, I64, I64, P], I32),
    "bm_cuda_moe_dispatch": ([P, I64, I64, P, P, P, P], I32),
    "bm_cuda_moe_experts_workspace": ([I64, I64, I64, I64, I32, I32], SZ),
    "bm_cuda_moe_experts": ([P, P, P, P, P, I32, I32, I32, P, I64, I64, I64, I64, P, SZ, P, P], I32),
    "bm_cuda_moe_decode_workspace": ([I64, I64], SZ),
    "bm_cuda_moe_experts_decode": ([P, P, P, P, P, I32, I32, P, I64, I64, I64, I64, P, SZ, P], I32),
    "bm_cuda_sinkhorn": ([P, P, I64, I64, F32, I32, I32, P, P], I32),
}


def _preload_cublas():
    """libcublas.so.13 from the pip wheels next to torch, if the loader would not find it."""
    import site
    dirs = site.getsitepackages() + [site.getusersitepackages()]
    for d in dirs:
        for pat in ("nvidia/cu13/lib/libcublasLt.so.*", "nvidia/cu13/lib/libcublas.so.*",
                    "nvidia/cublas/lib/libcublasLt.so.*", "nvidia/cublas/lib/libcublas.so.*"):
            for f in sorted(glob.glob(os.path.join(d, pat))):
                try:
                    ctypes.CDLL(f, mode=ctypes.RTLD_GLOBAL)
                except OSError:
                    pass


def load(path=None):
    import torch  # noqa: F401  pylint: disable=unused-import  (loads CUDA runtime + cuBLAS first)
    path = path or os.environ.get("BM_DEV_SO", os.path.join(HERE, "libbm_cuda_dev.so"))
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        _preload_cublas()
        lib = ctypes.CDLL(path)
    for name, (args, res) in SIGNATURES.items():
        f = getattr(lib, name)
        f.argtypes = args
        f.restype = res
    lib.bm_cuda_last_error.argtypes = []
    lib.bm_cuda_last_error.restype = ctypes.c_char_p
    return lib


def load_ref():
    """blackmamba/ref.py by path (pure NumPy; no need for the package's C extension)."""
    spec = importlib.util.spec_from_file_location("bm_ref", os.path.join(ROOT, "blackmamba", "ref.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def stream():
    import torch
    return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)


class CudaError(RuntimeError):
    pass


def call(lib, name, *args):
    rc = getattr(lib, name)(*args)
    if rc != 0:
        raise CudaError(f"{name} -> {rc}: {lib.bm_cuda_last_error().decode()}")
    return rc
