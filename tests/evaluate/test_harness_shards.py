"""Harness tasks cut into shards (dllmq.evaluate.harness_shards): the merged report - metrics, stderr, sample
counts and every logged sample, prompts included - equals a whole run's, for a multiple-choice task scored by
loglikelihood and a generate_until task, both with few-shot examples drawn from the task's random stream; a
shard runs the model on its own documents only; answers made for other prompts are refused.

The harness's own arc_easy and gsm8k run offline on made-up rows (tests/evaluate/data/hub_shards: 5 test
documents each and 6 training documents to draw 2 shots from)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

import dllmq  # noqa: E402
from dllmq.errors import DllmqError  # noqa: E402
from dllmq.evaluate import harness  # noqa: E402
from dllmq.evaluate.harness_shards import answer_shard, score_answers, task_items  # noqa: E402
from dllmq.evaluate.runner import EvalOptions, run_eval  # noqa: E402

DATA = Path(__file__).parent / "data" / "hub_shards"
SETTINGS = {"mc_num": 2, "gen_length": 8, "steps": 8, "block_length": 8, "num_fewshot": 2, "gen_batch_size": 2}
CUTS = [(0, 2), (2, 3), (3, 5)]     # uneven, and a generation batch (2 prompts) straddles two of them


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llada():
    model, tok, _ = dllmq.load_model("random-llada", seed=1)
    return model, tok


def options(**kw) -> EvalOptions:
    return EvalOptions(data_dir=DATA, offline=True, overrides=SETTINGS, progress=False, return_samples=True, **kw)


def through_json(part: dict) -> dict:
    return json.loads(json.dumps(part))      # what the study's database keeps


@pytest.mark.parametrize("task", ["arc_easy", "gsm8k"])
def test_sharded_report_is_the_whole_runs(llada, task, monkeypatch):
    whole = run_eval(llada, [task], options())
    assert task_items(task, options()) == 5

    calls = []        # the model's work per shard: loglikelihood scores, or generated prompts
    real_score, real_generate = harness.DllmqLM.score, harness.generate

    def score(self, ctx, cont, *, greedy=True):
        calls[-1].append("score")
        return real_score(self, ctx, cont, greedy=greedy)

    def generate(model, tok, ids, **kw):
        calls[-1] += ["prompt"] * ids.shape[0]
        return real_generate(model, tok, ids, **kw)

    monkeypatch.setattr(harness.DllmqLM, "score", score)
    monkeypatch.setattr(harness, "generate", generate)
    parts = []
    for cut in reversed(CUTS):                       # any order
        calls.append([])
        parts.append(through_json(answer_shard(llada, task, options(), cut)))
    merged = score_answers(task, options(), parts)

    w, m = whole["tasks"][task], merged["tasks"][task]
    for key in ("metric", "value", "stderr", "n_samples", "n_total", "num_fewshot", "metrics", "subtasks"):
        assert m[key] == w[key], key
    assert m["num_fewshot"] == 2 and len(merged["samples"]) == len(whole["samples"]) > 0
    assert merged["samples"] == whole["samples"]          # prompts (with their shots), answers, per-item metrics
    shots = {s["doc_id"]: s["arguments"][0][0].rsplit("Question:", 1)[0] for s in whole["samples"]}
    assert len(shots) == 5 and len(set(shots.values())) > 1     # the shots differ from document to document

    per_shard = [len(c) for c in calls]
    if task == "arc_easy":                                 # 3 choices per document, each scored once
        assert per_shard == [3 * (b - a) for a, b in reversed(CUTS)]
    else:              # whole batches of 2 prompts, and only those that hold one of its documents
        assert all(b - a <= n <= 2 * (b - a) for n, (a, b) in zip(per_shard, reversed(CUTS))), per_shard


def test_answers_for_other_prompts_or_missing_documents_are_refused(llada):
    part = through_json(answer_shard(llada, "arc_easy", options(), (0, 5)))
    with pytest.raises(DllmqError, match="do not cover"):
        score_answers("arc_easy", options(), [{**part, "answers": part["answers"][3:]}])
    other = EvalOptions(data_dir=DATA, offline=True, overrides={**SETTINGS, "num_fewshot": 1}, progress=False)
    with pytest.raises(DllmqError, match="other prompts"):
        score_answers("arc_easy", other, [part])
    with pytest.raises(DllmqError, match="outside"):
        answer_shard(llada, "arc_easy", options(), (3, 9))
