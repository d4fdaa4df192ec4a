"""Checkpoint I/O without torch: PyTorch zip checkpoints (as released) and safetensors.

Reading (`load_tensors`) maps every tensor straight from the file: the file is opened once
with mmap (read-only) and each tensor is a NumPy view of the mapped bytes, so loading a 5.6 GB
checkpoint costs page cache, not a second copy of the model in anonymous memory. bfloat16 has
no NumPy dtype: its bits are exposed as uint16 (`StoredTensor.array`) and converted on demand
(`StoredTensor.to_numpy()`), which is what the C kernels take as weights anyway.

A checkpoint is untrusted input. data.pkl is read by an unpickler that resolves only an
allow-list of globals, each mapped to a stand-in of ours that builds an inert record (never
the real torch objects, never an import); everything a file declares (entry offsets, storage
sizes, tensor sizes, strides) is checked against the file before it is used, so a corrupt or
hostile file raises `CheckpointError` instead of reading out of bounds or allocating what it
asks for.

Writing (`save_safetensors`, `save_torch_zip`) streams tensors to disk one at a time; values
may be `Deferred` so that a big random checkpoint never exists in memory all at once.

Layout of the PyTorch zip format (what torch.save writes, SPEC section 5):

    <root>/data.pkl          pickle: {"model": OrderedDict(name -> _rebuild_tensor_v2(...))}
    <root>/.format_version   b"1"
    <root>/.storage_alignment b"64"
    <root>/byteorder         b"little"
    <root>/data/<key>        raw little-endian storage bytes, one entry per storage
    <root>/version           b"3\\n"
    <root>/.data/serialization_id

All entries are stored (not compressed); torch pads each local header with an "FB" extra
field so that the data starts at a multiple of 64 bytes, which is what makes mapping the
storages straight from the file possible (and aligned).
"""
from __future__ import annotations

import collections
import io
import json
import mmap
import os
import pathlib
import pickle
import pickletools
import reprlib
import struct
import zipfile
import zlib

import numpy as np

__all__ = [
    "CheckpointError", "StoredTensor", "Deferred", "StorageView", "TensorRecord",
    "to_bfloat16", "load_tensors", "find_weights", "save_safetensors", "save_torch_zip",
    "torch_pickle_bytes", "write_torch_zip_records", "DTYPES",
]


class CheckpointError(ValueError):
    """A checkpoint file is corrupt, truncated, hostile, or in a layout we do not read."""


# dtype name -> NumPy dtype of the stored bits (little-endian on disk; bfloat16 as raw uint16)
DTYPES = {
    "bfloat16": np.dtype("<u2"),
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}
# NumPy dtype -> name, for plain arrays handed to the writers (uint16 is deliberately absent:
# raw uint16 is ambiguous with bfloat16 bits, so it must come wrapped in a StoredTensor)
_NAME_OF_NP = {np.dtype(v).newbyteorder("="): k for k, v in DTYPES.items() if k != "bfloat16"}

_TORCH_STORAGE = {  # torch.<X>Storage -> dtype name
    "BFloat16Storage": "bfloat16", "HalfStorage": "float16", "FloatStorage": "float32",
    "DoubleStorage": "float64", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool",
}
_STORAGE_OF = {v: k for k, v in _TORCH_STORAGE.items()}

