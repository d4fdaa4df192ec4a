"""blackmamba: run and study BlackMamba (Mamba SSM + mixture-of-experts) models.

C (CPU) and CUDA (GPU) kernels behind the CPython/NumPy C API; no PyTorch at run time.
"""
__version__ = "0.1.0"

from . import ops, ref  # noqa: F401
