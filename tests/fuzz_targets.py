"""Fuzz targets for tests/test_fuzz.py: hostile and corrupt checkpoints and configs.

Each target runs `examples` Hypothesis examples in this process and returns outcome counts.
tests/test_fuzz.py runs every target in a child process under a memory limit (RLIMIT_AS), so
an unbounded allocation surfaces as a failure and a crash as a dead child, never as a hung
or killed test session:

    PYTHONPATH=. python3 tests/fuzz_targets.py TARGET EXAMPLES WORKDIR [SEED]
        -> one JSON line {"target", "examples", "seed", outcome: count, ...} on stdout

Every example must end in a load (whose arrays all lie inside the mapped file) or in one of
the documented errors (CheckpointError; through bm.load also ConfigError and WeightError,
all ValueError subclasses). Any other exception fails the target, and Hypothesis prints the
smallest input it finds. A canary file that any executed pickle code would create must never
appear, and the allow-listed stand-ins of the unpickler must not change.
"""
import collections
import faulthandler
import io
import json
import math
import mmap
import os
import pathlib
import resource
import shutil
import struct
import sys
import time
import zipfile

import numpy as np
from hypothesis import HealthCheck, Phase, given, seed as hyp_seed, settings
from hypothesis import strategies as st

HERE = pathlib.Path(__file__).resolve().parent    # blackmamba: from PYTHONPATH (the
                                                  # package the calling test imported)

import blackmamba as bm                                         # noqa: E402
from blackmamba import checkpoint as ck                         # noqa: E402
from blackmamba.checkpoint import (CheckpointError, TensorRecord, load_tensors,  # noqa: E402
                                   save_safetensors, save_torch_zip, to_bfloat16,
                                   torch_pickle_bytes, write_torch_zip_records)
from blackmamba.config import Config, ConfigError, load_config  # noqa: E402
from blackmamba.model import Model, WeightError, random_tensors  # noqa: E402

MEMORY_LIMIT = 2 << 30      # address space of the child: files here are < 1 MB
TARGETS = {}


def target(fn):
    TARGETS[fn.__name__] = fn
    return fn


SEED = 0                    # set by main(): printed, so a failing run can be repeated


def _settings(n):
    def apply(test):
        return hyp_seed(SEED)(settings(max_examples=n, deadline=None, database=None,
                                       phases=[Phase.explicit, Phase.generate, Phase.shrink],
                                       suppress_health_check=list(HealthCheck))(test))
    return apply


# ------------------------------------------------------------------------------- shared checks

def _golden():
    shared = os.environ.get("BLACKMAMBA_SHARED", str(HERE.parent.parent / "shared"))
    return pathlib.Path(shared) / "golden" / "tiny-a"


def _mmap_range(a):
    base = a        # ndarray .base chains, as_strided's DummyArray .base, memoryview .obj
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None) if hasattr(base, "base") else \
            getattr(base, "obj", None)
    if base is None:
        return None
    start = np.frombuffer(base, np.uint8).__array_interface__["data"][0]
    return start, start + len(base)


def check_loaded(tensors):
    """Every array of a load lies inside its mapped file; small ones convert."""
    for name, t in tensors.items():
        a = t.array
        assert a.shape == t.shape and isinstance(t.dtype, str), name
        if a.size == 0:
            continue
        lo, hi = np.lib.array_utils.byte_bounds(a) if hasattr(np.lib, "array_utils") \
            else np.byte_bounds(a)
        span = _mmap_range(a)
        assert span is not None, f"{name}: not a view of the mapped file"
        assert span[0] <= lo and hi <= span[1], f"{name}: [{lo}, {hi}) outside {span}"
        first, last = a[(0,) * a.ndim], a[tuple(s - 1 for s in a.shape)]   # both extremes
        del first, last
        if a.size <= 1 << 16:
            with np.errstate(over="ignore", invalid="ignore"):   # float64 beyond float32
                f = t.to_numpy()
            assert f.shape == a.shape and f.dtype == np.float32


class Canary:
    """A file the hostile pickles would create if any of their code ran."""

    def __init__(self, work):
        self.path = work / "canary"
        self.cmd = f"touch {self.path}"

    def check(self):
        assert not self.path.exists(), "a pickle executed code: the canary file exists"


