"""The dLLM-aware ablation table: each option's cell against the clean-text cell with the same settings."""
import json

import numpy as np
import pytest

from dllmq.study.ablation import NOT_REACHED, REACHED, UNDECIDED, ablation_rows, dllm_options
from dllmq.study.evidence import build_evidence
from dllmq.study.report import ablation_table, build_report

BASE = {"method": "gptq", "wbits": 3, "damp": 0.05, "seed": 0}
VARIANTS = {  # label -> (extra settings, KL multiplier, right answers turned wrong)
    "gptq": ({}, 1.0, 0),
    "gptq-masked": ({"mask_schedule": "uniform"}, 0.7, 0),
    "gptq-weighted": ({"mask_schedule": "uniform", "weighting": "masked=1,unmasked=0.5"}, 0.95, 4),
    "gptq-damp": ({"damp": 0.1}, 0.5, 0),                      # not dLLM-aware: a baseline of its own
    "gptq-damp-masked": ({"damp": 0.1, "mask_schedule": "uniform"}, 0.3, 0),
    "gptq-orphan": ({"damp": 0.2, "mask_schedule": "uniform"}, 0.3, 0),  # no clean-text twin: no row
}


def study(windows=16, n_items=60, seed=0):
    rng = np.random.default_rng(seed)
    base_kl = rng.gamma(2.0, 0.005, size=windows)
    fp_right = rng.random(n_items) < 0.6
    cells, rows, items, measures = [], [], [], []
    for label, (extra, kl_mult, r2w) in {"fp": ({}, 0.0, 0), **VARIANTS}.items():
        key = f"m|{label}"
        settings = {} if label == "fp" else {**BASE, **extra}
        bits = "FP" if label == "fp" else "W3A16"
        cells.append(dict(cell_key=key, model="m", method=label, bits=bits, settings=json.dumps(settings),
                          status="done"))
        right = fp_right.copy()
        right[np.flatnonzero(right)[:r2w]] = False
        rows.append(dict(cell_key=key, model="m", method=label, bits=bits, task="mini_math", category="math",
                         metric="acc", value=float(right.mean()), stderr=0.05, n=n_items, seed=0, created=1.0))
        items += [dict(cell_key=key, task="mini_math", item=str(i), answer=str(int(r)), correct=int(r))
                  for i, r in enumerate(right)]
        kl = base_kl * kl_mult * (1 + (0 if label == "fp" else rng.normal(0, 0.02, windows)))
        measures.append(dict(cell_key=key, measure="kl", param="0.5", value=float(kl.mean()), n=windows,
                             units=list(kl), setup="s"))
    return cells, rows, items, measures


def test_options_are_read_from_settings():
    assert dllm_options({"mask_schedule": "none", "weighting": "none", "calib_windows": "random"}) == {}
    assert dllm_options({"mask_schedule": "uniform", "calib_windows": "chat"}) == \
        {"mask_schedule": "uniform", "calib_windows": "chat"}


def test_each_option_is_paired_with_its_clean_text_twin_and_the_change_is_hand_computable():
    cells, rows, items, measures = study()
    ev = build_evidence(rows, items, measures)
    found = {r.variant.method: r for r in ablation_rows(cells, ev)}
    assert set(found) == {"gptq-masked", "gptq-weighted", "gptq-damp-masked"}    # the orphan has no baseline
    assert found["gptq-masked"].baseline.method == "gptq"
    assert found["gptq-damp-masked"].baseline.method == "gptq-damp"             # same damp: its own baseline
    kl = {m["cell_key"].split("|")[1]: np.mean(m["units"]) for m in measures}
    masked = found["gptq-masked"].kl_change[0.5]
    assert masked.value == pytest.approx(kl["gptq-masked"] / kl["gptq"] - 1)
    assert masked.ci().hi < 0 and masked.value == pytest.approx(-0.3, abs=0.02)
    # accuracy: 4 right answers of 60 turned wrong -> the drop grows by 4/60 of 100 points, paired exactly
    weighted = found["gptq-weighted"]
    assert weighted.drop.value == pytest.approx(100 * 4 / 60)
    assert weighted.right_to_wrong.value == pytest.approx(4 / 60)
    assert found["gptq-masked"].drop.value == 0.0


def test_the_goal_verdict_follows_the_interval():
    cells, rows, items, measures = study()
    found = {r.variant.method: r for r in ablation_rows(cells, build_evidence(rows, items, measures))}
    assert found["gptq-masked"].goal(0.5) == REACHED          # -30 % with a tight interval
    assert found["gptq-weighted"].goal(0.5) == NOT_REACHED    # -5 %
    assert found["gptq-damp-masked"].goal(0.5) == REACHED     # 0.3 / 0.5 - 1 = -40 %
    # -20 % on average but window by window -52 % or +12 %: the interval straddles the goal
    cells, rows, items, measures = study(windows=8)
    units = {m["cell_key"]: m for m in measures}
    damp = np.asarray(units["m|gptq-damp"]["units"])
    units["m|gptq-damp-masked"]["units"] = list(damp * 0.8 * np.array([0.6, 1.4] * 4))
    found = {r.variant.method: r for r in ablation_rows(cells, build_evidence(rows, items, measures))}
    assert found["gptq-damp-masked"].goal(0.5) == UNDECIDED


def test_the_report_shows_the_table(tmp_path):
    from dllmq.study.store import connect
    cells, rows, items, measures = study()
    db = tmp_path / "s.db"
    conn = connect(db)
    with conn:
        for c in cells:
            conn.execute("INSERT INTO cells (cell_key, model, method, bits, settings, tasks, status) "
                         "VALUES (?, ?, ?, ?, ?, '[]', 'done')",
                         (c["cell_key"], c["model"], c["method"], c["bits"], c["settings"]))
        for r in rows:
            conn.execute("INSERT INTO results (cell_key, model, method, bits, task, category, metric, value, stderr,"
                         " n, seed, created) VALUES (:cell_key, :model, :method, :bits, :task, :category, :metric,"
                         " :value, :stderr, :n, :seed, :created)", r)
        conn.executemany("INSERT INTO items (cell_key, task, item, answer, correct) VALUES "
                         "(:cell_key, :task, :item, :answer, :correct)", items)
        for m in measures:
            conn.execute("INSERT INTO measures (cell_key, measure, param, value, n, units, setup) VALUES "
                         "(?, ?, ?, ?, ?, ?, ?)", (m["cell_key"], m["measure"], m["param"], m["value"], m["n"],
                                                   json.dumps(m["units"]), m["setup"]))
    conn.close()
    report = build_report(db, plots=False)
    assert "## dLLM-aware calibration against clean text" in report.markdown
    head, body = ablation_table(report.facts.ablation, 0.5)
    assert head[:4] == ["model", "setting", "vs", "options"] and len(body) == 3
    line = next(line for line in report.markdown.splitlines() if "mask_schedule=uniform, weighting=" in line)
    assert "not reached" in line
    assert "dLLM-aware calibration against clean text" in report.html
