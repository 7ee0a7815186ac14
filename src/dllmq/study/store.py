"""The results store of a study: one SQLite database (WAL mode), one row per (cell, task).

A *cell* is one model x quantization setting x task set x evaluation setting. Its identity is
`cell_key`, a hash of everything that decides its numbers. The runner claims a cell in `cells`,
and writes all of its `results` rows (and its `items` and `measures`) and marks it done in one
transaction when it finishes, so a killed run never leaves a partial cell behind.

- `results`: one row per task: the task's metric (what the report's tables show);
- `items` (schema 2): every item's answer and whether it was right, per task - what flips and the
  paired bootstrap are computed from (the FP cell's items are the reference);
- `measures` (schema 2): the distribution measures against FP (KL and top-1 agreement by mask
  ratio, ELBO NLL, the generation trajectory), each with its per-unit values (`units`, JSON) so
  the report can pair two cells unit by unit; `setup` identifies the units (same setup = same
  windows and masks).

Values are fractions in [0, 1]; reports show points (x 100).

- `units` (schema 3): results of the finished units of cells a Ray driver (dllmq.study.ray_runner) has
  not finished yet, so that a restarted driver runs only the rest; a cell's units go when it is written.

Older databases are migrated when opened (`migrate`): missing tables and columns are added in one
transaction and PRAGMA user_version records the schema; nothing is rewritten or dropped, so an old
database keeps its results and reports as before (without the new measures).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from dllmq.atomic import pid_alive

log = logging.getLogger(__name__)

DEFAULT_DB = "runs/study.db"   # where `dllmq study` writes and `dllmq report` reads unless told otherwise

SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    cell_key   TEXT PRIMARY KEY,
    model      TEXT NOT NULL,     -- model name or path as given (e.g. dllmq-tiny)
    method     TEXT NOT NULL,     -- fp | rtn | gptq | awq | smoothquant | quarot | duquant
    bits       TEXT NOT NULL,     -- FP | W4A16 | W3A16 | W8A8 | W4A4 | ... (label of the bit config)
    settings   TEXT NOT NULL,     -- JSON: the quantization settings ({} for FP)
    tasks      TEXT NOT NULL,     -- JSON list of task names
    status     TEXT NOT NULL,     -- running | done | failed | unavailable (its model is not there; error says why)
    owner      TEXT,              -- runner id holding the claim
    heartbeat  REAL,              -- unix time of the owner's last sign of life
    started    REAL,
    finished   REAL,
    error      TEXT
);
CREATE TABLE IF NOT EXISTS results (
    cell_key      TEXT NOT NULL REFERENCES cells(cell_key),
    model         TEXT NOT NULL,
    method        TEXT NOT NULL,
    bits          TEXT NOT NULL,
    task          TEXT NOT NULL,
    category      TEXT NOT NULL,  -- general | math | code
    metric        TEXT NOT NULL,  -- acc | exact_match | pass@1 | ...
    value         REAL NOT NULL,  -- fraction in [0, 1]
    stderr        REAL,
    n             INTEGER,
    seed          INTEGER,
    quant_seconds REAL,
    eval_seconds  REAL,
    created       REAL NOT NULL,
    PRIMARY KEY (cell_key, task)
);
CREATE TABLE IF NOT EXISTS items (
    cell_key   TEXT NOT NULL REFERENCES cells(cell_key),
    task       TEXT NOT NULL,
    item       TEXT NOT NULL,     -- the item's id within the task
    answer     TEXT,              -- chosen option / extracted answer / generated program
    correct    INTEGER NOT NULL,  -- 1 right, 0 wrong
    PRIMARY KEY (cell_key, task, item)
);
CREATE TABLE IF NOT EXISTS measures (
    cell_key   TEXT NOT NULL REFERENCES cells(cell_key),
    measure    TEXT NOT NULL,     -- kl | top1 | elbo_nll | elbo_nll_fp | traj_flip | ...
    param      TEXT NOT NULL,     -- the mask ratio, the denoising step, or '' when none
    value      REAL,              -- the mean over units
    n          INTEGER,           -- units (windows, items x steps)
    units      TEXT,              -- JSON list of per-unit values, in unit order
    setup      TEXT,              -- identity of the units (hash of text, windows, masks, settings)
    seconds    REAL,              -- time the measure (its kind) took in this cell
    PRIMARY KEY (cell_key, measure, param)
);
CREATE TABLE IF NOT EXISTS units (
    cell_key   TEXT NOT NULL,
    unit       TEXT NOT NULL,     -- the unit of a cell `dllmq study --ray` finished: kind|task|start-stop
    result     TEXT NOT NULL,     -- JSON: what the unit returned (outcomes, answers, rows)
    created    REAL NOT NULL,
    PRIMARY KEY (cell_key, unit)
);
"""
SCHEMA_VERSION = 3
# Columns added after schema 1 (table, column, SQL type): migrate() adds those an old database lacks.
ADDED_COLUMNS = (
    ("cells", "threads", "INTEGER"),          # torch intra-op threads the cell evaluated with
    ("cells", "calib_threads", "INTEGER"),    # threads pinned during quantization (calibration)
    ("cells", "measure_seconds", "REAL"),     # time of the distribution measures (0 when off)
    ("results", "items", "INTEGER"),          # per-item rows stored for this task (0 or NULL: none)
)

