"""`dllmq study`: run a grid of models x methods x bit configs x tasks into a results database, resumably.

    from dllmq.study.config import load_config
    from dllmq.study.runner import run_study
    summary = run_study(load_config("study.yaml"), db="runs/study.db", cache="runs/study-cache")

For each cell (cells.py) the runner
1. claims it in the database (store.claim_cell: one BEGIN IMMEDIATE transaction; a cell done, or held
   by a live runner, is skipped; a stale claim - no heartbeat for `stale_after` s, or its process gone
   from this host - is taken over), and keeps the claim alive from a background thread;
2. loads the quantized model from the cache (CACHE/<quant_key>) or loads the model, quantizes it and
   stores it in the cache atomically (cache.py);
3. runs every task (mini tasks in-process, other tasks through lm-evaluation-harness), keeping every
   item's answer;
4. runs the measures against the model's FP (measures.py: masked-prediction KL, top-1 agreement, ELBO,
   generation trajectory), from an FP reference built once per model in this run;
5. writes all its result rows, items and measures and marks it done in ONE transaction (store.finish_cell).

Threads: quantization runs with `calibration.threads` torch threads (pinned: GPTQ's float reductions
depend on the thread count, so an unpinned run would quantize differently on another machine);
evaluation and measures run with `threads` (None: the process's own), which they do not depend on.
Both are recorded in the cells table.
A cell that raises is marked failed with its error and the run goes on; a later run retries it.
Killed at any moment, a run loses no finished cell, and a rerun repeats none: the killed cell's claim
goes stale (at once on this host), leaving no rows, and its half-saved model is only ever in a staging
folder that lookups ignore.

The `dllmq study` command is dllmq.cli.study.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dllmq import quant
from dllmq.api import load_model
from dllmq.errors import DllmqError
from dllmq.evaluate import MINI_TASKS, evaluate_mini
from dllmq.evaluate.runner import EvalOptions, run_eval
from dllmq.quant.qlinear import keep_dequantized_weights
from dllmq.study import store
from dllmq.study.cache import QuantCache
from dllmq.study.cells import StudyCell, model_is_readable, plan_cells
from dllmq.study.config import StudyConfig
from dllmq.study.measures import (ReferenceCache, build_fp_reference, harness_items, measure_rows, mini_items,
                                  outlier_rows)

log = logging.getLogger(__name__)

DEFAULT_DB = store.DEFAULT_DB
DEFAULT_CACHE = "runs/study-cache"
MINI_METRIC = {"mini_general": "acc", "mini_math": "exact_match", "mini_code": "pass@1"}

# hook(event, cell, task): called at "claimed", "model_ready", "task_done" (task set), "finished".
# Tests raise from it to simulate a crash at a chosen point.
Hook = Callable[[str, StudyCell, "str | None"], None]


@dataclass
class CellOutcome:
    cell: StudyCell
    # done | failed | skipped (done before) | busy (another runner has it) | lost (taken over while we ran)
    # | not-retried (failed in an earlier run and retry_failed is off, or failed in another runner of this run)
    status: str
    seconds: float = 0.0
    error: str | None = None
    cached: bool = False        # the quantized model came from the cache
    measure_seconds: float = 0.0  # the measures against FP (building FP's reference included)


@dataclass
class StudySummary:
    db: Path
    cells: list[StudyCell]
    outcomes: list[CellOutcome] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)   # model -> why its cells did not run

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def failed(self) -> list[CellOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed


# ----------------------------------------------------------------------------- the claim's heartbeat
class Heartbeats:
    """Refreshes every claim a runner holds (add / discard keys), from one daemon thread with its own connection;
    a claim another runner took over moves to `lost`."""

    def __init__(self, db: Path, owner: str, every: float):
        self.db, self.owner, self.every = db, owner, every
        self.keys: set[str] = set()
        self.lost: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="study-heartbeat", daemon=True)

    def add(self, key: str) -> None:
        with self._lock:
            self.keys.add(key)

    def discard(self, key: str) -> None:
        with self._lock:
            self.keys.discard(key)

    def __enter__(self) -> "Heartbeats":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        conn = store.connect(self.db)
        try:
            while not self._stop.wait(self.every):
                with self._lock:
                    keys = list(self.keys)
                for key in keys:
                    try:
                        if not store.heartbeat(conn, key, self.owner):
                            with self._lock:
                                self.lost.add(key)
                                self.keys.discard(key)
                            log.warning("the claim on cell %s was taken over by another runner", key[:12])
                    except sqlite3.Error as err:
                        log.warning("heartbeat of cell %s failed: %s", key[:12], err)
        finally:
            conn.close()


class Heartbeat(Heartbeats):
    """The claim on one cell, refreshed while a local runner works on it."""

    def __init__(self, db: Path, cell_key: str, owner: str, every: float):
        super().__init__(db, owner, every)
        self.cell_key = cell_key
        self.add(cell_key)

    @property
    def lost_claim(self) -> bool:
        return self.cell_key in self.lost


# ----------------------------------------------------------------------------- one cell
def _finite(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


@contextlib.contextmanager
def pinned_threads(threads: int | None):
    """torch's intra-op thread count set to `threads` inside the block (nothing changes for None)."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def mini_result(task: str, summary: dict) -> dict:
    """The result columns of a mini task from evaluate_mini's (or mini.summarize's) summary of it."""
    return {"metric": MINI_METRIC[task], "value": float(summary["acc"]), "stderr": _finite(summary["stderr"]),
            "n": summary["n"], "category": store.task_category(task)}


