"""blackmamba.checkpoint: the released file loads as views of the file, writers round-trip,
hostile and corrupt files raise CheckpointError (never execute, never over-allocate)."""
import collections
import io
import json
import math
import mmap
import os
import pathlib
import pickletools
import re
import struct
import time
import tracemalloc
import zipfile

import numpy as np
import pytest

from blackmamba import checkpoint as ck
from blackmamba.checkpoint import (CheckpointError, Deferred, StorageView, StoredTensor,
                                   TensorRecord, load_tensors, save_safetensors, save_torch_zip,
                                   to_bfloat16, torch_pickle_bytes, write_torch_zip_records)

import conftest

GOLDEN = pathlib.Path(conftest.GOLDEN)


@pytest.fixture
def tiny_a():
    """The released-format file is the point of these tests: missing it is a failure."""
    if not (GOLDEN / "pytorch_model.bin").exists():
        pytest.fail(f"{GOLDEN}/pytorch_model.bin not found (set BLACKMAMBA_SHARED)")
    return GOLDEN / "pytorch_model.bin"


def expected_shapes(cfg):
    """SPEC section 5: every key and shape of a checkpoint for this config.json."""
    d, N, K, V = cfg["hidden_size"], cfg["state_size"], cfg["conv_dimension"], cfg["vocab_size"]
    E = cfg["expansion_factor"] * d
    R = math.ceil(d / 16)
    F = cfg["ffn_hidden_size"]
    out = {"embedding.word_embeddings.weight": (V, d), "decoder.final_layernorm.weight": (d,),
           "decoder.final_layernorm.bias": (d,)}
    for i, kind in enumerate(cfg["mamba_moe_layers"]):
        p = f"decoder.layers.{i}."
        out[p + "norm.weight"] = (d,)
        if kind == "r":
            m = p + "mixer."
            out.update({m + "in_proj.weight": (2 * E, d), m + "conv1d.weight": (E, 1, K),
                        m + "conv1d.bias": (E,), m + "x_proj.weight": (R + 2 * N, E),
                        m + "dt_proj.weight": (E, R), m + "dt_proj.bias": (E,),
                        m + "A_log": (E, N), m + "D": (E,), m + "out_proj.weight": (d, E)})
        else:
            X = int(kind)
            m = p + "mixer."
            out.update({m + "router.weight": (X, d), m + "router.bias": (X,)})
            for e in range(X):
                out[m + f"local_experts.{e}.linear_fc1.weight"] = (2 * F, d)
                out[m + f"local_experts.{e}.linear_fc2.weight"] = (d, F)
    return out


def reference_read(path):
    """An independent, deliberately naive reader for contiguous tensors: pickletools walks
    data.pkl's opcodes, zipfile reads each storage's bytes. Used to cross-check values."""
    z = zipfile.ZipFile(path)
    pkl = [n for n in z.namelist() if n.endswith("/data.pkl")][0]
    root = pkl.split("/")[0]
    ops = list(pickletools.genops(z.read(pkl)))
    out, name, pending = {}, None, []
    for i, (op, arg, _) in enumerate(ops):
        if op.name == "BINUNICODE" and ops[i + 1][0].name in ("BINPUT", "LONG_BINPUT") and \
                ops[i + 2][0].name in ("GLOBAL", "BINGET") and "." in arg:
            name = arg
        if op.name == "BINPERSID":
            # the tuple just closed: ('storage', type, key, 'cpu', numel); key is 3rd item
            strings = [a for (o, a, _) in ops[max(0, i - 12):i] if o.name == "BINUNICODE"]
            key = strings[-1] if strings[-1] != "cpu" else strings[-2]
            pending.append((name, key))
    for name, key in pending:
        out[name] = np.frombuffer(z.read(f"{root}/data/{key}"), dtype="<u2")
    return out


def _mmap_base(a):
    while a is not None and not isinstance(a, mmap.mmap):
        a = a.base if isinstance(a, np.ndarray) else getattr(a, "obj", None)
    return a


# ---------------------------------------------------------------------------- the released file

def test_tiny_a_every_key_and_shape(tiny_a):
    cfg = json.loads((GOLDEN / "config.json").read_text())
    T = load_tensors(GOLDEN / "pytorch_model.bin")
    want = expected_shapes(cfg)
    assert set(T) == set(want)
    assert len(T) == 61
    for k, shape in want.items():
        assert T[k].shape == shape, k
        assert T[k].dtype == "bfloat16", k
        assert T[k].array.dtype == np.uint16
        assert not T[k].array.flags.owndata and not T[k].array.flags.writeable
        assert isinstance(_mmap_base(T[k].array), mmap.mmap), k     # a view of the mapping
        assert T[k].array.ctypes.data % 64 == 0, k                  # torch's 64-byte alignment