# The study's three categories (the paper's general QA / math / code).
CATEGORIES = ("general", "math", "code")
TASK_CATEGORY = {
    "mini_general": "general", "mini_math": "math", "mini_code": "code",
    "mmlu": "general", "arc_easy": "general", "arc_challenge": "general", "hellaswag": "general",
    "winogrande": "general", "piqa": "general",
    "gsm8k": "math", "math": "math", "minerva_math": "math",
    "humaneval": "code", "mbpp": "code",
}

RESULT_COLUMNS = ("cell_key", "model", "method", "bits", "task", "category", "metric", "value", "stderr", "n",
                  "seed", "quant_seconds", "eval_seconds", "created")
ITEM_COLUMNS = ("cell_key", "task", "item", "answer", "correct")
MEASURE_COLUMNS = ("cell_key", "measure", "param", "value", "n", "units", "setup", "seconds")


def task_category(task: str) -> str:
    """general / math / code for a task name (prefix match for families like mmlu_*); general if unknown."""
    if task in TASK_CATEGORY:
        return TASK_CATEGORY[task]
    for name, category in TASK_CATEGORY.items():
        if task.startswith(name + "_"):
            return category
    return "general"


def connect(path: str | Path) -> sqlite3.Connection:
    """Open (creating if needed) a study database in WAL mode with the schema in place."""
    conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None)  # explicit transactions only
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(SCHEMA)
    migrate(conn)
    return conn


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}


def migrate(conn: sqlite3.Connection) -> int:
    """Bring an older database up to SCHEMA_VERSION: add the missing columns (tables come from SCHEMA's
    CREATE IF NOT EXISTS) in one write transaction, re-checked inside it so two runners opening one old
    database at once both succeed. Returns the number of columns added."""
    if conn.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
        return 0
    added = 0
    with immediate(conn):
        for table, column, kind in ADDED_COLUMNS:
            if column not in _columns(conn, table):
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                added += 1
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    if added:
        log.info("study database migrated to schema %d (%d columns added)", SCHEMA_VERSION, added)
    return added


def read_results(path: str | Path) -> list[dict]:
    """Every result row as a dict with RESULT_COLUMNS (what the report reads)."""
    conn = connect(path)
    try:
        rows = conn.execute(f"SELECT {', '.join(RESULT_COLUMNS)} FROM results ORDER BY model, method, bits, task")
        return [dict(r) for r in rows]
    finally:
        conn.close()


def read_items(path: str | Path) -> list[dict]:
    """Every per-item row (ITEM_COLUMNS) of a database; [] for one written before schema 2."""
    conn = connect(path)
    try:
        return [dict(r) for r in conn.execute(f"SELECT {', '.join(ITEM_COLUMNS)} FROM items "
                                              "ORDER BY cell_key, task, item")]
    finally:
        conn.close()


def read_measures(path: str | Path) -> list[dict]:
    """Every measure row (MEASURE_COLUMNS, units decoded to a list) of a database."""
    conn = connect(path)
    try:
        rows = [dict(r) for r in conn.execute(f"SELECT {', '.join(MEASURE_COLUMNS)} FROM measures "
                                              "ORDER BY cell_key, measure, param")]
    finally:
        conn.close()
    for r in rows:
        r["units"] = json.loads(r["units"]) if r["units"] else []
    return rows


def read_cells(path: str | Path) -> list[dict]:
    """Every cells row as a dict (status, owner, threads, ...)."""
    conn = connect(path)
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM cells ORDER BY cell_key")]
    finally:
        conn.close()


# ----------------------------------------------------------------------------- claims
# A runner claims a cell before computing it: status running, owner "host:pid:random", heartbeat.
# A running claim is stale (and may be taken over) when its heartbeat is older than stale_after
# seconds or its owner's process is gone from this host. Every change is one BEGIN IMMEDIATE
# transaction, so two runners never both see a cell as free.
CLAIMED, DONE, BUSY, FAILED = "claimed", "done", "busy", "failed"


