"""The `blackmamba` command: info, convert, generate (on the tiny golden model)."""
import json
import os
import subprocess
import sys

import numpy as np

import blackmamba as bm
from blackmamba.cli import main

from conftest import GOLDEN, rel_err


def test_info_json(capsys):
    assert main(["info", "--model", GOLDEN, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["mamba_moe_layers"] == ["r", "8", "r", "8"]
    total, active = bm.model.count_parameters(bm.load_config(GOLDEN))
    assert (info["parameters_total"], info["parameters_active"]) == (total, active)
    assert info["memory_bytes"]["bfloat16"] == 2 * total
    assert info["memory_bytes"]["float16"] == 2 * total


def test_convert_to_safetensors_loads_the_same(tmp_path, golden):
    out = tmp_path / "conv"
    assert main(["convert", "--model", GOLDEN, "--out", str(out)]) == 0
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    a = bm.load(GOLDEN, tokenizer=False)(golden["input_ids"])
    b = bm.load(str(out), tokenizer=False)(golden["input_ids"])
    np.testing.assert_array_equal(a, b)
    assert rel_err(b, golden["logits"]) < 1e-4


def test_generate_streams_greedy_text(capsys):
    assert main(["generate", "--model", GOLDEN, "--tokenizer", "byte", "-t", "0",
                 "-n", "12", "ab"]) == 0
    out = capsys.readouterr().out
    model = bm.load(GOLDEN, tokenizer="byte")
    assert out == "ab" + model.generate("ab", max_new_tokens=12) + "\n"


def test_python_dash_m_and_bad_model_path(tmp_path):
    # the child imports the same blackmamba this test imported (installed or in place)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(bm.__file__)))
    r = subprocess.run([sys.executable, "-m", "blackmamba", "info", "--model",
                        str(tmp_path / "missing")], capture_output=True, text=True, env=env,
                       cwd=tmp_path)
    assert r.returncode == 2 and "error:" in r.stderr