_SAFETENSORS = {  # safetensors dtype tag -> dtype name
    "BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
_SAFETENSORS_TAG = {v: k for k, v in _SAFETENSORS.items()}

MAX_PICKLE_BYTES = 64 << 20      # data.pkl of the 2.8B model is ~60 kB; more is not a checkpoint
MAX_SAFETENSORS_HEADER = 100_000_000   # the limit the safetensors library itself enforces
MAX_VIEW_ELEMENTS = 1 << 40      # stride-0 views may alias, but nothing real is this large
MAX_NDIM = 32                    # NPY_MAXDIMS of NumPy 1.x
_ALIGN = 64                      # torch's storage alignment inside the zip


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------

def _dtype_name(value) -> str:
    if isinstance(value, str):
        if value not in DTYPES:
            raise ValueError(f"unknown dtype {value!r}; expected one of {sorted(DTYPES)}")
        return value
    dt = np.dtype(value).newbyteorder("=")
    if dt not in _NAME_OF_NP:
        hint = (" (bfloat16 bits: wrap them as StoredTensor(bits, 'bfloat16'))"
                if dt == np.dtype(np.uint16) else "")
        raise ValueError(f"unsupported array dtype {np.dtype(value)}{hint}; supported: "
                         f"{sorted(DTYPES)}")
    return _NAME_OF_NP[dt]


class StoredTensor:
    """A tensor as stored: a dtype name and the array of its stored bits.

    dtype: one of DTYPES ("bfloat16", "float16", "float32", ...).
    array: np.ndarray of shape `shape`; for "bfloat16" the raw bits as uint16. Arrays that
           `load_tensors` returns are read-only views of the mapped file, never copies.
    """

    __slots__ = ("dtype", "array")

    def __init__(self, array, dtype=None):
        array = array if isinstance(array, np.ndarray) else np.asarray(array)
        name = _dtype_name(array.dtype) if dtype is None else _dtype_name(dtype)
        want = DTYPES[name]
        if (array.dtype.kind, array.dtype.itemsize) != (want.kind, want.itemsize):
            raise ValueError(f"StoredTensor({name}) needs an array of {want} "
                             f"(bfloat16: uint16 bits), got {array.dtype}")
        self.dtype = name
        self.array = array

    @property
    def shape(self) -> tuple:
        return self.array.shape

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    @property
    def size(self) -> int:
        return int(self.array.size)

    def to_numpy(self, dtype="float32") -> np.ndarray:
        """A new C-contiguous array of `dtype` (bfloat16 widens exactly: bits << 16)."""
        dtype = np.dtype(dtype)
        if self.dtype == "bfloat16":
            wide = self.array.astype(np.uint32)         # new (shape) array, C order
            np.left_shift(wide, 16, out=wide)
            f32 = wide.view(np.float32)
            return f32 if dtype == np.float32 else f32.astype(dtype)
        return np.array(self.array, dtype=dtype, order="C", copy=True)

    def __repr__(self):
        return f"StoredTensor(dtype={self.dtype}, shape={self.shape})"


def release_pages(arr) -> int:
    """Drop the mapped-file pages that lie wholly under `arr` from this process's resident set
    (MADV_DONTNEED on the read-only file mapping; a later read faults them back in from the
    page cache, so views stay valid). For callers that have copied a tensor out of the file
    (the float32 upcast): without it the file's pages, all read in by the progress bar, stay
    resident next to their float32 copies (1.5x the model at the peak instead of 1x).
    Returns the bytes released; 0 where `arr` is not a contiguous view of an mmap or the
    platform has no madvise."""
    if isinstance(arr, StoredTensor):
        arr = arr.array
    advice = getattr(mmap, "MADV_DONTNEED", None)
    mm = arr.base if isinstance(arr, np.ndarray) else None
    while isinstance(mm, (np.ndarray, memoryview)):
        mm = mm.base if isinstance(mm, np.ndarray) else mm.obj
    if advice is None or not isinstance(mm, mmap.mmap) or not hasattr(mm, "madvise") \
            or arr.size == 0 or not arr.flags.c_contiguous:
        return 0
    try:
        origin = np.frombuffer(mm, np.uint8, count=1).ctypes.data
    except (ValueError, TypeError):           # a closed or empty mapping
        return 0
    offset = arr.ctypes.data - origin
    page = mmap.PAGESIZE
    start = -(-offset // page) * page          # pages wholly inside the tensor only
    end = (offset + arr.nbytes) // page * page
    if offset < 0 or end <= start or end > mm.size():
        return 0
    try:
        mm.madvise(advice, start, end - start)
    except (OSError, ValueError):
        return 0
    return end - start


def to_bfloat16(a) -> StoredTensor:
    """float array -> StoredTensor("bfloat16"): round to nearest even, NaN stays NaN.

    uint32 arithmetic cannot overflow where it matters: only u >= 0xFFFF8000 would wrap, and
    those bit patterns are all NaNs, which the last line replaces."""
    f = np.ascontiguousarray(a, dtype=np.float32)
    u = f.view(np.uint32)
    r = (u >> 16) & 1
    r += u
    r += 0x7FFF
    r >>= 16
    bits = r.astype(np.uint16)
    nan = np.isnan(f)
    if nan.any():
        bits[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return StoredTensor(bits, "bfloat16")


class Deferred:
    """A tensor the writers produce only when its bytes are due: `make()` returns an ndarray
    or StoredTensor of exactly `shape` and `dtype`, is called once, and is dropped after
    writing. This is how a multi-GB random checkpoint streams to disk."""

    __slots__ = ("shape", "dtype", "make")

    def __init__(self, shape, dtype, make):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = _dtype_name(dtype)
        self.make = make

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * DTYPES[self.dtype].itemsize

    def materialize(self) -> StoredTensor:
        t = _as_stored(self.make())
        if t.dtype != self.dtype or t.shape != self.shape:
            raise ValueError(f"Deferred promised {self.dtype}{list(self.shape)}, make() "
                             f"returned {t.dtype}{list(t.shape)}")
        return t


class StorageView:
    """For `save_torch_zip`: a tensor that is a strided window on a named storage.

    storage: key into save_torch_zip's `storages`; shape, stride (elements; default
    contiguous), offset (elements) as torch's (size, stride, storage_offset).
    """

    __slots__ = ("storage", "shape", "stride", "offset")

    def __init__(self, storage, shape, stride=None, offset=0):
        self.storage = storage
        self.shape = tuple(int(s) for s in shape)
        self.stride = _contiguous_strides(self.shape) if stride is None else tuple(
            int(s) for s in stride)
        self.offset = int(offset)


def _as_stored(value) -> StoredTensor:
    if isinstance(value, StoredTensor):
        return value
    if isinstance(value, Deferred):
        return value.materialize()
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], str):
        return StoredTensor(value[0], value[1])     # (bits, "bfloat16") pairs
    if isinstance(value, np.ndarray) or np.isscalar(value):
        return StoredTensor(np.asarray(value))
    raise TypeError(f"expected an ndarray, StoredTensor, Deferred or (array, dtype) pair, "
                    f"got {type(value).__name__}")


def _meta(value):
    """(dtype name, shape) of a writer input without producing its data."""
    if isinstance(value, Deferred):
        return value.dtype, value.shape
    t = _as_stored(value)
    return t.dtype, t.shape


def _contiguous_strides(shape):
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(strides))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# --------------------------------------------------------------------------------------------
# The restricted unpickler: allow-listed globals map to inert stand-ins
# --------------------------------------------------------------------------------------------

class _Inert:
    """Base of the records the unpickler builds: no BUILD/setstate, no item assignment."""
    __slots__ = ()

    def __setstate__(self, state):
        raise CheckpointError("data.pkl tries to set the state of a tensor record")

    def __reduce__(self):
        raise TypeError("checkpoint records are not picklable")


class _StorageType(_Inert):
    """Stand-in for torch.<X>Storage: only a dtype tag (not callable, not a class)."""
    __slots__ = ("dtype", "torch_name")

    def __init__(self, torch_name):
        self.torch_name = torch_name
        self.dtype = _TORCH_STORAGE[torch_name]


class _DTypeTag(_Inert):
    """Stand-in for torch.bfloat16 etc., should a file carry dtype objects."""
    __slots__ = ("dtype",)

    def __init__(self, dtype):
        self.dtype = dtype


class _StorageRef(_Inert):
    """A storage the pickle referenced: zip entry `entry`, `numel` elements of `dtype`."""
    __slots__ = ("key", "dtype", "numel", "entry")

    def __init__(self, key, dtype, numel, entry):
        self.key, self.dtype, self.numel, self.entry = key, dtype, numel, entry


class _TensorRef(_Inert):
    """What _rebuild_tensor_v2 returns here: a storage reference and its view geometry."""
    __slots__ = ("storage", "offset", "shape", "stride")

    def __init__(self, storage, offset, shape, stride):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride


def _int_tuple(v, what):
    if not isinstance(v, (tuple, list)) or len(v) > MAX_NDIM or not all(_is_int(x) for x in v):
        raise CheckpointError(f"tensor {what} must be a tuple of at most {MAX_NDIM} ints, "
                              f"got {type(v).__name__}")
    return tuple(v)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    """Stand-in for torch._utils._rebuild_tensor_v2: validates types, returns a record."""
    if not isinstance(storage, _StorageRef):
        raise CheckpointError("_rebuild_tensor_v2: first argument is not a storage reference")
    if not _is_int(storage_offset):
        raise CheckpointError("_rebuild_tensor_v2: storage_offset is not an int")
    size = _int_tuple(size, "size")
    stride = _int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise CheckpointError(f"_rebuild_tensor_v2: size {size} and stride {stride} differ "
                              "in length")
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    """Stand-in for the older torch._utils._rebuild_tensor."""
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """Stand-in for torch._utils._rebuild_parameter (nn.Parameter saved directly)."""
    if not isinstance(data, _TensorRef):
        raise CheckpointError("_rebuild_parameter: argument is not a tensor")
    return data