def new_owner() -> str:
    """A runner id: host, process and a random part (two runners in one process differ)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def owner_dead(owner: str | None) -> bool:
    """True when `owner` names a process on this host that no longer runs (other hosts: unknown, False)."""
    if not owner:
        return True
    parts = owner.split(":")
    if len(parts) < 2 or parts[0] != socket.gethostname():
        return False
    try:
        return not pid_alive(int(parts[1]))
    except ValueError:
        return False


@contextlib.contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction (BEGIN IMMEDIATE takes the write lock at once): commit, or roll back on error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def claim_cell(conn: sqlite3.Connection, cell_key: str, owner: str, *, model: str, method: str, bits: str,
               settings: Mapping, tasks: Sequence[str], stale_after: float = 120.0,
               retry_failed_before: float | None = None, now: float | None = None) -> str:
    """Try to claim a cell for `owner`. Returns CLAIMED (it is ours now), DONE (finished before), BUSY (a
    live runner holds it) or FAILED (it failed at or after `retry_failed_before`, i.e. in this run; a cell
    that failed earlier is claimed again)."""
    now = time.time() if now is None else now
    with immediate(conn):
        row = conn.execute("SELECT status, owner, heartbeat, finished FROM cells WHERE cell_key = ?",
                           (cell_key,)).fetchone()
        if row is None:
            conn.execute("INSERT INTO cells (cell_key, model, method, bits, settings, tasks, status, owner, heartbeat, "
                         "started) VALUES (?, ?, ?, ?, ?, ?, 'running', ?, ?, ?)",
                         (cell_key, model, method, bits, json.dumps(dict(settings), sort_keys=True),
                          json.dumps(list(tasks)), owner, now, now))
            return CLAIMED
        status = row["status"]
        if status == "done":
            return DONE
        if status == "running":
            stale = row["heartbeat"] is None or now - row["heartbeat"] > stale_after or owner_dead(row["owner"])
            if not stale:
                return BUSY
            log.warning("taking over the stale claim of %s on cell %s (last heartbeat %.0f s ago)", row["owner"],
                        cell_key[:12], now - (row["heartbeat"] or 0))
        elif status == "failed":
            if retry_failed_before is None or (row["finished"] or 0) >= retry_failed_before:
                return FAILED
        conn.execute("UPDATE cells SET status = 'running', owner = ?, heartbeat = ?, started = ?, finished = NULL, "
                     "error = NULL WHERE cell_key = ?", (owner, now, now, cell_key))
        return CLAIMED


def mark_unavailable(conn: sqlite3.Connection, cell_key: str, *, model: str, method: str, bits: str,
                     settings: Mapping, tasks: Sequence[str], reason: str, now: float | None = None) -> None:
    """Record a cell that cannot run because its model is not available (status 'unavailable', the reason in
    `error`), so the report can say which cells are missing and why; a cell done or running is left alone."""
    now = time.time() if now is None else now
    with immediate(conn):
        row = conn.execute("SELECT status FROM cells WHERE cell_key = ?", (cell_key,)).fetchone()
        if row is None:
            conn.execute("INSERT INTO cells (cell_key, model, method, bits, settings, tasks, status, finished, error) "
                         "VALUES (?, ?, ?, ?, ?, ?, 'unavailable', ?, ?)",
                         (cell_key, model, method, bits, json.dumps(dict(settings), sort_keys=True),
                          json.dumps(list(tasks)), now, reason))
        elif row["status"] not in ("done", "running"):
            conn.execute("UPDATE cells SET status = 'unavailable', owner = NULL, finished = ?, error = ? "
                         "WHERE cell_key = ?", (now, reason, cell_key))


def heartbeat(conn: sqlite3.Connection, cell_key: str, owner: str, now: float | None = None) -> bool:
    """Refresh our claim's heartbeat; False when the claim is no longer ours."""
    with immediate(conn):
        cur = conn.execute("UPDATE cells SET heartbeat = ? WHERE cell_key = ? AND owner = ? AND status = 'running'",
                           (time.time() if now is None else now, cell_key, owner))
        return cur.rowcount == 1


