"""Build of blackmamba._C: the C core (always) and the CUDA part (where nvcc is found).

All flags live here.  Environment variables:

  BLACKMAMBA_STRICT_BUILD=1   a failed C/CUDA build is fatal (CI sets it); otherwise the
                              package installs without the extension and says so on import.
  BLACKMAMBA_SANITIZE=1       build the C core with AddressSanitizer + UBSan (tests/asan.sh).
  BLACKMAMBA_CUDA=0           skip the CUDA sources even where nvcc exists.
  BLACKMAMBA_CUDA_ARCHS       nvcc targets, default "90" (sm_90 SASS plus compute_90 PTX;
                              sm_90a SASS for the files in SM90A_SOURCES).
  BLACKMAMBA_NVCC_THREADS     nvcc -t value (default 4).
  BLACKMAMBA_CUDA_OBJ_CACHE   folder for the nvcc objects (default: the build folder). An
                              object is reused when its key (nvcc's version, the flags and
                              the bytes of the source and of every cuda/ and csrc/ header)
                              matches, so objects built on one machine with the same nvcc
                              can travel to another (tools/device_env.sh).
"""
import hashlib
import glob
import os
import shutil
import subprocess
import sys

import numpy as np
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
STRICT = os.environ.get("BLACKMAMBA_STRICT_BUILD", "") == "1"
SANITIZE = os.environ.get("BLACKMAMBA_SANITIZE", "") == "1"


def _blas():
    """OpenBLAS from PyPI (scipy-openblas32, the build NumPy ships); symbols are prefixed scipy_."""
    import scipy_openblas32 as ob
    return dict(include_dirs=[ob.get_include_dir()], library_dirs=[ob.get_lib_dir()],
                libraries=[ob.get_library()])


def _find_nvcc():
    if os.environ.get("BLACKMAMBA_CUDA", "1") == "0":
        return None
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
            if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
                nvcc = os.path.join(root, "bin", "nvcc")
                break
    return nvcc


# Sources with sm_90a-only instructions (wgmma): their sm_90 SASS target becomes sm_90a, and
# BM_HAVE_SM90A tells their host code that it exists. sm_90a SASS runs on compute capability
# 9.0 devices only (H100/H200); the PTX target (compute_XX of the last arch) stays plain, and
# the code there checks the device before launching an sm_90a kernel.
SM90A_SOURCES = ("grouped.cu",)


def _sm90a_flags(flags):
    plain = "-gencode=arch=compute_90,code=sm_90"
    if plain not in flags:
        return flags
    return [("-gencode=arch=compute_90a,code=sm_90a" if f == plain else f) for f in flags] + [
        "-DBM_HAVE_SM90A=1"]


class BuildExt(build_ext):
    """build_ext with a separate nvcc step: cuda/*.cu -> objects linked into _C."""

    def build_extension(self, ext):
        try:
            cu_sources = sorted(glob.glob(os.path.join(HERE, "cuda", "*.cu")))
            nvcc = _find_nvcc() if cu_sources else None
            if nvcc:
                self._add_cuda(ext, nvcc, cu_sources)
            elif cu_sources:
                print("blackmamba: nvcc not found; building the CPU-only extension", file=sys.stderr)
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - reported, then fatal or skipped
            if STRICT:
                raise
            print("\n" + "=" * 70 + f"\nblackmamba: building the C extension FAILED: {exc}\n"
                  "The package installs without it and every op will raise ImportError.\n"
                  "Set BLACKMAMBA_STRICT_BUILD=1 to make this fatal.\n" + "=" * 70,
                  file=sys.stderr)

    def _add_cuda(self, ext, nvcc, sources):
        cuda_home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        archs = os.environ.get("BLACKMAMBA_CUDA_ARCHS", "90").split(",")
        gencode = []
        for a in archs:
            a = a.strip()
            gencode += [f"-gencode=arch=compute_{a},code=sm_{a}"]
        gencode += [f"-gencode=arch=compute_{archs[-1].strip()},code=compute_{archs[-1].strip()}"]
        objdir = os.environ.get("BLACKMAMBA_CUDA_OBJ_CACHE") or os.path.join(self.build_temp, "cuda")
        os.makedirs(objdir, exist_ok=True)
        flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-lineinfo",
                 "--expt-relaxed-constexpr"] + gencode
        common = hashlib.sha256(subprocess.run([nvcc, "--version"], capture_output=True).stdout)
        common.update(" ".join(flags).encode())
        # every header: "*.h*" missed the .cuh ones (common.cuh, grouped_wgmma.cuh), so an
        # edit there kept stale objects
        for h in sorted(glob.glob(os.path.join(HERE, "cuda", "*.h")) +
                        glob.glob(os.path.join(HERE, "cuda", "*.cuh")) +
                        glob.glob(os.path.join(HERE, "csrc", "*.h"))):
            with open(h, "rb") as f:
                common.update(os.path.basename(h).encode() + f.read())
        objs = []
        for src in sources:
            obj = os.path.join(objdir, os.path.basename(src) + ".o")
            key = common.copy()
            with open(src, "rb") as f:
                key.update(f.read())
            src_flags = _sm90a_flags(flags) if os.path.basename(src) in SM90A_SOURCES else flags
            if src_flags is not flags:  # (other objects keep their keys)
                key.update(" ".join(src_flags).encode())
            key = key.hexdigest()
            try:
                with open(obj + ".key") as f:
                    fresh = os.path.exists(obj) and f.read().strip() == key
            except OSError:
                fresh = False
            if not fresh:
                cmd = [nvcc, "-c", src, "-o", obj] + src_flags + [
                    "-I" + os.path.join(HERE, "csrc"),
                    "-t", os.environ.get("BLACKMAMBA_NVCC_THREADS", "4")]
                print(" ".join(cmd))
                subprocess.check_call(cmd)
                with open(obj + ".key", "w") as f:
                    f.write(key + "\n")
            objs.append(obj)
        ext.extra_objects += objs
        ext.define_macros.append(("BM_WITH_CUDA", "1"))
        ext.include_dirs.append(os.path.join(cuda_home, "include"))
        for libdir in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
            if os.path.isdir(os.path.join(cuda_home, libdir)):
                ext.library_dirs.append(os.path.join(cuda_home, libdir))
                ext.runtime_library_dirs.append(os.path.join(cuda_home, libdir))
        ext.libraries += ["cudart", "cublas", "cublasLt", "stdc++"]


def _extension():
    blas = _blas()
    cflags = ["-std=c11", "-O3", "-fopenmp", "-fno-math-errno", "-Wall", "-Wextra",
              "-Wno-unused-parameter", "-Wno-missing-field-initializers"]
    ldflags = ["-fopenmp"]
    if SANITIZE:
        cflags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g",
                   "-fno-sanitize-recover=undefined"]
        ldflags += ["-fsanitize=address,undefined"]
    return Extension(
        "blackmamba._C",
        sources=sorted(glob.glob("csrc/*.c")),
        include_dirs=[np.get_include(), "csrc"] + blas["include_dirs"],
        library_dirs=blas["library_dirs"],
        libraries=blas["libraries"] + ["m"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
        depends=glob.glob("csrc/*.h"),
    )


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExt})