def _stand_ins():
    """What a BUILD or setattr on the allow-listed globals could change."""
    snap = {}
    for key, v in ck._ALLOWED_GLOBALS.items():
        fn = getattr(v, "fn", None)
        if fn is not None:
            snap[key] = (id(v), id(fn), fn.__defaults__, fn.__kwdefaults__, dict(fn.__dict__),
                         fn.__code__)
        elif isinstance(v, type):
            snap[key] = (id(v), sorted(vars(v)))
        else:
            snap[key] = (id(v), tuple(getattr(v, s) for s in type(v).__slots__))
    return snap


# ---------------------------------------------------------------------------- byte mutations

def _zip_fields(data):
    """(offset, width) of every integer field of every zip record found in `data`."""
    layouts = {
        b"PK\x03\x04": [(4, 2), (6, 2), (8, 2), (14, 4), (18, 4), (22, 4), (26, 2), (28, 2)],
        b"PK\x01\x02": [(4, 2), (6, 2), (8, 2), (10, 2), (16, 4), (20, 4), (24, 4), (28, 2),
                        (30, 2), (32, 2), (34, 2), (42, 4)],
        b"PK\x05\x06": [(4, 2), (6, 2), (8, 2), (10, 2), (12, 4), (16, 4), (20, 2)],
        b"PK\x06\x06": [(4, 8), (24, 8), (32, 8), (40, 8), (48, 8)],
        b"PK\x06\x07": [(8, 8), (16, 4)],
    }
    fields = []
    for sig, layout in layouts.items():
        i = data.find(sig)
        while i >= 0:
            fields += [(i + o, w) for o, w in layout if i + o + w <= len(data)]
            i = data.find(sig, i + 1)
    # zip64 extra fields inside headers (id 0x0001): their 8-byte sizes/offsets
    i = data.find(b"\x01\x00\x10\x00")
    while i >= 0:
        fields += [(i + 4, 8), (i + 12, 8)]
        i = data.find(b"\x01\x00\x10\x00", i + 1)
    return [(o, w) for o, w in fields if o + w <= len(data)]


def _interesting(draw, width, old, size):
    top = 1 << (8 * width)
    v = draw(st.sampled_from(["zero", "one", "max", "half", "size", "old+", "old-", "any"]))
    delta = draw(st.integers(1, 200))
    return {"zero": 0, "one": 1, "max": top - 1, "half": top >> 1, "size": size + delta - 100,
            "old+": old + delta, "old-": old - delta,
            "any": draw(st.integers(0, top - 1))}[v] % top


