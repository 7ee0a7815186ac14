"""Quantization x denoising steps (issue 19): how each method's accuracy, flips and trajectory drift from
full precision change with the number of LLaDA sampler steps and the remasking strategy.

For one model, each method is quantized once (through the study's cache of quantized models when one is
given: the same keys as `dllmq study`, so a study's cache is reused). Every method then generates the
first `limit` items of each mini generation task at every (steps, remasking) setting, with the mini
tasks' own prompts and scoring (`evaluate_mini` with `generation` overrides), while a `StepRecorder`
keeps the answer's state after every step. Against FP at the same setting:

- accuracy and its paired change (setting - FP, points) and the items whose correctness flipped
  (`evidence.item_contrast`, the study report's flips);
- the per-step disagreement with FP's free-running trajectory (`trajectory.step_disagreement`): at
  step s, the fraction of FP's committed answer tokens the method does not hold; read at 1/4, 1/2
  and the end of the trajectory, and averaged over the steps (the error accumulated along it).

Intervals: 95 % paired bootstrap over the items (one `Resampler`, the same indices for every row of a
task). Generation is greedy and seeded; the rows do not depend on the thread count.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from dllmq.diffusion.logits import mask_token_id
from dllmq.diffusion.trajectory import StepRecorder, step_disagreement
from dllmq.errors import DllmqError
from dllmq.evaluate.mini import evaluate_mini, expand_tasks
from dllmq.study.cache import QuantCache
from dllmq.study.cells import StudyCell, plan_cells
from dllmq.study.config import StudyConfig, parse_study_config
from dllmq.study.evidence import Estimate, item_contrast
from dllmq.study.runner import CellOutcome, _prepare_model   # the study's load-or-quantize-and-cache
from dllmq.study.stats import REPS, Resampler

GENERATION_TASKS = ("mini_math", "mini_code")
REMASKING = ("low_confidence", "random")
DEFAULT_METHODS = ("fp", "gptq:W3A16-g128", "awq:W3A16-g128", "quarot:W4A4", "duquant:W4A4")
FRACTIONS = (0.25, 0.5, 1.0)      # where along the trajectory the disagreement is read


@dataclass(frozen=True)
class StepsGrid:
    model: str = "dllmq-tiny-instruct"
    methods: tuple[str, ...] = DEFAULT_METHODS          # "fp" or "method:PRESET"
    tasks: tuple[str, ...] = GENERATION_TASKS
    limit: int = 48
    gen_length: int = 32
    block_length: int = 8
    steps: tuple[int, ...] = (4, 8, 16, 32)
    remasking: tuple[str, ...] = REMASKING
    seed: int = 0
    batch_size: int = 32
    calibration: dict = field(default_factory=dict)     # the study's calibration block (defaults: its own)
    chat: bool | None = None                            # None: the chat template for chat models

    def settings(self) -> list[tuple[int, str]]:
        return [(s, r) for s in self.steps for r in self.remasking]


def check_grid(grid: StepsGrid) -> None:
    """Refuse a grid the run would fail on late, in one sentence."""
    bad = [t for t in expand_tasks(list(grid.tasks)) if t not in GENERATION_TASKS]
    if bad:
        raise DllmqError(f"{', '.join(bad)} is not a generation task; give mini_math and/or mini_code.")
    if grid.limit < 2:
        raise DllmqError(f"--limit must be at least 2 items (intervals need them), got {grid.limit}.")
    if not grid.steps or any(s < 1 for s in grid.steps) or len(set(grid.steps)) != len(grid.steps):
        raise DllmqError(f"steps must be distinct positive numbers, got {list(grid.steps)}.")
    blocks = grid.gen_length // grid.block_length if grid.block_length > 0 else 0
    if grid.block_length < 1 or grid.gen_length % grid.block_length:
        raise DllmqError(f"gen_length ({grid.gen_length}) must be a multiple of block_length ({grid.block_length}).")
    for s in grid.steps:
        if s % blocks or s > grid.gen_length:
            raise DllmqError(f"steps {s} must be a multiple of the {blocks} blocks (gen_length / block_length) and "
                             f"at most gen_length ({grid.gen_length}), so every step commits a token.")
    bad = [r for r in grid.remasking if r not in REMASKING]
    if bad or not grid.remasking:
        raise DllmqError(f"Unknown remasking {bad or '(none)'}; use {' and/or '.join(REMASKING)}.")
    if not grid.methods or grid.methods[0] != "fp":
        raise DllmqError("The methods must start with fp: every setting is compared with full precision.")


def plan(grid: StepsGrid, device: str = "cpu") -> tuple[StudyConfig, list[StudyCell]]:
    """The grid's methods as a study config and its cells (quant keys as `dllmq study` computes them, so its
    cache applies)."""
    check_grid(grid)
    entries: list = []
    for m in grid.methods:
        name, _, preset = m.partition(":")
        if name == "fp":
            entries.append("fp")
        elif not preset:
            raise DllmqError(f"Method {m!r} needs a preset, e.g. {name}:W4A16-g128.")
        else:
            entries.append({"name": name, "bits": [preset]})
    config = parse_study_config({"models": [grid.model], "methods": entries, "tasks": list(grid.tasks),
                                 "limit": grid.limit, "seeds": [grid.seed], "measures": None,
                                 **({"calibration": grid.calibration} if grid.calibration else {})},
                                source="the steps study")
    return config, plan_cells(config, device)


def run_method(model, tokenizer, grid: StepsGrid, progress: bool = False) -> dict:
    """{task: {"steps/remasking": {"correct", "answers", "states"}}} of one loaded model over the grid."""
    out: dict[str, dict] = {}
    for task in expand_tasks(list(grid.tasks)):
        out[task] = {}
        for steps, remasking in grid.settings():
            recorder = StepRecorder(grid.gen_length)
            r = evaluate_mini(model, tokenizer, [task], limit=grid.limit, seed=grid.seed, progress=progress,
                              chat=grid.chat, batch_size=grid.batch_size, return_samples=True,
                              generation=dict(gen_length=grid.gen_length, block_length=grid.block_length,
                                              steps=steps, remasking=remasking),
                              step_callback=recorder)[task]
            out[task][f"{steps}/{remasking}"] = {"correct": [int(s["correct"]) for s in r["samples"]],
                                                 "answers": [s["answer"] for s in r["samples"]],
                                                 "states": recorder.states()}
    return out


def _ci(e: Estimate, scale: float = 1.0) -> dict:
    iv = e.ci()
    # + 0.0 turns a -0.0 (a zero difference negated) into 0.0
    return {"value": e.value * scale + 0.0, "lo": iv.lo * scale + 0.0, "hi": iv.hi * scale + 0.0}


def setting_rows(method: str, runs: dict, fp_runs: dict, mask_id: int, rs: Resampler) -> list[dict]:
    """The table rows of one method (its runs against FP's at the same settings)."""
    rows = []
    for task, by_setting in runs.items():
        for key, run in by_setting.items():
            steps, remasking = key.split("/")
            fp = fp_runs[task][key]
            kind = f"items:{task}"
            rs.sizes.setdefault(kind, len(fp["correct"]))
            c = item_contrast(fp["correct"], run["correct"], kind, rs, fp["answers"], run["answers"])
            acc = np.asarray(run["correct"], dtype=float)
            per_item = np.asarray(step_disagreement(fp["states"], run["states"], mask_id), dtype=float)  # [N, S]
            n_steps = per_item.shape[1]
            row = {"method": method, "task": task, "steps": int(steps), "remasking": remasking, "n": len(acc),
                   "acc": _ci(Estimate(float(acc.mean()), rs.mean(kind, acc)), 100.0),
                   "delta_acc": _ci(c["drop"].scaled(-1.0)),
                   "right_to_wrong": int(round(c["right_to_wrong"].value * len(acc))),
                   "wrong_to_right": int(round(c["wrong_to_right"].value * len(acc))),
                   "changed": int(round(c["changed"].value * len(acc))),
                   "disagree_by_step": [float(v) for v in per_item.mean(axis=0)]}
            flipped = (c["right_to_wrong"].reps + c["wrong_to_right"].reps)
            row["flipped"] = _ci(Estimate(c["right_to_wrong"].value + c["wrong_to_right"].value, flipped), 100.0)
            for f in FRACTIONS:
                s = max(1, math.ceil(f * n_steps)) - 1            # the step by which a fraction f is committed
                v = per_item[:, s]
                row[f"disagree@{f:g}"] = _ci(Estimate(float(v.mean()), rs.mean(kind, v)), 100.0)
            area = per_item.mean(axis=1)
            row["disagree_mean"] = _ci(Estimate(float(area.mean()), rs.mean(kind, area)), 100.0)
            rows.append(row)
    return rows


def run_steps_study(grid: StepsGrid, cache: str | None = None, *, device: str = "cpu", progress: bool = False,
                    reps: int = REPS, log: Callable[[str], None] = lambda s: None,
                    partial: Callable[[dict], None] = lambda result: None) -> dict:
    """{"grid", "rows", "cached"}: every (method, task, steps, remasking) row against FP (see the module
    docstring). `log` receives one line per method as it finishes, `partial` the result so far."""
    config, cells = plan(grid, device)
    qcache = QuantCache(cache) if cache else None
    rs = Resampler({}, reps=reps, seed=grid.seed)
    fp_runs, rows, cached = None, [], {}
    for cell in cells:
        outcome = CellOutcome(cell, "running")
        model, tokenizer, _ = _prepare_model(cell, qcache, device, None, progress, outcome,
                                              config.calibration.threads)
        label = "FP" if cell.is_fp else f"{cell.method} {cell.preset}"
        runs = run_method(model, tokenizer, grid, progress)
        if fp_runs is None:
            fp_runs = runs
        rows += setting_rows(label, runs, fp_runs, mask_token_id(model), rs)
        cached[label] = outcome.cached
        log(f"{label}: done ({'from the cache' if outcome.cached else 'quantized now' if not cell.is_fp else 'FP'})")
        del model
        partial({"grid": asdict(grid), "rows": rows, "cached": cached})
    return {"grid": asdict(grid), "rows": rows, "cached": cached}


# ----------------------------------------------------------------------------------------------- output
def _fmt(ci: dict, digits: int = 1) -> str:
    return f"{ci['value']:.{digits}f} [{ci['lo']:.{digits}f}, {ci['hi']:.{digits}f}]"


def format_table(rows: Sequence[dict]) -> str:
    """Markdown: one table per task, a row per (method, steps, remasking)."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        out.append(f"**{task}** ({mine[0]['n']} items; intervals: 95 % paired bootstrap over the items; "
                   "disagreement: % of FP's committed answer tokens the method does not hold)\n")
        out.append("| method | steps | remasking | acc % | Δacc vs FP (pts) | flips R→W / W→R | "
                   "disagree @¼ % | @½ % | @end % | mean over steps % |")
        out.append("|---|---:|---|---|---|---:|---:|---:|---|---|")
        for r in mine:
            fp = r["method"] == "FP"
            cells = [r["method"], str(r["steps"]), r["remasking"], _fmt(r["acc"]),
                     "—" if fp else _fmt(r["delta_acc"]),
                     "—" if fp else f"{r['right_to_wrong']} / {r['wrong_to_right']}",
                     "—" if fp else f"{r['disagree@0.25']['value']:.1f}",
                     "—" if fp else f"{r['disagree@0.5']['value']:.1f}",
                     "—" if fp else _fmt(r["disagree@1"]),
                     "—" if fp else _fmt(r["disagree_mean"])]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


__all__ = ["DEFAULT_METHODS", "GENERATION_TASKS", "StepsGrid", "check_grid", "format_table", "plan", "run_method",
           "run_steps_study", "setting_rows"]
