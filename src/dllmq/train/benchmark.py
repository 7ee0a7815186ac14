"""Build the mini benchmark's held-out items (src/dllmq/evaluate/mini_data/*.jsonl), seeded.

    python -m dllmq.train.benchmark [OUT_DIR]

- mini_general: LAMBADA-style cloze from the *held-out* Wikipedia articles (the training corpus
  uses only the train articles): a passage cut before a word that occurred earlier in it; four
  choices (the word and three words of similar length from other held-out articles).
- mini_math / mini_code: items from the held-out key space (`corpus.is_heldout`), which the
  training generators never produce.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from dllmq.train import corpus

SEED = 20240521
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "evaluate" / "mini_data"


def general_items(n: int, rng: random.Random) -> list[dict]:
    docs = corpus.wiki_documents("heldout")
    items, seen = [], set()
    while len(items) < n:
        item = corpus.general_item(docs, rng)
        if item is None or item["context"] in seen:
            continue
        seen.add(item["context"])
        items.append(item)
    return items


def math_items(n: int, rng: random.Random) -> list[dict]:
    items, seen = [], set()
    while len(items) < n:
        item = corpus.math_item(rng, heldout=True)
        if item.key in seen:
            continue
        seen.add(item.key)
        items.append({"key": item.key, "question": item.question, "prompt": item.prompt, "answer": item.answer})
    return items


def code_items(rng: random.Random) -> list[dict]:
    items = []
    for group, template, param in corpus.code_space():
        if corpus.is_heldout(f"code/{template}/{param}"):
            item = corpus._code_item(group, template, param, rng)
            items.append({"key": item.key, "name": item.name, "prompt": item.prompt, "tests": list(item.tests),
                          "reference": item.body})
    rng.shuffle(items)
    return items


def build(out: Path = DEFAULT_OUT, n_general: int = 400, n_math: int = 400) -> dict[str, int]:
    rng = random.Random(SEED)
    sets = {"mini_general": general_items(n_general, rng), "mini_math": math_items(n_math, rng),
            "mini_code": code_items(rng)}
    out.mkdir(parents=True, exist_ok=True)
    for name, items in sets.items():
        lines = [json.dumps({"id": f"{name}/{i}", **item}, ensure_ascii=False) for i, item in enumerate(items)]
        tmp = out / f".{name}.jsonl.tmp"
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.replace(out / f"{name}.jsonl")
    return {k: len(v) for k, v in sets.items()}


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT))
