"""The measures against FP (issue 14): KL / agreement / ELBO / trajectory on a real (random) model, the paired
bootstrap, the findings decided on intervals, the store's schema migration, and rows that do not depend on the
thread count."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

import dllmq
from dllmq.diffusion.divergence import build_reference, compare, measure_windows
from dllmq.diffusion.trajectory import record_trajectory, teacher_forced_flips
from dllmq.study import findings as F
from dllmq.study import store
from dllmq.study.config import parse_study_config
from dllmq.study.evidence import build_evidence
from dllmq.study.measures import harness_items
from dllmq.study.report import build_report
from dllmq.study.runner import run_study
from dllmq.study.stats import Resampler, mean_interval, paired_delta, percentile_ci
from dllmq.study.verdicts import evaluate_findings, gptq_beats_awq, w4a4_severe


@pytest.fixture(scope="module")
def llada():
    model, tok, _ = dllmq.load_model("random-llada", dtype="float32")
    model.eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 250, (4000,), generator=gen)   # byte-level vocabulary, no special ids
    return model, tok, measure_windows(ids, 6, 48)


def noisy_copy(model, scale: float, seed: int = 0):
    """The model with Gaussian noise of `scale` x each weight's std added to every block linear."""
    import copy
    q = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in q.named_parameters():
            if p.dim() == 2 and ("blocks" in name or "layers" in name):
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * scale)
    return q


# --- the measures on a model ------------------------------------------------------------------------------

def test_fp_against_itself_is_exactly_zero(llada):
    model, tok, windows = llada
    ref = build_reference(model, windows, elbo_mc=2, batch_size=4)
    d = compare(model, ref)
    assert all(v == 0.0 for r in ref.ratios for v in d.kl[r])          # exactly, not approximately
    assert all(v == 1.0 for r in ref.ratios for v in d.top1[r])
    assert d.nll_delta == [0.0] * len(windows)
    prompts = torch.randint(3, 250, (3, 10), generator=torch.Generator().manual_seed(2))
    traj = record_trajectory(model, prompts, gen_length=8, steps=8, block_length=4)
    assert traj.steps == 8 and teacher_forced_flips(model, traj) == [[0] * 8] * 3


def test_kl_grows_monotonically_with_planted_weight_noise(llada):
    model, _, windows = llada
    ref = build_reference(model, windows, elbo_mc=0, batch_size=8)
    scales = (0.01, 0.03, 0.1, 0.3)
    kl = {s: compare(noisy_copy(model, s), ref).kl for s in scales}
    for r in ref.ratios:
        means = [float(np.mean(kl[s][r])) for s in scales]
        assert all(a < b for a, b in zip(means, means[1:])), (r, means)
        assert means[0] > 0


def test_masks_are_shared_nested_and_batch_size_does_not_change_values(llada):
    model, _, windows = llada
    a = build_reference(model, windows, elbo_mc=2, batch_size=2)
    b = build_reference(model, windows, elbo_mc=2, batch_size=6)
    for m_small, m_large in zip(a.kl_masks, a.kl_masks[1:]):
        assert bool((m_small <= m_large).all())                       # ratio r's masks inside the next ratio's
    assert all(torch.equal(x, y) for x, y in zip(a.kl_masks, b.kl_masks)) and torch.equal(a.elbo_masks, b.elbo_masks)
    q = noisy_copy(model, 0.1)
    assert compare(q, a).kl == compare(q, b).kl and a.nll == b.nll


def test_a_coarsened_reference_is_a_lower_bound_that_keeps_zero(llada):
    model, _, windows = llada
    full = build_reference(model, windows, elbo_mc=0)
    small = build_reference(model, windows, elbo_mc=0, max_reference_bytes=200_000)   # forces top-k + rest
    assert any(t is not None for t in small.top_index)
    assert all(v == 0.0 for r in small.ratios for v in compare(model, small).kl[r])
    q = noisy_copy(model, 0.3)
    kf, ks = compare(q, full).kl, compare(q, small).kl
    for r in full.ratios:
        assert all(0 < s <= f + 1e-7 for s, f in zip(ks[r], kf[r]))     # data processing: coarser, smaller


# --- statistics --------------------------------------------------------------------------------------------

def test_paired_bootstrap_covers_the_true_difference_at_the_nominal_rate():
    """300 synthetic studies of 100 paired items (FP right 40 %, each answer flipped with probability 0.15):
    the 95 % interval of the accuracy difference contains the true one about 95 % of the time."""
    hits, trials, n, flip = 0, 300, 100, 0.15
    true = 0.4 - (0.4 * (1 - flip) + 0.6 * flip)
    for seed in range(trials):
        rng = np.random.default_rng(seed)
        a = (rng.random(n) < 0.4).astype(float)
        b = np.where(rng.random(n) < flip, 1 - a, a)
        lo, hi = percentile_ci(Resampler({"u": n}, reps=500, seed=seed).mean("u", a - b))
        hits += lo <= true <= hi
    assert 0.91 <= hits / trials <= 0.98, hits / trials


