"""The study grid runner: config validation, cell keys, the cache, claims, crash-safe resume, concurrency, CLI.

Everything runs on random-llada with a handful of items per task (numbers are noise; the properties
are what is tested: rows written once and complete, cells computed once, results equal to a direct
evaluation and to a rerun from the cache)."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

import dllmq.quant
from dllmq.errors import DllmqError
from dllmq.study import store
from dllmq.study.cache import QuantCache
from dllmq.study.cells import model_identity, plan_cells
from dllmq.study.config import load_config, parse_study_config
from dllmq.cli.study import main as study_main
from dllmq.study.runner import run_study

TWO_TASKS = ["mini_math", "mini_code"]   # the quick ones (mini_general costs ~1 s per cell here)
ONE_TASK = ["mini_math"]
CALIB: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def small_calibration_text(tmp_path_factory):
    """A 20 kB slice of the shipped Wikipedia: tokenizing all of it costs a second per calibrated cell."""
    from dllmq.data import heldout_text

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(heldout_text("wiki")[:20_000])
    CALIB["path"] = str(path)


# The measures against FP run in every cell here too, on a token amount of text (their values are
# tested in test_measures.py; here they only have to survive crashes and resumes with the rows).
SMALL_MEASURES = {"windows": 2, "seqlen": 32, "elbo_mc": 1, "trajectory": 2}


def grid(methods, tasks=TWO_TASKS, limit=4, **extra) -> dict:
    return {"models": ["random-llada"], "methods": methods, "tasks": tasks, "limit": limit,
            "calibration": {"calib": CALIB["path"], "nsamples": 2, "seqlen": 32}, "measures": SMALL_MEASURES,
            **extra}


RTN3 = ["fp", {"name": "rtn", "bits": ["W4A16-g128", "W3A16-g128", "W8A8"]}]   # 4 cells, no calibration


class Crash(BaseException):
    """Stands for the process dying: not an Exception, so the runner does not record it as a failed cell."""


class Recorder:
    """A run_study hook that records events and can crash at the n-th occurrence of one."""

    def __init__(self, crash_on: str | None = None, after: int = 1):
        self.events: list[tuple[str, str, str | None]] = []
        self.crash_on, self.after = crash_on, after
        self.lock = threading.Lock()

    def __call__(self, event, cell, task):
        with self.lock:
            self.events.append((event, cell.cell_key, task))
            hit = event == self.crash_on and sum(e[0] == event for e in self.events) == self.after
        if hit:
            raise Crash(f"simulated crash at {event} #{self.after}")

    def claimed(self) -> list[str]:
        return [k for e, k, _ in self.events if e == "claimed"]


@pytest.fixture
def count_quantize(monkeypatch):
    """Counts real quantize() calls (the runner calls dllmq.quant.quantize)."""
    calls: list[str] = []
    real = dllmq.quant.quantize

    def counting(model, tokenizer, config, **kw):
        calls.append(config.method)
        return real(model, tokenizer, config, **kw)

    monkeypatch.setattr(dllmq.quant, "quantize", counting)
    return calls


def db_state(db: Path) -> tuple[dict[str, str], list[tuple[str, str]]]:
    conn = sqlite3.connect(db)
    try:
        status = dict(conn.execute("SELECT cell_key, status FROM cells"))
        rows = list(conn.execute("SELECT cell_key, task FROM results"))
    finally:
        conn.close()
    return status, rows


def assert_complete(db: Path, cells, tasks) -> None:
    """Every cell done with exactly one row per task, and no other rows."""
    status, rows = db_state(db)
    assert {c.cell_key: "done" for c in cells} == {k: v for k, v in status.items()}
    assert sorted(rows) == sorted((c.cell_key, t) for c in cells for t in tasks)


# ----------------------------------------------------------------------------- config
def test_default_config_is_the_papers_grid():
    config = load_config()
    assert config.models == ("dllmq-tiny", "dllmq-tiny-instruct")
    assert config.tasks == ("mini_general", "mini_math", "mini_code") and config.limit == 50
    assert config.measures.windows == 8
    assert (config.calibration.calib, config.calibration.nsamples, config.calibration.seqlen) == ("wiki", 32, 256)
    # the tiny models may not be installed: plan with placeholder identities
    cells = plan_cells(config, model_identities={m: json.dumps({"name": m}) for m in config.models})
    by_model = {m: {(c.method, c.bits) for c in cells if c.model == m} for m in config.models}
    expected = {("fp", "FP")} | {(m, b) for m in ("rtn", "gptq", "awq") for b in ("W4A16", "W3A16")} | \
               {(m, b) for m in ("smoothquant", "quarot", "duquant") for b in ("W8A8", "W4A4")}
    assert all(v == expected for v in by_model.values()) and len(cells) == 26
    w4 = next(c for c in cells if c.method == "gptq" and c.bits == "W4A16")
    assert w4.settings["group_size"] == 128 and w4.settings["wbits"] == 4 and w4.settings["nsamples"] == 32
    w4a4 = next(c for c in cells if c.method == "quarot" and c.bits == "W4A4")
    assert (w4a4.settings["wbits"], w4a4.settings["abits"], w4a4.settings["group_size"]) == (4, 4, -1)
    assert len({c.cell_key for c in cells}) == 26


@pytest.mark.parametrize("change, fragment", [
    (lambda d: d.update(modles=["x"]), "modles is not a known key"),
    (lambda d: d.pop("tasks"), "tasks is missing"),
    (lambda d: d["methods"].append({"name": "rtn", "bits": ["W5A16"]}), "methods[2].bits has an unknown bit config"),
    (lambda d: d["methods"].append({"name": "foo", "bits": ["W8A8"]}), "methods[2].name is 'foo'"),
    (lambda d: d["methods"].append({"name": "gptq", "bits": ["W4A16-g128"], "wbitz": 3}), "methods[2].wbitz"),
    (lambda d: d["methods"].append({"name": "gptq", "bits": ["W4A16-g128"], "seed": 3}), "methods[2].seed"),
    (lambda d: d["methods"].append({"name": "gptq", "bits": ["W4A16-g128"], "damp": 2.0}),
     "methods[2] at W4A16-g128 is not a valid setting (GPTQ damping"),
    (lambda d: d["methods"].append({"name": "gptq"}), "methods[2].bits is missing"),
    (lambda d: d["methods"].append({"name": "rtn", "bits": ["W4A16"]}), "repeats rtn at W4A16"),
    (lambda d: d["methods"].append({"name": "fp", "bits": ["W4A4"]}), "methods[2] is fp"),
    (lambda d: d.update(limit=0), "limit must be a positive whole number"),
    (lambda d: d.update(seeds=["a"]), "seeds must be"),
    (lambda d: d.update(calibration={"nsamples": -1}), "calibration.nsamples"),
    (lambda d: d.update(calibration={"window": 3}), "calibration.window is not a known setting"),
    (lambda d: d.update(dtype="int3"), "dtype is 'int3'"),
    (lambda d: d.update(eval={"batch_size": 0}), "eval.batch_size"),
    (lambda d: d.update(eval={"harness": {"mc_nun": 3}}), "eval.harness.mc_nun"),
    (lambda d: d.update(tasks=["humaneval"]), "eval.allow_code_execution"),
    (lambda d: d.update(models=[]), "models must be a non-empty list"),
])
def test_config_errors_name_the_key(change, fragment):
    data = grid(["fp", {"name": "rtn", "bits": ["W4A16-g128"]}])
    change(data)
    with pytest.raises(DllmqError) as info:
        parse_study_config(data, "s.yaml")
    message = str(info.value)
    assert message.startswith("Study config s.yaml") and fragment in message, message
    assert "\n" not in message and message.endswith(".")


def test_config_expands_task_groups_and_overrides():
    c = parse_study_config(grid(["fp", {"name": "gptq", "bits": ["W4A16-g128"], "act_order": True, "nsamples": 3,
                                  "label": "gptq-ao"}], tasks=["mini", "gsm8k"], seeds=[0, 1]))
    assert c.tasks == ("mini_general", "mini_math", "mini_code", "gsm8k")
    [spec] = [m for m in c.methods if m.name == "gptq"]
    qc = spec.quant_config("W4A16-g128", c.calibration, seed=1)
    assert qc.settings.act_order and qc.calibration.nsamples == 3 and qc.calibration.seqlen == 32 and qc.seed == 1  # override beats calibration
    cells = plan_cells(c)
    assert [(x.method, x.seed) for x in cells] == [("fp", 0), ("gptq-ao", 0), ("fp", 1), ("gptq-ao", 1)]


def test_bad_yaml_is_one_sentence_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [random-llada\nmethods: fp\n")
    with pytest.raises(DllmqError, match=r"bad.yaml is not valid YAML at line \d+"):
        load_config(bad)
    assert study_main(["--config", str(bad), "--db", str(tmp_path / "db")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Study config") and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "db").exists()
    (tmp_path / "bad2.yaml").write_text(yaml.safe_dump({"models": ["random-llada"], "methods": ["fp"],
                                                        "tasks": ["mini_general"], "limit": -3}))
    assert study_main(["--config", str(tmp_path / "bad2.yaml"), "--dry-run"]) == 2
    assert "limit must be" in capsys.readouterr().err
    (tmp_path / "nomodel.yaml").write_text(yaml.safe_dump({"models": [str(tmp_path / "nope")], "methods": ["fp"],
                                                           "tasks": ["mini_math"]}))
    assert study_main(["--config", str(tmp_path / "nomodel.yaml"), "--db", str(tmp_path / "db")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Study model") and "No model directory" in err and "\n" not in err


# ----------------------------------------------------------------------------- keys
def test_cell_keys_are_stable_and_follow_every_setting(tmp_path, monkeypatch):
    base = grid(["fp", {"name": "rtn", "bits": ["W4A16-g128"]}, {"name": "gptq", "bits": ["W4A16-g128"]}])

    def keys(data, device="cpu"):
        return {(c.method, c.bits): (c.cell_key, c.quant_key) for c in plan_cells(parse_study_config(data), device)}

    k0 = keys(base)
    assert k0 == keys(json.loads(json.dumps(base)))                                  # stable
    assert len({v[0] for v in k0.values()}) == 3 and k0["fp", "FP"][1] is None

    more_items = keys({**base, "limit": 5})                   # evaluation only: cells change, quantized models not
    assert all(more_items[k][0] != k0[k][0] and more_items[k][1] == k0[k][1] for k in k0)
    other_tasks = keys({**base, "tasks": ["mini_general"]})
    assert all(other_tasks[k][0] != k0[k][0] and other_tasks[k][1] == k0[k][1] for k in k0)
    calib = keys({**base, "calibration": {**base["calibration"], "nsamples": 3}})
    assert calib["fp", "FP"] == k0["fp", "FP"]                # FP does not depend on calibration
    assert calib["gptq", "W4A16"][1] != k0["gptq", "W4A16"][1] and calib["gptq", "W4A16"][0] != k0["gptq", "W4A16"][0]
    override = keys({**base, "methods": ["fp", {"name": "rtn", "bits": ["W4A16-g128"]},
                                         {"name": "gptq", "bits": ["W4A16-g128"], "act_order": False}]})
    assert override["gptq", "W4A16"][1] != k0["gptq", "W4A16"][1] and override["rtn", "W4A16"] == k0["rtn", "W4A16"]
    seeds = keys({**base, "seeds": [1]})
    assert all(seeds[k][0] != k0[k][0] for k in k0)
    assert keys(base, "cuda")["fp", "FP"] != k0["fp", "FP"]   # auto dtype is bfloat16 there: other numbers
    assert keys({**base, "dtype": "float32"}, "cuda")["fp", "FP"] == k0["fp", "FP"]
    assert keys({**base, "eval": {"batch_size": 4}})["fp", "FP"] != k0["fp", "FP"]
    assert keys({**base, "eval": {"data_dir": "/x"}})["fp", "FP"] == k0["fp", "FP"]  # where data lives: not

    # a checkpoint directory is identified by its config and weight files
    from dllmq.models.loading import save_model
    from dllmq.models.random_models import random_model
    model, tok = random_model("random-llada", seed=0)
    d = save_model(model, tok, tmp_path / "ckpt")
    first = model_identity(str(d))
    assert model_identity(str(d)) == first
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "rope_theta": 1234.0}))
    assert model_identity(str(d)) != first

    # a shipped model is identified by its files' contents: a fresh clone (new mtimes) keeps its cells
    import os
    import shutil
    import dllmq.tiny
    copy = shutil.copytree(dllmq.tiny.checkpoint_dir("dllmq-tiny"), tmp_path / "shipped")
    monkeypatch.setattr(dllmq.tiny, "checkpoint_dir", lambda name: copy)
    shipped = model_identity("dllmq-tiny")
    weights = next(copy.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert model_identity("dllmq-tiny") == shipped
    with open(weights, "r+b") as f:      # ... and a changed byte is a different model
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    assert model_identity("dllmq-tiny") != shipped


# ----------------------------------------------------------------------------- runs
def test_full_run_fills_the_db_and_the_cache_reproduces_it(tmp_path, count_quantize, capsys):
    from dllmq.api import load_model
    from dllmq.evaluate import evaluate_mini

    config = parse_study_config(grid(["fp", {"name": "rtn", "bits": ["W4A16-g128"]}, {"name": "gptq", "bits": ["W4A16-g128"]}],
                               tasks=["mini"]))
    db, cache = tmp_path / "runs.db", tmp_path / "cache"
    summary = run_study(config, db, cache, progress=False, log_lines=True)
    cells = summary.cells
    assert summary.ok and [o.status for o in summary.outcomes] == ["done"] * 3 and count_quantize == ["rtn", "gptq"]
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in lines] == ["study 1/3 cells", "study 2/3 cells", "study 3/3 cells"]
    assert " rtn W4A16 done in " in lines[1] and "ETA" in lines[0] and "ETA" not in lines[2]
    assert_complete(db, cells, config.tasks)

    rows = store.read_results(db)
    assert len(rows) == 9
    for r in rows:
        assert 0 <= r["value"] <= 1 and r["n"] == 4 and r["seed"] == 0 and r["eval_seconds"] > 0
        assert (r["category"], r["metric"]) == {"mini_general": ("general", "acc"), "mini_math": ("math", "exact_match"),
                                                "mini_code": ("code", "pass@1")}[r["task"]]
        assert (r["quant_seconds"] is None) == (r["method"] == "fp")
    assert {(r["method"], r["bits"]) for r in rows} == {("fp", "FP"), ("rtn", "W4A16"), ("gptq", "W4A16")}
    conn = store.connect(db)
    settings = {r["method"]: json.loads(r["settings"]) for r in conn.execute("SELECT method, settings FROM cells")}
    conn.close()
    assert settings["fp"] == {} and settings["gptq"] == cells[2].quant_config().to_dict()
    assert settings["gptq"]["group_size"] == 128 and settings["gptq"]["nsamples"] == 2

    # FP numbers equal a direct evaluation of the model (mini_general: the only task where a random model
    # scores above zero)
    model, tok, _ = load_model("random-llada", dtype="float32")
    direct = evaluate_mini(model, tok, ["mini_general"], limit=4, seed=0, progress=False)["mini_general"]["acc"]
    assert [r["value"] for r in rows if r["method"] == "fp" and r["task"] == "mini_general"] == [direct]

    # the cache holds both quantized models, complete; a new database reuses them with equal numbers
    assert sorted(p.name for p in cache.iterdir()) == sorted(c.quant_key for c in cells[1:])
    # (other tasks: other cells, same quantized models)
    # (mini_general: the likelihood task, whose numbers move with every logit)
    fewer = parse_study_config(grid(["fp", {"name": "rtn", "bits": ["W4A16-g128"]}, {"name": "gptq", "bits": ["W4A16-g128"]}],
                              tasks=["mini_general"]))
    summary2 = run_study(fewer, tmp_path / "again.db", cache, progress=False)
    assert count_quantize == ["rtn", "gptq"] and [o.cached for o in summary2.outcomes] == [False, True, True]
    again = {(r["method"], r["task"]): r["value"] for r in store.read_results(tmp_path / "again.db")}
    assert again == {(r["method"], r["task"]): r["value"] for r in rows if r["task"] == "mini_general"}
    quant_seconds = {r["method"]: r["quant_seconds"] for r in rows}
    assert {r["method"]: r["quant_seconds"] for r in store.read_results(tmp_path / "again.db")} == quant_seconds

    # a third run on the first database finds everything done
    summary3 = run_study(config, db, cache, progress=False)
    assert [o.status for o in summary3.outcomes] == ["skipped"] * 3 and count_quantize == ["rtn", "gptq"]


def test_resume_after_a_crash_between_cells(tmp_path, count_quantize):
    config = parse_study_config(grid(RTN3))
    db = tmp_path / "runs.db"
    crash = Recorder("finished", after=2)
    with pytest.raises(Crash):
        run_study(config, db, None, progress=False, hook=crash)
    status, rows = db_state(db)
    first_two = crash.claimed()
    assert list(status.values()) == ["done", "done"] and set(status) == set(first_two) and len(rows) == 4
    conn = store.connect(db)
    finished = dict(conn.execute("SELECT cell_key, finished FROM cells"))
    conn.close()

    rerun = Recorder()
    summary = run_study(config, db, None, progress=False, hook=rerun)
    cells = summary.cells
    assert rerun.claimed() == [c.cell_key for c in cells[2:]]        # only the missing cells were computed
    assert count_quantize == ["rtn", "rtn", "rtn"]                   # 1 before the crash, 2 after, none twice
    assert_complete(db, cells, config.tasks)
    conn = store.connect(db)
    assert {k: v for k, v in conn.execute("SELECT cell_key, finished FROM cells") if k in finished} == finished
    conn.close()


def test_resume_after_a_crash_inside_a_cell(tmp_path, count_quantize):
    config = parse_study_config(grid(["fp", {"name": "gptq", "bits": ["W4A16-g128"]}, {"name": "rtn", "bits": ["W8A8"]}]))
    db, cache = tmp_path / "runs.db", tmp_path / "cache"
    crash = Recorder("task_done", after=3)      # fp's two tasks, then the first task of the gptq cell
    with pytest.raises(Crash):
        run_study(config, db, cache, progress=False, hook=crash)
    cells = plan_cells(config)
    status, rows = db_state(db)
    assert status == {cells[0].cell_key: "done"}                     # the interrupted cell left no claim ...
    assert sorted(rows) == sorted((cells[0].cell_key, t) for t in config.tasks)   # ... and no partial rows
    assert count_quantize == ["gptq"] and QuantCache(cache).lookup(cells[1].quant_key) is not None

    summary = run_study(config, db, cache, progress=False)
    assert [o.status for o in summary.outcomes] == ["skipped", "done", "done"]
    assert summary.outcomes[1].cached and count_quantize == ["gptq", "rtn"]   # gptq not calibrated again
    assert_complete(db, cells, config.tasks)


def test_stale_claims_are_taken_over_and_live_ones_respected(tmp_path):
    config = parse_study_config(grid(["fp", {"name": "rtn", "bits": ["W4A16-g128", "W8A8"]}], tasks=ONE_TASK))
    cells = plan_cells(config)
    db = tmp_path / "runs.db"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = store.new_owner().split(":")[0]
    conn = store.connect(db)
    meta = lambda c: dict(model=c.model, method=c.method, bits=c.bits, settings=c.settings, tasks=c.tasks)  # noqa: E731
    old = time.time() - 1000
    # cell 0: another machine, silent for 1000 s; cell 1: this machine, fresh heartbeat but its process is gone;
    # cell 2: a live runner of this process, fresh heartbeat
    assert store.claim_cell(conn, cells[0].cell_key, "elsewhere:42:aa", now=old, **meta(cells[0])) == store.CLAIMED
    assert store.claim_cell(conn, cells[1].cell_key, f"{host}:{dead.pid}:bb", **meta(cells[1])) == store.CLAIMED
    live = f"{host}:{os.getpid()}:cc"
    assert store.claim_cell(conn, cells[2].cell_key, live, **meta(cells[2])) == store.CLAIMED
    conn.close()

    rec = Recorder()
    summary = run_study(config, db, None, progress=False, hook=rec, heartbeat_every=0.05)
    assert rec.claimed() == [cells[0].cell_key, cells[1].cell_key]
    assert [o.status for o in summary.outcomes] == ["done", "done", "busy"] and summary.ok
    conn = store.connect(db)
    rows = {r["cell_key"]: dict(r) for r in conn.execute("SELECT * FROM cells")}
    conn.close()
    assert rows[cells[2].cell_key]["status"] == "running" and rows[cells[2].cell_key]["owner"] == live
    assert rows[cells[0].cell_key]["owner"] == rows[cells[1].cell_key]["owner"] != live
    _, results = db_state(db)
    assert sorted(k for k, _ in results) == sorted([cells[0].cell_key, cells[1].cell_key])


def test_claim_store_semantics(tmp_path):
    conn = store.connect(tmp_path / "db")
    meta = dict(model="m", method="rtn", bits="W4A16", settings={"wbits": 4}, tasks=["t1", "t2"])
    assert store.claim_cell(conn, "k", "h:1:a", **meta) == store.CLAIMED
    assert store.claim_cell(conn, "k", "h:1:b", **meta) == store.BUSY            # other host-less owner, fresh
    assert store.heartbeat(conn, "k", "h:1:a") and not store.heartbeat(conn, "k", "h:1:b")
    row = {"model": "m", "method": "rtn", "bits": "W4A16", "category": "general", "metric": "acc", "seed": 0}
    # a result row that breaks the schema (value NULL) aborts the whole finish: still running, no rows
    with pytest.raises(sqlite3.IntegrityError):
        store.finish_cell(conn, "k", "h:1:a", [{**row, "task": "t1", "value": 0.5}, {**row, "task": "t2", "value": None}])
    assert conn.execute("SELECT status FROM cells").fetchone()[0] == "running"
    assert conn.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 0
    assert not store.finish_cell(conn, "k", "h:1:b", [{**row, "task": "t1", "value": 0.5}])   # not the owner
    assert store.finish_cell(conn, "k", "h:1:a", [{**row, "task": t, "value": 0.5} for t in ("t1", "t2")])
    assert store.claim_cell(conn, "k", "h:1:c", **meta) == store.DONE
    assert conn.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 2

    assert store.claim_cell(conn, "f", "h:1:a", **meta) == store.CLAIMED
    assert store.fail_cell(conn, "f", "h:1:a", "ValueError: boom")
    failed_at = conn.execute("SELECT finished FROM cells WHERE cell_key='f'").fetchone()[0]
    assert store.claim_cell(conn, "f", "h:1:b", retry_failed_before=failed_at, **meta) == store.FAILED   # this run
    assert store.claim_cell(conn, "f", "h:1:b", retry_failed_before=None, **meta) == store.FAILED
    assert store.claim_cell(conn, "f", "h:1:b", retry_failed_before=failed_at + 1, **meta) == store.CLAIMED
    assert conn.execute("SELECT error FROM cells WHERE cell_key='f'").fetchone()[0] is None
    assert store.release_cell(conn, "f", "h:1:b") and store.claim_cell(conn, "f", "h:1:c", **meta) == store.CLAIMED
    conn.close()


def test_claim_race_has_one_winner(tmp_path):
    db = tmp_path / "db"
    store.connect(db).close()
    meta = dict(model="m", method="fp", bits="FP", settings={}, tasks=["t"])
    results: list[str] = []
    barrier = threading.Barrier(8)

    def claim(i):
        conn = store.connect(db)
        barrier.wait()
        results.append(store.claim_cell(conn, "k", f"h:{i}:x", **meta))
        conn.close()

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [store.BUSY] * 7 + [store.CLAIMED]


def test_heartbeat_thread_keeps_the_claim_fresh(tmp_path):
    config = parse_study_config(grid(["fp"], tasks=ONE_TASK))
    db = tmp_path / "db"
    seen = []

    def slow(event, cell, task):
        if event == "claimed":
            conn = store.connect(db)
            first = conn.execute("SELECT heartbeat FROM cells").fetchone()[0]
            time.sleep(0.4)
            seen.append(conn.execute("SELECT heartbeat FROM cells").fetchone()[0] - first)
            conn.close()

    run_study(config, db, None, progress=False, hook=slow, heartbeat_every=0.05)
    assert seen[0] > 0.2


def test_failed_cell_is_recorded_the_run_goes_on_and_exit_code_is_1(tmp_path, capsys):
    spec = grid(["fp", {"name": "gptq", "bits": ["W4A16-g128"], "seqlen": 100000}, {"name": "rtn", "bits": ["W8A8"]}],
                tasks=ONE_TASK)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    argv = ["--config", str(tmp_path / "s.yaml"), "--db", str(tmp_path / "db"), "--cache", str(tmp_path / "c")]
    assert study_main(argv) == 1
    out = capsys.readouterr().out
    assert "2 computed" in out and "1 failed" in out and "FAILED random-llada gptq W4A16" in out
    assert "longer than the model's context" in out and "dllmq report --db" in out
    status, rows = db_state(tmp_path / "db")
    assert sorted(status.values()) == ["done", "done", "failed"] and len(rows) == 2
    conn = store.connect(tmp_path / "db")
    assert "DllmqError" in conn.execute("SELECT error FROM cells WHERE status='failed'").fetchone()[0]
    conn.close()
    assert study_main(argv + ["--no-retry-failed"]) == 0                 # left failed; nothing else to do
    assert "2 already done, 1 left failed" in capsys.readouterr().out
    assert study_main(argv) == 1                                         # retried by default (and fails again)


def test_two_concurrent_runners_compute_each_cell_once(tmp_path, count_quantize):
    config = parse_study_config(grid(RTN3 + [{"name": "gptq", "bits": ["W4A16-g128"]}], tasks=ONE_TASK))
    db, cache = tmp_path / "runs.db", tmp_path / "cache"
    rec = Recorder()
    errors: list[BaseException] = []
    summaries = []
    barrier = threading.Barrier(2)

    def slow_claims(event, cell, task):  # holds each claim a moment, so the other runner must work around it
        rec(event, cell, task)
        if event == "claimed":
            time.sleep(0.3)

    def runner():
        try:
            barrier.wait()
            summaries.append(run_study(config, db, cache, progress=False, hook=slow_claims))
        except BaseException as err:  # noqa: BLE001 - surfaced below
            errors.append(err)

    threads = [threading.Thread(target=runner) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    cells = plan_cells(config)
    assert sorted(rec.claimed()) == sorted(c.cell_key for c in cells)          # each cell computed exactly once
    assert sorted(count_quantize) == ["gptq", "rtn", "rtn", "rtn"]
    assert_complete(db, cells, config.tasks)
    done = [o.cell.cell_key for s in summaries for o in s.outcomes if o.status == "done"]
    assert sorted(done) == sorted(c.cell_key for c in cells)
    assert all(s.count("done") >= 1 and s.count("busy") >= 1 for s in summaries)   # both really worked at once


def test_kill_9_mid_run_then_rerun_completes_without_duplicates(tmp_path):
    tasks = ["mini_math", "mini_general"]   # slow enough cells to catch one mid-way
    spec = grid(RTN3, tasks=tasks, limit=4)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    db, cache = tmp_path / "runs.db", tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dllmq.study", "--config", str(tmp_path / "s.yaml"),
                             "--db", str(db), "--cache", str(cache)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    status: dict[str, str] = {}
    try:
        while time.time() < deadline and proc.poll() is None:  # wait until one cell is done and another running
            if db.exists():
                try:
                    status, _ = db_state(db)
                except sqlite3.Error:
                    status = {}
                if "done" in status.values() and "running" in status.values():
                    break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    status, rows = db_state(db)
    done = {k for k, v in status.items() if v == "done"}
    assert done and "running" in status.values()
    assert sorted(rows) == sorted((k, t) for k in done for t in tasks)        # only complete cells have rows

    config = parse_study_config(spec)
    rec = Recorder()
    summary = run_study(config, db, cache, progress=False, hook=rec)       # the dead runner's claim is stale at once
    assert sorted(rec.claimed()) == sorted(c.cell_key for c in summary.cells if c.cell_key not in done)
    assert_complete(db, summary.cells, config.tasks)
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]      # no staging leftovers
    for p in cache.iterdir():
        assert (p / "study.json").is_file()


def test_cache_ignores_and_cleans_a_dead_runners_staging(tmp_path):
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cache = QuantCache(tmp_path)
    key = "ab" * 32
    stale = tmp_path / f".staging-{socket.gethostname()}-{dead.pid}-0123abcd"
    (stale / key).mkdir(parents=True)
    (stale / key / "config.json").write_text("{}")                          # half a model
    mine = tmp_path / f".staging-{socket.gethostname()}-{os.getpid()}-0123abcd"
    mine.mkdir()
    assert cache.lookup(key) is None
    assert cache.clean_stale() == [stale] and not stale.exists() and mine.exists()


def test_cli_dry_run_lists_cells_and_their_state(tmp_path, capsys):
    spec = grid(["fp", {"name": "rtn", "bits": ["W4A16-g128"]}], tasks=ONE_TASK)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    db = tmp_path / "runs.db"
    argv = ["--config", str(tmp_path / "s.yaml"), "--db", str(db), "--dry-run"]
    assert study_main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("random-llada") == 2 and "2 todo" in out and not db.exists()   # a dry run creates nothing
    config = parse_study_config(spec)
    with pytest.raises(Crash):
        run_study(config, db, None, progress=False, hook=Recorder("finished", after=1))
    assert study_main(argv) == 0
    out = capsys.readouterr().out
    fp_line = next(line for line in out.splitlines() if " fp " in line)
    rtn_line = next(line for line in out.splitlines() if " rtn " in line)
    assert fp_line.rstrip().endswith("done") and rtn_line.rstrip().endswith("todo") and "1 done, 1 todo" in out
    assert study_main(argv[:-1] + ["--limit", "2", "--dry-run"]) == 0      # another limit: other cells
    assert "2 todo" in capsys.readouterr().out


def test_add_parser_wires_the_subcommand():
    import argparse

    from dllmq.cli import study

    parser = argparse.ArgumentParser()
    study.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["study", "--dry-run", "--db", "x.db"])
    assert args.func is study.run and args.dry_run and args.db == "x.db" and args.cache == "runs/study-cache"
    assert args.config is None


def test_harness_tasks_run_through_lm_eval(tmp_path):
    """A harness task (HumanEval ships with its package, so this is offline) lands in the same rows."""
    config = parse_study_config(grid(["fp"], tasks=["humaneval", "mini_math"], limit=2,
                               eval={"allow_code_execution": True,
                                     "harness": {"gen_length": 8, "steps": 8, "block_length": 8}}))
    summary = run_study(config, tmp_path / "db", None, progress=False)
    assert summary.ok, summary.outcomes
    rows = {r["task"]: r for r in store.read_results(tmp_path / "db")}
    assert (rows["humaneval"]["category"], rows["humaneval"]["metric"], rows["humaneval"]["n"]) == ("code", "pass@1", 2)
    assert 0 <= rows["humaneval"]["value"] <= 1 and rows["mini_math"]["n"] == 2