def test_tiny_a_values_match_an_independent_reader(tiny_a):
    T = load_tensors(GOLDEN / "pytorch_model.bin")
    ref = reference_read(GOLDEN / "pytorch_model.bin")
    assert set(ref) == set(T)
    for k, bits in ref.items():
        np.testing.assert_array_equal(T[k].array.reshape(-1), bits, err_msg=k)
        f = T[k].to_numpy()
        assert f.dtype == np.float32 and f.flags.c_contiguous and f.shape == T[k].shape
        np.testing.assert_array_equal(f.reshape(-1).view(np.uint32), bits.astype(np.uint32) << 16)
    a = T["decoder.layers.0.mixer.A_log"].to_numpy()
    assert np.all(np.isfinite(a)) and 0.1 < np.abs(a).mean() < 10     # decoded as bf16, not noise


def test_tiny_a_loads_from_directory_and_rewrites_byte_identical_pickle(tmp_path, tiny_a):
    T = load_tensors(GOLDEN)                         # a directory: finds pytorch_model.bin
    out = tmp_path / "copy.bin"
    save_torch_zip(out, T, root="pytorch_model")
    z0, z1 = zipfile.ZipFile(GOLDEN / "pytorch_model.bin"), zipfile.ZipFile(out)
    # our pickler emits exactly the opcodes torch.save did
    assert z0.read("pytorch_model/data.pkl") == z1.read("pytorch_model/data.pkl")
    assert z1.testzip() is None
    assert z0.namelist()[:4] == z1.namelist()[:4]
    T2 = load_tensors(out, verify=True)
    for k in T:
        np.testing.assert_array_equal(T[k].array, T2[k].array)
        assert T2[k].array.ctypes.data % 64 == 0


