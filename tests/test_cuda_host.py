"""The CUDA-linked extension without touching GPU memory: runs everywhere (CI has nvcc but no
GPU), on the GPU machine too.

- blackmamba.cuda.is_available() never raises; require() says why the GPU cannot be used;
  the CPU ops work with the CUDA-linked _C.
- Foreign GPU arrays are parsed (__cuda_array_interface__, DLPack) and validated (shape
  letters, dtype, contiguity, alignment, host/device mixing) before anything is allocated or
  launched, so fake descriptors of never-dereferenced pointers exercise all of it.
- DLPack capsules of a DeviceArray view: names, versions, the owner's reference count.
"""
import ctypes
import gc
import sys

import numpy as np
import pytest

from blackmamba import cuda, ops, ref

from conftest import rel_err

C = None
if cuda.built_with_cuda():
    from blackmamba import _lib
    C = _lib.C()

needs_cuda_build = pytest.mark.skipif(C is None, reason="blackmamba built without CUDA")
FAKE_PTR = 0x7F0000000000   # never dereferenced: validation fails before any launch


def test_is_available_never_raises_and_cpu_ops_still_work():
    avail = cuda.is_available()
    assert isinstance(avail, bool)
    assert cuda.device_count() >= (1 if avail else 0)
    if not avail:
        assert cuda.device_count() == 0
        with pytest.raises(RuntimeError, match="built without CUDA|no GPU is visible"):
            cuda.require()
    rng = np.random.default_rng(1234)
    x = rng.standard_normal((5, 33)).astype(np.float32)
    w = rng.standard_normal((7, 33)).astype(np.float32)
    y = ops.linear(x, w)
    assert isinstance(y, np.ndarray)
    assert rel_err(y, ref.linear(x, w)) < 1e-6
    out, _ = ops.rms_norm(x, np.ones(33, np.float32))
    assert rel_err(out, ref.rms_norm(x, np.ones(33, np.float32))[0]) < 1e-6


@needs_cuda_build
def test_cuda_build_reports_itself():
    assert ops.cpu_info()["cuda"] is True
    p = cuda.probe()
    assert set(p) == {"device_count", "error", "driver_version", "runtime_version"}
    assert p["runtime_version"] >= 12000
    if p["device_count"] == 0:
        assert p["error"]                       # e.g. cudaErrorNoDevice / InsufficientDriver


@needs_cuda_build
@pytest.mark.skipif(cuda.is_available(), reason="a GPU is present")
def test_without_gpu_allocation_says_so():
    with pytest.raises(RuntimeError, match="no GPU is visible"):
        cuda.to_device(np.ones(3, np.float32))
    with pytest.raises(RuntimeError, match="no usable CUDA GPU|cannot allocate"):
        C.to_device(np.ones(3, np.float32))
    # an empty array needs no memory
    e = C.cuda_empty((0, 4))
    assert e.shape == (0, 4) and e.ptr == 0 and e.numpy().shape == (0, 4)


class FakeCAI:
    """A descriptor of GPU memory that is never touched."""

    def __init__(self, shape, typestr="<f4", ptr=FAKE_PTR, strides=None, readonly=False,
                 mask=None, stream=None):
        self.__cuda_array_interface__ = {
            "shape": tuple(shape), "typestr": typestr, "data": (ptr, readonly),
            "strides": strides, "version": 3}
        if mask is not None:
            self.__cuda_array_interface__["mask"] = mask
        if stream is not None:
            self.__cuda_array_interface__["stream"] = stream


class DL:
    """Only the DLPack protocol of `a` (forces the DLPack import path)."""

    def __init__(self, a):
        self.a = a

    def __dlpack__(self, stream=None):
        return self.a.__dlpack__(stream=stream)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


def _capsule_name_is(cap, name):
    f = ctypes.pythonapi.PyCapsule_IsValid
    f.argtypes, f.restype = [ctypes.py_object, ctypes.c_char_p], ctypes.c_int
    return f(cap, name.encode()) == 1


