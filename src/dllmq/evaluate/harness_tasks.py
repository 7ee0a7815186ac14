"""The lm-evaluation-harness side of `run_eval`: the task index, building a preset's task objects
(which loads their data) and summarising the harness's results per preset."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import lm_eval.tasks
from lm_eval.api.group import Group
from lm_eval.tasks import TaskManager

from dllmq.errors import DllmqError
from dllmq.evaluate import presets as P
from dllmq.evaluate.humaneval import SANDBOXED_TASKS, STUDY_TASKS
from dllmq.evaluate.sources import DatasetUnavailable

# The harness folders that hold the preset tasks (minerva_math's group file sits in benchmarks/).
PRESET_TASK_DIRS = ("mmlu/default", "arc", "gsm8k", "hellaswag", "piqa", "winogrande", "minerva_math", "benchmarks")


@lru_cache(maxsize=4)
def _task_manager(include_path: tuple[str, ...], include_defaults: bool) -> TaskManager:
    """lm_eval's task index, built once per process (the full one reads ~14k YAML files: seconds)."""
    index_log = logging.getLogger("lm_eval.tasks._index")
    level = index_log.level
    index_log.setLevel(logging.ERROR)  # tags shared between folders are reported as overrides
    try:
        return TaskManager(include_path=list(include_path) or None, include_defaults=include_defaults)
    finally:
        index_log.setLevel(level)


def is_sandboxed(preset: P.TaskPreset) -> bool:
    """A code task dllmq runs through its own sandboxed task (not the harness's)."""
    return preset.code_execution and preset.harness_task in SANDBOXED_TASKS


def task_manager_for(presets: Sequence[P.TaskPreset], user_paths: tuple[str, ...],
                     include_defaults: bool) -> TaskManager:
    """An index that knows the presets' harness tasks: only the preset tasks' folders (and the user's)
    when that suffices - milliseconds instead of seconds - else the harness's full index."""
    harness_tasks = [p.harness_task for p in presets if not is_sandboxed(p)]
    if not include_defaults:
        return _task_manager(user_paths, False)
    root = Path(lm_eval.tasks.__file__).parent
    fast_dirs = tuple(str(root / d) for d in PRESET_TASK_DIRS if (root / d).is_dir())
    fast = _task_manager(fast_dirs + user_paths, False)
    if all(name in fast.all_tasks for name in harness_tasks):
        return fast
    return _task_manager(user_paths, True)


def task_spec(preset: P.TaskPreset, allow_code_execution: bool, sandbox_limits, sandbox_workers,
              variant: str | None = None) -> str | dict:
    """What TaskManager.load takes for a preset: the harness task name, or dllmq's sandboxed task config;
    `variant` (presets.study_task_variant) names the study's own version of the task, which keeps the
    preset's task name."""
    if variant is not None:
        return STUDY_TASKS[variant](allow_code_execution=allow_code_execution, limits=sandbox_limits,
                                    workers=sandbox_workers, name=preset.harness_task)
    if preset.harness_task in SANDBOXED_TASKS and preset.code_execution:
        return SANDBOXED_TASKS[preset.harness_task](allow_code_execution=allow_code_execution, limits=sandbox_limits,
                                                    workers=sandbox_workers)
    return preset.harness_task


def build_task(task_manager: TaskManager, spec: str | dict, preset: P.TaskPreset) -> list:
    """The top-level Task / Group objects for one preset (loads its data)."""
    try:
        loaded = task_manager.load([spec])
    except DatasetUnavailable as err:
        raise err.for_task(preset.name) from None
    except KeyError:
        if isinstance(spec, str) and spec not in task_manager.all_tasks:
            raise DllmqError(
                f"Unknown task {spec!r}; use a group ({', '.join(P.GROUPS)}), a preset task "
                f"({', '.join(P.PRESETS)}) or an lm-evaluation-harness task name.") from None
        raise
    except ImportError as err:
        raise DllmqError(f"Task {preset.name} needs a package that is missing ({err}); install dllmq's "
                         "evaluation dependencies (pip install -e .).") from None
    name = spec["task"] if isinstance(spec, dict) else spec
    top = loaded["groups"].get(name) or loaded["tasks"].get(name)
    if top is None:  # a tag: several tasks
        return list(loaded["tasks"].values())
    return [top]


def leaf_tasks(objs) -> list:
    """The leaf Task objects under the built Task / Group objects, in order."""
    leaves = []
    for obj in objs:
        leaves += obj.get_all_tasks() if isinstance(obj, Group) else [obj]
    return leaves


def leaf_names(objs) -> list[str]:
    """The names of the leaf tasks under the built Task / Group objects."""
    return [t.task_name for t in leaf_tasks(objs)]


def _metrics_of(results: dict, name: str) -> dict:
    for section in ("groups", "results"):
        block = results.get(section, {}) or {}
        if name in block:
            return {k: v for k, v in block[name].items() if k not in ("alias", " ", "name", "sample_len")}
    return {}


def _sample_counts(results: dict, leaves: Sequence[str]) -> tuple[int, int]:
    counts = results.get("n-samples", {}) or {}
    effective = sum(int(counts.get(t, {}).get("effective", 0)) for t in leaves)
    original = sum(int(counts.get(t, {}).get("original", 0)) for t in leaves)
    return effective, original


def summarise(preset: P.TaskPreset, results: dict, leaves: Sequence[str], settings: dict, shots,
              seconds: float) -> dict:
    """One preset's entry of the results file, from lm_eval.simple_evaluate's results."""
    metrics = _metrics_of(results, preset.harness_task)
    if not metrics and len(leaves) == 1:
        metrics = _metrics_of(results, leaves[0])
    headline = preset.metric or next((k for k in metrics if "_stderr" not in k), "")
    value = metrics.get(headline)
    name, _, filt = headline.partition(",")
    stderr = metrics.get(f"{name}_stderr,{filt}") if filt else metrics.get(f"{name}_stderr")
    effective, original = _sample_counts(results, leaves)
    return {
        "category": preset.category,
        "metric": headline,
        "value": value,
        "stderr": stderr if isinstance(stderr, (int, float)) else None,
        "n_samples": effective,
        "n_total": original,
        "num_fewshot": shots,
        "metrics": metrics,
        "subtasks": {leaf: _metrics_of(results, leaf) for leaf in leaves} if len(leaves) > 1 else {},
        "higher_is_better": (results.get("higher_is_better", {}) or {}).get(preset.harness_task),
        "preset": preset.to_dict(),
        "settings": settings,
        "seconds": round(seconds, 3),
    }