def mutate(draw, data, hot=(), fields=()):
    """1-4 random mutations of `data`: integer fields set to boundary values, bytes set or
    flipped, bytes inserted or deleted, truncation. Positions favour the `hot` byte ranges
    (headers, pickles) over the bulk of tensor bytes."""
    d = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if not d:
            break
        kind = draw(st.sampled_from(["field", "field", "byte", "flip", "insert", "delete",
                                     "truncate"] if fields else
                                    ["byte", "flip", "insert", "delete", "truncate"]))
        if kind == "field":
            o, w = draw(st.sampled_from(fields))
            if o + w > len(d):
                continue
            old = int.from_bytes(d[o:o + w], "little")
            d[o:o + w] = _interesting(draw, w, old, len(d)).to_bytes(w, "little")
            continue
        ranges = [r for r in hot if r[0] < len(d)]
        if ranges and draw(st.integers(0, 9)) < 8:
            a, b = draw(st.sampled_from(ranges))
            pos = draw(st.integers(a, min(b, len(d)) - 1))
        else:
            pos = draw(st.integers(0, len(d) - 1))
        if kind == "byte":
            d[pos] = draw(st.integers(0, 255))
        elif kind == "flip":
            d[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            d[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del d[pos:pos + draw(st.integers(1, 64))]
        else:
            del d[pos:]
    return bytes(d)


def _small_zip(work):
    """A zip checkpoint with shared storages, an offset, transposed strides, bf16, int64."""
    rng = np.random.default_rng(0)
    flat = rng.standard_normal(64).astype(np.float32)
    p = work / "small.bin"
    save_torch_zip(p, {"whole": ck.StorageView("s", (64,)),
                       "mat": ck.StorageView("s", (6, 5), offset=3),
                       "matT": ck.StorageView("s", (5, 6), stride=(1, 5), offset=3),
                       "bcast": ck.StorageView("s", (4, 3), stride=(0, 1), offset=1),
                       "bf": to_bfloat16(rng.standard_normal((3, 7))),
                       "i": np.arange(5, dtype=np.int64)},
                   storages={"s": flat})
    return p.read_bytes()


def _zip_hot_ranges(data):
    """Byte ranges of every record header, name, and of each data.pkl."""
    hot = []
    for sig, n in ((b"PK\x03\x04", 30), (b"PK\x01\x02", 46), (b"PK\x05\x06", 22)):
        i = data.find(sig)
        while i >= 0:
            hot.append((i, min(len(data), i + n + 64)))
            i = data.find(sig, i + 1)
    z = zipfile.ZipFile(io.BytesIO(data))
    for info in z.infolist():
        if info.filename.endswith("data.pkl"):
            start = info.header_offset + 30 + len(info.filename.encode()) + \
                struct.unpack("<H", data[info.header_offset + 28:info.header_offset + 30])[0]
            hot.append((start, start + info.compress_size))
    return hot


def _zip_parts(data):
    """(root, data.pkl bytes, {storage key: bytes}) of a torch zip."""
    z = zipfile.ZipFile(io.BytesIO(data))
    pkl = [n for n in z.namelist() if n.endswith("/data.pkl")][0]
    root = pkl.split("/")[0]
    storages = {n.split("/data/", 1)[1]: z.read(n) for n in z.namelist()
                if n.startswith(root + "/data/")}
    return root, z.read(pkl), storages


@target
def zip_bytes(n, work):
    """Random damage to real torch zips (tiny-a as released; a small one with shared
    storages and strides): boundary values in zip header fields, bytes set, flipped,
    inserted, deleted, truncation; and the pickle alone damaged inside a valid zip. A quarter
    of the tiny-a cases go through bm.load (config + weights) and a 3-token forward."""
    golden = _golden()
    sources = {"tiny-a": (golden / "pytorch_model.bin").read_bytes(), "small": _small_zip(work)}
    meta = {k: (_zip_hot_ranges(v), _zip_fields(v), _zip_parts(v)) for k, v in sources.items()}
    model_dir = work / "model"
    model_dir.mkdir()
    shutil.copy(golden / "config.json", model_dir / "config.json")
    bad = model_dir / "pytorch_model.bin"
    out = collections.Counter()

    @_settings(n)
    @given(st.data())
    def run(data):
        name = data.draw(st.sampled_from(sorted(sources)))
        hot, fields, (root, pkl, storages) = meta[name]
        how = data.draw(st.sampled_from(["zip", "zip", "pickle"]))
        if how == "zip":
            bad.write_bytes(mutate(data.draw, sources[name], hot, fields))
        else:                            # a valid zip around a damaged pickle
            write_torch_zip_records(bad, mutate(data.draw, pkl, [(0, len(pkl))]), storages,
                                    root=root)
        via_model = name == "tiny-a" and data.draw(st.integers(0, 3)) == 0
        try:
            if via_model:
                m = bm.load(model_dir, tokenizer=False)
                logits = m(np.array([[1, 2, 3]]))
                assert logits.shape == (1, 3, m.vocab_size)
                out["loaded model"] += 1
            else:
                check_loaded(load_tensors(bad, verify=data.draw(st.booleans())))
                out["loaded"] += 1
        except CheckpointError:
            out["CheckpointError"] += 1
        except (WeightError, ConfigError) as exc:
            assert via_model, exc
            out[type(exc).__name__] += 1
        out["examples"] += 1

    run()
    return out


# ---------------------------------------------------------------------- random pickle streams

def _u(s):
    b = s.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(b)) + b


def _pickle_atoms(canary):
    """Strategies for pickle fragments: every opcode family with well-formed arguments, the
    forbidden calls in each of their spellings (each would create the canary if run), the
    allow-listed globals, and whole well-formed tensor records."""
    cmd = canary.cmd
    path = str(canary.path)
    forbidden = [("os", "system", _u(cmd) + b"\x85"), ("posix", "system", _u(cmd) + b"\x85"),
                 ("builtins", "exec", _u(f"open({path!r}, 'w')") + b"\x85"),
                 ("builtins", "eval", _u(f"open({path!r}, 'w')") + b"\x85"),
                 ("builtins", "open", _u(path) + _u("w") + b"\x86"),
                 ("io", "open", _u(path) + _u("w") + b"\x86"),
                 ("subprocess", "Popen", b"(" + _u("sh") + _u("-c") + _u(cmd) + b"l\x85"),
                 ("pathlib", "Path", _u(path) + b"\x85"),
                 ("torch", "load", _u(path) + b"\x85"),
                 ("torch.storage", "_load_from_bytes", _u(cmd) + b"\x85"),
                 ("numpy.core.multiarray", "_reconstruct", b")"),
                 ("__builtin__", "eval", _u(f"open({path!r}, 'w')") + b"\x85"),
                 ("copyreg", "_reconstructor", b")")]
    allowed = [("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
               ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_parameter"),
               ("torch", "Size"), ("torch", "FloatStorage"), ("torch", "BFloat16Storage"),
               ("torch", "LongStorage"), ("torch", "float32"), ("torch", "bfloat16")]
    ints = st.one_of(st.integers(-3, 300), st.sampled_from([2 ** 31 - 1, 2 ** 32, 2 ** 63,
                                                            -2 ** 63, 2 ** 64, 10 ** 15]))

    def enc_int(v):
        if 0 <= v < 256:
            return b"K" + bytes([v])
        if 0 <= v < 65536:
            return b"M" + struct.pack("<H", v)
        if -2 ** 31 <= v < 2 ** 31:
            return b"J" + struct.pack("<i", v)
        raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
        return b"\x8a" + bytes([len(raw)]) + raw

    def gadget_forbidden(t):
        (mod, name, args), spelling = t
        if spelling == "GLOBAL":
            return b"c" + f"{mod}\n{name}\n".encode() + args + b"R"
        if spelling == "STACK_GLOBAL":
            return _u(mod) + _u(name) + b"\x93" + args + b"R"
        if spelling == "INST":
            return b"(" + args[:-1] + b"i" + f"{mod}\n{name}\n".encode()
        if spelling == "OBJ":
            return b"(c" + f"{mod}\n{name}\n".encode() + args[:-1] + b"o"
        if spelling == "NEWOBJ":
            return b"c" + f"{mod}\n{name}\n".encode() + args + b"\x81"
        if spelling == "NEWOBJ_EX":
            return b"c" + f"{mod}\n{name}\n".encode() + args + b"}\x92"
        return b"c" + f"{mod}\n{name}\n".encode() + b"N}" + _u("__setstate__") + \
            b"c" + f"{mod}\n{name}\n".encode() + b"s\x86b"                 # BUILD

    def gadget_tensor(t):
        stype, key, numel, offset, size, stride = t
        persid = b"(" + _u("storage") + b"ctorch\n" + stype.encode() + b"\n" + _u(key) + \
            _u("cpu") + enc_int(numel) + b"tQ"
        tup = lambda xs: b"(" + b"".join(enc_int(x) for x in xs) + b"t"   # noqa: E731
        return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + persid + enc_int(offset) + tup(size)
                + tup(stride) + b"\x89ccollections\nOrderedDict\n)Rt" + b"R")

    scalar = st.one_of(ints.map(enc_int), st.text(max_size=8).map(_u), st.just(b"N"),
                       st.just(b"\x88"))
    literal = st.one_of(
        ints.map(enc_int),
        st.integers(-10 ** 6, 10 ** 6).map(lambda v: b"I" + str(v).encode() + b"\n"),
        st.floats(allow_nan=True).map(lambda f: b"G" + struct.pack(">d", f)),
        st.text(max_size=12).map(_u),
        st.binary(max_size=12).map(lambda b: b"C" + bytes([len(b)]) + b),
        st.text(alphabet="abcz./_ ", max_size=8).map(lambda s: b"S'" + s.encode() + b"'\n"),
        st.sampled_from([b"N", b"\x88", b"\x89", b"]", b"}", b")", b"\x8f", b"(", b"l", b"d",
                         b"t", b"\x85", b"\x86", b"\x87", b"a", b"e", b"s", b"u", b"\x90",
                         b"\x91", b"0", b"1", b"2", b"\x94", b"R", b"b", b"o", b"\x81", b"\x92",
                         b"\x93", b"Q", b".", b"\x97", b"\x98", b"\x80\x02", b"\x80\x05",
                         b"\x82\x01"]),
        st.integers(0, 7).map(lambda i: b"q" + bytes([i])),
        st.integers(0, 7).map(lambda i: b"h" + bytes([i])),
        st.integers(0, 2 ** 32 - 1).map(lambda i: b"j" + struct.pack("<I", i)),
        st.integers(0, 9).map(lambda i: b"p" + str(i).encode() + b"\n"),
        st.integers(0, 9).map(lambda i: b"g" + str(i).encode() + b"\n"),
        st.text(alphabet="0123456789abc ", max_size=6).map(lambda s: b"P" + s.encode() + b"\n"),
        st.integers(0, 2 ** 64 - 1).map(lambda n: b"\x95" + struct.pack("<Q", n)),
        st.integers(0, 2 ** 64 - 1).map(lambda n: b"\x8e" + struct.pack("<Q", n)),  # BINBYTES8
    )
    globals_ = st.sampled_from(allowed).map(lambda mn: b"c" + f"{mn[0]}\n{mn[1]}\n".encode())
    forbidden_calls = st.tuples(st.sampled_from(forbidden),
                                st.sampled_from(["GLOBAL", "STACK_GLOBAL", "INST", "OBJ",
                                                 "NEWOBJ", "NEWOBJ_EX", "BUILD"])
                                ).map(gadget_forbidden)
    dims = st.lists(ints, max_size=4)
    tensors = st.tuples(st.sampled_from(["FloatStorage", "BFloat16Storage", "LongStorage",
                                         "ByteStorage", "Size", "float32"]),
                        st.sampled_from(["0", "1", "2", "9", "../0"]), ints, ints, dims,
                        dims).map(gadget_tensor)
    # units that push exactly one object, so that streams of them stay well formed long
    # enough for the forbidden globals to reach the unpickler's find_class
    unit = st.deferred(lambda: st.one_of(scalar, scalar, forbidden_calls, tensors, globals_,
                                         container))
    container = st.tuples(st.sampled_from([b"l", b"t", b"\x91"]),
                          st.lists(unit, max_size=3)).map(
        lambda t: b"(" + b"".join(t[1]) + t[0])
    value = st.one_of(forbidden_calls, forbidden_calls, forbidden_calls, tensors, unit)
    return value, st.one_of(literal, literal, globals_, forbidden_calls, tensors, unit)


@target
def pickle_opcodes(n, work):
    """data.pkl replaced by random opcode streams, alone or spliced at an opcode boundary
    into a valid {"model": {...}} pickle, inside a valid zip with real storages."""
    canary = Canary(work)
    unit, atom = _pickle_atoms(canary)
    good = torch_pickle_bytes({"model": collections.OrderedDict(
        [("w", TensorRecord("0", "float32", 64, 0, (8, 8), (8, 1))),
         ("b", TensorRecord("1", "bfloat16", 16, 0, (4, 4), (4, 1)))])})
    import pickletools
    bounds = [pos for _, _, pos in pickletools.genops(good)]
    storages = {"0": np.arange(64, dtype=np.float32), "1": to_bfloat16(np.ones(16)),
                "2": np.arange(8, dtype=np.int64)}
    bad = work / "bad.bin"
    before = _stand_ins()
    out = collections.Counter()

    @_settings(n)
    @given(st.data())
    def run(data):
        how = data.draw(st.sampled_from(["dict", "dict", "dict", "splice", "raw"]))
        if how == "dict":              # {"k0": unit, ...} with a few raw opcodes mixed in
            items = data.draw(st.lists(unit, min_size=1, max_size=6))
            if data.draw(st.integers(0, 4)) == 0:          # and a raw opcode somewhere
                items.insert(data.draw(st.integers(0, len(items))), data.draw(atom))
            body = b"".join(_u(f"k{i}") + u for i, u in enumerate(items))
            pkl = b"\x80\x02}(" + body + b"u."
        else:
            body = b"".join(data.draw(st.lists(atom, min_size=1, max_size=30)))
            if how == "splice":
                at = data.draw(st.sampled_from(bounds))
                pkl = good[:at] + body + good[at:]
            else:
                pkl = b"\x80\x02" + body + (b"." if data.draw(st.booleans()) else b"")
        write_torch_zip_records(bad, pkl, storages)
        try:
            check_loaded(load_tensors(bad))
            out["loaded"] += 1
        except CheckpointError as exc:
            out["refused global" if "refusing global" in str(exc) else "CheckpointError"] += 1
            if os.environ.get("FUZZ_DEBUG"):
                out[str(exc).split(": ")[-1][:50]] += 1
        canary.check()
        out["examples"] += 1

    run()
    canary.check()
    assert _stand_ins() == before, "the unpickler's allow-listed stand-ins changed"
    return out


# ----------------------------------------------------------------- tensor geometry and dtypes

@target
def tensor_geometry(n, work):
    """Structured torch zips: 1-3 tensor records with random storage dtype tags, keys,
    declared element counts, offsets, shapes and strides (negative, zero, huge, beyond int64,
    length mismatches), sharing storages under different dtypes, over storage entries of
    random length (truncated, not a multiple of the item size). A load must give exactly the
    elements an independent index computation reads from the raw storage bytes."""
    hostile = st.sampled_from([-1, -2, -2 ** 63, 0, 2 ** 31, 2 ** 32 + 1, 2 ** 62,
                               2 ** 63 - 1, 2 ** 63, 2 ** 64 + 3, 10 ** 15, 2 ** 70,
                               10 ** 5000, -10 ** 5000])
    bad = work / "geom.bin"
    out = collections.Counter()

    @st.composite
    def record(draw):
        """A tensor that fits its storage by construction, then 0-2 fields damaged."""
        dtype = draw(st.sampled_from(sorted(ck.DTYPES)))
        shape = draw(st.lists(st.integers(0, 5), max_size=4))
        stride = draw(st.lists(st.integers(0, 7), min_size=len(shape), max_size=len(shape)))
        offset = draw(st.integers(0, 6))
        span = sum((n - 1) * t for n, t in zip(shape, stride) if n) + 1
        numel = offset + span + draw(st.integers(0, 3))
        key = draw(st.sampled_from(["0", "1"]))
        rec = [key, dtype, numel, offset, shape, stride]
        for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2]))):
            i = draw(st.integers(0, 5))
            if i == 0:
                rec[0] = draw(st.sampled_from(["7", "../0", ""]))
            elif i == 1:
                rec[1] = draw(st.sampled_from(["bogus", "Size", "float32", "bfloat16", "int8"]))
            elif i in (2, 3):
                rec[i] = draw(st.one_of(hostile, st.integers(-3, 60)))
            else:
                dims = list(rec[i])
                how = draw(st.sampled_from(["value", "append", "drop"]))
                if how == "value" and dims:
                    dims[draw(st.integers(0, len(dims) - 1))] = draw(
                        st.one_of(hostile, st.integers(-2, 30)))
                elif how == "append":
                    dims.append(draw(st.one_of(hostile, st.integers(0, 5))))
                else:
                    dims = dims[:-1]
                rec[i] = dims
        return rec

    def storage_bytes(draw, recs):
        """Each storage sized for its largest declared need, or damaged (truncated or a
        length that is not a multiple of the item size)."""
        raw = {}
        for key, dtype, numel, *_ in recs:
            item = ck.DTYPES[dtype].itemsize if dtype in ck.DTYPES else 4
            need = numel * item if 0 <= numel < 4096 else 64
            raw[key] = max(raw.get(key, 0), need)
        out = {}
        for key, n in raw.items():
            n = draw(st.sampled_from([n, n, n, max(0, n - 1), n // 2, n + 3]))
            out[key] = bytes(i * 37 % 251 for i in range(n))
        return out

    @_settings(n)
    @given(st.data())
    def run(data):
        records = data.draw(st.lists(record(), min_size=1, max_size=3))
        raw = storage_bytes(data.draw, records)
        recs = collections.OrderedDict()
        for i, (key, dtype, numel, offset, size, stride) in enumerate(records):
            recs[f"t{i}"] = TensorRecord(key, dtype, numel, offset, size, stride)
        write_torch_zip_records(bad, torch_pickle_bytes({"model": recs}), raw)
        try:
            T = load_tensors(bad)
        except CheckpointError:
            out["CheckpointError"] += 1
            out["examples"] += 1
            return
        check_loaded(T)
        for name, rec in recs.items():              # the reference read of every element
            t = T[name]
            itemsize = ck.DTYPES[t.dtype].itemsize
            store = np.frombuffer(raw[rec.key][:rec.numel * itemsize],
                                  ck.DTYPES[t.dtype]) if rec.numel else None
            assert t.shape == tuple(rec.shape)
            for flat in range(min(64, t.array.size)):
                idx = np.unravel_index(flat, t.shape)
                e = rec.offset + sum(int(i) * s for i, s in zip(idx, rec.stride))
                assert 0 <= e < rec.numel
                assert t.array[idx].tobytes() == store[e].tobytes(), (name, idx)
        out["loaded"] += 1
        out["examples"] += 1

    run()
    return out


# --------------------------------------------------------------------------------- safetensors

def _json_values():
    return st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                  st.floats(allow_nan=True), st.text(max_size=8)),
        lambda inner: st.one_of(st.lists(inner, max_size=4),
                                st.dictionaries(st.text(max_size=6), inner, max_size=4)),
        max_leaves=12)


@target
def safetensors(n, work):
    """safetensors files with structured random headers (valid and bogus dtype tags, shapes
    and data_offsets of any JSON type, huge and negative numbers, overlaps, metadata of any
    type) over data of random length; and byte damage to a valid file's length prefix and
    header."""
    rng = np.random.default_rng(1)
    good_path = work / "good.safetensors"
    save_safetensors(good_path, {"a": rng.standard_normal((5, 7)).astype(np.float32),
                                 "b": to_bfloat16(rng.standard_normal(6)),
                                 "c": np.arange(4, dtype=np.int64)}, metadata={"k": "v"})
    good = good_path.read_bytes()
    hlen = struct.unpack("<Q", good[:8])[0]
    ints = st.one_of(st.integers(-3, 200), st.sampled_from([2 ** 31, 2 ** 63, 2 ** 64,
                                                            10 ** 15, 10 ** 30]))
    tags = st.one_of(st.sampled_from(sorted(ck._SAFETENSORS) + ["F8_E4M3", "f32", ""]),
                     _json_values())
    entry = st.one_of(
        st.fixed_dictionaries({"dtype": tags,
                               "shape": st.one_of(st.lists(ints, max_size=4), _json_values()),
                               "data_offsets": st.one_of(st.lists(ints, min_size=2,
                                                                  max_size=2),
                                                         _json_values())}),
        _json_values())
    header = st.dictionaries(st.text(max_size=6), entry, min_size=1, max_size=4)
    bad = work / "bad.safetensors"
    out = collections.Counter()

    def consistent(draw):
        """A valid header and data for 1-3 small tensors, then 0-2 corrupted fields."""
        h, pos = {}, 0
        for i in range(draw(st.integers(1, 3))):
            tag = draw(st.sampled_from(sorted(ck._SAFETENSORS)))
            shape = draw(st.lists(st.integers(0, 4), max_size=3))
            nbytes = int(np.prod(shape, dtype=np.int64)) * ck.DTYPES[ck._SAFETENSORS[tag]].itemsize
            h[f"t{i}"] = {"dtype": tag, "shape": shape, "data_offsets": [pos, pos + nbytes]}
            pos += nbytes
        for _ in range(draw(st.integers(0, 2))):
            e = h[draw(st.sampled_from(sorted(h)))]
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
            how = draw(st.sampled_from(["json", "int", "shift"]))
            if how == "json" or (field != "dtype" and not isinstance(e[field], list)):
                e[field] = draw(_json_values())
            elif how == "int" and field != "dtype":
                e[field] = [draw(ints) for _ in e[field]] or [draw(ints)]
            elif field == "data_offsets":
                e[field] = [v + draw(st.integers(-9, 9)) if isinstance(v, int) else v
                            for v in e[field]]
            else:
                e[field] = draw(tags)
        return h, pos

    @_settings(n)
    @given(st.data())
    def run(data):
        if data.draw(st.booleans()):
            if data.draw(st.integers(0, 3)) == 0:
                h, pos = data.draw(header), data.draw(st.integers(0, 128))
            else:
                h, pos = consistent(data.draw)
            if data.draw(st.booleans()):
                h["__metadata__"] = data.draw(_json_values())
            blob = json.dumps(h).encode()
            blob += b" " * data.draw(st.integers(0, 8))
            prefix = len(blob)
            if data.draw(st.integers(0, 4)) == 0:
                prefix = data.draw(ints) % 2 ** 64
            raw = struct.pack("<Q", prefix) + blob + bytes(range(256))[:pos] + \
                data.draw(st.one_of(st.just(b""), st.binary(max_size=16)))
        else:
            raw = mutate(data.draw, good, [(0, 8 + hlen)], [(0, 8)])
        bad.write_bytes(raw)
        try:
            check_loaded(load_tensors(bad))
            out["loaded"] += 1
        except CheckpointError:
            out["CheckpointError"] += 1
        out["examples"] += 1

    run()
    return out


# ------------------------------------------------------------------------------------- config

_BASE = dict(num_layers=4, hidden_size=24, state_size=8, conv_dimension=4, vocab_size=61,
             expansion_factor=2, mamba_moe_layers=["r", "4", "r2", "1"], ffn_hidden_size=16,
             bias=False, add_bias_linear=False, swiglu=True, max_sequence_length=2048)
_KEYS = sorted(Config.__dataclass_fields__)
# a key whose value is wrong can be reported through the key that contradicts it
_RELATED = {"num_layers": {"mamba_moe_layers"}, "mamba_moe_layers": {"num_layers"},
            "ffn_hidden_size": {"mamba_moe_layers"}, "real_vocab_size": {"vocab_size"},
            "vocab_size": {"real_vocab_size"}}


def _bad_values():
    return st.one_of(
        st.integers(-5, 5), st.sampled_from([-1, 0, 2 ** 31, 2 ** 63, 10 ** 30, 10 ** 5000]),
        st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf,
                                                                         -math.inf, 1e308]),
        st.text(max_size=6), st.none(), st.booleans(),
        st.lists(st.sampled_from(["r", "8", "r2", "x", 3, None, "", "r0", "88"]), max_size=9),
        st.sampled_from([["r"] * 100_000, [["r"]] * 4, {"r": 1}, "r8r8", ("r",) * 4]),
        _json_values())