@needs_cuda_build
def test_cai_import_is_a_view_keeping_its_owner():
    owner = FakeCAI((2, 3, 5))
    n0 = sys.getrefcount(owner)
    a = C.cuda_asarray(owner)
    assert isinstance(a, cuda.DeviceArray)
    assert a.shape == (2, 3, 5) and a.ndim == 3 and a.size == 30 and a.nbytes == 120
    assert a.dtype == np.float32 and a.ptr == FAKE_PTR and a.base is owner
    assert sys.getrefcount(owner) == n0 + 1
    cai = a.__cuda_array_interface__
    assert cai == {"shape": (2, 3, 5), "typestr": "<f4", "data": (FAKE_PTR, False),
                   "strides": None, "version": 3, "stream": 1}
    assert a.__dlpack_device__() == (2, a.device)
    assert "DeviceArray(shape=(2, 3, 5), dtype=float32" in repr(a)
    r = a.reshape(6, -1)
    assert r.shape == (6, 5) and r.ptr == a.ptr and r.base is a
    assert a.reshape((30,)).shape == (30,)
    with pytest.raises(ValueError, match="cannot reshape"):
        a.reshape(7, 4)
    with pytest.raises(TypeError, match="numpy"):
        np.asarray(a)
    del a, r, cai
    gc.collect()
    assert sys.getrefcount(owner) == n0
    # to_device of a GPU array wraps it, no copy
    b = C.to_device(owner)
    assert b.ptr == FAKE_PTR and b.base is owner
    for ts, dt in [("<f8", np.float64), ("<f2", np.float16), ("|i1", np.int8), ("<i4", np.int32),
                   ("<i8", np.int64), ("<u2", np.uint16), ("|u1", np.uint8), ("|b1", np.bool_)]:
        v = C.cuda_asarray(FakeCAI((4,), ts, ptr=FAKE_PTR))
        assert v.dtype == dt and v.__cuda_array_interface__["typestr"] == np.dtype(dt).str


@needs_cuda_build
@pytest.mark.parametrize("make,exc,match", [
    (lambda: FakeCAI((4, 6), strides=(4, 16)), ValueError, "non-contiguous"),   # transposed
    (lambda: FakeCAI((4, 6), strides=(48, 4)), ValueError, "non-contiguous"),   # sliced rows
    (lambda: FakeCAI((4,), ptr=FAKE_PTR + 2), ValueError, "not aligned"),
    (lambda: FakeCAI((4,), "<c8"), TypeError, "unsupported element type"),
    (lambda: FakeCAI((4,), ">f4"), TypeError, "unsupported element type"),
    (lambda: FakeCAI((4,), mask=FakeCAI((4,), "|b1")), ValueError, "masked"),
    (lambda: [1.0, 2.0], TypeError, "host array"),
    (lambda: np.ones(3, np.float32), TypeError, "mixing host and device"),
    (lambda: object(), TypeError, "must be a CUDA device array"),
])
def test_cai_import_rejects(make, exc, match):
    with pytest.raises(exc, match=match):
        C.cuda_asarray(make())


@needs_cuda_build
def test_cai_strides_that_are_compact_are_accepted():
    # explicit C strides, and size-1 dimensions with arbitrary strides (PyTorch emits those)
    assert C.cuda_asarray(FakeCAI((4, 6), strides=(24, 4))).shape == (4, 6)
    assert C.cuda_asarray(FakeCAI((1, 6), strides=(999, 4))).shape == (1, 6)
    assert C.cuda_asarray(FakeCAI((0, 6), strides=(4, 16))).size == 0
    assert C.cuda_asarray(FakeCAI((0,), ptr=0)).ptr == 0


