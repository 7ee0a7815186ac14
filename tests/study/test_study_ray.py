"""The study grid on Ray (dllmq.study.ray_runner): the rows of a sharded run equal the local runner's; a
worker killed mid-unit is retried and nothing is counted twice; a unit that keeps dying fails only its
cell; an interrupted or killed driver resumes from the database, unit by unit; harness tasks cut into
shards give the whole task's rows and items; without Ray, one sentence and exit 2.

The Ray tests share one local cluster of two simulated nodes with one CPU each
(ray.cluster_utils.Cluster), started once for the module, and a 3-cell grid on random-llada with
8 items per task cut into shards of 4 (2 units per task)."""
from __future__ import annotations

import ast
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml

from dllmq.cli.study import main as study_main
from dllmq.study import store
from dllmq.study.cells import plan_cells
from dllmq.study.config import parse_study_config
from dllmq.study.ray_runner import RAY_MISSING, Unit, merge_cell, plan_shards
from dllmq.study.runner import run_study

TASKS = ["mini_general", "mini_math"]     # likelihood and generation (mini_code's sandbox adds time, not cases)
SMALL_MEASURES = {"windows": 2, "seqlen": 32, "elbo_mc": 1, "trajectory": 2}
SPEC = {"models": ["random-llada"], "methods": ["fp", {"name": "rtn", "bits": ["W4A16-g128", "W8A8"]}],
        "tasks": TASKS, "limit": 8, "eval": {"batch_size": 4}, "measures": SMALL_MEASURES}
SHARD = 4   # items per unit: 2 shards per task


class Crash(BaseException):
    """Stands for Ctrl-C / the driver dying (not an Exception: no cell is marked failed for it)."""