def _evaluate_task(model, tokenizer, task: str, cell: StudyCell, config: StudyConfig, progress: bool,
                   items: list[dict] | None = None) -> dict:
    """{metric, value, stderr, n, category} of one task on a loaded model; its per-item answers are appended
    to `items` when given."""
    if task in MINI_TASKS:
        r = evaluate_mini(model, tokenizer, [task], limit=cell.limit, seed=cell.seed, progress=progress,
                          chat=config.eval.chat, batch_size=config.eval.batch_size, return_samples=True)[task]
        if items is not None:
            items += mini_items(task, r["samples"])
        return mini_result(task, r)
    report = run_eval((model, tokenizer), [task], harness_options(cell, config, progress, items is not None))
    return harness_row(task, report, items)


def harness_options(cell: StudyCell, config: StudyConfig, progress: bool = False, samples: bool = True) -> EvalOptions:
    """How a cell's harness tasks are evaluated (the same for a whole task and for its shards)."""
    ev = config.eval
    overrides = {"chat": ev.chat, **ev.harness}  # eval.chat applies to harness tasks too, unless harness sets it
    return EvalOptions(limit=cell.limit, allow_code_execution=ev.allow_code_execution, data_dir=ev.data_dir,
                       overrides=overrides, seed=cell.seed, offline=True if ev.offline else None,
                       progress=progress, model_name=cell.model, return_samples=samples, profile=ev.profile)


def harness_row(task: str, report: dict, items: list[dict] | None = None) -> dict:
    """{metric, value, stderr, n, category} of a harness task from its run_eval report; its per-item answers
    are appended to `items` when given."""
    t = report["tasks"][task]
    if items is not None and t.get("metric"):
        items += harness_items(task, report.get("samples") or [], t["metric"])
    if _finite(t["value"]) is None:
        raise DllmqError(f"Task {task} reported no value for its metric {t['metric'] or '(none)'}; "
                         "give a task with a headline metric.")
    category = t["category"] if t["category"] in store.CATEGORIES else store.task_category(task)
    return {"metric": t["metric"].split(",")[0], "value": float(t["value"]), "stderr": _finite(t["stderr"]),
            "n": t["n_samples"], "category": category}