def finish_cell(conn: sqlite3.Connection, cell_key: str, owner: str, rows: Sequence[Mapping],
                now: float | None = None, *, items: Sequence[Mapping] = (), measures: Sequence[Mapping] = (),
                facts: Mapping | None = None) -> bool:
    """Write all result rows of a cell (and its per-item rows, its measures and the `facts` columns of its
    cells row: threads, calib_threads, measure_seconds) and mark it done, in one transaction. False (and
    nothing written) when the claim is no longer ours: whoever took it over writes the cell."""
    now = time.time() if now is None else now
    facts = {k: v for k, v in (facts or {}).items() if k in ("threads", "calib_threads", "measure_seconds")}
    with immediate(conn):
        sets = "".join(f", {k} = ?" for k in facts)
        cur = conn.execute(f"UPDATE cells SET status = 'done', finished = ?, heartbeat = ?, error = NULL{sets} "
                           "WHERE cell_key = ? AND owner = ? AND status = 'running'",
                           (now, now, *facts.values(), cell_key, owner))
        if cur.rowcount != 1:
            return False
        for table in ("results", "items", "measures", "units"):  # none expected but units; never two copies
            conn.execute(f"DELETE FROM {table} WHERE cell_key = ?", (cell_key,))
        cols = RESULT_COLUMNS
        conn.executemany(f"INSERT INTO results ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                         [tuple({**row, "cell_key": cell_key, "created": now}.get(c) for c in cols) for row in rows])
        counts: dict[str, int] = {}
        for it in items:
            counts[it["task"]] = counts.get(it["task"], 0) + 1
        conn.executemany("UPDATE results SET items = ? WHERE cell_key = ? AND task = ?",
                         [(k, cell_key, t) for t, k in counts.items()])
        conn.executemany(f"INSERT INTO items ({', '.join(ITEM_COLUMNS)}) VALUES ({', '.join('?' * len(ITEM_COLUMNS))})",
                         [(cell_key, str(it["task"]), str(it["item"]), None if it.get("answer") is None
                           else str(it["answer"]), int(bool(it["correct"]))) for it in items])
        conn.executemany(
            f"INSERT INTO measures ({', '.join(MEASURE_COLUMNS)}) VALUES ({', '.join('?' * len(MEASURE_COLUMNS))})",
            [(cell_key, str(m["measure"]), str(m.get("param", "")), m.get("value"), m.get("n"),
              json.dumps([float(u) for u in m.get("units", ())]), m.get("setup"), m.get("seconds"))
             for m in measures])
        return True


def _json_default(value):
    if hasattr(value, "item"):          # numpy / torch scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def save_unit(conn: sqlite3.Connection, cell_key: str, owner: str, unit: str, result) -> bool:
    """Keep a finished unit's result (JSON) while our claim on its cell runs; False when the claim is not ours."""
    text = json.dumps(result, default=_json_default)
    with immediate(conn):
        mine = conn.execute("SELECT 1 FROM cells WHERE cell_key = ? AND owner = ? AND status = 'running'",
                            (cell_key, owner)).fetchone()
        if not mine:
            return False
        conn.execute("INSERT OR REPLACE INTO units (cell_key, unit, result, created) VALUES (?, ?, ?, ?)",
                     (cell_key, unit, text, time.time()))
        return True


def unit_results(conn: sqlite3.Connection, cell_keys: Sequence[str]) -> dict[str, dict[str, object]]:
    """{cell_key: {unit: result}} of the finished units kept for the given cells."""
    out: dict[str, dict[str, object]] = {}
    keys = list(cell_keys)
    for i in range(0, len(keys), 500):
        chunk = keys[i:i + 500]
        for r in conn.execute(f"SELECT cell_key, unit, result FROM units WHERE cell_key IN "
                              f"({', '.join('?' * len(chunk))})", chunk):
            out.setdefault(r["cell_key"], {})[r["unit"]] = json.loads(r["result"])
    return out


def fail_cell(conn: sqlite3.Connection, cell_key: str, owner: str, error: str, now: float | None = None) -> bool:
    """Mark our claimed cell failed with `error`; False when the claim is no longer ours."""
    now = time.time() if now is None else now
    with immediate(conn):
        cur = conn.execute("UPDATE cells SET status = 'failed', finished = ?, error = ? "
                           "WHERE cell_key = ? AND owner = ? AND status = 'running'", (now, error, cell_key, owner))
        return cur.rowcount == 1


def release_cell(conn: sqlite3.Connection, cell_key: str, owner: str) -> bool:
    """Drop our running claim (on an interrupt), so the next run starts the cell at once."""
    with immediate(conn):
        cur = conn.execute("DELETE FROM cells WHERE cell_key = ? AND owner = ? AND status = 'running'",
                           (cell_key, owner))
        return cur.rowcount == 1


def cell_rows(conn: sqlite3.Connection, cell_keys: Sequence[str]) -> dict[str, dict]:
    """{cell_key: the cells row as a dict} for those of `cell_keys` the database has."""
    out: dict[str, dict] = {}
    keys = list(cell_keys)
    for i in range(0, len(keys), 500):  # SQLite's host-parameter limit
        chunk = keys[i:i + 500]
        for r in conn.execute(f"SELECT * FROM cells WHERE cell_key IN ({', '.join('?' * len(chunk))})", chunk):
            out[r["cell_key"]] = dict(r)
    return out


def results_of(conn: sqlite3.Connection, cell_keys: Sequence[str]) -> list[dict]:
    """The result rows of the given cells."""
    out: list[dict] = []
    keys = list(cell_keys)
    for i in range(0, len(keys), 500):
        chunk = keys[i:i + 500]
        out += [dict(r) for r in conn.execute(
            f"SELECT {', '.join(RESULT_COLUMNS)} FROM results WHERE cell_key IN ({', '.join('?' * len(chunk))})", chunk)]
    return out