def test_pairing_narrows_the_interval_and_intervals_are_seeded():
    rng = np.random.default_rng(0)
    a = rng.normal(size=200)
    b = a + 0.1 + rng.normal(scale=0.05, size=200)     # strongly paired
    paired = paired_delta(b, a)
    unpaired_width = 2 * 1.96 * np.sqrt(a.var() / 200 + b.var() / 200)
    assert paired.lo > 0 and paired.hi - paired.lo < unpaired_width / 5
    assert mean_interval(list(a), seed=3) == mean_interval(list(a), seed=3)


# --- findings decided by intervals ---------------------------------------------------------------------------

def synthetic(effect: float, kl_effect: float, n_items: int = 100, windows: int = 16, seed: int = 0):
    """rows / items / measures of one model: FP, GPTQ and AWQ at W4A16, SmoothQuant / QuaRot / DuQuant at W4A4.
    AWQ's KL exceeds GPTQ's by `kl_effect`; each W4A4 cell flips right answers to wrong with probability
    `effect`."""
    rng = np.random.default_rng(seed)
    tasks = {"mini_general": "general", "mini_math": "math", "mini_code": "code"}
    fp_correct = {t: rng.random(n_items) < 0.5 for t in tasks}
    base = rng.gamma(2.0, 0.005, size=windows)                  # window difficulty, shared by every setting
    settings = {("fp", "FP"): (0.0, 0.0), ("gptq", "W4A16"): (0.02, 0.0), ("awq", "W4A16"): (0.02, kl_effect),
                ("smoothquant", "W4A4"): (effect, 0.0), ("quarot", "W4A4"): (effect, 0.0),
                ("duquant", "W4A4"): (effect, 0.0)}
    rows, items, measures = [], [], []
    for (method, bits), (p_flip, dkl) in settings.items():
        key = f"m|{method}|{bits}"
        for t in tasks:
            right = fp_correct[t] & ~(rng.random(n_items) < p_flip) if method != "fp" else fp_correct[t]
            rows.append(dict(cell_key=key, model="m", method=method, bits=bits, task=t, category=tasks[t],
                             metric="acc", value=float(right.mean()), stderr=0.05, n=n_items, seed=0, created=1.0))
            items += [dict(cell_key=key, task=t, item=f"{t}/{i}", answer=str(int(r)), correct=int(r))
                      for i, r in enumerate(right)]
        kl = np.zeros(windows) if method == "fp" else base * (1 + rng.normal(0, 0.1, windows)) + dkl
        measures.append(dict(cell_key=key, measure="kl", param="0.5", value=float(kl.mean()), n=windows,
                             units=list(kl), setup="s"))
    return rows, items, measures


def _verdict(check, effect, kl_effect, seed=0):
    rows, items, measures = synthetic(effect, kl_effect, seed=seed)
    return check(build_evidence(rows, items, measures)["m"], "m")


def test_a_finding_goes_from_inconclusive_to_holds_as_the_planted_effect_grows():
    assert _verdict(gptq_beats_awq, 0.0, 0.0).status == F.INCONCLUSIVE
    assert _verdict(gptq_beats_awq, 0.0, 0.00005).status == F.INCONCLUSIVE   # far below the window noise
    big = _verdict(gptq_beats_awq, 0.0, 0.01)
    assert big.status == F.HOLDS and big.metric.startswith("KL@0.5") and "difference" in big.evidence
    assert _verdict(gptq_beats_awq, 0.0, -0.01).status == F.DOES_NOT_HOLD
    # an accuracy claim: W4A4 loses a little (undecided whether severe) ... or a lot (severe)
    assert _verdict(w4a4_severe, 0.09, 0.0).status == F.INCONCLUSIVE
    assert _verdict(w4a4_severe, 0.6, 0.0).status == F.HOLDS
    assert _verdict(w4a4_severe, 0.0, 0.0).status == F.DOES_NOT_HOLD


def test_findings_name_their_metric_and_fall_back_to_points_without_items():
    rows, items, measures = synthetic(0.6, 0.01)
    found = {f.key: f for f in evaluate_findings({"m": {}}, build_evidence(rows, items, measures))}
    assert found["gptq_beats_awq"].status == F.HOLDS and "KL@0.5" in found["gptq_beats_awq"].metric
    assert found["w4a4_severe"].status == F.HOLDS and "accuracy drop" in found["w4a4_severe"].metric
    report = build_report(rows, plots=False)           # no items given: the point rules, no "decided by"
    assert all(not f.metric for f in report.findings) and "decided by" not in report.markdown