@target
def config(n, work):
    """config.json dicts with 1-3 keys removed, replaced by random values (negative, zero,
    absurd, 10**5000, NaN, inf, strings, None, bools, huge lists, nested JSON) or added
    (unknown keys); half of them through a JSON file and load_config. Each gives a
    ConfigError naming a changed key (or one it contradicts) or a Config within its limits;
    a small valid one builds a random model that runs."""
    path = work / "config.json"
    out = collections.Counter()

    @_settings(n)
    @given(st.data())
    def run(data):
        raw = dict(_BASE)
        changed = set()
        for _ in range(data.draw(st.integers(1, 3))):
            kind = data.draw(st.sampled_from(["remove", "set", "set", "set", "unknown"]))
            if kind == "unknown":
                k = data.draw(st.sampled_from(["rotary", "d_inner", "num_heads", "routing",
                                               "torch_dtype", ""]))
            else:
                k = data.draw(st.sampled_from(_KEYS))
            changed.add(k)
            if kind == "remove":
                raw.pop(k, None)
            else:
                raw[k] = data.draw(_bad_values())
        via_file = data.draw(st.booleans())
        try:
            if via_file:
                try:
                    text = json.dumps(raw)
                except ValueError:            # 10**5000 cannot be written as JSON text
                    via_file = False
                else:
                    path.write_text(text)
            cfg = load_config(path) if via_file else Config.from_dict(raw)
        except ConfigError as exc:
            msg = str(exc)
            named = {k for k in _KEYS + ["rotary", "d_inner", "num_heads", ""]
                     if f"'{k}'" in msg}
            related = set().union(changed, *(_RELATED.get(k, set()) for k in changed))
            assert named & related or "absurdly large" in msg or "not valid JSON" in msg \
                or "larger than 1 MiB" in msg, (msg, changed)
            out["ConfigError"] += 1
            out["examples"] += 1
            return
        for k, (lo, hi) in bm.config._LIMITS.items():   # ffn 0: no MLP layers need one
            assert lo <= getattr(cfg, k) <= hi or (k == "ffn_hidden_size" and cfg.ffn_hidden_size
                                                   == 0 and set(cfg.layer_kinds) == {"r"}), k
        assert len(cfg.layer_kinds) == cfg.num_layers
        out["loaded"] += 1
        if cfg.num_layers * cfg.hidden_size * max(cfg.d_inner, cfg.ffn_hidden_size, 1) \
                * 9 < 2_000_000 and cfg.vocab_size * cfg.hidden_size < 2_000_000:
            m = Model(cfg, random_tensors(cfg, seed=0))
            ids = np.array([[0, cfg.vocab_size - 1]])
            assert m(ids).shape == (1, 2, cfg.vocab_size)
            out["ran a model"] += 1
        out["examples"] += 1

    run()
    return out


def main():
    name, n, work = sys.argv[1], int(sys.argv[2]), pathlib.Path(sys.argv[3])
    global SEED
    SEED = int(sys.argv[4]) if len(sys.argv) > 4 else int.from_bytes(os.urandom(4), "little")
    print(f"fuzz target {name}: {n} examples, seed {SEED}", file=sys.stderr, flush=True)
    faulthandler.enable()
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    t0 = time.perf_counter()
    counts = TARGETS[name](n, work)
    result = {"target": name, "seed": SEED, "seconds": round(time.perf_counter() - t0, 2)}
    result.update(sorted(counts.items()))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