def _prepare_model(cell: StudyCell, cache: QuantCache | None, device: str, calib_device: str | None,
                   progress: bool, outcome: CellOutcome, calib_threads: int | None = None):
    """(model, tokenizer, quant_seconds): the full-precision model, or the quantized one from the cache,
    or freshly quantized (and then cached)."""
    if cell.is_fp:
        model, tokenizer, _ = load_model(cell.model, dtype=cell.dtype, device=device, seed=0)
        return model, tokenizer, None
    hit = cache.lookup(cell.quant_key) if cache else None
    if hit is not None:
        log.info("%s: quantized model from the cache %s", cell.describe(), hit)
        model, tokenizer, _ = load_model(hit, dtype=cell.dtype, device=device)
        outcome.cached = True
        return model, tokenizer, _finite(cache.meta(cell.quant_key).get("quant_seconds"))
    model, tokenizer, _ = load_model(cell.model, dtype=cell.dtype, device=device, seed=0)
    start = time.perf_counter()
    with pinned_threads(calib_threads):
        quant.quantize(model, tokenizer, cell.quant_config(), device=calib_device or device, progress=progress)
    seconds = time.perf_counter() - start
    if cache is not None:
        try:
            cache.store(cell.quant_key, model, tokenizer, {"model": cell.model, "method": cell.method_name,
                                                            "preset": cell.preset, "settings": cell.settings,
                                                            "quant_seconds": seconds})
        except (OSError, DllmqError) as err:  # the measurement does not depend on the cache
            log.warning("could not cache the quantized model of %s (%s); going on without", cell.describe(), err)
    return model, tokenizer, seconds


def _fp_reference(cell: StudyCell, config: StudyConfig, refs: ReferenceCache, device: str, model=None,
                  tokenizer=None):
    """The FP reference of the cell's model (built now from `model` when it is the FP model, or from a freshly
    loaded FP model, unless this run built it already)."""
    key = (cell.model, cell.seed, cell.dtype, device, repr(config.measures), config.eval.chat, cell.tasks)
    ref = refs.get(key)
    if ref is None:
        if model is None:
            model, tokenizer, _ = load_model(cell.model, dtype=cell.dtype, device=device, seed=0)
        ref = build_fp_reference(model, tokenizer, config.measures, cell.seed, chat=config.eval.chat, tasks=cell.tasks,
                                 limit=cell.limit)
        refs.put(key, ref)
        log.info("%s: FP reference built in %.1f s", cell.model, ref.seconds)
    return ref