def test_loading_does_not_copy_the_weights(tmp_path):
    # 48 MB of weights; loading them must allocate (almost) nothing: the arrays are the map
    path = tmp_path / "big.bin"
    rng = np.random.default_rng(0)
    save_torch_zip(path, {f"w{i}": StoredTensor(rng.integers(0, 2 ** 16, (1024, 4096),
                                                             dtype=np.uint16), "bfloat16")
                          for i in range(6)})
    tracemalloc.start()
    T = load_tensors(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert sum(t.nbytes for t in T.values()) == 6 * 1024 * 4096 * 2
    assert peak < 2 << 20, peak


# ---------------------------------------------------------------------------- round trips

def _random(rng, dtype, shape):
    if dtype == "bfloat16":
        return to_bfloat16(rng.standard_normal(shape).astype(np.float32))
    if dtype == "bool":
        return rng.random(shape) < 0.5
    if dtype.startswith("int") or dtype == "uint8":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(shape).astype(dtype)


ALL_DTYPES = ["bfloat16", "float16", "float32", "float64", "int64", "int32", "int16", "int8",
              "uint8", "bool"]
SHAPES = [(), (1,), (7,), (3, 33), (0, 5), (2, 1, 7), (2947,)]


def _same(a, b):
    a = a.array if isinstance(a, StoredTensor) else np.asarray(a)
    assert a.shape == b.array.shape
    np.testing.assert_array_equal(a, b.array)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_round_trip_all_dtypes_and_shapes(tmp_path, fmt, seed):
    rng = np.random.default_rng(seed)
    tensors = {f"t.{d}.{i}": _random(rng, d, s) for d in ALL_DTYPES for i, s in enumerate(SHAPES)}
    path = tmp_path / ("m.safetensors" if fmt == "safetensors" else "m.bin")
    (save_safetensors if fmt == "safetensors" else save_torch_zip)(path, tensors)
    back = load_tensors(path, verify=True)
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        want = v.dtype if isinstance(v, StoredTensor) else ck._dtype_name(v.dtype)
        assert back[k].dtype == want, k
        _same(v, back[k])


def test_bfloat16_conversion_is_exact_and_rounds_to_nearest_even():
    x = np.array([1.0, -2.5, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20, np.inf,
                  -0.0, 3.4e38, np.nan], dtype=np.float32)
    t = to_bfloat16(x)
    assert t.dtype == "bfloat16" and t.array.dtype == np.uint16
    y = t.to_numpy()
    # ties go to even: 1+2^-8 -> 1.0; 1+3*2^-8 -> 1+2^-6 ... (bf16 keeps 7 mantissa bits)
    np.testing.assert_array_equal(y[:7], np.array([1.0, -2.5, 1.0, 1 + 2 ** -6, 1 + 2 ** -7,
                                                   np.inf, -0.0], dtype=np.float32))
    assert np.signbit(y[6]) and np.isinf(y[7]) and np.isnan(y[8])      # 3.4e38 rounds to inf
    assert t.to_numpy("float64").dtype == np.float64


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bfloat16_matches_the_reference_on_every_kind_of_bit_pattern(seed):
    from blackmamba import ref
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x[:4] = np.array([0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFFFFFFFF], np.uint32).view(np.float32)
    np.testing.assert_array_equal(to_bfloat16(x).array, ref.f32_to_bf16(x))
    assert np.isnan(x).sum() > 100                      # NaN payloads exercised too


def test_safetensors_interoperates_with_the_safetensors_library(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(3)
    tensors = {"a": rng.standard_normal((5, 7)).astype(np.float32),
               "b": rng.integers(-9, 9, (3,), dtype=np.int64),
               "c": rng.standard_normal((2, 2, 2)).astype(np.float16),
               "e": np.zeros((0, 3), np.float32)}
    theirs = tmp_path / "theirs.safetensors"
    st.save_file(tensors, str(theirs), metadata={"format": "np"})
    for k, v in load_tensors(theirs).items():
        _same(tensors[k], v)
    ours = tmp_path / "ours.safetensors"
    save_safetensors(ours, tensors, metadata={"format": "np"})
    got = st.load_file(str(ours))
    for k, v in tensors.items():
        np.testing.assert_array_equal(got[k], v)
    # bf16 through the library's own bf16 type tag
    from safetensors import safe_open
    save_safetensors(ours, {"w": to_bfloat16(np.arange(6, dtype=np.float32).reshape(2, 3))})
    with safe_open(str(ours), framework="np") as f:
        assert f.keys() == ["w"]
    np.testing.assert_array_equal(load_tensors(ours)["w"].to_numpy(),
                                  np.arange(6, dtype=np.float32).reshape(2, 3))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_torch_zip_shared_storage_offsets_and_transposed_strides(tmp_path, seed):
    rng = np.random.default_rng(seed)
    flat = rng.standard_normal(2 * 6 * 5 + 11).astype(np.float32)
    bits = to_bfloat16(rng.standard_normal(64).astype(np.float32))
    tensors = {
        "whole": StorageView("s", (flat.size,)),
        "mat": StorageView("s", (6, 5), offset=3),                    # offset, contiguous
        "matT": StorageView("s", (5, 6), stride=(1, 5), offset=3),     # its transpose
        "every_other": StorageView("s", (10,), stride=(2,), offset=7),
        "cube": StorageView("s", (2, 3, 4), stride=(30, 1, 3), offset=11),
        "bcast": StorageView("s", (4, 3), stride=(0, 1), offset=1),    # stride 0 (expand)
        "empty": StorageView("s", (0, 4), stride=(4, 1), offset=0),
        "bf_rows": StorageView("b", (4, 8), stride=(16, 1), offset=0),  # every other row
        "own": rng.standard_normal((3, 4)).astype(np.float32),
        "own_T": rng.standard_normal((4, 3)).astype(np.float32).T,     # non-contiguous input
    }
    path = tmp_path / "shared.bin"
    save_torch_zip(path, tensors, storages={"s": flat, "b": bits}, root="not-archive_7")
    z = zipfile.ZipFile(path)
    assert {n.split("/")[0] for n in z.namelist()} == {"not-archive_7"}
    assert len([n for n in z.namelist() if "/data/" in n]) == 4        # s, b, own, own_T
    T = load_tensors(path, verify=True)
    S = np.lib.stride_tricks.as_strided
    it = flat.itemsize
    np.testing.assert_array_equal(T["whole"].array, flat)
    np.testing.assert_array_equal(T["mat"].array, flat[3:33].reshape(6, 5))
    np.testing.assert_array_equal(T["matT"].array, flat[3:33].reshape(6, 5).T)
    np.testing.assert_array_equal(T["every_other"].array, flat[7:27:2])
    np.testing.assert_array_equal(T["cube"].array,
                                  S(flat[11:], (2, 3, 4), (30 * it, it, 3 * it)))
    np.testing.assert_array_equal(T["bcast"].array, np.tile(flat[1:4], (4, 1)))
    assert T["empty"].shape == (0, 4)
    np.testing.assert_array_equal(T["bf_rows"].array, bits.array.reshape(8, 8)[::2])
    np.testing.assert_array_equal(T["own"].array, tensors["own"])
    np.testing.assert_array_equal(T["own_T"].array, tensors["own_T"])
    # one storage in the file, several views of it in memory
    assert np.shares_memory(T["mat"].array, T["matT"].array)
    assert np.shares_memory(T["whole"].array, T["cube"].array)
    assert not np.shares_memory(T["own"].array, T["whole"].array)
    np.testing.assert_array_equal(T["matT"].to_numpy(), flat[3:33].reshape(6, 5).T)


def test_torch_zip_wrappers_and_bare_dicts(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    for wrap in ("model", "state_dict", "module", None):
        p = tmp_path / f"{wrap}.bin"
        save_torch_zip(p, {"x": a}, wrap=wrap)
        np.testing.assert_array_equal(load_tensors(p)["x"].array, a)
    # {"model": ..., "iteration": 7}: extra plain entries beside the state dict are fine
    rec = TensorRecord("0", "float32", 6, 0, (2, 3), (3, 1))
    p = tmp_path / "extra.bin"
    write_torch_zip_records(p, torch_pickle_bytes({"iteration": 7, "model": {"x": rec}}),
                            {"0": a})
    np.testing.assert_array_equal(load_tensors(p)["x"].array, a)


def test_deferred_streams_without_holding_copies(tmp_path):
    calls = []

    def make(i):
        def f():
            calls.append(i)
            return np.full((1024, 2048), i, np.float32)     # 8 MB each
        return f
    tensors = {f"w{i}": Deferred((1024, 2048), "float32", make(i)) for i in range(4)}
    tracemalloc.start()
    save_torch_zip(tmp_path / "d.bin", tensors)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert calls == [0, 1, 2, 3]
    assert peak < 8 * 2 ** 20 * 1.5, peak              # one tensor at a time, no extra copy
    T = load_tensors(tmp_path / "d.bin")
    for i in range(4):
        assert T[f"w{i}"].array[5, 7] == i
    save_safetensors(tmp_path / "d.safetensors",
                     {"x": Deferred((3,), "bfloat16", lambda: to_bfloat16(np.ones(3)))})
    np.testing.assert_array_equal(load_tensors(tmp_path / "d.safetensors")["x"].to_numpy(),
                                  np.ones(3, np.float32))
    with pytest.raises(ValueError, match="promised"):
        save_torch_zip(tmp_path / "bad.bin", {"x": Deferred((3,), "float32",
                                                            lambda: np.ones(4, np.float32))})


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_write_array_chunking_of_non_contiguous_arrays(chunk):
    rng = np.random.default_rng(chunk)
    a = rng.standard_normal((5, 6, 7)).astype(">f4").transpose(2, 0, 1)[:, ::2]   # big-endian
    buf = io.BytesIO()
    crc = ck._write_array(buf, a, chunk_bytes=chunk)
    want = np.ascontiguousarray(a, dtype="<f4").tobytes()
    assert buf.getvalue() == want and crc == __import__("zlib").crc32(want)


def test_writer_input_errors(tmp_path):
    with pytest.raises(ValueError, match="bfloat16"):
        save_safetensors(tmp_path / "x", {"a": np.zeros(3, np.uint16)})
    with pytest.raises(ValueError, match="does not fit"):
        save_torch_zip(tmp_path / "x", {"a": StorageView("s", (4,), offset=1)},
                       storages={"s": np.zeros(4, np.float32)})
    with pytest.raises(ValueError):
        StoredTensor(np.zeros(3, np.float32), "bfloat16")


# ---------------------------------------------------------------------------- hostile pickles

def _canary_cmd(tmp_path):
    return f"touch {tmp_path / 'canary'}"


def _zip_with_pickle(tmp_path, data_pkl, storages=None, **kw):
    p = tmp_path / "evil.bin"
    write_torch_zip_records(p, data_pkl, storages or {}, **kw)
    return p


def _u(s):  # BINUNICODE
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _hostile_pickles(cmd):
    arg = _u(cmd) + b"\x85"                          # (cmd,) TUPLE1
    yield "os.system", b"\x80\x02cos\nsystem\n" + arg + b"R."
    yield "posix.system", b"\x80\x02cposix\nsystem\n" + arg + b"R."
    yield "builtins.eval", (b"\x80\x02cbuiltins\neval\n" + _u(f"__import__('os').system("
                                                              f"{cmd!r})") + b"\x85R.")
    yield "__builtin__.eval", (b"\x80\x02c__builtin__\neval\n" + _u(f"__import__('os').system("
                                                                    f"{cmd!r})") + b"\x85R.")
    yield "subprocess.Popen", (b"\x80\x02csubprocess\nPopen\n" + _u("sh") + _u("-c") + _u(cmd)
                               + b"\x87\x85R.")
    # protocol 4 STACK_GLOBAL
    yield "os.system", b"\x80\x04" + _u("os") + _u("system") + b"\x93" + arg + b"R."
    yield "builtins.exec", (b"\x80\x04" + _u("builtins") + _u("exec") + b"\x93"
                            + _u(f"import os; os.system({cmd!r})") + b"\x85R.")
    # protocol 0 INST and protocol 1 OBJ opcodes
    yield "os.system", b"(S'" + cmd.encode() + b"'\nios\nsystem\n."
    yield "os.system", b"(cos\nsystem\nS'" + cmd.encode() + b"'\no."
    # hidden inside an otherwise valid {"model": {...}} after a real tensor
    good = torch_pickle_bytes({"model": collections.OrderedDict(
        [("w", TensorRecord("0", "float32", 4, 0, (4,), (1,))),
         ("evil", "PLACEHOLDER")])})
    i = good.index(b"PLACEHOLDER") - 5
    j = i + 5 + len("PLACEHOLDER")
    yield "os.system", good[:i] + b"cos\nsystem\n" + arg + b"R" + good[j:]
    # a torch-looking name that is not on the allow-list
    yield "torch.storage._load_from_bytes", (b"\x80\x02ctorch.storage\n_load_from_bytes\n"
                                             + _u(cmd) + b"\x85R.")
    yield "torch.load", b"\x80\x02ctorch\nload\n" + arg + b"R."


def test_hostile_pickles_are_refused_and_never_run(tmp_path):
    cmd = _canary_cmd(tmp_path)
    # the command does create the canary when really run: the test can fail
    n = 0
    for name, data in _hostile_pickles(cmd):
        p = _zip_with_pickle(tmp_path, data, {"0": np.zeros(4, np.float32)})
        with pytest.raises(CheckpointError, match=f"refusing global {name.replace('.', '[.]')}"):
            load_tensors(p)
        assert not (tmp_path / "canary").exists(), name
        n += 1
    assert n == 12
    os.system(cmd)
    assert (tmp_path / "canary").exists()


def test_hostile_pickle_error_names_the_file_and_the_rule(tmp_path):
    p = _zip_with_pickle(tmp_path, b"\x80\x02cos\nsystem\n" + _u("true") + b"\x85R.")
    with pytest.raises(CheckpointError) as e:
        load_tensors(p)
    msg = str(e.value)
    assert "os.system" in msg and "evil.bin" in msg and "data.pkl" in msg
    assert "tensor-rebuilding globals" in msg


class _WithState(TensorRecord):
    """Pickles as _rebuild_tensor_v2(...) followed by BUILD {"offset": 3}."""

    def __reduce__(self):
        return super().__reduce__() + ({"offset": 3},)


@pytest.mark.parametrize("body,match", [
    # BUILD on a tensor record would overwrite its offset/shape
    (lambda good: torch_pickle_bytes({"model": {"w": _WithState("0", "float32", 4, 0, (4,),
                                                                (1,))}}), "state"),
    # a persistent id that is not ("storage", ...)
    (lambda good: b"\x80\x02}X\x01\x00\x00\x00wX\x03\x00\x00\x00abcQs.", "persistent id"),
    # storage type that is not a storage
    (lambda good: b"\x80\x02(X\x07\x00\x00\x00storageK\x01X\x01\x00\x00\x000X\x03\x00\x00\x00"
                  b"cpuK\x04tQ.", "storage type"),
    # calling a storage type
    (lambda good: b"\x80\x02ctorch\nFloatStorage\n)R.", "malformed"),
    # the result is a list, not a dict
    (lambda good: b"\x80\x02]q\x00.", "not a dict"),
    # deep nesting
    (lambda good: b"\x80\x02" + b"]" * 100000 + b"a" * 99999 + b".", "not a dict|deep"),
    # garbage / truncated
    (lambda good: good[:len(good) // 2], "malformed"),
    (lambda good: b"\x80\x02\xff\xfe", "malformed"),
    (lambda good: b"", "malformed"),
])
def test_malformed_pickles(tmp_path, body, match):
    good = torch_pickle_bytes({"model": {"w": TensorRecord("0", "float32", 4, 0, (4,), (1,))}})
    p = _zip_with_pickle(tmp_path, body(good), {"0": np.zeros(4, np.float32)})
    with pytest.raises(CheckpointError, match=match):
        load_tensors(p)


def test_pickle_size_limit(tmp_path, monkeypatch):
    good = torch_pickle_bytes({"model": {"w": TensorRecord("0", "float32", 4, 0, (4,), (1,))}})
    p = _zip_with_pickle(tmp_path, good, {"0": np.zeros(4, np.float32)})
    load_tensors(p)
    monkeypatch.setattr(ck, "MAX_PICKLE_BYTES", len(good) - 1)
    with pytest.raises(CheckpointError, match="refusing to read"):
        load_tensors(p)


# ---------------------------------------------------------------------------- corrupt files

def _good_file(tmp_path, name="good.bin"):
    rng = np.random.default_rng(7)
    p = tmp_path / name
    save_torch_zip(p, {"a": rng.standard_normal((33, 7)).astype(np.float32),
                       "b": to_bfloat16(rng.standard_normal(100))})
    return p


@pytest.mark.parametrize("frac", [0.0, 0.05, 0.3, 0.5, 0.9, 0.999])
def test_truncated_zip(tmp_path, frac):
    data = _good_file(tmp_path).read_bytes()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(data[:max(1, int(len(data) * frac))])
    with pytest.raises(CheckpointError):
        load_tensors(cut)


@pytest.mark.parametrize("cut", [1, 10, 21, 22, 23, 60, 200])
def test_zip_cut_near_the_end(tmp_path, cut):
    data = _good_file(tmp_path).read_bytes()
    p = tmp_path / "cut.bin"
    p.write_bytes(data[:-cut])
    with pytest.raises(CheckpointError):
        load_tensors(p)


def test_zip_with_the_storage_bytes_gone(tmp_path):
    # central directory intact, data region zeroed out -> CRC of data.pkl fails; storages
    # moved beyond the end -> "runs past the end"
    data = bytearray(_good_file(tmp_path).read_bytes())
    data[64:200] = bytes(136)
    p = tmp_path / "zeroed.bin"
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC"):
        load_tensors(p)


def test_verify_catches_flipped_storage_bytes(tmp_path):
    p = _good_file(tmp_path)
    data = bytearray(p.read_bytes())
    T = load_tensors(p)
    start = T["a"].array.ctypes.data - np.frombuffer(_mmap_base(T["a"].array), np.uint8).ctypes.data
    del T
    data[start + 5] ^= 0xFF
    p.write_bytes(bytes(data))
    load_tensors(p)                                       # lazily trusted ...
    with pytest.raises(CheckpointError, match="CRC"):     # ... verified on request
        load_tensors(p, verify=True)


@pytest.mark.parametrize("content,match", [
    (b"", "empty"),
    (b"hello world, not a checkpoint", "neither"),
    (b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.", "legacy"),
    (b"PK\x03\x04" + bytes(100), "not a readable zip"),
    (b"GGUF" + bytes(100), "neither"),
])
def test_wrong_magic(tmp_path, content, match):
    p = tmp_path / "x.bin"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_tensors(p)


def test_missing_data_pkl_and_several_roots(tmp_path):
    p = tmp_path / "nopkl.bin"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/data/0", bytes(16))
        z.writestr("archive/byteorder", b"little")
    with pytest.raises(CheckpointError, match="data.pkl"):
        load_tensors(p)
    good = torch_pickle_bytes({"w": TensorRecord("0", "float32", 4, 0, (4,), (1,))})
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("a/data.pkl", good)
        z.writestr("b/data.pkl", good)
    with pytest.raises(CheckpointError, match="several"):
        load_tensors(p)


def test_compressed_entries(tmp_path):
    good = torch_pickle_bytes({"model": {"w": TensorRecord("0", "float32", 4, 0, (4,), (1,))}})
    w = np.arange(4, dtype=np.float32)
    p = tmp_path / "deflated.bin"
    with zipfile.ZipFile(p, "w") as z:       # data.pkl deflated, storage stored: fine
        z.writestr("archive/data.pkl", good, compress_type=zipfile.ZIP_DEFLATED)
        z.writestr("archive/data/0", w.tobytes())
    np.testing.assert_array_equal(load_tensors(p)["w"].array, w)
    with zipfile.ZipFile(p, "w") as z:       # storage deflated: cannot be mapped
        z.writestr("archive/data.pkl", good)
        z.writestr("archive/data/0", w.tobytes(), compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointError, match="compressed"):
        load_tensors(p)


def test_big_endian_refused(tmp_path):
    good = torch_pickle_bytes({"model": {"w": TensorRecord("0", "float32", 4, 0, (4,), (1,))}})
    p = _zip_with_pickle(tmp_path, good, {"0": np.zeros(4, np.float32)}, byteorder="big")
    with pytest.raises(CheckpointError, match="little-endian"):
        load_tensors(p)
    p = _zip_with_pickle(tmp_path, good, {"0": np.zeros(4, np.float32)}, byteorder=None)
    assert load_tensors(p)["w"].shape == (4,)             # no byteorder record: little


BAD_RECORDS = [
    # (storage key, numel in pid, offset, size, stride, storage elements written, match)
    ("9", 4, 0, (4,), (1,), 4, "no entry"),                       # missing storage entry
    ("0", 5, 0, (4,), (1,), 4, "declares 5"),                     # numel larger than entry
    ("0", 4, 1, (4,), (1,), 4, "reach element 4"),                # offset pushes past end
    ("0", 12, 0, (3, 4), (5, 1), 12, "reach element 13"),         # stride out of bounds
    ("0", 12, 0, (4, 3), (1, 5), 12, "reach element 13"),         # transposed, too wide
    ("0", 4, 0, (-1,), (1,), 4, "negative"),                      # negative size
    ("0", 4, 0, (2,), (-1,), 4, "negative"),                      # negative stride
    ("0", 4, -1, (2,), (1,), 4, "negative"),                      # negative offset
    ("0", -4, 0, (2,), (1,), 4, "declares -4"),                   # negative numel
    ("0", 4, 0, (10 ** 15,), (1,), 4, "reach element"),           # 1e15 elements
    ("0", 4, 0, (10 ** 8, 10 ** 7), (10 ** 7, 1), 4, "reach"),    # 1e15 elements, 2-D
    ("0", 10 ** 15, 0, (10 ** 15,), (1,), 4, "declares"),         # 1e15-element storage
    ("0", 4, 0, (10 ** 15,), (0,), 4, "refusing"),                # 1e15-element stride-0 view
    ("0", 4, 0, (2 ** 70,), (1,), 4, "reach"),                    # beyond int64
    ("0", 4, 0, (2, 2), (1,), 4, "differ in length"),             # size/stride mismatch
    ("0", 4, 0, (1,) * 40, (1,) * 40, 4, "at most 32"),           # too many dims
]


@pytest.mark.parametrize("key,numel,offset,size,stride,written,match", BAD_RECORDS)
def test_bad_tensor_geometry(tmp_path, key, numel, offset, size, stride, written, match):
    rec = TensorRecord(key, "float32", numel, offset, size, stride)
    p = _zip_with_pickle(tmp_path, torch_pickle_bytes({"model": {"w": rec}}),
                         {"0": np.zeros(written, np.float32)})
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        load_tensors(p)
        err = None
    except CheckpointError as exc:
        err = exc
    dt = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert err is not None and re.search(match, str(err)), err
    assert dt < 1.0 and peak < 1 << 20, (dt, peak)         # refused before allocating anything


def test_bad_values_via_save_torch_zip_unchecked(tmp_path):
    p = tmp_path / "u.bin"
    save_torch_zip(p, {"a": StorageView("s", (3, 3), stride=(3, 1), offset=1)},
                   storages={"s": np.zeros(9, np.float32)}, check=False)
    with pytest.raises(CheckpointError, match="u.bin:a: size"):
        load_tensors(p)


def test_size_zero_tensors_are_legal_anywhere(tmp_path):
    rec = TensorRecord("0", "float32", 4, 4, (0, 10 ** 15), (10 ** 15, 1))
    p = _zip_with_pickle(tmp_path, torch_pickle_bytes({"model": {"w": rec}}),
                         {"0": np.zeros(4, np.float32)})
    assert load_tensors(p)["w"].shape == (0, 10 ** 15)


# ---------------------------------------------------------------------------- safetensors

def _st_file(tmp_path, header, data=b"", raw_header=None):
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return p


@pytest.mark.parametrize("header,data,match", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(4), "outside"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}, bytes(12), "needs 8"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 0]}}, bytes(8), "outside"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, bytes(8), "outside"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 0]}}, bytes(8), "bad shape"),
    ({"a": {"dtype": "F32", "shape": [10 ** 15], "data_offsets": [0, 8]}}, bytes(8), "needs"),
    ({"a": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, bytes(2), "unsupported"),
    ({"a": {"dtype": "F32", "shape": [2]}}, bytes(8), "data_offsets"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), "overlap"),
])
def test_bad_safetensors(tmp_path, header, data, match):
    with pytest.raises(CheckpointError, match=match):
        load_tensors(_st_file(tmp_path, header, data))