@needs_cuda_build
def test_gpu_ops_validate_before_allocating():
    x, w = FakeCAI((3, 5)), FakeCAI((5,))
    with pytest.raises(ValueError, match=r"rms_norm: weight must have shape \(d=5\), got \(4,\)"):
        ops.rms_norm(x, FakeCAI((4,)))
    with pytest.raises(TypeError, match="rms_norm: x must be float32, got float64"):
        ops.rms_norm(FakeCAI((3, 5), "<f8"), w)
    with pytest.raises(TypeError, match="weight is a host array .* mixing host and device"):
        ops.rms_norm(x, np.ones(5, np.float32))
    with pytest.raises(TypeError, match="x is a host array"):
        ops.rms_norm(np.ones((3, 5), np.float32), w)
    with pytest.raises(ValueError, match="residual must have the shape of x"):
        ops.rms_norm(x, w, FakeCAI((1, 3, 5)))
    with pytest.raises(ValueError, match="conv_state is updated in place and must be writeable"):
        ops.causal_conv1d_update(FakeCAI((2, 7)), FakeCAI((2, 3, 7), readonly=True),
                                 FakeCAI((7, 4)))
    with pytest.raises(ValueError, match="conv width K must be in 2..8"):
        ops.causal_conv1d(FakeCAI((2, 9, 7)), FakeCAI((7, 1, 9)))
    with pytest.raises(ValueError, match="state size N in 1..64"):
        ops.selective_scan(*[FakeCAI((1, 2, 3))] * 2, FakeCAI((3, 65)), *[FakeCAI((1, 2, 65))] * 2)
    with pytest.raises(ValueError, match="at most 64 experts"):
        ops.sinkhorn(FakeCAI((4, 65)))
    with pytest.raises(ValueError, match="at most 256 experts"):
        ops.route_top1(FakeCAI((4, 8)), FakeCAI((257, 8)), FakeCAI((257,)))
    with pytest.raises(TypeError, match="ids must be int32 or int64"):
        ops.moe_dispatch(FakeCAI((4,), "<f4"), 8)
    with pytest.raises(ValueError, match="math must be"):
        ops.linear(FakeCAI((3, 5)), FakeCAI((4, 5)), math="fp16")
    with pytest.raises(TypeError, match="fc1 and fc2 must have the same dtype"):
        ops.moe_experts(FakeCAI((3, 8)), FakeCAI((3,), "<i4"), None, FakeCAI((2, 6, 8)),
                        FakeCAI((2, 8, 3), "<u2"))
    with pytest.raises(ValueError, match="gated=False"):
        ops.mlp(FakeCAI((3, 8)), FakeCAI((6, 8)), FakeCAI((8, 6)), gated=False)


@needs_cuda_build
def test_dlpack_capsules_and_owner_lifetime():
    owner = FakeCAI((3, 4))
    a = C.cuda_asarray(owner)
    n0 = sys.getrefcount(a)
    cap = a.__dlpack__()
    assert _capsule_name_is(cap, "dltensor")
    assert sys.getrefcount(a) == n0 + 1          # the managed tensor holds the array
    del cap                                       # never consumed: its destructor releases
    gc.collect()
    assert sys.getrefcount(a) == n0
    capv = a.__dlpack__(max_version=(1, 0), stream=None)
    assert _capsule_name_is(capv, "dltensor_versioned")
    del capv
    gc.collect()
    assert sys.getrefcount(a) == n0
    assert _capsule_name_is(a.__dlpack__(max_version=(0, 8)), "dltensor")
    with pytest.raises(BufferError):
        a.__dlpack__(dl_device=(1, 0))
    # import through DLPack only: a view of the same memory holding the managed tensor
    b = C.cuda_asarray(DL(a))
    assert b.ptr == a.ptr and b.shape == (3, 4) and b.dtype == np.float32
    assert sys.getrefcount(a) == n0 + 1
    del b
    gc.collect()
    assert sys.getrefcount(a) == n0
    # the ops take DLPack-only arrays too (validation runs on the imported view)
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.rms_norm(DL(a), DL(C.cuda_asarray(FakeCAI((3,)))))
    gc.collect()
    assert sys.getrefcount(a) == n0


@needs_cuda_build
def test_dispatch_rules():
    assert not ops.is_gpu_array(np.ones(3)) and not ops.is_gpu_array(None)
    assert not ops.is_gpu_array(3.0) and not ops.is_gpu_array([1, 2])
    assert ops.is_gpu_array(FakeCAI((3,))) and ops.is_gpu_array(C.cuda_asarray(FakeCAI((3,))))
    assert ops.is_gpu_array(DL(C.cuda_asarray(FakeCAI((3,)))))
    assert C.cuda_is_device(DL(C.cuda_asarray(FakeCAI((3,))))) is True
    assert C.cuda_is_device(np.ones(3)) is False

    class HostDL:                                # a DLPack host array (device type kDLCPU)
        def __dlpack_device__(self):
            return (1, 0)
    assert not ops.is_gpu_array(HostDL())
    assert ops.linear.__name__ == "linear" and "GPU" in ops.linear.__doc__
    assert ops.cpu_info is C.cpu_info             # no wrapper where no arrays are taken