def _compute_cell(cell: StudyCell, config: StudyConfig, cache: QuantCache | None, device: str,
                  calib_device: str | None, progress: bool, hook: Hook | None,
                  outcome: CellOutcome, refs: ReferenceCache | None = None,
                  items: list[dict] | None = None, measures: list[dict] | None = None) -> list[dict]:
    model, tokenizer, quant_seconds = _prepare_model(cell, cache, device, calib_device, progress, outcome,
                                                     config.calibration.threads)
    try:
        if hook:
            hook("model_ready", cell, None)
        rows = []
        with pinned_threads(config.threads):
            for task in cell.tasks:
                start = time.perf_counter()
                r = _evaluate_task(model, tokenizer, task, cell, config, progress, items)
                rows.append({"model": cell.model, "method": cell.method, "bits": cell.bits, "task": task,
                             "seed": cell.seed, "quant_seconds": quant_seconds,
                             "eval_seconds": time.perf_counter() - start, **r})
                if hook:
                    hook("task_done", cell, task)
            if config.measures is not None and measures is not None:
                start = time.perf_counter()
                with keep_dequantized_weights(model):
                    ref = _fp_reference(cell, config, refs if refs is not None else ReferenceCache(), device,
                                        *((model, tokenizer) if cell.is_fp else ()))
                    measures += measure_rows(model, ref)
                    if cell.is_fp:
                        measures += outlier_rows(model, ref.divergence.windows, config.measures, cell.seed, ref.setup)
                outcome.measure_seconds = time.perf_counter() - start
        return rows
    finally:
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def _run_claimed(conn: sqlite3.Connection, db: Path, cell: StudyCell, owner: str, config: StudyConfig,
                 cache: QuantCache | None, device: str, calib_device: str | None, heartbeat_every: float,
                 progress: bool, hook: Hook | None, refs: ReferenceCache | None = None) -> CellOutcome:
    outcome = CellOutcome(cell, "done")
    start = time.perf_counter()
    items: list[dict] = []
    measures: list[dict] = []
    try:
        with Heartbeat(db, cell.cell_key, owner, heartbeat_every) as beat:
            if hook:
                hook("claimed", cell, None)
            rows = _compute_cell(cell, config, cache, device, calib_device, progress, hook, outcome, refs, items,
                                 measures)
    except Exception as err:  # a failed cell is recorded and the grid goes on
        log.debug("cell %s failed", cell.describe(), exc_info=True)
        outcome.status, outcome.error = "failed", f"{type(err).__name__}: {err}"
        store.fail_cell(conn, cell.cell_key, owner, outcome.error)
    except BaseException:  # Ctrl-C (or a simulated crash): free the claim so a rerun starts it at once
        try:
            store.release_cell(conn, cell.cell_key, owner)
        except sqlite3.Error:
            pass
        raise
    else:
        facts = {"threads": config.threads or torch.get_num_threads(),
                 "calib_threads": None if cell.is_fp else config.calibration.threads,
                 "measure_seconds": outcome.measure_seconds}
        if beat.lost_claim or not store.finish_cell(conn, cell.cell_key, owner, rows, items=items, measures=measures,
                                              facts=facts):
            outcome.status = "lost"
            log.warning("%s: another runner took this cell over; its results are theirs", cell.describe())
        elif hook:
            hook("finished", cell, None)
    outcome.seconds = time.perf_counter() - start
    return outcome


# ----------------------------------------------------------------------------- the grid
def prepare_run(config: StudyConfig, device, db, owner: str | None, cache
                ) -> tuple[list, Path, str, QuantCache | None, dict[str, str]]:
    """What every runner (local or Ray) does first: check the models, plan the cells, make the database's
    folder, pick an owner id and clean the quantized-model cache of stale entries. The cells of planned
    shipped models this installation lacks are recorded as unavailable (with the reason) instead of run;
    returns the cells to run and those models' reasons."""
    unavailable = _check_models(config)
    db = Path(db)
    db.parent.mkdir(parents=True, exist_ok=True)
    cells = plan_cells(config, device, model_identities=_placeholders(unavailable))
    if unavailable:
        conn = store.connect(db)
        try:
            for c in cells:
                if c.model in unavailable:
                    store.mark_unavailable(conn, c.cell_key, model=c.model, method=c.method, bits=c.bits,
                                           settings=c.settings, tasks=c.tasks, reason=unavailable[c.model])
        finally:
            conn.close()
        cells = [c for c in cells if c.model not in unavailable]
    qcache = QuantCache(cache) if cache is not None else None
    if qcache is not None:
        qcache.clean_stale()
    return cells, db, owner or store.new_owner(), qcache, unavailable


def _placeholders(unreadable) -> dict[str, str]:
    """Identities for models that cannot be read (their cells get keys, but never run)."""
    return {m: f'{{"name": "{m}", "unreadable": true}}' for m in unreadable}


def _check_models(config: StudyConfig) -> dict[str, str]:
    """model -> reason for the planned shipped models not in this installation; DllmqError for any other
    model that cannot be read, or when no model of the grid is left to run."""
    from dllmq.tiny import not_shipped

    unavailable = {}
    for model in config.models:
        reason = model_is_readable(model)
        if reason and not_shipped(model):
            unavailable[model] = reason.rstrip(".")
        elif reason:
            raise DllmqError(f"Study model {model} cannot be used: {reason.rstrip('.')}.")
    if unavailable and len(unavailable) == len(config.models):
        raise DllmqError(f"No model of the grid can run here: {'; '.join(unavailable.values())}.")
    return unavailable


