"""`dllmq study --ray`: the study grid on a Ray cluster, with the work split below the cell.

    from dllmq.study.ray_runner import run_study_ray
    summary = run_study_ray(load_config("grid.yaml"), db="runs.db", cache="/shared/study-cache", address="auto")

The driver (this process) is the only writer of the SQLite database; Ray tasks compute and return rows.
A cell becomes units (`Unit`):

- `quantize`: loads the model, quantizes it (calibration threads pinned, as the local runner does) and
  stores it in the cache directory `cache` - which must be on storage every node sees - or, without a
  cache, returns the saved directory's files, which Ray keeps in its object store for the cell's other
  units. A cell whose quantized model the driver finds in the cache has no quantize unit.
- `reference`: the FP reference of the measures (dllmq.study.measures), one per model and seed, shared
  by every cell of that model through the object store.
- `eval`: one (cell, task, shard of the task's items), `shard_items` items a shard. A mini task's
  generation shards start at multiples of the evaluation batch size, so every batch - and its padding -
  is the one a whole-task run makes. A harness task is cut into shards of its documents when it has
  more than `shard_items` (the driver counts them: it reads the tasks' data); each shard returns the
  model's answers to its documents' requests (dllmq.evaluate.harness_shards), else it is one unit.
- `measure`: the cell's measures against its model's FP reference.

When every unit of a cell has returned, the driver merges the shards - a mini task's outcomes
concatenated in item order and summarized by the same function a single process uses; a harness
task's answers scored together by lm-eval (filters, metrics, aggregation, stderr, logged samples), so
value, stderr and items are the ones `run_study` writes - and writes the cell's rows, items and
measures in one transaction (store.finish_cell), exactly as the local runner does.

Claims, resume and faults: the driver claims a cell (store.claim_cell) when it submits its units and
keeps every claim alive from one heartbeat thread; a rerun skips done cells and takes over the claims
of a dead driver (at once on the same host, after `stale_after` s elsewhere). Every unit's result is
kept in the database's `units` table as it arrives (the driver writes it; store.save_unit), so a rerun
runs only the units of an unfinished cell that had not returned; the rows go when the cell is written.
A worker or node that dies mid-unit gets the unit retried by Ray
(`retries` times, on any node); a unit that still dies, or raises, fails its cell with the error and
the run goes on; nothing of a failed cell is written but its error. Ctrl-C cancels every unit in
flight, frees the claims and re-raises.

Resources: with device cuda (or a cuda calibration device for the quantize unit) each unit asks Ray
for one GPU; otherwise for `threads` CPUs (default 1), and runs with that many torch threads.
"""
from __future__ import annotations

import atexit
import logging
import math
import os
import re
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dllmq.errors import DllmqError
from dllmq.study import store
from dllmq.study.cache import QuantCache
from dllmq.study.cells import StudyCell
from dllmq.study.config import StudyConfig
from dllmq.study.runner import (DEFAULT_CACHE, CellOutcome, Heartbeats, StudySummary, _finite, prepare_run,
                                mini_result, pinned_threads)

log = logging.getLogger(__name__)

RAY_MISSING = "--ray needs Ray, which is not installed; install it with pip install 'dllmq[ray]'."
DEFAULT_RETRIES = 2          # a unit whose worker died is run again this many times before its cell fails
MIN_SHARD_ITEMS = 8          # auto shards never get smaller than this (each unit loads its model)

# hook(event, cell, unit): on the driver, at "submitted" (unit None), "unit_done" and "finished" (None).
DriverHook = Callable[[str, StudyCell, "Unit | None"], None]
# unit_hook(kind, cell_key, task, shard): in the worker, when a unit starts (tests kill the worker from it).
UnitHook = Callable[[str, str, "str | None", "tuple[int, int] | None"], None]


def import_ray():
    """The ray module, or DllmqError with the one sentence that says how to install it."""
    try:
        import ray
    except ImportError as err:
        raise DllmqError(RAY_MISSING) from err
    return ray


# ----------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Unit:
    kind: str                          # quantize | reference | eval | measure
    cell_key: str
    task: str | None = None
    shard: tuple[int, int] | None = None

    def describe(self, cell: StudyCell) -> str:
        what = {"quantize": "quantize", "reference": "FP reference", "measure": "measures"}.get(self.kind, self.task)
        shard = f" items {self.shard[0]}-{self.shard[1] - 1}" if self.shard else ""
        return f"{cell.describe()}: {what}{shard}"

    @property
    def name(self) -> str:
        """The unit's key within its cell in the database's `units` table."""
        shard = f"{self.shard[0]}-{self.shard[1]}" if self.shard else ""
        return f"{self.kind}|{self.task or ''}|{shard}"