def test_flips_are_counted_against_fp_item_by_item():
    rows, items, measures = synthetic(0.0, 0.0)
    # plant: AWQ gets the first 10 right items of mini_math wrong and the first 3 wrong ones right
    fp = {it["item"]: it["correct"] for it in items if it["cell_key"] == "m|fp|FP" and it["task"] == "mini_math"}
    right = [i for i, c in fp.items() if c][:10]
    wrong = [i for i, c in fp.items() if not c][:3]
    for it in items:
        if it["cell_key"] == "m|awq|W4A16" and it["task"] == "mini_math":
            it["correct"] = fp[it["item"]]
            it["correct"] = 0 if it["item"] in right else 1 if it["item"] in wrong else it["correct"]
            it["answer"] = str(it["correct"])
    ev = build_evidence(rows, items, measures)["m"].settings[("awq", "W4A16")]
    flips = ev.flips["mini_math"]
    assert flips["right_to_wrong"].value == pytest.approx(0.10) and flips["wrong_to_right"].value == pytest.approx(0.03)
    assert flips["changed"].value == pytest.approx(0.13)
    assert ev.drop["mini_math"].value == pytest.approx(7.0)


def test_harness_samples_become_items():
    mc = [{"doc_id": 0, "filter": "none", "acc": 1.0, "filtered_resps": [[-3.0, False], [-1.0, True]]},
          {"doc_id": 1, "filter": "none", "acc": 0.0, "filtered_resps": [[-0.5, True], [-2.0, False]]}]
    assert harness_items("arc_easy", mc, "acc,none") == [
        {"task": "arc_easy", "item": "arc_easy/0", "answer": "1", "correct": True},
        {"task": "arc_easy", "item": "arc_easy/1", "answer": "0", "correct": False}]
    gen = [{"doc_id": 3, "filter": "strict-match", "exact_match": 0.0, "filtered_resps": ["[invalid]"]},
           {"doc_id": 3, "filter": "flexible-extract", "exact_match": 1.0, "filtered_resps": ["42"]}]
    assert harness_items("gsm8k", gen, "exact_match,flexible-extract") == [
        {"task": "gsm8k", "item": "gsm8k/3", "answer": "42", "correct": True}]


# --- the store ------------------------------------------------------------------------------------------------

V1_SCHEMA = """
CREATE TABLE cells (cell_key TEXT PRIMARY KEY, model TEXT NOT NULL, method TEXT NOT NULL, bits TEXT NOT NULL,
    settings TEXT NOT NULL, tasks TEXT NOT NULL, status TEXT NOT NULL, owner TEXT, heartbeat REAL, started REAL,
    finished REAL, error TEXT);
CREATE TABLE results (cell_key TEXT NOT NULL REFERENCES cells(cell_key), model TEXT NOT NULL, method TEXT NOT NULL,
    bits TEXT NOT NULL, task TEXT NOT NULL, category TEXT NOT NULL, metric TEXT NOT NULL, value REAL NOT NULL,
    stderr REAL, n INTEGER, seed INTEGER, quant_seconds REAL, eval_seconds REAL, created REAL NOT NULL,
    PRIMARY KEY (cell_key, task));
"""


def test_an_old_database_is_migrated_in_place_and_still_reports(tmp_path):
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    conn.executescript(V1_SCHEMA)
    for method, bits, value in (("fp", "FP", 0.5), ("rtn", "W4A16", 0.45)):
        key = f"k-{method}"
        conn.execute("INSERT INTO cells VALUES (?, 'toy', ?, ?, '{}', '[]', 'done', NULL, NULL, NULL, NULL, NULL)",
                     (key, method, bits))
        conn.execute("INSERT INTO results VALUES (?, 'toy', ?, ?, 'mini_math', 'math', 'exact_match', ?, 0.05, 100, "
                     "0, 1.0, 1.0, 1.7e9)", (key, method, bits, value))
    conn.commit()
    conn.close()
    report = build_report(db, plots=False)                       # opens (and migrates) the old database
    assert "(-5.0 !!)" in report.markdown and report.facts.decided is None
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION
    cols = {r[1] for r in conn.execute("PRAGMA table_info(cells)")}
    assert {"threads", "calib_threads", "measure_seconds"} <= cols
    assert conn.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 2      # nothing lost
    conn.close()
    assert store.migrate(store.connect(db)) == 0                  # idempotent