def _eta(durations: list[float], remaining: int) -> str:
    if not durations or remaining <= 0:
        return "ETA ?" if remaining > 0 else ""
    return f"ETA {tqdm.format_interval(sum(durations) / len(durations) * remaining)}"


def run_study(config: StudyConfig, db: str | os.PathLike = DEFAULT_DB, cache: str | os.PathLike | None = DEFAULT_CACHE,
              *, device: str = "cpu", calib_device: str | None = None, stale_after: float = 120.0,
              heartbeat_every: float = 10.0, retry_failed: bool = True, progress: bool = True,
              hook: Hook | None = None, owner: str | None = None, log_lines: bool = False) -> StudySummary:
    """Run every cell of `config` not yet done in `db`; see the module docstring. cache=None: no cache.
    retry_failed: cells that failed in an earlier run are run again (never twice in one run).
    log_lines: one line on stderr per computed cell (for logs, where a progress bar cannot draw)."""
    if stale_after <= 0:
        raise DllmqError(f"stale_after must be a positive number of seconds, got {stale_after}.")
    heartbeat_every = min(heartbeat_every, stale_after / 4)  # a live claim must never look stale
    cells, db, owner, qcache, unavailable = prepare_run(config, device, db, owner, cache)
    started = time.time()
    summary = StudySummary(db, cells, unavailable=unavailable)
    refs = ReferenceCache()
    conn = store.connect(db)
    try:
        known = store.cell_rows(conn, [c.cell_key for c in cells])
        done_before = sum(known.get(c.cell_key, {}).get("status") == "done" for c in cells)
        bar = tqdm(total=len(cells), initial=done_before, desc="study", unit="cell", disable=not progress,
                   bar_format="{desc}{n_fmt}/{total_fmt} cells |{bar}| [{elapsed}{postfix}]")
        durations: list[float] = []
        finished = done_before  # the bar's count, kept apart because a disabled bar counts nothing
        try:
            for cell in cells:
                if known.get(cell.cell_key, {}).get("status") == "done":
                    summary.outcomes.append(CellOutcome(cell, "skipped"))
                    continue
                state = store.claim_cell(conn, cell.cell_key, owner, model=cell.model, method=cell.method,
                                         bits=cell.bits, settings=cell.settings, tasks=cell.tasks,
                                         stale_after=stale_after,
                                         retry_failed_before=started if retry_failed else None)
                if state != store.CLAIMED:
                    status = {store.DONE: "skipped", store.BUSY: "busy", store.FAILED: "not-retried"}[state]
                    summary.outcomes.append(CellOutcome(cell, status))
                    if state == store.DONE:
                        bar.update(1)
                        finished += 1
                    continue
                bar.set_description(f"study ({cell.describe()})")
                outcome = _run_claimed(conn, db, cell, owner, config, qcache, device, calib_device,
                                       heartbeat_every, progress, hook, refs)
                summary.outcomes.append(outcome)
                if outcome.status == "failed":
                    log.warning("%s failed: %s", cell.describe(), outcome.error)
                durations.append(outcome.seconds)
                bar.update(1)
                finished += 1
                eta = _eta(durations, len(cells) - finished)
                bar.set_postfix_str(eta)
                if log_lines:
                    print(f"study {finished}/{len(cells)} cells: {cell.describe()} {outcome.status} in "
                          f"{outcome.seconds:.0f} s {eta}".rstrip(), file=sys.stderr, flush=True)
        finally:
            bar.set_description("study")
            bar.close()
    finally:
        conn.close()
    return summary