def task_size(task: str, limit: int | None) -> int | None:
    """Items of a mini task at `limit` (None: a harness task, whose size only the harness knows)."""
    from dllmq.evaluate.mini import TASKS, load_items
    return len(load_items(task, limit)) if task in TASKS else None


def plan_shards(task: str, limit: int | None, batch_size: int, shard_items: int,
                harness_items: int | None = None) -> list[tuple[int, int] | None]:
    """The item ranges of a task's units. A mini task: ranges of `shard_items` items, rounded up to whole
    batches for the generation tasks (so that each batch is the one a whole-task run generates). A
    harness task of `harness_items` documents: ranges of `shard_items` documents (any cut is exact, see
    dllmq.evaluate.harness_shards), or [None] - the whole task as one unit - when it fits one shard or
    its size is not given."""
    n = task_size(task, limit)
    size = max(1, shard_items)
    if n is None:
        if harness_items is None or harness_items <= size:
            return [None]
        return [(start, min(start + size, harness_items)) for start in range(0, harness_items, size)]
    if task != "mini_general":
        size = math.ceil(size / batch_size) * batch_size
    return [(start, min(start + size, n)) for start in range(0, n, size)] or [(0, 0)]


def harness_sizes(config: StudyConfig, cells: list[StudyCell]) -> dict[str, int]:
    """Documents of each harness task of the grid at its limit (the driver reads the tasks' data for it)."""
    from dllmq.evaluate import MINI_TASKS
    from dllmq.evaluate.harness_shards import task_items
    from dllmq.study.runner import harness_options

    tasks = [t for t in config.tasks if t not in MINI_TASKS]
    if not tasks or not cells:
        return {}
    options = harness_options(cells[0], config, samples=False)
    return {t: task_items(t, options) for t in tasks}


def auto_shard_items(config: StudyConfig, slots: int, harness: dict[str, int] | None = None) -> int:
    """Items per shard that give every slot of the cluster work within one cell's largest task, but at
    least MIN_SHARD_ITEMS."""
    sizes = [n for n in (task_size(t, config.limit) for t in config.tasks) if n] + list((harness or {}).values())
    if not sizes:
        return MIN_SHARD_ITEMS
    return max(MIN_SHARD_ITEMS, math.ceil(max(sizes) / max(1, slots)))


# ----------------------------------------------------------------------------- the units (in workers)
@dataclass(frozen=True)
class UnitContext:
    """What every unit needs besides its cell; put in the object store once per run."""
    config: StudyConfig
    device: str
    calib_device: str | None
    cache: str | None
    unit_hook: UnitHook | None = None


# One loaded model per worker process (CPU only: an idle worker holding a GPU model would keep its
# memory from the next unit on that GPU). Units of one cell, run by the same worker one after the
# other, then load it once.
_LOADED: dict = {}
_UNPACKED: dict[str, Path] = {}     # quant_key -> the folder its files from the object store were written to
_UNPACKED_CLEANUP: list[bool] = []


def _started(ctx: UnitContext, unit: Unit) -> None:
    if ctx.unit_hook is not None:
        ctx.unit_hook(unit.kind, unit.cell_key, unit.task, unit.shard)


def _unit_threads(ctx: UnitContext) -> int:
    return ctx.config.threads or 1


def _unpack(blob: dict[str, bytes], key: str) -> Path:
    """A quantized model's files from the object store, written once per worker into a temp folder."""
    if key in _UNPACKED and _UNPACKED[key].is_dir():
        return _UNPACKED[key]
    _remove_unpacked()
    if not _UNPACKED_CLEANUP:
        atexit.register(_remove_unpacked)   # a worker that exits leaves no copies in /tmp
        _UNPACKED_CLEANUP.append(True)
    root = Path(tempfile.mkdtemp(prefix="dllmq-ray-"))
    for rel, data in blob.items():
        path = root / key / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    _UNPACKED[key] = root / key
    return root / key


def _remove_unpacked() -> None:
    for old in _UNPACKED.values():
        shutil.rmtree(old.parent, ignore_errors=True)
    _UNPACKED.clear()