# --- the runner: items and measures stored, the same rows at any thread count -----------------------------------

@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    from dllmq.data import heldout_text
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(heldout_text("wiki")[:20_000])
    return str(path)


def _grid(calib: str, threads: int | None) -> dict:
    # GPTQ: its Hessian products are where a thread count could change the numbers (pinned by the runner)
    return {"models": ["random-llada"], "tasks": ["mini_general", "mini_math"], "limit": 2,
            "methods": ["fp", {"name": "gptq", "bits": ["W4A16-g128"]}],
            "calibration": {"calib": calib, "nsamples": 4, "seqlen": 64},
            "measures": {"windows": 3, "seqlen": 32, "elbo_mc": 2, "trajectory": 2}, "threads": threads}


def _dump(db: Path) -> dict:
    conn = sqlite3.connect(db)
    try:
        return {"results": sorted(conn.execute("SELECT cell_key, task, value, stderr, n FROM results")),
                "items": sorted(conn.execute("SELECT * FROM items")),
                "measures": sorted(conn.execute("SELECT cell_key, measure, param, value, n, units, setup FROM measures")),
                "threads": sorted(conn.execute("SELECT threads, calib_threads FROM cells"), key=repr)}
    finally:
        conn.close()


def test_rows_are_identical_whatever_the_thread_count(tmp_path, calib_file):
    before = torch.get_num_threads()
    dumps = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(3 - threads)    # the process's own count differs too
            db = tmp_path / f"t{threads}.db"
            summary = run_study(parse_study_config(_grid(calib_file, threads)), db, None, progress=False)
            assert summary.ok, [o.error for o in summary.outcomes]
            dumps.append(_dump(db))
    finally:
        torch.set_num_threads(before)
    one, two = dumps
    assert one["threads"] != two["threads"]                   # recorded: 1 and 2 ...
    for part in ("results", "items", "measures"):            # ... and nothing else differs
        assert one[part] == two[part], part
    fp_kl = [json.loads(m[5]) for m in one["measures"] if m[1] == "kl" and m[3] == 0.0]
    assert fp_kl and all(u == [0.0] * 3 for u in fp_kl)       # FP against itself: exactly zero
    assert len(one["items"]) == 2 * 2 * 2                     # every item of every task of every cell
    report = build_report(tmp_path / "t1.db", plots=True)
    assert "Against FP, paired" in report.markdown and "kl_vs_mask_ratio.png" in report.images
    ev = report.facts.evidence["random-llada"]
    assert ev.settings[("gptq", "W4A16")].flips["all"]["changed"].value >= 0
    assert all(f.metric for f in report.findings if f.status != F.NOT_MEASURED)


def test_the_cli_runs_several_runners_on_one_grid(tmp_path, calib_file):
    import yaml
    from dllmq.cli.study import main as study_main

    spec = _grid(calib_file, None)
    spec["methods"] = ["fp", {"name": "rtn", "bits": ["W4A16-g128", "W8A8"]}]
    spec["tasks"] = ["mini_math"]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    db = tmp_path / "runs.db"
    argv = ["--config", str(tmp_path / "s.yaml"), "--db", str(db), "--no-cache", "--threads", "1"]
    assert study_main(argv + ["--workers", "2"]) == 0
    cells = store.read_cells(db)
    assert len(cells) == 3 and {c["status"] for c in cells} == {"done"} and {c["threads"] for c in cells} == {1}
    assert study_main(argv + ["--workers", "0"]) == 2                    # refused in one sentence


def test_report_kl_ratio_flag_is_checked(tmp_path, capsys):
    from dllmq.cli import main
    rows, items, measures = synthetic(0.0, 0.01)
    db = tmp_path / "r.db"
    conn = store.connect(db)
    for key in sorted({r["cell_key"] for r in rows}):
        r = next(x for x in rows if x["cell_key"] == key)
        store.claim_cell(conn, key, "me", model=r["model"], method=r["method"], bits=r["bits"], settings={}, tasks=[])
        store.finish_cell(conn, key, "me", [x for x in rows if x["cell_key"] == key],
                          items=[i for i in items if i["cell_key"] == key],
                          measures=[m for m in measures if m["cell_key"] == key])
    conn.close()
    assert main(["report", "--db", str(db), "--kl-ratio", "0"]) == 2
    assert "--kl-ratio must be a mask ratio" in capsys.readouterr().err
    assert main(["report", "--db", str(db), "--kl-ratio", "0.4"]) == 0      # the nearest measured ratio: 0.5
    out = capsys.readouterr().out
    assert "KL@0.5" in out and "findings decided with 95 % confidence" in out
