"""Fuzzing of everything a file can feed the package: torch zips, pickles, tensor geometry,
safetensors, config.json (targets in tests/fuzz_targets.py). Each target runs in a child
process under a 2 GB address-space limit: the child must exit cleanly having seen only loads
and documented errors; a crash, a MemoryError or any other exception fails the test with the
child's report (Hypothesis prints the smallest failing input and the seed to replay it).

Budget: ~4000 cases, ~20 s on 2 cores. BLACKMAMBA_FUZZ_EXAMPLES=N runs N cases per target;
BLACKMAMBA_FUZZ_SEED=S replays a run. Case counts are printed at the end of the session.

Below the targets: regressions for what fuzzing and review found (each failed before its fix).
"""
import collections
import json
import os
import pathlib
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

import conftest
from blackmamba import checkpoint as ck
from blackmamba.checkpoint import (CheckpointError, TensorRecord, load_tensors,
                                   torch_pickle_bytes, write_torch_zip_records)
from blackmamba.config import Config, ConfigError

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_EXAMPLES = {"zip_bytes": 1000, "pickle_opcodes": 1000, "tensor_geometry": 800,
                    "safetensors": 800, "config": 500}


@pytest.mark.skipif(conftest.SANITIZED, reason="pure Python; the child does not get ASan")
@pytest.mark.parametrize("target", sorted(DEFAULT_EXAMPLES))
def test_fuzz(target, tmp_path, record_property):
    n = int(os.environ.get("BLACKMAMBA_FUZZ_EXAMPLES", DEFAULT_EXAMPLES[target]))
    cmd = [sys.executable, str(HERE / "fuzz_targets.py"), target, str(n), str(tmp_path)]
    if os.environ.get("BLACKMAMBA_FUZZ_SEED"):
        cmd.append(os.environ["BLACKMAMBA_FUZZ_SEED"])
    # the child imports the blackmamba this process imported (installed, or the tree)
    pkg_parent = str(pathlib.Path(ck.__file__).resolve().parent.parent)
    env = dict(os.environ, BLACKMAMBA_SHARED=conftest.SHARED,
               PYTHONPATH=os.pathsep.join([pkg_parent] + [p for p in os.environ.get(
                   "PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          timeout=120 + 0.1 * n)
    tail = proc.stderr[-6000:]
    assert proc.returncode >= 0, (f"fuzz child killed by signal {-proc.returncode} (crash); "
                                  f"the last input is in {tmp_path}\n{tail}")
    assert proc.returncode == 0, f"fuzz target {target} failed:\n{tail}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["examples"] == n, report
    assert not (tmp_path / "canary").exists()
    # every target must reach both outcomes, or it is not exploring
    assert sum(v for k, v in report.items() if k.startswith("loaded")) > 0, report
    assert sum(v for k, v in report.items() if "Error" in k or "refused" in k) > 0, report
    conftest.FUZZ_REPORT[target] = report
    record_property("fuzz_cases", report["examples"])
    print(f"fuzz {target}: {json.dumps(report)}")


# ----------------------------------------------------------------------- regressions: pickles

def _u(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _zip(tmp_path, pkl, storages=None):
    p = tmp_path / "x.bin"
    write_torch_zip_records(p, pkl, storages or {"0": np.arange(4, dtype=np.float32)})
    return p


GOOD = torch_pickle_bytes({"model": {"w": TensorRecord("0", "float32", 4, 0, (4,), (1,))}})


@pytest.mark.parametrize("state", [
    b"N}" + _u("__defaults__") + b"K\x07\x85s\x86",          # (None, slotstate): setattr
    b"}" + _u("__defaults__") + b"N" + b"s",                 # dict state: __dict__ entries
    b"}" + _u("evil") + b"K\x07s",
])
@pytest.mark.parametrize("glob", [b"ctorch._utils\n_rebuild_tensor_v2\n",
                                  b"ctorch._utils\n_rebuild_tensor\n", b"ctorch\nSize\n",
                                  b"ctorch\nFloatStorage\n", b"ccollections\nOrderedDict\n"])
def test_build_cannot_change_the_unpicklers_stand_ins(tmp_path, glob, state):
    # BUILD on an allow-listed function used to set its attributes for the whole process:
    # __defaults__ = (7,) then broke every later load of a legitimate file
    fn = ck._rebuild_tensor_v2
    before = (fn.__defaults__, dict(fn.__dict__))
    with pytest.raises(CheckpointError):
        load_tensors(_zip(tmp_path, b"\x80\x02" + glob + state + b"b0}."))
    assert (fn.__defaults__, dict(fn.__dict__)) == before
    np.testing.assert_array_equal(load_tensors(_zip(tmp_path, GOOD))["w"].array, np.arange(4))


def _tuple_dag(depth):
    """{t_depth: None} where t_0 = 1, t_i = (t_{i-1}, t_{i-1}): 36 bytes a level, 2**depth
    elements to hash."""
    p = b"\x80\x02}K\x01q\x000"
    for i in range(depth):
        g = b"j" + i.to_bytes(4, "little")
        p += g + g + b"\x86r" + (i + 1).to_bytes(4, "little") + b"0"
    return p + b"j" + depth.to_bytes(4, "little") + b"Ns."


def test_hash_bomb_is_refused_before_it_runs(tmp_path):
    # 24 levels took 3.5 s, 40 levels (700 bytes) would take days of hashing
    for depth in (24, 40, 400):
        p = _zip(tmp_path, _tuple_dag(depth))
        t0 = time.perf_counter()
        with pytest.raises(CheckpointError, match="bomb"):
            load_tensors(p)
        assert time.perf_counter() - t0 < 1.0
    # a small DAG is legal pickle and only fails for not being tensors
    with pytest.raises(CheckpointError, match="not tensors"):
        load_tensors(_zip(tmp_path, _tuple_dag(8)))


def test_error_messages_stay_short_for_shared_structures(tmp_path):
    # lists filled top-down after being memoized: 2**40 elements when printed in full;
    # the persistent id error used to repr it whole
    depth = 40
    p = b"\x80\x02"
    for i in range(depth + 1):
        p += b"]r" + i.to_bytes(4, "little") + b"0"
    for i in range(depth, 0, -1):
        inner = b"j" + (i - 1).to_bytes(4, "little")
        p += b"j" + i.to_bytes(4, "little") + inner + b"a" + inner + b"a0"
    p += b"}" + _u("w") + b"j" + depth.to_bytes(4, "little") + b"Qs."
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="persistent id") as e:
        load_tensors(_zip(tmp_path, p))
    assert time.perf_counter() - t0 < 1.0 and len(str(e.value)) < 400


def test_object_count_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(ck, "MAX_PICKLE_OBJECTS", 1000)
    with pytest.raises(CheckpointError, match="more than 1000 objects"):
        load_tensors(_zip(tmp_path, b"\x80\x02" + b"]0" * 1001 + b"}."))
    np.testing.assert_array_equal(load_tensors(_zip(tmp_path, GOOD))["w"].array, np.arange(4))


def test_stand_in_errors_name_the_file(tmp_path):
    rec = TensorRecord("0", "float32", 4, 0, "ab", (1, 1))      # size not of ints
    with pytest.raises(CheckpointError, match=r"x\.bin:archive/data\.pkl: tensor size"):
        load_tensors(_zip(tmp_path, torch_pickle_bytes({"model": {"w": rec}})))


def test_the_released_pickle_is_far_inside_the_bounds():
    # the simulation of tiny-a's pickle charges a few units per tensor
    import zipfile
    data = zipfile.ZipFile(pathlib.Path(conftest.GOLDEN) / "pytorch_model.bin").read(
        "pytorch_model/data.pkl")
    old = ck.MAX_PICKLE_WORK
    try:
        ck.MAX_PICKLE_WORK = 61 * 40          # 61 tensors, 40 units each
        ck._scan_opcodes(data, "tiny-a")
    finally:
        ck.MAX_PICKLE_WORK = old


@pytest.mark.parametrize("shape", [(2 ** 62, 0), (0, 2 ** 63 - 1, 2 ** 63 - 1), (2 ** 70, 0)])
def test_empty_tensors_with_huge_dimensions(tmp_path, shape):
    # NumPy cannot make these shapes even empty: its ValueError/OverflowError escaped
    rec = TensorRecord("0", "float32", 4, 0, shape, (1,) * len(shape))
    with pytest.raises(CheckpointError, match="cannot be an array"):
        load_tensors(_zip(tmp_path, torch_pickle_bytes({"model": {"w": rec}})))
    h = json.dumps({"a": {"dtype": "F32", "shape": list(shape), "data_offsets": [0, 0]}})
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(h)) + h.encode())
    with pytest.raises(CheckpointError, match="cannot be an array"):
        load_tensors(p)


ENORMOUS = [
    (4, 0, (10 ** 5000,), (0,), "refusing"),                     # str() of it raised
    (4, 10 ** 5000, (2,), (1,), "reach element"),
    (4, 0, (2,), (-10 ** 5000,), "negative"),
    (4, 0, (1, 2), (2 ** 62, 0), None),        # a size-1 dim with a stride NumPy cannot hold
]


@pytest.mark.parametrize("numel,offset,size,stride,match", ENORMOUS,
                         ids=[str(i) for i in range(len(ENORMOUS))])
def test_geometry_with_enormous_ints(tmp_path, numel, offset, size, stride, match):
    rec = TensorRecord("0", "float32", numel, offset, size, stride)
    p = _zip(tmp_path, torch_pickle_bytes({"model": {"w": rec}}))
    if match is None:
        np.testing.assert_array_equal(load_tensors(p)["w"].array, [[0, 0]])
        return
    with pytest.raises(CheckpointError, match=match) as e:
        load_tensors(p)
    assert len(str(e.value)) < 400


# ------------------------------------------------------------------ regressions: safetensors

@pytest.mark.parametrize("tag", [[1], {"a": 1}, 5, None, ["F32"], 1.5])
def test_safetensors_dtype_of_any_json_type(tmp_path, tag):
    # an unhashable dtype tag ([1]) used to raise TypeError
    h = json.dumps({"a": {"dtype": tag, "shape": [1], "data_offsets": [0, 4]}}).encode()
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(h)) + h + bytes(4))
    with pytest.raises(CheckpointError, match="unsupported dtype"):
        load_tensors(p)