def _pack(model, tokenizer) -> dict[str, bytes]:
    from dllmq.quant import save_quantized
    with tempfile.TemporaryDirectory(prefix="dllmq-ray-") as tmp:
        out = save_quantized(model, tokenizer, Path(tmp) / "q")
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _load(ctx: UnitContext, cell: StudyCell, blob: dict | None):
    """(model, tokenizer) of a cell: FP, or quantized from the cache / the object store."""
    from dllmq.api import load_model

    if cell.is_fp:
        source, key, seed = cell.model, ("fp", cell.model), 0
    else:
        source = QuantCache(ctx.cache).lookup(cell.quant_key) if ctx.cache else None
        if source is None and blob:
            source = _unpack(blob, cell.quant_key)
        if source is None:
            import socket
            raise DllmqError(f"The quantized model of {cell.describe()} is not in the cache {ctx.cache} on node "
                             f"{socket.gethostname()}; give --cache a folder on storage every node shares.")
        key, seed = ("quant", cell.quant_key), None
    key = (*key, cell.dtype, ctx.device)
    if key in _LOADED:
        return _LOADED[key]
    _LOADED.clear()
    loaded = load_model(source, dtype=cell.dtype, device=ctx.device, **({"seed": seed} if seed is not None else {}))
    pair = (loaded[0], loaded[1])
    if str(ctx.device).split(":")[0] == "cpu":
        _LOADED[key] = pair
    return pair


def unit_quantize(ctx: UnitContext, cell: StudyCell) -> tuple[dict, dict | None]:
    """Quantize a cell's model into the cache: ({quant_seconds, cached}, None); without a cache the
    saved model's files come back as the second value, which stays in the object store for the cell's
    other units (the driver only ever fetches the first)."""
    from dllmq.study.runner import _prepare_model

    _started(ctx, Unit("quantize", cell.cell_key))
    cache = QuantCache(ctx.cache) if ctx.cache else None
    outcome = CellOutcome(cell, "done")
    model, tokenizer, seconds = _prepare_model(cell, cache, ctx.device, ctx.calib_device, False, outcome,
                                               ctx.config.calibration.threads)
    try:
        if cache is None:
            return {"quant_seconds": seconds, "cached": False}, _pack(model, tokenizer)
        if cache.lookup(cell.quant_key) is None:
            raise DllmqError(f"The quantized model of {cell.describe()} could not be stored in the cache {ctx.cache}; "
                             "check that the folder is writable and has space.")
        return {"quant_seconds": seconds, "cached": outcome.cached}, None
    finally:
        del model


def unit_reference(ctx: UnitContext, cell: StudyCell):
    """The FP reference of a model's measures (None when measures are off)."""
    from dllmq.study.measures import build_fp_reference

    _started(ctx, Unit("reference", cell.cell_key))
    config = ctx.config
    if config.measures is None:
        return None
    model, tokenizer = _load(ctx, cell, None)
    with pinned_threads(_unit_threads(ctx)):
        return build_fp_reference(model, tokenizer, config.measures, cell.seed, chat=config.eval.chat,
                                  tasks=cell.tasks, limit=cell.limit)


def unit_eval(ctx: UnitContext, cell: StudyCell, task: str, shard: tuple[int, int] | None, blob: dict | None) -> dict:
    """One task (or a shard of its items) on the cell's model: a mini shard's outcomes, a harness shard's
    answers to its documents' requests, or a whole harness task's row."""
    from dllmq.evaluate import MINI_TASKS, evaluate_mini
    from dllmq.evaluate.harness_shards import answer_shard
    from dllmq.study.measures import mini_items
    from dllmq.study.runner import _evaluate_task, harness_options

    _started(ctx, Unit("eval", cell.cell_key, task, shard))
    model, tokenizer = _load(ctx, cell, blob)
    start = time.perf_counter()
    with pinned_threads(_unit_threads(ctx)):
        if task in MINI_TASKS:
            ev = ctx.config.eval
            r = evaluate_mini(model, tokenizer, [task], limit=cell.limit, seed=cell.seed, progress=False,
                              chat=ev.chat, batch_size=ev.batch_size, return_samples=True, shard=shard)[task]
            return {"correct": [bool(s["correct"]) for s in r["samples"]], "items": mini_items(task, r["samples"]),
                    "seconds": time.perf_counter() - start}
        if shard is not None:
            out = answer_shard((model, tokenizer), task, harness_options(cell, ctx.config, samples=False), shard)
            return {**out, "seconds": time.perf_counter() - start}
        items: list[dict] = []
        row = _evaluate_task(model, tokenizer, task, cell, ctx.config, False, items)
        return {"row": row, "items": items, "seconds": time.perf_counter() - start}


