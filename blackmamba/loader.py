"""bm.load: a released checkpoint (local folder, file or hub id) -> a ready Model."""
import os

from .config import load_config
from .model import DTYPES, Model


def _weights_file(model_dir):
    for name in ("model.safetensors", "pytorch_model.bin"):
        p = os.path.join(model_dir, name)
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"{model_dir} holds neither model.safetensors nor pytorch_model.bin")


def load(path_or_id=None, device="cpu", dtype=None, tokenizer=None, progress=None):
    """Load a BlackMamba checkpoint.

    path_or_id: a folder with config.json + pytorch_model.bin (or model.safetensors), a
      weights file next to its config.json, a hub id such as "Zyphra/BlackMamba-2.8B", or
      None / "shakespeare" for the small byte-level model shipped inside the package
      (blackmamba/models/shakespeare: 4.6M parameters trained on Tiny Shakespeare).
    device: "cpu", or "cuda" (a model_cuda.CudaModel: weights and state on the GPU; needs
      the CUDA build and a visible GPU).
    dtype: "float32" (weights upcast; the default on the CPU) or "bfloat16" (weights kept at
      2 bytes; the default on the GPU); on the GPU also "float16" (IEEE half weights, 2 bytes,
      fp32 math; a weight beyond fp16's range raises ValueError naming it). Compute, state and
      residual stay float32 (on the GPU, with bf16 weights, larger matrix products round
      activations to bf16: see model_cuda).
    tokenizer: None (look next to the checkpoint, then the GPT-NeoX-20B tokenizer), "byte",
      a tokenizer.json path, or a tokenizer object; False for none.
    """
    from .checkpoint import load_tensors
    from .hub import resolve_model_dir
    from .tokenizer import load_tokenizer

    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda":
        from .model_cuda import require
        require()                    # says why not: no CUDA build, or no visible GPU
    dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
    if device == "cuda":
        from .model_cuda import DTYPES as CUDA_DTYPES
        if dtype not in CUDA_DTYPES:
            raise ValueError(f"dtype must be one of {CUDA_DTYPES} on the GPU, got {dtype!r}")
    elif dtype not in DTYPES:
        hint = " (float16 is GPU-only: device='cuda')" if dtype == "float16" else ""
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}{hint}")
    model_dir = resolve_model_dir(path_or_id)
    if os.path.isfile(model_dir):
        weights, model_dir = str(model_dir), os.path.dirname(str(model_dir))
    else:
        model_dir = str(model_dir)
        weights = _weights_file(model_dir)
    cfg = load_config(model_dir)
    if progress is None:
        progress = os.path.getsize(weights) > (1 << 30)
    tensors = load_tensors(weights, progress=progress)
    tokenizer_error = None
    if tokenizer is None:
        try:
            tokenizer = load_tokenizer(cfg.tokenizer or None, model_dir=model_dir)
        except (OSError, ValueError) as exc:   # weights still usable through token ids
            tokenizer, tokenizer_error = None, str(exc)
    elif tokenizer is False:
        tokenizer = None
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(str(tokenizer), model_dir=model_dir)
    name = os.path.basename(os.path.normpath(model_dir))
    if device == "cuda":             # weights uploaded once; the mapped file can go
        from .model_cuda import CudaModel
        model = CudaModel(cfg, tensors, dtype=dtype, tokenizer=tokenizer, name=name)
    else:
        model = Model(cfg, tensors, dtype=dtype, tokenizer=tokenizer, name=name)
        model._tensors = tensors     # keeps the mapped file alive while bf16 views use it
    model.tokenizer_error = tokenizer_error
    return model