def _torch_size(dims=()):
    """Stand-in for torch.Size: a tuple of ints."""
    return _int_tuple(tuple(dims) if isinstance(dims, (tuple, list)) else dims, "torch.Size")


_TORCH_DTYPE_ALIASES = {
    "bfloat16": "bfloat16", "float16": "float16", "half": "float16", "float32": "float32",
    "float": "float32", "float64": "float64", "double": "float64", "int64": "int64",
    "long": "int64", "int32": "int32", "int": "int32", "int16": "int16", "short": "int16",
    "int8": "int8", "uint8": "uint8", "bool": "bool",
}

class _Callable(_Inert):
    """An allow-listed function as the unpickler sees it. Plain functions would be exposed to
    BUILD, which sets attributes (`__defaults__`, `__dict__` entries) on its target: a file
    could then change our stand-ins for every later load in the process. This wrapper has no
    attributes to set and refuses BUILD (_Inert.__setstate__)."""
    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,     # a type: BUILD cannot set
    ("torch._utils", "_rebuild_tensor_v2"): _Callable(_rebuild_tensor_v2),   # attributes
    ("torch._utils", "_rebuild_tensor"): _Callable(_rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): _Callable(_rebuild_parameter),
    ("torch", "Size"): _Callable(_torch_size),
}
_ALLOWED_GLOBALS.update({("torch", n): _StorageType(n) for n in _TORCH_STORAGE})
_ALLOWED_GLOBALS.update({("torch", n): _DTypeTag(d) for n, d in _TORCH_DTYPE_ALIASES.items()})


# protocol-5 out-of-band buffers and the copyreg extension registry: never in a checkpoint,
# and the buffer opcodes reach corners of the C unpickler we would rather not exercise
_REFUSED_OPCODES = {"NEXT_BUFFER", "READONLY_BUFFER", "BYTEARRAY8", "EXT1", "EXT2", "EXT4"}


# What a pickle may make the unpickler do before our stand-ins see a single object: each is
# far above a real checkpoint (the 2.8B data.pkl: ~10k objects, ~20 work units a tensor)
# and far below a stall. Work counts elements visited by hashing or walking shared
# (memoized) objects: a few bytes of memo GETs build a tuple DAG whose hash doubles per
# level (24 levels of (t, t): 3 s; 40 levels: days). Objects bound the memory: 16 MB of
# one-byte EMPTY_LIST opcodes would otherwise build 16M lists (1 GB).
MAX_PICKLE_WORK = 1 << 24
MAX_PICKLE_OBJECTS = 1 << 22

_HASHED = {"SETITEM": slice(1, 2), "SETITEMS": slice(1, None, 2), "DICT": slice(0, None, 2),
           "ADDITEMS": slice(1, None), "FROZENSET": slice(None)}   # which consumed items
_CALLS = {"REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ", "INST", "BINPERSID", "PERSID",
          "STACK_GLOBAL", "BUILD"}      # may hash, compare or repr their arguments
_SPECIAL = {"GET": "get", "BINGET": "get", "LONG_BINGET": "get", "PUT": "put",
            "BINPUT": "put", "LONG_BINPUT": "put", "MEMOIZE": "memoize", "DUP": "dup",
            "MARK": "mark", "APPEND": "grow", "APPENDS": "grow", "SETITEM": "grow",
            "SETITEMS": "grow", "ADDITEMS": "grow", "BUILD": "grow"}


def _opinfo(op):
    """opcode -> (pops to a mark, items popped (below the mark), hashed slice, charged,
    what it pushes), from pickletools' stack effects."""
    mark = pickletools.markobject
    takes_mark = mark in op.stack_before
    npop = op.stack_before.index(mark) if takes_mark else len(op.stack_before)
    pushes = _SPECIAL.get(op.name, "new" if op.stack_after else None)
    return takes_mark, npop, _HASHED.get(op.name), op.name in _CALLS, pushes


_OPINFO = {op.name: _opinfo(op) for op in pickletools.opcodes}