def unit_measure(ctx: UnitContext, cell: StudyCell, blob: dict | None, reference) -> dict:
    """The cell's measures rows against its model's FP reference."""
    from dllmq.quant.qlinear import keep_dequantized_weights
    from dllmq.study.measures import measure_rows, outlier_rows

    _started(ctx, Unit("measure", cell.cell_key))
    if reference is None:
        return {"rows": [], "seconds": 0.0}
    model, _ = _load(ctx, cell, blob)
    start = time.perf_counter()
    with pinned_threads(_unit_threads(ctx)), keep_dequantized_weights(model):
        rows = measure_rows(model, reference)
        if cell.is_fp:
            rows += outlier_rows(model, reference.divergence.windows, ctx.config.measures, cell.seed,
                                 reference.setup)
    return {"rows": rows, "seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------- merging (on the driver)
def merge_cell(cell: StudyCell, results: dict[Unit, dict], quant_seconds: float | None,
               config: StudyConfig | None = None) -> tuple[list, list, list, float]:
    """(result rows, items, measures, measure seconds) of a cell from its units' results: the rows a
    single-process run writes (eval_seconds: the shards' seconds summed, plus the scoring of a sharded
    harness task's answers, which runs here and reads the task's data; it needs `config`)."""
    from dllmq.evaluate import MINI_TASKS
    from dllmq.evaluate.harness_shards import score_answers
    from dllmq.evaluate.mini import summarize
    from dllmq.study.runner import harness_options, harness_row

    rows, items, measures, measure_seconds = [], [], [], 0.0
    for task in cell.tasks:
        shards = sorted((u for u in results if u.kind == "eval" and u.task == task),
                        key=lambda u: u.shard[0] if u.shard else 0)
        seconds = sum(results[u]["seconds"] for u in shards)
        if task in MINI_TASKS:
            correct = [c for u in shards for c in results[u]["correct"]]
            r = mini_result(task, summarize(correct, task))
            items += [it for u in shards for it in results[u]["items"]]
        elif shards[0].shard is None:     # a harness task run whole
            r = results[shards[0]]["row"]
            items += results[shards[0]]["items"]
        else:                             # a harness task's shards: lm-eval scores all their answers at once
            if config is None:
                raise ValueError("merging a sharded harness task needs the study's config")
            report = score_answers(task, harness_options(cell, config), [results[u] for u in shards])
            r = harness_row(task, report, items)
            seconds += report["merge_seconds"]
        rows.append({"model": cell.model, "method": cell.method, "bits": cell.bits, "task": task, "seed": cell.seed,
                     "quant_seconds": quant_seconds, "eval_seconds": seconds, **r})
    for u, r in results.items():
        if u.kind == "measure":
            measures, measure_seconds = r["rows"], r["seconds"]
    return rows, items, measures, measure_seconds


# ----------------------------------------------------------------------------- the driver
@dataclass
class _CellRun:
    cell: StudyCell
    units: list[Unit]
    refs: dict = field(default_factory=dict)          # Unit -> ObjectRef, while in flight
    results: dict = field(default_factory=dict)       # Unit -> result
    blob: object = None                               # ObjectRef of the model's files (no cache)
    quant_seconds: float | None = None
    cached: bool = False
    started: float = field(default_factory=time.perf_counter)


_ADDRESS = re.compile(r"^(local|auto|ray://[^\s:/]+:\d+|[^\s:/]+:\d+)$")


def check_address(address: str) -> None:
    if not _ADDRESS.match(str(address)):
        raise DllmqError(f"--ray must be local, auto, ray://HOST:PORT (Ray Client) or HOST:PORT (the head's GCS "
                         f"address), got {address!r}.")


def connect_ray(ray, address: str, workers: int | None) -> bool:
    """Join (or start) the Ray cluster that `address` names; True when this call started Ray (and so
    has to stop it). local: a Ray on this machine with `workers` CPUs (default: all cores); auto: the
    cluster started with `ray start` on this machine (or RAY_ADDRESS); ray://host:port or host:port:
    that cluster's client or GCS address."""
    if ray.is_initialized():
        return False
    check_address(address)
    quiet = {"include_dashboard": False, "logging_level": logging.WARNING, "configure_logging": False}
    try:
        if address == "local":
            ray.init(num_cpus=workers or os.cpu_count() or 1, **quiet)
        else:
            ray.init(address=address, logging_level=logging.WARNING, configure_logging=False)
    except (ConnectionError, ValueError, TimeoutError) as err:
        hint = ("start one with `ray start --head` (or set RAY_ADDRESS), or use --ray local" if address == "auto"
                else "check the address and that the cluster is up")
        raise DllmqError(f"No Ray cluster answers at {address} ({str(err).splitlines()[0].rstrip('.')}); {hint}.") from err
    return True


def _error_text(ray, err: BaseException, retries: int) -> str:
    cause = getattr(err, "cause", None)
    if isinstance(err, ray.exceptions.RayTaskError) and isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    first = (str(err).strip().splitlines() or [""])[0]
    if isinstance(err, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                        ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError)):
        return f"{type(err).__name__} (the unit's worker died, also on its {retries} retries): {first}"
    return f"{type(err).__name__}: {first}"