# ----------------------------------------------------------------------------- what a run wrote
def written(db: Path) -> dict:
    """Everything a run decides, without the timings: results rows, per-item rows, measures, cell states."""
    timing = {"eval_seconds", "quant_seconds", "created"}
    conn = store.connect(db)
    try:
        counts = sorted(tuple(r) for r in conn.execute("SELECT cell_key, task, items FROM results"))
        quant = sorted((r["cell_key"], r["quant_seconds"] is None) for r in conn.execute(
            "SELECT cell_key, quant_seconds FROM results"))
    finally:
        conn.close()
    return {"results": [{k: v for k, v in r.items() if k not in timing} for r in store.read_results(db)],
            "items": store.read_items(db),
            "measures": [{k: v for k, v in m.items() if k != "seconds"} for m in store.read_measures(db)],
            "cells": sorted((c["cell_key"], c["status"]) for c in store.read_cells(db)),
            "item_counts": counts, "quant_is_null": quant}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> dict:
    """The grid as the local runner writes it (one process, no Ray)."""
    tmp = tmp_path_factory.mktemp("local")
    summary = run_study(parse_study_config(SPEC), tmp / "local.db", tmp / "cache", progress=False)
    assert summary.ok
    return written(tmp / "local.db")


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of two nodes with one CPU each; this process is its driver."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # the hooks below run in Ray's workers, which cannot import this test module: send them by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                      "object_store_memory": 80 * 2 ** 20})
    c.add_node(num_cpus=1, object_store_memory=80 * 2 ** 20)
    ray.init(address=c.address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


class UnitLog:
    """A unit_hook that appends every unit start to a file (units run in other processes) and kills its
    worker (os._exit) on the first start of `kill`, or on every start when `always`."""

    def __init__(self, path: Path, kill: tuple | None = None, always: bool = False):
        self.path, self.kill, self.always = path, kill, always

    def __call__(self, kind, cell_key, task, shard):
        with open(self.path, "a") as f:
            f.write(f"{kind} {cell_key} {task} {shard}\n")
        if self.kill is not None and (kind, cell_key, task, shard) == self.kill:
            flag = self.path.with_suffix(".killed")
            if self.always or not flag.exists():
                flag.touch()
                os._exit(1)

    def starts(self, kinds: Sequence[tuple] | None = None) -> list[tuple[str, str, str, str]]:
        if not self.path.exists():
            return []
        out = [tuple(line.split(" ", 3)) for line in self.path.read_text().splitlines()]
        return [s for s in out if kinds is None or (s[0],) in kinds]


def ray_run(db: Path, cache: Path | None, **kw):
    from dllmq.study.ray_runner import run_study_ray
    return run_study_ray(parse_study_config(SPEC), db, cache, shard_items=SHARD, progress=False, **kw)


# ----------------------------------------------------------------------------- no Ray needed
def test_without_ray_one_sentence_and_exit_2(tmp_path, monkeypatch, capsys):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(SPEC))
    monkeypatch.setitem(sys.modules, "ray", None)      # `import ray` raises ImportError
    code = study_main(["--config", str(tmp_path / "s.yaml"), "--db", str(tmp_path / "db"), "--ray", "local"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"error: {RAY_MISSING}" and "pip install 'dllmq[ray]'" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "db").exists()


def test_a_bad_ray_address_is_one_sentence_and_exit_2(tmp_path, capsys):
    pytest.importorskip("ray")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(SPEC))
    code = study_main(["--config", str(tmp_path / "s.yaml"), "--db", str(tmp_path / "db"), "--ray", "headnode"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: --ray must be local, auto, ray://HOST:PORT") and len(err.splitlines()) == 1


def test_shards_keep_every_batch_whole():
    assert plan_shards("mini_general", 10, 4, 3) == [(0, 3), (3, 6), (6, 9), (9, 10)]   # likelihood: any cut
    assert plan_shards("mini_math", 10, 4, 3) == [(0, 4), (4, 8), (8, 10)]              # generation: whole batches
    assert plan_shards("mini_code", 8, 32, 4) == [(0, 8)]
    assert plan_shards("gsm8k", 10, 4, 3) == [None]                                      # harness, size unknown
    assert plan_shards("gsm8k", 10, 4, 3, harness_items=3) == [None]                     # fits one shard: whole
    assert plan_shards("gsm8k", 10, 4, 3, harness_items=7) == [(0, 3), (3, 6), (6, 7)]   # any cut is exact


def test_merged_shards_are_the_single_process_summary():
    """Shards merge through the summary a whole-task run computes: the same value and stderr, in item order."""
    from dllmq.evaluate.mini import summarize
    from dllmq.study.runner import mini_result

    cell = plan_cells(parse_study_config({**SPEC, "tasks": ["mini_math"]}))[0]
    outcomes = [True, False, False, True, True, False, False, False]
    results = {Unit("eval", cell.cell_key, "mini_math", (4, 8)): {"correct": outcomes[4:], "seconds": 2.0,
                                                                 "items": [{"item": i} for i in (4, 5, 6, 7)]},
               Unit("eval", cell.cell_key, "mini_math", (0, 4)): {"correct": outcomes[:4], "seconds": 1.0,
                                                                 "items": [{"item": i} for i in (0, 1, 2, 3)]}}
    rows, items, measures, _ = merge_cell(cell, results, None)
    assert rows == [{"model": "random-llada", "method": "fp", "bits": "FP", "task": "mini_math", "seed": 0,
                     "quant_seconds": None, "eval_seconds": 3.0, **mini_result("mini_math",
                                                                                summarize(outcomes, "mini_math"))}]
    assert [it["item"] for it in items] == list(range(8)) and measures == []


def test_units_are_kept_while_their_cell_runs_and_an_older_database_opens(tmp_path):
    """A schema-2 database (no `units` table) opens and gains it; a unit is kept only under our claim, read
    back as it was saved, and dropped with the cell's other leftovers when the cell is written."""
    db = tmp_path / "old.db"
    conn = store.connect(db)
    conn.execute("DROP TABLE units")
    conn.execute("PRAGMA user_version = 2")
    conn.close()
    conn = store.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION == 3
    claim = dict(model="m", method="fp", bits="FP", settings={}, tasks=["t"], stale_after=60)
    assert store.claim_cell(conn, "c1", "me", **claim) == store.CLAIMED
    result = {"answers": [["loglikelihood", "arc_easy", 0, 1, "ab12", [[-1.25, False]]]], "seconds": 0.5}
    assert store.save_unit(conn, "c1", "me", "eval|arc_easy|0-2", result)
    assert not store.save_unit(conn, "c1", "someone-else", "eval|arc_easy|2-4", result)   # not their claim
    assert store.unit_results(conn, ["c1", "c2"]) == {"c1": {"eval|arc_easy|0-2": result}}
    row = {"model": "m", "method": "fp", "bits": "FP", "task": "t", "category": "general", "metric": "acc",
           "value": 0.5, "stderr": 0.1, "n": 2, "seed": 0}
    assert store.finish_cell(conn, "c1", "me", [row])
    assert store.unit_results(conn, ["c1"]) == {}
    conn.close()


# ----------------------------------------------------------------------------- on a two-node Ray cluster
def test_sharded_ray_run_writes_the_local_runners_rows(cluster, local_run, tmp_path):
    """No cache: the quantized models travel through Ray's object store; every task runs as 2 shards."""
    units = UnitLog(tmp_path / "units.log")
    summary = ray_run(tmp_path / "ray.db", None, unit_hook=units)
    assert summary.ok and [o.status for o in summary.outcomes] == ["done"] * 3
    assert written(tmp_path / "ray.db") == local_run
    starts = units.starts()     # 2 quantized cells, one FP reference, 3 tasks x 2 shards and the measures per cell
    assert sorted(k for k, *_ in starts) == sorted(["quantize"] * 2 + ["reference"] + ["eval"] * 4 * 3 + ["measure"] * 3)
    assert len(set(starts)) == len(starts)                                    # every unit ran once

    again = ray_run(tmp_path / "ray.db", None, unit_hook=units)             # all done: nothing runs
    assert [o.status for o in again.outcomes] == ["skipped"] * 3 and len(units.starts()) == len(starts)


def test_ray_run_of_a_causal_model_with_the_outlier_profile_writes_the_local_runners_rows(cluster, tmp_path):
    """The families grid's additions on Ray: a causal model's next-token measures and the FP cell's outlier rows."""
    from dllmq.study.ray_runner import run_study_ray
    spec = {**SPEC, "models": ["random-llama"], "methods": ["fp", {"name": "rtn", "bits": ["W4A16-g128"]}],
            "measures": {**SMALL_MEASURES, "outliers": 2}}
    assert run_study(parse_study_config(spec), tmp_path / "local.db", None, progress=False).ok
    summary = run_study_ray(parse_study_config(spec), tmp_path / "ray.db", None, shard_items=SHARD, progress=False)
    assert summary.ok and [o.status for o in summary.outcomes] == ["done"] * 2
    got = written(tmp_path / "ray.db")
    assert got == written(tmp_path / "local.db")
    assert {m["measure"] for m in got["measures"]} >= {"kl_next", "nll", "traj_flip", "massive_frac", "massive_pos"}


class Faults(UnitLog):
    """Kills its worker on the first start of `once`, and on every start of `always`."""

    def __init__(self, path: Path, once: tuple, always: tuple):
        super().__init__(path)
        self.once, self.always_kill = once, always

    def __call__(self, kind, cell_key, task, shard):
        super().__call__(kind, cell_key, task, shard)
        unit = (kind, cell_key, task, shard)
        flag = self.path.with_suffix(".once")
        if unit == self.once and not flag.exists():
            flag.touch()
            os._exit(1)
        if unit == self.always_kill:
            os._exit(1)


def test_killed_workers_are_retried_counted_once_and_a_unit_that_keeps_dying_fails_its_cell(cluster, local_run,
                                                                                              tmp_path):
    """One run, retries=1: a worker killed mid-unit in cell 1 (its unit runs again, the cell is done once, rows
    identical), and a unit of cell 2 whose worker dies on every attempt (cell 2 failed with the error, the
    others done); a rerun then completes cell 2 alone, its model from the cache."""
    cells = plan_cells(parse_study_config(SPEC))
    victim = ("eval", cells[1].cell_key, "mini_math", (4, 8))
    doomed = ("measure", cells[2].cell_key, None, None)
    units = Faults(tmp_path / "units.log", once=victim, always=doomed)
    summary = ray_run(tmp_path / "ray.db", tmp_path / "cache", unit_hook=units, retries=1)
    assert [o.status for o in summary.outcomes] == ["done", "done", "failed"]
    starts = units.starts()
    logged = tuple(map(str, victim)), tuple(map(str, doomed))
    assert starts.count(logged[0]) == 2 and starts.count(logged[1]) == 2       # killed, run again (once)
    assert all(starts.count(s) == 1 for s in starts if s not in logged)        # everything else ran once
    error = summary.outcomes[2].error
    assert "measures" in error and "WorkerCrashedError" in error and "1 retries" in error, error
    status = {c["cell_key"]: (c["status"], c["error"]) for c in store.read_cells(tmp_path / "ray.db")}
    assert status[cells[2].cell_key] == ("failed", error)
    assert not [r for r in store.read_results(tmp_path / "ray.db") if r["cell_key"] == cells[2].cell_key]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(c.quant_key for c in cells[1:])

    conn = store.connect(tmp_path / "ray.db")           # the failed cell's units that finished are kept
    kept = set(store.unit_results(conn, [cells[2].cell_key]).get(cells[2].cell_key, {}))
    conn.close()
    planned = [Unit("eval", cells[2].cell_key, t, s) for t in TASKS for s in ((0, 4), (4, 8))]
    planned.append(Unit("measure", cells[2].cell_key))
    assert Unit("measure", cells[2].cell_key).name not in kept
    assert kept <= {u.name for u in planned} | {Unit("quantize", cells[2].cell_key).name}

    rerun = UnitLog(tmp_path / "rerun.log")                                   # the failed cell is run again:
    summary = ray_run(tmp_path / "ray.db", tmp_path / "cache", unit_hook=rerun)
    assert [o.status for o in summary.outcomes] == ["skipped", "skipped", "done"]
    left = sorted((u.kind, u.cell_key, str(u.task), str(u.shard)) for u in planned if u.name not in kept)
    assert sorted(s for s in rerun.starts() if s[0] != "reference") == left   # only what had not finished
    assert [s[0] for s in rerun.starts()].count("reference") == 1             # (and FP's reference; no quantize)
    assert {s[1] for s in rerun.starts() if s[0] != "reference"} == {cells[2].cell_key}
    assert written(tmp_path / "ray.db") == local_run                          # nothing lost or counted twice


def test_interrupted_driver_cancels_frees_claims_and_resumes(cluster, local_run, tmp_path):
    cells = plan_cells(parse_study_config(SPEC))
    finished: list[str] = []

    def crash_after_first_cell(event, cell, unit):
        if event == "finished":
            finished.append(cell.cell_key)
            raise Crash("Ctrl-C")

    with pytest.raises(Crash):
        ray_run(tmp_path / "ray.db", tmp_path / "cache", hook=crash_after_first_cell, max_cells=3)
    state = {c["cell_key"]: c["status"] for c in store.read_cells(tmp_path / "ray.db")}
    assert state == {finished[0]: "done"}                                     # the other claims were freed

    submitted: list[str] = []
    summary = ray_run(tmp_path / "ray.db", tmp_path / "cache",
                      hook=lambda event, cell, unit: submitted.append(cell.cell_key) if event == "submitted" else None)
    assert summary.ok and sorted(submitted) == sorted(c.cell_key for c in cells if c.cell_key != finished[0])
    assert written(tmp_path / "ray.db") == local_run


# A harness grid: arc_easy (multiple choice) and gsm8k (generate_until) offline, 2 shots from the tasks' random
# streams, 5 documents each cut into shards of 2 (3 eval units per task); the FP cell, no measures.
HARNESS_DATA = Path(__file__).parents[1] / "evaluate" / "data" / "hub_shards"
HARNESS_SPEC = {"models": ["random-llada"], "methods": ["fp"],
                "tasks": ["arc_easy", "gsm8k"], "limit": 5, "measures": None,
                "eval": {"data_dir": str(HARNESS_DATA), "offline": True,
                         "harness": {"mc_num": 2, "gen_length": 8, "steps": 8, "block_length": 8, "num_fewshot": 2,
                                     "gen_batch_size": 2}}}


@pytest.fixture(scope="module")
def local_harness_run(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("local-harness")
    summary = run_study(parse_study_config(HARNESS_SPEC), tmp / "local.db", tmp / "cache", progress=False)
    assert summary.ok
    return written(tmp / "local.db")


def test_harness_tasks_in_shards_resume_unit_by_unit(cluster, local_harness_run, tmp_path):
    """The driver stops (Ctrl-C) after 4 of the cell's 6 units finished; the rerun runs only the units that had
    not finished - none twice - and writes the local runner's rows and per-item rows (the shards' answers
    scored together by lm-eval)."""
    from dllmq.study.ray_runner import run_study_ray

    config = parse_study_config(HARNESS_SPEC)
    cells = plan_cells(config)
    done: list[Unit] = []

    def crash_after_four_units(event, cell, unit):
        if event == "unit_done":
            done.append(unit)
            if len(done) == 4:
                raise Crash("Ctrl-C")

    first = UnitLog(tmp_path / "first.log")
    with pytest.raises(Crash):
        run_study_ray(config, tmp_path / "ray.db", tmp_path / "cache", shard_items=2, progress=False,
                      hook=crash_after_four_units, unit_hook=first)
    conn = store.connect(tmp_path / "ray.db")
    kept = {(k, u) for k, names in store.unit_results(conn, [c.cell_key for c in cells]).items() for u in names}
    conn.close()
    assert kept == {(u.cell_key, u.name) for u in done}                      # every finished unit is kept
    assert not store.read_results(tmp_path / "ray.db")

    again = UnitLog(tmp_path / "again.log")
    summary = run_study_ray(config, tmp_path / "ray.db", tmp_path / "cache", shard_items=2, progress=False,
                            unit_hook=again)
    assert summary.ok and [o.status for o in summary.outcomes] == ["done"]
    shards = [(0, 2), (2, 4), (4, 5)]
    planned = {(c.cell_key, Unit("eval", c.cell_key, t, s).name) for c in cells for t in config.tasks for s in shards}
    rerun = {(key, Unit(kind, key, task, ast.literal_eval(shard)).name) for kind, key, task, shard in again.starts()
             if kind == "eval"}
    assert len(again.starts([("eval",)])) == len(rerun)                      # no unit twice
    assert rerun == planned - kept and len(kept & planned) == 4              # the finished ones not again
    assert written(tmp_path / "ray.db") == local_harness_run
    conn = store.connect(tmp_path / "ray.db")
    assert conn.execute("SELECT COUNT(*) FROM units").fetchone()[0] == 0   # a written cell's units are dropped
    conn.close()


@pytest.mark.slow
def test_driver_killed_mid_run_resumes_without_repeating_finished_cells(cluster, local_run, tmp_path):
    """A real driver process (`python -m dllmq.study --ray ADDRESS`) killed with SIGKILL once a cell is done."""
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(SPEC))
    db, cache = tmp_path / "ray.db", tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "driver.log", "w")      # a file, not a pipe nobody reads: Ray may say a lot
    proc = subprocess.Popen([sys.executable, "-m", "dllmq.study", "--config", str(tmp_path / "s.yaml"), "--db", str(db),
                             "--cache", str(cache), "--ray", cluster.address, "--shard-items", str(SHARD)],
                            env=env, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.time() + 90
    status: dict[str, str] = {}
    try:
        while time.time() < deadline and proc.poll() is None:
            if db.exists():
                try:
                    status = {c["cell_key"]: c["status"] for c in store.read_cells(db)}
                except sqlite3.Error:
                    status = {}
                if "done" in status.values() and "running" in status.values():
                    break
            time.sleep(0.05)
        assert proc.poll() is None, (tmp_path / "driver.log").read_text()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
    status = {c["cell_key"]: c["status"] for c in store.read_cells(db)}
    done = {k for k, v in status.items() if v == "done"}
    assert done and "running" in status.values()
    conn = store.connect(db)
    finished = dict(conn.execute("SELECT cell_key, finished FROM cells WHERE status = 'done'"))
    conn.close()

    submitted: list[str] = []
    summary = ray_run(db, cache, hook=lambda event, cell, unit: submitted.append(cell.cell_key)
                      if event == "submitted" else None)     # the dead driver's claims are stale at once
    assert summary.ok
    assert sorted(submitted) == sorted(c.cell_key for c in summary.cells if c.cell_key not in done)
    conn = store.connect(db)
    assert {k: v for k, v in conn.execute("SELECT cell_key, finished FROM cells") if k in finished} == finished
    conn.close()
    assert written(db) == local_run
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]        # no staging leftovers


class NodeVictim(UnitLog):
    """A unit_hook for the node test: the first eval unit that starts on `node_id` marks itself and sleeps,
    so that the test can take its node away while it runs."""

    def __init__(self, path: Path, node_id: str):
        super().__init__(path)
        self.node_id = node_id

    def __call__(self, kind, cell_key, task, shard):
        import ray
        super().__call__(kind, cell_key, task, shard)
        marker = self.path.with_suffix(".victim")
        if kind == "eval" and ray.get_runtime_context().get_node_id() == self.node_id and not marker.exists():
            marker.write_text(f"{kind} {cell_key} {task} {shard}")
            time.sleep(120)


@pytest.mark.slow
def test_a_node_lost_mid_unit_is_survived(cluster, local_run, tmp_path):
    """The second node is removed (its raylet and workers killed) while one of its units runs: the units
    it held run again on the head node; the rows are the local runner's. The node comes back afterwards."""
    import threading

    node = next(n for n in cluster.list_all_nodes() if n is not cluster.head_node)
    hook = NodeVictim(tmp_path / "units.log", node.node_id)
    marker = (tmp_path / "units.log").with_suffix(".victim")
    removed = threading.Event()

    def remove_when_marked():
        deadline = time.time() + 120
        while not marker.exists() and time.time() < deadline:
            time.sleep(0.05)
        if marker.exists():
            cluster.remove_node(node, allow_graceful=False)
            removed.set()

    watcher = threading.Thread(target=remove_when_marked, daemon=True)
    watcher.start()
    try:
        summary = ray_run(tmp_path / "ray.db", tmp_path / "cache", unit_hook=hook)
        watcher.join()
        assert removed.is_set() and summary.ok and [o.status for o in summary.outcomes] == ["done"] * 3
        kind, key, task, shard = marker.read_text().split(" ", 3)
        assert hook.starts().count((kind, key, task, shard)) == 2              # cut off once, run again
        assert written(tmp_path / "ray.db") == local_run
    finally:
        watcher.join(timeout=1)
        if removed.is_set():
            cluster.add_node(num_cpus=1, object_store_memory=80 * 2 ** 20)