def _scan_opcodes(data: bytes, where: str):
    """Parse and simulate the whole opcode stream before running any of it.

    pickletools.genops is a pure parser (it executes nothing and allocates no more than the
    data): truncation, unknown and refused opcodes surface here with a clear message. The
    stack, marks and memo are simulated as the C unpickler keeps them, each object reduced
    to a weight (the elements a recursive walk of it visits) shared by all its aliases (memo
    GET, DUP), as the real objects are, so a container grown after being memoized grows for
    every alias. Weights are charged where the unpickler or our stand-ins may walk an object;
    more than MAX_PICKLE_WORK charged or MAX_PICKLE_OBJECTS built is refused."""
    stack, marks, memo = [], [], {}    # stack items are one-element lists [weight]
    work = objects = 0
    cap = MAX_PICKLE_WORK + 1           # weights saturate: no bignum arithmetic on bombs

    def bad(pos, why):
        return CheckpointError(f"{where}: malformed pickle (byte {pos}: {why})")

    try:
        for op, arg, pos in pickletools.genops(data):
            name = op.name
            takes_mark, npop, hashed, charged, pushes = _OPINFO[name]
            if name in _REFUSED_OPCODES:
                raise CheckpointError(f"{where}: pickle opcode {name} at byte {pos} has no "
                                      "place in a checkpoint; refusing")
            consumed = []
            if takes_mark or (name == "POP" and marks and marks[-1] == len(stack)):
                if not marks:
                    raise bad(pos, f"{name} without a MARK")
                i = marks.pop()
                consumed = stack[i:]
                del stack[i:]
                if not takes_mark:
                    npop = 0
            fence = marks[-1] if marks else 0
            if npop:
                if len(stack) - npop < fence:
                    raise bad(pos, f"{name} pops below the stack or a MARK")
                consumed = stack[len(stack) - npop:] + consumed
                del stack[len(stack) - npop:]
            if hashed is not None:               # dict keys and set members are hashed
                work += sum(o[0] for o in consumed[hashed])
            elif charged:
                work += sum(o[0] for o in consumed)
            if work > MAX_PICKLE_WORK:
                raise CheckpointError(
                    f"{where}: by byte {pos} the pickle would visit more than "
                    f"{MAX_PICKLE_WORK} elements of shared (memoized) objects: a hash or "
                    "expansion bomb, not a checkpoint; refusing")
            if pushes == "get":
                if arg not in memo:
                    raise bad(pos, f"memo key {arg} was never stored")
                stack.append(memo[arg])
            elif pushes == "put":
                if len(stack) <= fence:
                    raise bad(pos, f"{name} with nothing to store")
                memo[arg] = stack[-1]
            elif pushes == "memoize":            # index = entries so far, as the C unpickler
                memo[len(memo)] = consumed[0]
                stack.append(consumed[0])
            elif pushes == "dup":
                stack += consumed * 2
            elif pushes == "mark":
                marks.append(len(stack))
            elif pushes == "grow":               # the container (or BUILD's instance) grows
                target = consumed[0]
                target[0] = min(cap, target[0] + sum(o[0] for o in consumed[1:]))
                stack.append(target)
            elif pushes == "new":                # a new object built from what was consumed
                stack.append([min(cap, 1 + sum(o[0] for o in consumed))])
                objects += 1
                if objects > MAX_PICKLE_OBJECTS:
                    raise CheckpointError(f"{where}: the pickle builds more than "
                                          f"{MAX_PICKLE_OBJECTS} objects; refusing")
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - ValueError on truncated/unknown opcodes, etc.
        raise CheckpointError(f"{where}: malformed pickle ({type(exc).__name__}: {exc})") \
            from exc


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only _ALLOWED_GLOBALS (to our stand-ins); storages via `resolve_storage`."""

    def __init__(self, data: bytes, where: str, resolve_storage):
        super().__init__(io.BytesIO(data))
        self._where = where
        self._resolve_storage = resolve_storage

    def find_class(self, module, name):
        hit = _ALLOWED_GLOBALS.get((module, name))
        if hit is None:
            raise CheckpointError(
                f"refusing global {module}.{name} in {self._where}: checkpoints may only "
                "reference tensor-rebuilding globals (collections.OrderedDict, "
                "torch._utils._rebuild_tensor_v2, torch.<X>Storage, torch.Size)")
        return hit

    def persistent_load(self, pid):
        return self._resolve_storage(pid)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def _map_file(path: pathlib.Path):
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise CheckpointError(f"{path}: empty file")
            # the map holds its own descriptor; arrays keep the map alive through .base
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot map the file: {exc}") from exc


def find_weights(directory) -> pathlib.Path:
    """The weights file of a model directory: model.safetensors, pytorch_model.bin, or a
    sharded index (*.index.json), in that order of preference."""
    d = pathlib.Path(directory)
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json"):
        if (d / name).is_file():
            return d / name
    raise FileNotFoundError(f"{d}: no model.safetensors or pytorch_model.bin in this directory")


def load_tensors(path, progress=False, verify=False) -> dict:
    """Every tensor of a checkpoint, as {name: StoredTensor} of read-only views of the file.

    path: a PyTorch zip checkpoint (pytorch_model.bin as released), a .safetensors file, a
          sharded *.index.json, or a directory holding one of those (see `find_weights`).
    progress: show a tqdm bar while the mapped pages are read in (the first touch of a cold
          file is where the disk time goes; without it, pages load lazily on first use).
    verify: check the CRC-32 of every zip entry (reads the whole file once).
    """
    path = pathlib.Path(path)
    if path.is_dir():
        path = find_weights(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.name.endswith(".index.json"):
        return _load_sharded(path, progress, verify)
    mm = _map_file(path)
    head = mm[:8]
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        tensors, regions = _load_torch_zip(path, mm)
    elif head[:1] == b"\x80":     # a bare pickle: torch.save before the zip format
        raise CheckpointError(f"{path}: legacy (pre-1.6, non-zip) torch.save format; re-save "
                              "it with a current torch (torch.save(..., "
                              "_use_new_zipfile_serialization=True)) or as safetensors")
    elif len(head) == 8 and mm.size() > 8 and mm[8:9] == b"{":
        tensors, regions = _load_safetensors(path, mm)
    else:
        raise CheckpointError(f"{path}: neither a PyTorch zip checkpoint nor a safetensors file "
                              f"(starts with {bytes(head)!r})")
    if verify:
        _verify_crc(path, mm, regions, progress)
    elif progress:
        _prefault(path, mm, regions)
    return tensors


def _load_sharded(index_path: pathlib.Path, progress, verify):
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except Exception as exc:  # noqa: BLE001 - any malformation is the same error to the user
        raise CheckpointError(f"{index_path}: not a valid shard index ({exc})") from exc
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index_path}: weight_map must map tensor names to file names")
    out = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if pathlib.Path(shard).name != shard:
            raise CheckpointError(f"{index_path}: shard name {shard!r} is not a plain file name")
        tensors = load_tensors(shard_path, progress=progress, verify=verify)
        for name, file in weight_map.items():
            if file == shard:
                if name not in tensors:
                    raise CheckpointError(f"{shard_path}: tensor {name!r} listed in the index "
                                          "is missing")
                out[name] = tensors[name]
    return out


class _Region:
    """A byte range of the mapped file that tensors view: (name, start, size, crc or None)."""
    __slots__ = ("name", "start", "size", "crc")

    def __init__(self, name, start, size, crc=None):
        self.name, self.start, self.size, self.crc = name, start, size, crc


class _Entry:
    """A zip entry: its central-directory record and the file offset of its data."""
    __slots__ = ("filename", "data_start", "file_size", "compress_size", "compress_type", "CRC")

    def __init__(self, info, data_start):
        self.filename, self.data_start = info.filename, data_start
        self.file_size, self.compress_size = info.file_size, info.compress_size
        self.compress_type, self.CRC = info.compress_type, info.CRC


def _zip_entries(path, mm):
    """Central directory -> {name: _Entry}: where each entry's bytes start in the file."""
    try:
        with open(path, "rb") as f:
            with zipfile.ZipFile(f) as zf:
                infos = zf.infolist()
            # local headers are scattered through the file: read them with pread in file
            # order, not through the map, whose fault read-around would pull ~1 MB of a
            # cold file per header (2.4 s instead of 50 ms for the 2.8B checkpoint)
            infos.sort(key=lambda i: i.header_offset)
            headers = [os.pread(f.fileno(), 30 + 1024, max(0, i.header_offset))
                       for i in infos]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError,
            struct.error, NotImplementedError, OverflowError) as exc:
        raise CheckpointError(f"{path}: not a readable zip file ({exc}); the download may be "
                              "truncated or corrupt") from exc
    file_size = mm.size()
    entries = {}
    for info, head in zip(infos, headers):
        if info.filename in entries:
            raise CheckpointError(f"{path}: duplicate zip entry {info.filename!r}")
        if info.flag_bits & 0x1:
            raise CheckpointError(f"{path}: entry {info.filename!r} is encrypted")
        off = info.header_offset
        if off < 0 or off + 30 > file_size:
            raise CheckpointError(f"{path}: entry {info.filename!r} has its local header "
                                  f"beyond the end of the file (truncated?)")
        sig, name_len, extra_len = struct.unpack("<I22xHH", head[:30])
        if sig != 0x04034B50:
            raise CheckpointError(f"{path}: bad local header for {info.filename!r}")
        name = head[30:30 + name_len] if name_len <= 1024 else mm[off + 30:off + 30 + name_len]
        if name.decode("utf-8", "replace") != info.filename and \
                name.decode("cp437", "replace") != info.filename:
            raise CheckpointError(f"{path}: local header name {name!r} does not match the "
                                  f"central directory's {info.filename!r}")
        start = off + 30 + name_len + extra_len
        if start + info.compress_size > file_size or info.compress_size < 0:
            raise CheckpointError(f"{path}: entry {info.filename!r} ({info.compress_size} "
                                  f"bytes) runs past the end of the file ({file_size} bytes): "
                                  "truncated?")
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise CheckpointError(f"{path}: stored entry {info.filename!r} declares "
                                  f"{info.file_size} bytes but occupies {info.compress_size}")
        entries[info.filename] = _Entry(info, start)
    return entries