def run_study_ray(config: StudyConfig, db: str | os.PathLike = store.DEFAULT_DB,
                  cache: str | os.PathLike | None = DEFAULT_CACHE, *, address: str = "auto",
                  workers: int | None = None, device: str = "cpu", calib_device: str | None = None,
                  stale_after: float = 120.0, heartbeat_every: float = 10.0, retry_failed: bool = True,
                  shard_items: int | None = None, retries: int = DEFAULT_RETRIES, max_cells: int | None = None,
                  progress: bool = True, log_lines: bool = False, owner: str | None = None,
                  hook: DriverHook | None = None, unit_hook: UnitHook | None = None) -> StudySummary:
    """Run every cell of `config` not yet done in `db` as Ray units; see the module docstring.
    shard_items: items per eval unit of a mini task (None: enough shards for every slot of the cluster);
    max_cells: cells in flight at once (None: the cluster's slots + 2); the rest as in run_study."""
    ray = import_ray()
    check_address(address)
    if stale_after <= 0:
        raise DllmqError(f"stale_after must be a positive number of seconds, got {stale_after}.")
    if retries < 0:
        raise DllmqError(f"retries must be 0 or more, got {retries}.")
    if str(device).startswith("cuda:") or str(calib_device or "").startswith("cuda:"):
        raise DllmqError("With --ray give --device cuda (and --calib-device cuda), not a GPU number: Ray gives each "
                         "unit its own GPU, which the unit sees as cuda:0.")
    heartbeat_every = min(heartbeat_every, stale_after / 4)
    cells, db, owner, qcache, unavailable = prepare_run(config, device, db, owner, cache)
    started_ray = connect_ray(ray, address, workers)
    try:
        summary = _Driver(ray, config, cells, db, qcache, owner, device=device, calib_device=calib_device,
                       stale_after=stale_after, heartbeat_every=heartbeat_every, retry_failed=retry_failed,
                       shard_items=shard_items, retries=retries, max_cells=max_cells, progress=progress,
                       log_lines=log_lines, hook=hook, unit_hook=unit_hook).run()
        summary.unavailable = unavailable
        return summary
    finally:
        if started_ray:
            ray.shutdown()


