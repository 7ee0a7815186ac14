"""One lm-evaluation-harness task cut into shards of its documents, merged into the whole run's report.

    n = task_items("gsm8k", options)                                   # documents at options.limit
    parts = [answer_shard((model, tok), "gsm8k", options, (a, b)) for a, b in ranges(n)]   # anywhere
    report = score_answers("gsm8k", options, parts)                    # == run_eval(model, "gsm8k", options)

A task's documents are its leaf tasks' documents in order (a group such as mmlu is one task of many
leaves); a shard is a range of them. Exactness comes from letting lm-eval do everything but the
model's work, twice:

- `answer_shard` runs the task through `run_eval` as a whole run does - the same task objects, config
  overrides, seeds and the full request list, so every document gets the contexts and few-shot
  examples the whole run gives it (lm-eval draws few-shot examples from one random stream per task, in
  document order: a shard that built only its own documents would get other prompts) - but its model
  (ShardLM) answers only the shard's documents' requests, records the answers and stops the harness
  before it scores anything. Each answer is the one the whole run computes: a request's likelihood does
  not depend on the others, the greedy flag is counted per document (shards hold whole documents), and
  a generation batch is formed over the whole request list and run whole whenever it holds one of the
  shard's requests.
- `score_answers` runs the task through `run_eval` again with a model (ReplayLM) that answers every
  request from the shards' records. lm-eval then filters, scores, aggregates, computes the stderr and
  logs the samples with its own code on the same answers as the whole run: the report (metrics, stderr,
  sample counts, samples) is the whole run's - for any metric, including ones that are not means of
  per-item values - except the timings. Each recorded answer carries a digest of its request, so shards
  built from other prompts (another dllmq or lm-eval version) are refused rather than merged.
"""
from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from lm_eval.api.model import LM

from dllmq.errors import DllmqError
from dllmq.evaluate import harness
from dllmq.evaluate.harness_tasks import leaf_tasks
from dllmq.evaluate.runner import EvalOptions, built_tasks, plan_eval, run_eval
from dllmq.evaluate.sources import dataset_sources


def documents(objs, limit) -> list[tuple[str, int]]:
    """(leaf task, doc_id) of every document a task evaluates at `limit`, in the task's order."""
    from lm_eval.evaluator_utils import get_sample_size

    out = []
    for task in leaf_tasks(objs):
        n = len(task.eval_docs)
        cap = get_sample_size(task, limit)
        out += [(task.task_name, d) for d in range(n if cap is None else min(n, cap))]
    return out


def task_items(task: str, options: EvalOptions | None = None) -> int:
    """How many documents the (preset or harness) task evaluates at options.limit, over its leaf tasks."""
    o = options or EvalOptions()
    plan = plan_eval([task], o)
    with dataset_sources(o.data_dir, o.offline):
        ((_, objs),) = built_tasks(plan, o)
        return len(documents(objs, plan.limit))


def _key(reqtype: str, req) -> tuple[str, str, int, int]:
    return (reqtype, str(req.task_name), int(req.doc_id), int(req.idx))


def _digest(req) -> str:
    return hashlib.sha1(repr(req.args).encode()).hexdigest()[:16]


class _AnswersReady(Exception):
    """Raised by ShardLM once every request type is answered: the shard's work is done, nothing to score."""


class ShardLM(harness.DllmqLM):
    """DllmqLM answering only the requests of `docs` ((leaf task, doc_id) pairs); see the module docstring."""

    def __init__(self, *args, docs: set[tuple[str, int]], leaves: Sequence, **kwargs):
        super().__init__(*args, **kwargs)
        self.docs, self.leaves = docs, list(leaves)
        self.only = lambda req: (req.task_name, req.doc_id) in self.docs
        self.records: dict[tuple, dict] = {}
        self._pending: set[str] | None = None

    def _record(self, reqtype: str, requests, answers) -> None:
        if self._pending is None:   # every task's requests are built before the harness calls its model
            self._pending = {inst.request_type for t in self.leaves for inst in t.instances}
        for req, answer in zip(requests, answers):
            if self.only(req):       # a request of `repeats` > 1 comes that many times: one answer each
                rec = self.records.setdefault(_key(reqtype, req), {"digest": _digest(req), "answers": []})
                rec["answers"].append(list(answer) if isinstance(answer, tuple) else answer)
        self._pending.discard(reqtype)
        if not self._pending:
            raise _AnswersReady

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        out = super().loglikelihood(requests, disable_tqdm)
        self._record("loglikelihood", requests, out)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        out = super().loglikelihood_rolling(requests, disable_tqdm)
        self._record("loglikelihood_rolling", requests, out)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        out = super().generate_until(requests, disable_tqdm)
        self._record("generate_until", requests, out)
        return out