def _entry_bytes(path, mm, info, limit):
    """A small entry's bytes (data.pkl, byteorder), bounded by `limit`, CRC checked."""
    if info.file_size > limit:
        raise CheckpointError(f"{path}: {info.filename} is {info.file_size} bytes, more than "
                              f"the {limit} a checkpoint needs; refusing to read it")
    if info.compress_type == zipfile.ZIP_STORED:
        data = mm[info.data_start:info.data_start + info.file_size]
    else:
        try:
            with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
                data = zf.read(info.filename)   # bounded by file_size, CRC checked by zipfile
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{path}: cannot read {info.filename}: {exc}") from exc
    if zlib.crc32(data) != info.CRC:
        raise CheckpointError(f"{path}: {info.filename} fails its CRC check: corrupt file")
    return data


def _load_torch_zip(path, mm):
    entries = _zip_entries(path, mm)
    roots = sorted(n[:-len("/data.pkl")] for n in entries
                   if n.endswith("/data.pkl") and n.count("/") == 1)
    if not roots:
        raise CheckpointError(f"{path}: zip file without <root>/data.pkl: not a PyTorch "
                              "checkpoint (or a truncated one)")
    if len(roots) > 1:
        raise CheckpointError(f"{path}: several checkpoint roots in one zip: {roots}")
    root = roots[0]
    pkl_name = f"{root}/data.pkl"
    where = f"{path.name}:{pkl_name}"

    order = entries.get(f"{root}/byteorder")
    if order is not None:
        bo = _entry_bytes(path, mm, order, 16)
        if bo != b"little":
            raise CheckpointError(f"{path}: byteorder is {bo!r}; only little-endian "
                                  "checkpoints are supported")

    regions = {}      # entry name -> _Region (each storage entry once, however shared)

    def resolve_storage(pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{where}: unsupported persistent id {_short(pid)}")
        _, stype, key, location, numel = pid
        if isinstance(stype, _DTypeTag):
            dtype = stype.dtype
        elif isinstance(stype, _StorageType):
            dtype = stype.dtype
        else:
            raise CheckpointError(f"{where}: persistent id names no storage type")
        if not isinstance(key, str) or not isinstance(location, str) or not _is_int(numel):
            raise CheckpointError(f"{where}: malformed storage reference {_short(pid)}")
        entry = f"{root}/data/{key}"
        info = entries.get(entry)
        if info is None:
            raise CheckpointError(f"{path}: data.pkl references storage {key!r} but the zip "
                                  f"has no entry {entry!r} (truncated or corrupt file)")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{path}: storage entry {entry!r} is compressed; tensors are "
                                  "mapped straight from the file, which needs stored entries "
                                  "(re-save with torch.save, or as safetensors)")
        itemsize = DTYPES[dtype].itemsize
        if numel < 0 or numel * itemsize > info.file_size:
            raise CheckpointError(f"{path}: storage {key!r} declares {numel} {dtype} elements "
                                  f"({numel * itemsize} bytes) but its entry holds "
                                  f"{info.file_size} bytes")
        if entry not in regions:
            regions[entry] = _Region(entry, info.data_start, info.file_size, info.CRC)
        return _StorageRef(key, dtype, numel, regions[entry])

    data = _entry_bytes(path, mm, entries[pkl_name], MAX_PICKLE_BYTES)
    _scan_opcodes(data, where)
    try:
        obj = _RestrictedUnpickler(data, where, resolve_storage).load()
    except CheckpointError as exc:       # the stand-ins' messages do not know the file
        if where in str(exc) or str(path) in str(exc):
            raise
        raise CheckpointError(f"{where}: {exc}") from exc
    except (RecursionError, MemoryError) as exc:
        raise CheckpointError(f"{where}: pickle too deep or too large "
                              f"({type(exc).__name__})") from exc
    except Exception as exc:  # noqa: BLE001 - EOFError, UnpicklingError, TypeError from odd
        raise CheckpointError(f"{where}: malformed pickle ({type(exc).__name__}: {exc})") from exc

    state = _find_state_dict(obj, where)
    storages = {}     # entry name -> uint8 view of its bytes
    tensors = {}
    for name, ref in state.items():
        region = ref.storage.entry
        raw = storages.get(region.name)
        if raw is None:
            raw = storages[region.name] = np.frombuffer(mm, np.uint8, count=region.size,
                                                        offset=region.start)
        dt = DTYPES[ref.storage.dtype]
        typed = raw[:ref.storage.numel * dt.itemsize].view(dt)
        arr = _strided_view(typed, ref.offset, ref.shape, ref.stride, f"{path.name}:{name}")
        tensors[name] = StoredTensor(arr, ref.storage.dtype)
    return tensors, list(regions.values())


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 60, 60


def _short(obj, n=120):
    """A bounded repr for error messages: a hostile object may be a DAG whose full repr
    would be exponentially long (reprlib stops at depth 3 and a few items per level)."""
    try:
        s = _REPR.repr(obj)
    except Exception:  # noqa: BLE001
        s = f"<{type(obj).__name__}>"
    return s if len(s) <= n else s[:n] + "..."


