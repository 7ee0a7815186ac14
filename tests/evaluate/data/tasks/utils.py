"""Datasets of the tiny test tasks, read from the JSONL files beside this folder (no network)."""
import json
from pathlib import Path

import datasets

DATA = Path(__file__).resolve().parent.parent


def _load(name):
    rows = [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_tiny_mc(**kwargs):
    return _load("tiny_mc.jsonl")


def load_tiny_gen(**kwargs):
    return _load("tiny_gen.jsonl")