def answer_shard(model_or_pair: Any, task: str, options: EvalOptions | None, shard: tuple[int, int]) -> dict:
    """The model's answers to the requests of documents [start, stop) of `task`:
    {"answers": [[reqtype, leaf, doc_id, idx, digest, [answer per repeat]], ...], "documents": n in the shard,
    "settings": the model settings}. JSON-serializable, for a store."""
    o = replace(options or EvalOptions(), out=None, samples_out=None, log_samples=False, return_samples=False)
    start, stop = shard
    made: list[ShardLM] = []

    def factory(preset, objs, model, tok, label, settings):
        docs = documents(objs, int(o.limit) if isinstance(o.limit, float) and o.limit > 1 else o.limit)
        if not 0 <= start < stop <= len(docs):
            raise DllmqError(f"Shard {start}-{stop} is outside task {task}'s {len(docs)} documents.")
        lm = ShardLM(label, model=model, tokenizer=tok, seed=o.seed, progress=o.progress,
                     docs=set(docs[start:stop]), leaves=leaf_tasks(objs), **settings)
        made.append(lm)
        return lm

    try:
        run_eval(model_or_pair, [task], o, lm_factory=factory)
    except _AnswersReady:
        pass
    else:
        raise DllmqError(f"Task {task} finished without asking its model anything; it cannot be sharded.")
    lm = made[-1]
    answers = [[*key, rec["digest"], rec["answers"]] for key, rec in sorted(lm.records.items())]
    return {"answers": answers, "documents": stop - start, "settings": lm.settings()}


class ReplayLM(LM):
    """Answers every request from the answers recorded by shards (no model)."""

    def __init__(self, shards: Sequence[dict], task: str):
        super().__init__()
        self.task = task
        self.answers: dict[tuple, tuple[str, list]] = {}
        for part in shards:
            for reqtype, leaf, doc_id, idx, digest, answers in part["answers"]:
                self.answers[(reqtype, leaf, int(doc_id), int(idx))] = (digest, answers)
        self._settings = dict(shards[0].get("settings") or {}) if shards else {}
        self._served: dict[tuple, int] = defaultdict(int)

    def settings(self) -> dict:
        return self._settings

    def _replay(self, reqtype: str, requests) -> list:
        out = []
        for req in requests:
            key = _key(reqtype, req)
            if key not in self.answers:
                raise DllmqError(f"No shard answered {reqtype} request {key[3]} of document {key[2]} of "
                                 f"{key[1]} (task {self.task}); the shards do not cover the task.")
            digest, answers = self.answers[key]
            if digest != _digest(req):
                raise DllmqError(f"The shards of task {self.task} answered other prompts than this run builds "
                                 f"(document {key[2]} of {key[1]}); were they made with another dllmq or lm-eval?")
            answer = answers[self._served[key]]
            self._served[key] += 1
            out.append(tuple(answer) if reqtype == "loglikelihood" else answer)
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._replay("loglikelihood", requests)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self._replay("loglikelihood_rolling", requests)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self._replay("generate_until", requests)


def score_answers(task: str, options: EvalOptions | None, shards: Sequence[dict]) -> dict:
    """run_eval's report of `task` (samples included when options.return_samples) from the answers of
    shards that together cover its documents, scored by lm-eval as the whole run scores them."""
    o = options or EvalOptions()
    replay = ReplayLM(shards, task)
    start = time.time()
    report = run_eval(None, [task], o, lm_factory=lambda *args: replay)
    report["merge_seconds"] = time.time() - start
    return report


__all__ = ["ReplayLM", "ShardLM", "answer_shard", "documents", "score_answers", "task_items"]