# ----------------------------------------------------------------------- regressions: config

BASE = dict(num_layers=2, hidden_size=24, state_size=16, conv_dimension=4, vocab_size=97,
            ffn_hidden_size=40, mamba_moe_layers=["r", "8"])


CONFIG_CASES = [
    ("hidden_size", 10 ** 5000, "hidden_size' = an integer of 16610 bits"),  # str() raised
    ("vocab_size", 2 ** 64, "vocab_size' = an integer of 65 bits"),
    ("tokenizer", 5, "tokenizer' must be a string"),                # accepted, failed later
    ("tokenizer", ["byte"], "tokenizer' must be a string"),
    ("mamba_moe_layers", 0, "mamba_moe_layers' must list"),          # 0/False meant "all r"
    ("mamba_moe_layers", False, "mamba_moe_layers' must list"),
    ("mamba_moe_layers", ["r"] * 100_000, "got 100000 entries"),     # message stays short
    ("activation", ["gelu"] * 1000, "activation' must be"),
    ("state_size", float("nan"), "state_size' must be an integer"),
]


@pytest.mark.parametrize("key,value,match", CONFIG_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CONFIG_CASES)])
def test_config_values_found_by_fuzzing(key, value, match):
    raw = dict(BASE, **{key: value})
    with pytest.raises(ConfigError, match=match) as e:
        Config.from_dict(raw)
    assert len(str(e.value)) < 300


def test_config_absent_layer_list_still_means_all_mamba():
    cfg = Config.from_dict(dict(BASE, mamba_moe_layers=None, ffn_hidden_size=0))
    assert cfg.layer_kinds == ["r", "r"]
    cfg = Config.from_dict({k: v for k, v in BASE.items() if k != "mamba_moe_layers"})
    assert cfg.layer_kinds == ["r", "r"]