def test_safetensors_header_problems(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", 10 ** 12) + b'{"a": 1}')      # header size beyond file
    with pytest.raises(CheckpointError, match="header size"):
        load_tensors(p)
    with pytest.raises(CheckpointError, match="JSON"):
        load_tensors(_st_file(tmp_path, None, raw_header=b'{"a": {"dtype": "F3'))
    with pytest.raises(CheckpointError, match="JSON"):
        load_tensors(_st_file(tmp_path, None, raw_header=b'{"a": 1\xff}'))
    with pytest.raises(CheckpointError, match="duplicate"):
        load_tensors(_st_file(tmp_path, None, raw_header=(
            b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
            b'"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'), data=b"\x01"))
    # metadata and zero-size tensors sharing an offset are legal
    p = _st_file(tmp_path, {"__metadata__": {"k": "v"},
                            "e1": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},
                            "e2": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]},
                            "a": {"dtype": "I16", "shape": [2], "data_offsets": [0, 4]}},
                 struct.pack("<hh", -3, 7))
    T = load_tensors(p)
    assert T["e2"].shape == (0, 3) and T["a"].array.tolist() == [-3, 7]


# ---------------------------------------------------------------------------- directories

def test_directory_and_sharded_index(tmp_path):
    a, b = np.arange(3, dtype=np.float32), np.arange(4, dtype=np.int64)
    with pytest.raises(FileNotFoundError):
        load_tensors(tmp_path)
    save_safetensors(tmp_path / "model-1.safetensors", {"a": a})
    save_safetensors(tmp_path / "model-2.safetensors", {"b": b})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}))
    T = load_tensors(tmp_path)
    np.testing.assert_array_equal(T["a"].array, a)
    np.testing.assert_array_equal(T["b"].array, b)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "../../etc/passwd"}}))
    with pytest.raises(CheckpointError, match="plain file name"):
        load_tensors(tmp_path)


