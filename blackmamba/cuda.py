"""blackmamba.cuda: the GPU backend's entry points.

    from blackmamba import cuda, ops
    if cuda.is_available():
        x = cuda.to_device(x_host)            # a DeviceArray (owns cudaMalloc'd memory)
        y = ops.linear(x, cuda.to_device(W))  # runs on the GPU, returns a DeviceArray
        y.numpy()                             # host copy
        cupy.asarray(y); torch.from_dlpack(y) # zero-copy views (CAI / DLPack)
        ids = cuda.sample(logits_dev, temperature=0.8, top_p=0.95, seed=1, step=0)

All work goes on the legacy default CUDA stream, ordered with CuPy's and PyTorch's default
streams; synchronize() waits for it.
"""
from . import _lib


def _module():
    try:
        return _lib.C()
    except ImportError:
        return None


def built_with_cuda():
    """True if the C extension was built with nvcc (the CUDA kernels are linked in)."""
    m = _module()
    return m is not None and hasattr(m, "cuda_probe")


def probe():
    """{device_count, error, driver_version, runtime_version}, or None without a CUDA build."""
    m = _module()
    return m.cuda_probe() if m is not None and hasattr(m, "cuda_probe") else None


def device_count():
    """Number of visible CUDA GPUs (0 without a CUDA build, a driver or a device)."""
    try:
        p = probe()
        return p["device_count"] if p else 0
    except Exception:  # noqa: BLE001 - never raises
        return 0


def is_available():
    """True if blackmamba was built with CUDA and a GPU is visible. Never raises."""
    return device_count() > 0


def require():
    """Raise RuntimeError saying why the GPU backend cannot run, if it cannot."""
    m = _module()
    if m is None:
        raise RuntimeError(f"blackmamba's C extension is not available: {_lib.IMPORT_ERROR}")
    if not hasattr(m, "cuda_probe"):
        raise RuntimeError(
            "blackmamba was built without CUDA (nvcc was not found when it was built, or "
            "BLACKMAMBA_CUDA=0): reinstall with the CUDA toolkit's nvcc on PATH or CUDA_HOME set")
    p = m.cuda_probe()
    if p["device_count"] < 1:
        why = p["error"] or "no devices"
        raise RuntimeError(
            f"blackmamba was built with CUDA, but no GPU is visible ({why}; driver version "
            f"{p['driver_version']}, runtime {p['runtime_version']}): check nvidia-smi and "
            "CUDA_VISIBLE_DEVICES")


def _gpu():
    require()
    return _lib.C()


def to_device(a, dtype=None):
    """A DeviceArray holding `a`: host arrays are copied; GPU arrays are wrapped, no copy."""
    return _gpu().to_device(a, dtype)


def asarray(a):
    """A DeviceArray view of a GPU array (CAI or DLPack), no copy; TypeError for host arrays."""
    return _gpu().cuda_asarray(a)


def empty(shape, dtype="float32"):
    """An uninitialised DeviceArray."""
    return _gpu().cuda_empty(shape, dtype)


def is_device_array(a):
    """True if `a` lives in CUDA memory (DeviceArray, CAI, or DLPack on a CUDA device)."""
    from .ops import is_gpu_array
    return is_gpu_array(a)


def synchronize():
    """Wait for all work on the GPU."""
    _gpu().cuda_synchronize()


def mem_info():
    """(free bytes, total bytes) of the current GPU."""
    return _gpu().cuda_mem_info()


def sample(logits, temperature=1.0, top_k=None, top_p=None, seed=0, step=0, vocab_limit=None,
           row_streams=True):
    """One token per row of GPU logits (B, V) float32, drawn on the device: a DeviceArray of
    int64 (B,). The semantics of blackmamba.generation.sample_next (ids >= vocab_limit never
    chosen; temperature 0 = greedy, ties -> lowest id; top_k keeps ties at the k-th largest;
    top_p keeps the smallest most-probable set whose mass >= top_p; NaN, or every logit -inf,
    in a row: FloatingPointError; +inf logits: uniform among them), with the uniform u of
    generation.sample_uniform(seed, step, row) (Philox4x32-10; row 0 for every row when
    row_streams is False): generation.sample_next_u(logits[r], params, u) is the float64
    twin. Reproducible: the same (seed, step) gives the same tokens. cuda/sample.cu has the
    algorithm and its accuracy."""
    from .generation import SamplingParams, _is_integer
    params = SamplingParams(temperature, top_k, top_p, seed)
    if params.seed is None:
        raise ValueError("seed must be an integer >= 0 here (the draw is reproducible)")
    if not _is_integer(step) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    return _gpu().cuda_sample(logits, params.temperature, params.top_k, params.top_p,
                              params.seed, int(step), vocab_limit, bool(row_streams))


def __getattr__(name):
    if name == "DeviceArray":
        m = _module()
        if m is None or not hasattr(m, "DeviceArray"):
            require()
        return m.DeviceArray
    raise AttributeError(f"module 'blackmamba.cuda' has no attribute {name!r}")