# ----------------------------------------------------------------------------- output
def _points(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def format_table(db: str | os.PathLike, cells: list[StudyCell]) -> str:
    """Model, method, bits (and seed when several) and each task's points, for the grid's cells."""
    conn = store.connect(db)
    try:
        rows = store.cell_rows(conn, [c.cell_key for c in cells])
        results: dict[str, dict[str, float]] = {}
        for r in store.results_of(conn, [c.cell_key for c in cells]):
            results.setdefault(r["cell_key"], {})[r["task"]] = r["value"]
    finally:
        conn.close()
    tasks = list(cells[0].tasks) if cells else []
    seeds = len({c.seed for c in cells}) > 1
    head = ["model", "method", "bits"] + (["seed"] if seeds else []) + tasks
    table = [head]
    for c in cells:
        status = rows.get(c.cell_key, {}).get("status")
        got = results.get(c.cell_key, {})
        if status == "done":
            vals = [_points(got.get(t)) for t in tasks]
        else:
            vals = [status or "todo"] + [""] * (len(tasks) - 1)
        table.append([c.model, c.method, c.bits] + ([str(c.seed)] if seeds else []) + vals)
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    n_left = 3 + seeds
    return "\n".join("  ".join(v.ljust(w) if i < n_left else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
                     .rstrip() for r in table)


def format_summary(summary: StudySummary, note: str = "") -> str:
    """The run's counts on one line (`note` appended to it), then each failed cell and each skipped model."""
    n = len(summary.cells)
    done_now = summary.count("done")
    parts = [f"{done_now} computed", f"{summary.count('skipped')} already done"]
    for status, text in (("busy", "run by another runner"), ("lost", "taken over by another runner"),
                         ("not-retried", "left failed (not retried)"), ("failed", "failed")):
        if summary.count(status):
            parts.append(f"{summary.count(status)} {text}")
    cached = sum(o.cached for o in summary.outcomes)
    lines = [f"{n} cells: " + ", ".join(parts) + (f" ({cached} quantized models from the cache)" if cached else "")
             + note]
    for o in summary.failed:
        lines.append(f"  FAILED {o.cell.describe()}: {o.error}")
    for model, reason in summary.unavailable.items():
        lines.append(f"  SKIPPED {model}: {reason}.")
    return "\n".join(lines)


def format_dry_run(config: StudyConfig, db: str | os.PathLike, device: str = "cpu") -> str:
    """The grid's cells and each one's state in `db` (the database is not created if missing)."""
    unreadable = {m: model_is_readable(m) for m in config.models}
    cells = plan_cells(config, device, model_identities=_placeholders(m for m, why in unreadable.items() if why))
    rows: dict[str, dict] = {}
    if Path(db).is_file():
        conn = store.connect(db)
        try:
            rows = store.cell_rows(conn, [c.cell_key for c in cells])
        finally:
            conn.close()
    now = time.time()
    table = [["status", "model", "method", "bits", "seed", "cell"]]
    counts: dict[str, int] = {}
    for c in cells:
        row = rows.get(c.cell_key)
        if unreadable.get(c.model):
            status = "no-model"
        elif row is None:
            status = "todo"
        elif row["status"] == "running":
            status = f"running ({row['owner']}, heartbeat {now - (row['heartbeat'] or 0):.0f} s ago)"
        else:
            status = row["status"]
        counts[status.split(" ")[0]] = counts.get(status.split(" ")[0], 0) + 1
        key = "-" if unreadable.get(c.model) else c.cell_key[:12]
        table.append([status, c.model, c.method, c.bits, str(c.seed), key])
    widths = [max(len(r[i]) for r in table) for i in range(1, len(table[0]))]
    per_model = sum(len(m.bits) for m in config.methods)
    lines = [f"{len(cells)} cells ({len(config.models)} models x {per_model} method/bits x {len(config.seeds)} seeds); "
             f"tasks {', '.join(config.tasks)}; limit {config.limit}; db {db}"]
    for r in table:
        lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(r[1:], widths)) + "  " + r[0])
    lines.append(", ".join(f"{v} {k}" for k, v in counts.items()))
    for m, why in unreadable.items():
        if why:
            lines.append(f"note: {m} cannot be read yet ({why.rstrip('.')}).")
    return "\n".join(lines)
