"""Loads blackmamba._C. OpenBLAS comes from the scipy-openblas32 wheel: its shared library is
preloaded here (RTLD_GLOBAL) so that _C, linked against it, finds it wherever pip put it."""
import ctypes
import os

_C = None
IMPORT_ERROR = None


def _preload_openblas():
    import scipy_openblas32 as ob
    lib = os.path.join(ob.get_lib_dir(), ob.get_library(fullname=True))
    ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)


try:
    _preload_openblas()
    from . import _C  # noqa: F811
except ImportError as exc:  # reported when an op is used, with the reason
    IMPORT_ERROR = exc


def C():
    """The extension module, or ImportError saying why it is missing."""
    if _C is None:
        raise ImportError(
            "blackmamba's C extension (blackmamba._C) is not available: "
            f"{IMPORT_ERROR}. Reinstall with `pip install .` and read the build log "
            "(BLACKMAMBA_STRICT_BUILD=1 makes a failed build fatal).")
    return _C