def _find_state_dict(obj, where):
    """{"model": OrderedDict(...)} as released; also a bare dict of tensors, or one wrapped in
    "state_dict" / "module" (what other trainers write)."""
    for _ in range(4):
        if not isinstance(obj, dict):
            raise CheckpointError(f"{where}: top-level object is a {type(obj).__name__}, not a "
                                  "dict of tensors")
        if obj and all(isinstance(v, _TensorRef) for v in obj.values()):
            break
        for wrapper in ("model", "state_dict", "module"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
        else:
            if not obj:
                return {}
            bad = [k for k, v in obj.items() if not isinstance(v, _TensorRef)][:3]
            raise CheckpointError(f"{where}: entries {_short(bad)} are not tensors and there is no "
                                  "'model' / 'state_dict' / 'module' dict of tensors")
    else:
        raise CheckpointError(f"{where}: no dict of tensors found")
    for k in obj:
        if not isinstance(k, str):
            raise CheckpointError(f"{where}: tensor name {_short(k)} is not a string")
    return obj


def _empty(shape, dtype, what):
    """A read-only empty array of `shape`; NumPy refuses shapes whose other dimensions
    multiply past 2**63 even with a zero among them: (2**62, 0) is not an array either."""
    try:
        empty = np.empty(shape, dtype)
    except (ValueError, OverflowError) as exc:
        raise CheckpointError(f"{what}: shape {_short(tuple(shape))} cannot be an array "
                              f"({exc})") from exc
    empty.flags.writeable = False
    return empty


def _num(v):
    """An int for messages: a pickle may hold a 10**5000, whose str() Python refuses."""
    return str(v) if v.bit_length() <= 64 else f"<{v.bit_length()}-bit int>"


def _dims(values):
    return "(" + ", ".join(map(_num, values)) + ")"


def _strided_view(storage, offset, shape, stride, what):
    """View `shape`/`stride` (elements) at `offset` of the 1-D `storage`, after checking that
    every element it can reach lies inside the storage. Never copies, never allocates."""
    numel = storage.shape[0]
    if offset < 0 or any(s < 0 for s in shape) or any(s < 0 for s in stride):
        raise CheckpointError(f"{what}: negative offset/size/stride (offset {_num(offset)}, "
                              f"size {_dims(shape)}, stride {_dims(stride)})")
    count = 1
    for s in shape:
        count *= s
    if count == 0:
        return _empty(shape, storage.dtype, what)
    last = offset + sum((s - 1) * st for s, st in zip(shape, stride))
    if last >= numel:
        raise CheckpointError(f"{what}: size {_dims(shape)}, stride {_dims(stride)}, offset "
                              f"{_num(offset)} reach element {_num(last)} of a storage "
                              f"of {numel} elements")
    if count > MAX_VIEW_ELEMENTS:     # in bounds only through stride 0: a bomb, not a weight
        raise CheckpointError(f"{what}: size {_dims(shape)} has {_num(count)} elements; "
                              "refusing")
    # a dimension of size 1 may declare any stride, even one NumPy cannot hold (2**62
    # elements); it is never used, so make it 0. Every other stride is < numel (in bounds).
    stride = tuple(st if s > 1 else 0 for s, st in zip(shape, stride))
    dense = tuple(st if s > 1 else 0 for s, st in zip(shape, _contiguous_strides(shape)))
    if stride == dense:
        return storage[offset:offset + count].reshape(shape)
    item = storage.dtype.itemsize
    return np.lib.stride_tricks.as_strided(storage[offset:], shape=shape,
                                           strides=[st * item for st in stride],
                                           writeable=False)


def _load_safetensors(path, mm):
    file_size = mm.size()
    (n,) = struct.unpack("<Q", mm[:8])
    if n > MAX_SAFETENSORS_HEADER or 8 + n > file_size:
        raise CheckpointError(f"{path}: safetensors header size {n} exceeds the file "
                              f"({file_size} bytes) or the {MAX_SAFETENSORS_HEADER} byte limit")

    def no_duplicates(pairs):
        d = {}
        for k, v in pairs:
            if k in d:
                raise CheckpointError(f"{path}: duplicate key {k!r} in the safetensors header")
            d[k] = v
        return d

    try:
        header = json.loads(mm[8:8 + n].decode("utf-8"), object_pairs_hook=no_duplicates)
    except CheckpointError:
        raise
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({exc})") from exc
    header.pop("__metadata__", None)      # starts with "{" (how we recognised it): a dict
    data_start, data_len = 8 + n, file_size - 8 - n
    buffer = np.frombuffer(mm, np.uint8, count=data_len, offset=data_start)
    spans, tensors = [], {}
    for name, entry in header.items():
        what = f"{path.name}:{name}"
        try:
            tag, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (TypeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{what}: header entry needs dtype, shape, data_offsets "
                                  f"[begin, end] ({exc})") from exc
        if not isinstance(tag, str) or tag not in _SAFETENSORS:
            raise CheckpointError(f"{what}: unsupported dtype {_short(tag)}; supported: "
                                  f"{sorted(_SAFETENSORS)}")
        dtype = DTYPES[_SAFETENSORS[tag]]
        if not (isinstance(shape, list) and len(shape) <= MAX_NDIM
                and all(_is_int(s) and s >= 0 for s in shape)):
            raise CheckpointError(f"{what}: bad shape {_short(shape)}")
        if not (_is_int(begin) and _is_int(end) and 0 <= begin <= end <= data_len):
            raise CheckpointError(f"{what}: data_offsets [{begin}, {end}] outside the "
                                  f"{data_len} bytes of tensor data")
        count = 1
        for s in shape:
            count *= s
        if count * dtype.itemsize != end - begin:
            raise CheckpointError(f"{what}: shape {shape} of {tag} needs "
                                  f"{count * dtype.itemsize} bytes, data_offsets span "
                                  f"{end - begin}")
        spans.append((begin, end, name))
        view = buffer[begin:end].view(dtype).reshape(shape) if count else \
            _empty(shape, dtype, what)
        tensors[name] = StoredTensor(view, _SAFETENSORS[tag])
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors {n0!r} and {n1!r} overlap in the file")
    return tensors, [_Region("tensor data", data_start, data_len)]


def _chunks(total, step=64 << 20):
    for start in range(0, total, step):
        yield start, min(step, total - start)


def _willneed(mm, start, size):
    """Ask the kernel to read [start, start+size) ahead, where madvise exists (Linux)."""
    advice = getattr(mmap, "MADV_WILLNEED", None)
    if advice is None or not hasattr(mm, "madvise"):
        return
    aligned = start - start % mmap.PAGESIZE
    try:
        mm.madvise(advice, aligned, min(size + start - aligned, mm.size() - aligned))
    except (OSError, ValueError):
        pass       # advice only


def _prefault(path, mm, regions):
    """Read every mapped page once, with a progress bar: the disk time of a cold load."""
    from tqdm import tqdm
    total = sum(r.size for r in regions)
    page = mmap.PAGESIZE
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {path.name}") as bar:
        for r in regions:
            for start, size in _chunks(r.size):
                _willneed(mm, r.start + start, size)
                view = np.frombuffer(mm, np.uint8, count=size, offset=r.start + start)
                int(view[::page].sum(dtype=np.uint64))   # one byte per page faults it in
                bar.update(size)


def _verify_crc(path, mm, regions, progress):
    from tqdm import tqdm
    total = sum(r.size for r in regions)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"verifying {path.name}",
              disable=not progress) as bar:
        for r in regions:
            if r.crc is None:
                bar.update(r.size)
                continue
            crc = 0
            for start, size in _chunks(r.size):
                crc = zlib.crc32(memoryview(mm)[r.start + start:r.start + start + size], crc)
                bar.update(size)
            if crc != r.crc:
                raise CheckpointError(f"{path}: entry {r.name} fails its CRC check: corrupt "
                                      "file")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def _write_array(f, arr: np.ndarray, crc=0, chunk_bytes=64 << 20):
    """Write arr's elements in C order as little-endian bytes; return the running CRC-32.
    Contiguous little-endian arrays go out without a copy; others in bounded chunks."""
    le = arr.dtype.newbyteorder("<")
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.flags.c_contiguous and arr.dtype == le:
        buf = memoryview(arr.reshape(-1).view(np.uint8))
        for start, size in _chunks(len(buf), chunk_bytes):
            part = buf[start:start + size]
            f.write(part)
            crc = zlib.crc32(part, crc)
        return crc
    if arr.size == 0:
        return crc
    row_bytes = arr[0].nbytes            # one row of the first axis (an element when 1-D)
    if arr.ndim > 1 and row_bytes > chunk_bytes:
        for i in range(arr.shape[0]):          # a single row is already big: recurse into it
            crc = _write_array(f, arr[i], crc, chunk_bytes)
        return crc
    rows = max(1, chunk_bytes // max(1, row_bytes))
    for i in range(0, arr.shape[0], rows):
        part = np.ascontiguousarray(arr[i:i + rows], dtype=le)
        mv = memoryview(part.reshape(-1).view(np.uint8))
        f.write(mv)
        crc = zlib.crc32(mv, crc)
    return crc


def save_safetensors(path, tensors: dict, metadata=None):
    """Write a safetensors file.

    tensors: {name: ndarray | StoredTensor | Deferred | (uint16 bits, "bfloat16")}; plain
             ndarrays keep their dtype (uint16 is refused: bfloat16 bits must say so).
    metadata: optional {str: str}, stored as "__metadata__".
    Tensors are laid out by decreasing itemsize then name (as the safetensors library does),
    so each is aligned to its itemsize; the header is space-padded to a multiple of 8.
    """
    metas = {name: _meta(v) for name, v in tensors.items()}
    order = sorted(metas, key=lambda k: (-DTYPES[metas[k][0]].itemsize, k))
    header, pos = {}, 0
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must be {str: str}")
        header["__metadata__"] = dict(metadata)
    for name in order:
        dtype, shape = metas[name]
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        header[name] = {"dtype": _SAFETENSORS_TAG[dtype], "shape": list(shape),
                        "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in order:
            t = _as_stored(tensors[name])
            dtype, shape = metas[name]
            if (t.dtype, t.shape) != (dtype, shape):
                raise ValueError(f"{name}: tensor changed while writing")
            _write_array(f, t.array)
            del t


class _Global:
    """A pickled reference to a global we cannot (and must not) import, e.g. torch's
    _rebuild_tensor_v2: _TorchPickler writes it as a GLOBAL opcode, memoized."""
    __slots__ = ("module", "name")

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):      # pickle's save_reduce insists that func is callable
        raise TypeError(f"{self.module}.{self.name} is a pickling placeholder")


_G_REBUILD = _Global("torch._utils", "_rebuild_tensor_v2")
_G_STORAGE = {d: _Global("torch", s) for d, s in _STORAGE_OF.items()}


class TensorRecord:
    """One tensor of a torch pickle: storage `key` (its zip entry is data/<key>) holding
    `numel` elements of `dtype`, viewed with (offset, shape, stride). Pickles exactly like a
    torch tensor: _rebuild_tensor_v2(("storage", torch.<X>Storage, key, location, numel),
    offset, shape, stride, False, OrderedDict()). Nothing is validated here: tests use it to
    write broken files on purpose."""

    def __init__(self, key, dtype, numel, offset, shape, stride, location="cpu"):
        self.key, self.dtype, self.numel = str(key), dtype, numel
        self.offset, self.shape, self.stride, self.location = offset, shape, stride, location

    def __reduce__(self):
        return (_G_REBUILD, (_PersistentStorage(self), self.offset, tuple(self.shape),
                             tuple(self.stride), False, collections.OrderedDict()))


class _PersistentStorage:
    __slots__ = ("rec",)

    def __init__(self, rec):
        self.rec = rec


class _TorchPickler(pickle._Pickler):  # the pure-Python pickler: its dispatch is extendable
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_global_placeholder(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
        self.memoize(obj)

    dispatch[_Global] = _save_global_placeholder

    def persistent_id(self, obj):
        if isinstance(obj, _PersistentStorage):
            r = obj.rec
            stype = _G_STORAGE[r.dtype] if r.dtype in _G_STORAGE else r.dtype
            return ("storage", stype, r.key, r.location, r.numel)
        return None


def torch_pickle_bytes(obj) -> bytes:
    """Pickle `obj` (dicts, OrderedDicts, TensorRecords, plain values) with protocol 2 the way
    torch.save does: tensors as _rebuild_tensor_v2 calls with persistent storage ids."""
    buf = io.BytesIO()
    _TorchPickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


class _ZipWriter:
    """A minimal zip writer: stored entries, each data start aligned to `align` bytes with
    torch's "FB" padding extra field, zip64 where sizes or offsets need it, CRCs patched in
    after streaming (so the file must be seekable)."""

    def __init__(self, f, align=_ALIGN):
        self.f, self.align, self.entries = f, align, []

    def add(self, name, size, write):
        """write(f) -> crc must write exactly `size` bytes."""
        f = self.f
        offset = f.tell()
        name_b = name.encode("utf-8")
        zip64 = size >= 0xFFFFFFFF
        extra = struct.pack("<HHQQ", 0x0001, 16, size, size) if zip64 else b""
        pad = -(offset + 30 + len(name_b) + len(extra) + 4) % self.align
        extra += struct.pack("<HH", 0x4246, pad) + b"Z" * pad
        small = 0xFFFFFFFF if zip64 else size
        f.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 45 if zip64 else 20, 0x0800, 0, 0,
                            0x21, 0, small, small, len(name_b), len(extra)))
        f.write(name_b)
        f.write(extra)
        start = f.tell()
        crc = write(f) & 0xFFFFFFFF
        if f.tell() - start != size:
            raise RuntimeError(f"zip entry {name}: wrote {f.tell() - start} bytes, "
                               f"announced {size}")
        end = f.tell()
        f.seek(offset + 14)
        f.write(struct.pack("<I", crc))
        f.seek(end)
        self.entries.append((name_b, offset, size, crc))

    def add_bytes(self, name, data: bytes):
        self.add(name, len(data), lambda f: (f.write(data), zlib.crc32(data))[1])

    def close(self):
        f = self.f
        cd_start = f.tell()
        for name_b, offset, size, crc in self.entries:
            extra_fields = []
            if size >= 0xFFFFFFFF:
                extra_fields += [size, size]
            if offset >= 0xFFFFFFFF:
                extra_fields.append(offset)
            extra = (struct.pack(f"<HH{len(extra_fields)}Q", 0x0001, 8 * len(extra_fields),
                                 *extra_fields) if extra_fields else b"")
            v = 45 if extra_fields else 20
            small = 0xFFFFFFFF if size >= 0xFFFFFFFF else size
            f.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, v, v, 0x0800, 0, 0, 0x21, crc,
                                small, small, len(name_b), len(extra), 0, 0, 0, 0,
                                min(offset, 0xFFFFFFFF)))
            f.write(name_b)
            f.write(extra)
        cd_end = f.tell()
        n, cd_size = len(self.entries), cd_end - cd_start
        if n >= 0xFFFF or cd_start >= 0xFFFFFFFF or cd_size >= 0xFFFFFFFF:
            f.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, cd_size,
                                cd_start))
            f.write(struct.pack("<IIQI", 0x07064B50, 0, cd_end, 1))
        f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(n, 0xFFFF), min(n, 0xFFFF),
                            min(cd_size, 0xFFFFFFFF), min(cd_start, 0xFFFFFFFF), 0))


