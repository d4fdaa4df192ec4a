"""blackmamba: run and study BlackMamba (Mamba SSM + mixture-of-experts) models.

C (CPU) and CUDA (GPU) kernels behind the CPython/NumPy C API; no PyTorch at run time.

    import blackmamba as bm
    model = bm.load()                   # the small Shakespeare model shipped with the package
    print(model.generate("ROMEO:", max_new_tokens=200))
    model = bm.load("Zyphra/BlackMamba-2.8B", dtype="bfloat16")
    print(model.generate("The capital of France is", max_new_tokens=20))
"""
__version__ = "0.1.0"

from . import ops, ref  # noqa: F401
from .config import Config, ConfigError, load_config  # noqa: F401
from .loader import load  # noqa: F401
from .model import Model, State, WeightError  # noqa: F401
from . import routing  # noqa: F401  (imports no matplotlib: figures import it lazily)