class _Driver:
    """One run on the cluster: submits the cells' units (a few cells at a time), collects their results,
    writes finished cells and keeps the progress; the only code that touches the database."""

    def __init__(self, ray, config: StudyConfig, cells: list[StudyCell], db: Path, qcache: QuantCache | None,
                 owner: str, *, device: str, calib_device: str | None, stale_after: float, heartbeat_every: float,
                 retry_failed: bool, shard_items: int | None, retries: int, max_cells: int | None, progress: bool,
                 log_lines: bool, hook: DriverHook | None, unit_hook: UnitHook | None):
        self.ray, self.config, self.cells, self.db, self.qcache, self.owner = ray, config, cells, db, qcache, owner
        self.stale_after, self.retry_failed, self.retries = stale_after, retry_failed, retries
        self.log_lines, self.hook = log_lines, hook
        gpu = str(device).split(":")[0] == "cuda"
        gpu_calib = gpu or str(calib_device or "").split(":")[0] == "cuda"
        self.threads = config.threads or 1
        resources = ray.cluster_resources()
        slots = int(resources.get("GPU", 0)) if gpu else int(resources.get("CPU", 1) // self.threads)
        if gpu and slots < 1:
            raise DllmqError(f"--device {device} needs GPUs, but the Ray cluster has none; run on a cluster with "
                             "GPU nodes or use --device cpu.")
        slots = max(1, slots)
        self.max_cells = max_cells or slots + 2
        sizes = harness_sizes(config, cells)
        shard_items = shard_items or auto_shard_items(config, slots, sizes)
        self.shards = {t: plan_shards(t, config.limit, config.eval.batch_size, shard_items, sizes.get(t))
                       for t in config.tasks}
        self.measured = config.measures is not None

        def options(uses_gpu: bool) -> dict:
            res = {"num_gpus": 1, "num_cpus": 1} if uses_gpu else {"num_cpus": self.threads}
            return {**res, "max_retries": retries, "retry_exceptions": False}

        self.remote_quantize = ray.remote(unit_quantize).options(num_returns=2, **options(gpu_calib))
        self.remote_reference = ray.remote(unit_reference).options(**options(gpu))
        self.remote_eval = ray.remote(unit_eval).options(**options(gpu))
        self.remote_measure = ray.remote(unit_measure).options(**options(gpu))
        self.ctx = ray.put(UnitContext(config, device, calib_device, str(qcache.root) if qcache else None, unit_hook))

        self.outcomes: dict[str, CellOutcome] = {}
        self.active: dict[str, _CellRun] = {}
        self.inflight: dict = {}                  # ObjectRef -> (cell key, or None for an FP reference; Unit)
        self.references: dict[tuple, object] = {}   # (model, seed) -> ObjectRef of its FP reference
        self.ref_users: dict[tuple, int] = {}       # cells still to finish per (model, seed)
        self.pending: list[StudyCell] = []
        self.planned: dict[str, int] = {}           # units counted in the total per cell, before it starts
        self.ref_planned: set[tuple] = set()        # FP references counted in the total, not yet submitted
        self.total = self.done_units = self.cells_done = 0
        self.conn: sqlite3.Connection | None = None
        self.beats = Heartbeats(db, owner, heartbeat_every)
        self.bar = None
        self.progress = progress

    # --------------------------------------------------------------------- planning
    def cached_before(self, cell: StudyCell) -> bool:
        return cell.is_fp or (self.qcache is not None and self.qcache.lookup(cell.quant_key) is not None)

    def units_of(self, cell: StudyCell, finished: dict | None = None) -> list[Unit]:
        """The units a cell still needs: its eval and measure units that `finished` (unit name -> result, from
        the database) lacks, and a quantize unit when one of them needs a model the cache does not have."""
        finished = finished or {}
        units = [Unit("eval", cell.cell_key, t, s) for t in cell.tasks for s in self.shards[t]]
        units += [Unit("measure", cell.cell_key)] if self.measured else []
        units = [u for u in units if u.name not in finished]
        quantize = Unit("quantize", cell.cell_key)
        if not self.cached_before(cell) and (units or quantize.name not in finished):
            units.insert(0, quantize)
        return units

    def finished_units(self, cell: StudyCell, finished: dict) -> dict[Unit, dict]:
        """The cell's units the database holds results of, as Units (only those of the current plan)."""
        planned = [Unit("quantize", cell.cell_key)] + [Unit("eval", cell.cell_key, t, s) for t in cell.tasks
                                                       for s in self.shards[t]] + [Unit("measure", cell.cell_key)]
        return {u: finished[u.name] for u in planned if u.name in finished}

    # --------------------------------------------------------------------- progress
    def eta(self) -> str:
        remaining = self.total - self.done_units
        if remaining <= 0:
            return ""
        if not self.done_units:
            return "ETA ?"
        from tqdm.auto import tqdm
        return f"ETA {tqdm.format_interval((time.perf_counter() - self.run_start) / self.done_units * remaining)}"

    def status_line(self) -> str:
        failed = sum(o.status == "failed" for o in self.outcomes.values())
        return (f"cells {self.cells_done}/{len(self.cells)} done, {len(self.active)} running"
                + (f", {failed} failed" if failed else "") + f", {len(self.pending)} waiting; {self.eta()}").rstrip("; ")

    def count_done(self) -> None:
        self.done_units += 1
        self.bar.update(1)

    def drop_units(self, n: int) -> None:
        """n units counted in the total will not run (their cell failed, or another runner has it)."""
        if n:
            self.total -= n
            self.bar.total = self.total
            self.bar.refresh()

    # --------------------------------------------------------------------- submitting
    def reference_for(self, cell: StudyCell):
        key = (cell.model, cell.seed)
        if key not in self.references:
            fp = next((c for c in self.cells if c.model == cell.model and c.seed == cell.seed and c.is_fp), None)
            ref = self.remote_reference.remote(self.ctx, fp or _fp_twin(cell))
            self.references[key] = ref
            self.ref_planned.discard(key)
            self.inflight[ref] = (None, Unit("reference", cell.cell_key))
        return self.references[key]

    def submit(self, cell: StudyCell) -> None:
        state = store.claim_cell(self.conn, cell.cell_key, self.owner, model=cell.model, method=cell.method,
                                 bits=cell.bits, settings=cell.settings, tasks=cell.tasks, stale_after=self.stale_after,
                                 retry_failed_before=self.started if self.retry_failed else None)
        if state != store.CLAIMED:
            self.outcomes[cell.cell_key] = CellOutcome(cell, {store.DONE: "skipped", store.BUSY: "busy",
                                                              store.FAILED: "not-retried"}[state])
            self.drop_units(self.planned[cell.cell_key])
            self.release_reference(cell)
            return
        self.beats.add(cell.cell_key)
        finished = store.unit_results(self.conn, [cell.cell_key]).get(cell.cell_key, {})
        done = self.finished_units(cell, finished)
        run = _CellRun(cell, self.units_of(cell, finished))
        run.results.update({u: r for u, r in done.items() if u not in run.units})
        quantized = run.results.get(Unit("quantize", cell.cell_key))
        if quantized is not None:                   # quantized by an earlier driver
            run.quant_seconds, run.cached = _finite(quantized.get("quant_seconds")), bool(quantized.get("cached"))
        elif not cell.is_fp and self.qcache is not None and self.qcache.lookup(cell.quant_key) is not None:
            run.quant_seconds = _finite(self.qcache.meta(cell.quant_key).get("quant_seconds"))
            run.cached = True
        self.drop_units(self.planned[cell.cell_key] - len(run.units))   # another runner cached / finished some
        self.active[cell.cell_key] = run
        if not run.units:      # everything was finished before: only the merge is left
            if self.hook:
                self.hook("submitted", cell, None)
            self.close(run, "done")
            return
        blob = None    # the quantized model's files in the object store (no cache), or None
        if run.units[0].kind == "quantize":
            meta, blob = self.remote_quantize.remote(self.ctx, cell)
            run.refs[run.units[0]] = meta
            run.blob = blob
        for u in run.units:
            if u.kind == "eval":
                run.refs[u] = self.remote_eval.remote(self.ctx, cell, u.task, u.shard, blob)
            elif u.kind == "measure":
                run.refs[u] = self.remote_measure.remote(self.ctx, cell, blob, self.reference_for(cell))
        for u, ref in run.refs.items():
            self.inflight[ref] = (cell.cell_key, u)
        if self.hook:
            self.hook("submitted", cell, None)

    def release_reference(self, cell: StudyCell) -> None:
        """One cell of (model, seed) is over: the FP reference goes when no cell needs it any more."""
        key = (cell.model, cell.seed)
        self.ref_users[key] -= 1
        if self.ref_users[key]:
            return
        ref = self.references.pop(key, None)
        if ref is None and key in self.ref_planned:    # never submitted: not to be counted
            self.ref_planned.discard(key)
            self.drop_units(1)
        elif ref is not None and ref in self.inflight:  # still running, and every user failed
            self.inflight.pop(ref)
            self.ray.cancel(ref, force=False)
            self.drop_units(1)

    # --------------------------------------------------------------------- results
    def collect(self, ref) -> None:
        key, unit = self.inflight.pop(ref)
        if key is None:   # an FP reference: the measure units that need it fetch it themselves
            self.count_done()
            return
        run = self.active[key]
        try:
            result = self.ray.get(ref)
        except self.ray.exceptions.RayError as err:
            self.close(run, "failed", f"{unit.describe(run.cell)}: {_error_text(self.ray, err, self.retries)}")
            return
        run.results[unit] = result
        if unit.kind == "quantize":
            run.quant_seconds = _finite(result.get("quant_seconds"))
            run.cached = bool(result.get("cached"))
        try:     # kept so that a restarted driver does not run it again
            store.save_unit(self.conn, key, self.owner, unit.name, result)
        except (sqlite3.Error, TypeError, ValueError) as err:
            log.warning("%s: could not keep the unit's result (%s); a restart would run it again",
                        unit.describe(run.cell), err)
        self.count_done()
        if self.hook:
            self.hook("unit_done", run.cell, unit)
        if all(u in run.results for u in run.units):
            self.close(run, "done")

    def close(self, run: _CellRun, status: str, error: str | None = None) -> None:
        """A cell is over: write it (done: all its rows in one transaction; failed: its error)."""
        cell = run.cell
        for u, ref in run.refs.items():
            self.inflight.pop(ref, None)
            if u not in run.results:
                self.ray.cancel(ref, force=False)
        self.drop_units(sum(u not in run.results for u in run.units))
        self.beats.discard(cell.cell_key)
        self.active.pop(cell.cell_key, None)
        self.release_reference(cell)
        merged = None
        if status == "done":
            try:
                merged = merge_cell(cell, run.results, run.quant_seconds, self.config)
            except Exception as err:  # noqa: BLE001 - scoring merged harness answers failed: the cell fails
                log.debug("merging %s failed", cell.describe(), exc_info=True)
                status, error = "failed", f"merging the units: {type(err).__name__}: {err}"
        outcome = CellOutcome(cell, status, seconds=time.perf_counter() - run.started, error=error, cached=run.cached)
        if merged is not None:
            rows, items, measures, outcome.measure_seconds = merged
            facts = {"threads": self.threads, "calib_threads": None if cell.is_fp else self.config.calibration.threads,
                     "measure_seconds": outcome.measure_seconds}
            if cell.cell_key in self.beats.lost or not store.finish_cell(self.conn, cell.cell_key, self.owner, rows,
                                                                         items=items, measures=measures, facts=facts):
                outcome.status = "lost"
                log.warning("%s: another runner took this cell over; its results are theirs", cell.describe())
        else:
            store.fail_cell(self.conn, cell.cell_key, self.owner, error or "unknown error")
            log.warning("%s failed: %s", cell.describe(), error)
        self.outcomes[cell.cell_key] = outcome
        self.cells_done += 1
        if self.log_lines:
            print(f"study {self.cells_done}/{len(self.cells)} cells, {self.done_units}/{self.total} units: "
                  f"{cell.describe()} {outcome.status} in {outcome.seconds:.0f} s {self.eta()}".rstrip(),
                  file=sys.stderr, flush=True)
        if self.hook and outcome.status == "done":
            self.hook("finished", cell, None)

    # --------------------------------------------------------------------- the loop
    def run(self) -> StudySummary:
        from tqdm.auto import tqdm

        self.conn = store.connect(self.db)
        try:
            known = store.cell_rows(self.conn, [c.cell_key for c in self.cells])
            kept = store.unit_results(self.conn, [c.cell_key for c in self.cells])
            self.started = time.time()
            for cell in self.cells:
                if known.get(cell.cell_key, {}).get("status") == "done":
                    self.outcomes[cell.cell_key] = CellOutcome(cell, "skipped")
                else:
                    self.pending.append(cell)
                    self.planned[cell.cell_key] = len(self.units_of(cell, kept.get(cell.cell_key)))
                    key = (cell.model, cell.seed)
                    self.ref_users[key] = self.ref_users.get(key, 0) + 1
            self.ref_planned = set(self.ref_users) if self.measured else set()
            self.total = sum(self.planned.values()) + len(self.ref_planned)
            self.cells_done = len(self.outcomes)
            self.run_start = time.perf_counter()
            self.bar = tqdm(total=self.total, desc="study (ray)", unit="unit", disable=not self.progress,
                            bar_format="{desc} {n_fmt}/{total_fmt} units |{bar}| [{elapsed}{postfix}]")
            try:
                with self.beats:
                    self._loop()
            except BaseException:   # Ctrl-C or a failing driver: cancel what runs, free the claims, re-raise
                self._cancel_all()
                raise
            finally:
                self.bar.close()
        finally:
            self.conn.close()
        summary = StudySummary(self.db, self.cells)
        summary.outcomes = [self.outcomes[c.cell_key] for c in self.cells if c.cell_key in self.outcomes]
        return summary

    def _loop(self) -> None:
        while self.pending or self.inflight:
            while self.pending and len(self.active) < self.max_cells:
                self.submit(self.pending.pop(0))
            if not self.inflight:
                continue
            ready, _ = self.ray.wait(list(self.inflight), num_returns=1, timeout=1.0)
            for ref in ready:
                if ref in self.inflight:
                    self.collect(ref)
            self.bar.set_postfix_str(self.status_line())

    def _cancel_all(self) -> None:
        for ref in list(self.inflight):
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - cancelling is best effort; the claims matter more
                pass
        for key in list(self.active):
            try:
                store.release_cell(self.conn, key, self.owner)
            except sqlite3.Error:
                pass


def _fp_twin(cell: StudyCell) -> StudyCell:
    """The FP cell of a quantized cell's model (its reference is built from the FP model)."""
    from dataclasses import replace
    return replace(cell, method="fp", method_name="fp", preset="FP", settings={}, quant_key=None)


__all__ = ["RAY_MISSING", "Unit", "UnitContext", "connect_ray", "import_ray", "merge_cell", "plan_shards",
           "run_study_ray"]