def write_torch_zip_records(path, data_pkl: bytes, storages: dict, root="archive",
                            byteorder="little", extra_records=None):
    """Low-level writer of the torch zip layout: `data_pkl` verbatim, each storages[key]
    (bytes, ndarray, StoredTensor or Deferred) as <root>/data/<key>. byteorder=None leaves
    the byteorder record out. Used by save_torch_zip, and by tests to write hostile files."""
    with open(path, "wb") as f:
        z = _ZipWriter(f)
        z.add_bytes(f"{root}/data.pkl", data_pkl)
        z.add_bytes(f"{root}/.format_version", b"1")
        z.add_bytes(f"{root}/.storage_alignment", str(_ALIGN).encode())
        if byteorder is not None:
            z.add_bytes(f"{root}/byteorder", byteorder.encode())
        for key, value in storages.items():
            name = f"{root}/data/{key}"
            if isinstance(value, (bytes, bytearray, memoryview)):
                z.add_bytes(name, bytes(value))
                continue
            size = value.nbytes if isinstance(value, Deferred) else _as_stored(value).nbytes

            def write(f, value=value):
                t = _as_stored(value)
                return _write_array(f, t.array)
            z.add(name, size, write)
        for name, data in (extra_records or {}).items():
            z.add_bytes(f"{root}/{name}", data)
        z.add_bytes(f"{root}/version", b"3\n")
        z.add_bytes(f"{root}/.data/serialization_id",
                    str(zlib.crc32(data_pkl)).rjust(40, "0").encode())
        z.close()