def test_progress_bar_runs(tmp_path, capsys):
    T = load_tensors(_good_file(tmp_path), progress=True)
    assert T["a"].shape == (33, 7)
    assert "loading good.bin" in capsys.readouterr().err


@pytest.mark.slow
def test_zip64_many_entries(tmp_path):
    # > 65535 entries forces the zip64 end-of-central-directory records
    n = 70000
    p = tmp_path / "many.bin"
    save_torch_zip(p, {f"t{i}": np.array([i], np.int32) for i in range(n)})
    T = load_tensors(p)
    assert len(T) == n and T["t69999"].array[0] == 69999


def test_buffer_and_extension_opcodes_refused(tmp_path):
    for data, op in [(b"\x80\x05\x96\x03\x00\x00\x00\x00\x00\x00\x00abc.", "BYTEARRAY8"),
                     (b"\x80\x05\x97.", "NEXT_BUFFER"),
                     (b"\x80\x05C\x03abc\x98.", "READONLY_BUFFER"),
                     (b"\x80\x02\x82\x01.", "EXT1")]:
        p = _zip_with_pickle(tmp_path, data)
        with pytest.raises(CheckpointError, match=op):
            load_tensors(p)


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzzed_files_raise_only_checkpoint_error(tmp_path, seed):
    """Random damage to a zip checkpoint, its pickle, or a safetensors file: the outcome is
    a load (damage in the data bytes) or CheckpointError, never another exception."""
    rng = np.random.default_rng(seed)
    flat = rng.standard_normal(100).astype(np.float32)
    recs = collections.OrderedDict(
        a=TensorRecord("0", "float32", 100, 3, (6, 5), (1, 6)),
        b=TensorRecord("1", "bfloat16", 12, 0, (3, 4), (4, 1)))
    pkl = torch_pickle_bytes({"model": recs})
    stores = {"0": flat, "1": to_bfloat16(np.ones(12))}
    zpath, spath = tmp_path / "z.bin", tmp_path / "s.safetensors"
    write_torch_zip_records(zpath, pkl, stores)
    save_safetensors(spath, {"a": flat, "b": to_bfloat16(np.ones(3))})
    zbytes, sbytes = zpath.read_bytes(), spath.read_bytes()
    bad = tmp_path / "bad.bin"
    outcomes = collections.Counter()
    for it in range(300):
        kind = it % 3
        d = bytearray(pkl if kind == 0 else zbytes if kind == 1 else sbytes)
        for _ in range(rng.integers(1, 4)):
            i = int(rng.integers(0, len(d)))
            if rng.random() < 0.5:
                d[i] = int(rng.integers(0, 256))
            else:
                del d[i:i + int(rng.integers(1, 4))]
        if kind == 0:
            write_torch_zip_records(bad, bytes(d), stores)     # valid zip, damaged pickle
        else:
            bad.write_bytes(bytes(d))
        try:
            for t in load_tensors(bad, verify=bool(it % 2)).values():
                t.to_numpy()
            outcomes["loaded"] += 1
        except CheckpointError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 100 and outcomes["loaded"] > 10, outcomes
