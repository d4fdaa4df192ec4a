"""Offline datasets for the local test tasks: JSONL files next to this file, read without
the network or the `datasets` cache (lm-eval's `custom_dataset` hook)."""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _jsonl(name):
    import datasets
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}


def mc_docs(**kwargs):
    return _jsonl("mc.jsonl")


def rolling_docs(**kwargs):
    return _jsonl("rolling.jsonl")


def gen_docs(**kwargs):
    return _jsonl("gen.jsonl")