def save_torch_zip(path, tensors: dict, root="archive", storages=None, wrap="model",
                   check=True):
    """Write a checkpoint in the released PyTorch zip format (what torch.save writes).

    tensors:  {name: ndarray | StoredTensor | Deferred | (bits, "bfloat16") | StorageView}.
              Each array gets its own storage (written contiguous, in C order); a
              StorageView is a (shape, stride, offset) window on storages[view.storage],
              which is how tests write shared storages, offsets and transposed strides.
    storages: {key: flat array | StoredTensor | Deferred} backing the StorageViews; each is
              written once, under its element count, however many views share it.
    root:     the zip's root folder (torch uses the file stem; the released files "archive"
              or "pytorch_model").
    wrap:     the pickle holds {wrap: OrderedDict(...)} as released ("model"); None writes the
              OrderedDict bare.
    check:    refuse views that reach outside their storage (check=False writes them anyway:
              for tests of the reader).
    """
    storages = dict(storages or {})
    records, blobs, key_of = collections.OrderedDict(), {}, {}

    def storage_key(ident):
        if ident not in key_of:
            key_of[ident] = str(len(key_of))
        return key_of[ident]

    for name, value in tensors.items():
        if isinstance(value, StorageView):
            if value.storage not in storages:
                raise KeyError(f"{name}: StorageView names unknown storage {value.storage!r}")
            dtype, shape = _meta(storages[value.storage])
            numel = int(np.prod(shape, dtype=np.int64))
            key = storage_key(("named", value.storage))
            blobs[key] = storages[value.storage]
            if check:
                empty = any(s == 0 for s in value.shape)
                last = value.offset + sum((s - 1) * st for s, st in zip(value.shape,
                                                                        value.stride))
                if len(value.shape) != len(value.stride) or min(
                        (value.offset,) + value.shape + value.stride) < 0 or (
                        not empty and last >= numel):
                    raise ValueError(f"{name}: view (offset {value.offset}, shape "
                                     f"{value.shape}, stride {value.stride}) does not fit a "
                                     f"storage of {numel} elements")
            records[name] = TensorRecord(key, dtype, numel, value.offset, value.shape,
                                         value.stride)
        else:
            dtype, shape = _meta(value)
            key = storage_key(("own", name))
            blobs[key] = value
            records[name] = TensorRecord(key, dtype, int(np.prod(shape, dtype=np.int64)), 0,
                                         shape, _contiguous_strides(shape))
    obj = records if wrap is None else {wrap: records}
    write_torch_zip_records(path, torch_pickle_bytes(obj), blobs, root=root)
