"""The study report: degradation classes, category averages, the paper's findings (each both ways and
unmeasured), the self-contained HTML, the Markdown legend, and the `report` command."""
import argparse
import base64
import json
import re
import sqlite3
from pathlib import Path

import pytest

from dllmq.cli.report import add_parser, run
from dllmq.errors import DllmqError
from dllmq.study import findings as F
from dllmq.study.grid import (AVG, MODERATE, NEGLIGIBLE, SEVERE, Setting, build_tables, classify, normalize,
                              parse_bits)
from dllmq.study.report import MARKERS, build_report, terminal_report
from dllmq.study.store import connect, task_category

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- helpers --------------------------------------------------------------------------------------------

def row(model, method, bits, task, value, stderr=0.01, n=100, created=1.7e9, cell_key=None, seed=0):
    return dict(cell_key=cell_key or f"{model}|{method}|{bits}|{seed}", model=model, method=method, bits=bits,
                task=task, category=task_category(task), metric="acc", value=value, stderr=stderr, n=n, seed=seed,
                quant_seconds=1.0, eval_seconds=1.0, created=created)


def write_db(path: Path, rows: list[dict]) -> Path:
    """A study database filled directly through the store's schema."""
    conn = connect(path)
    try:
        for key in dict.fromkeys(r["cell_key"] for r in rows):
            r = next(x for x in rows if x["cell_key"] == key)
            conn.execute("INSERT INTO cells (cell_key, model, method, bits, settings, tasks, status) "
                         "VALUES (?, ?, ?, ?, '{}', '[]', 'done')", (key, r["model"], r["method"], r["bits"]))
        for r in rows:
            cols = list(r)
            conn.execute(f"INSERT INTO results ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                         [r[c] for c in cols])
    finally:
        conn.close()
    return path


# FP: general (mmlu 60, arc_easy 80) avg 70, math (gsm8k) 50, code (humaneval) 30, overall 50.
FP = {"mmlu": 0.60, "arc_easy": 0.80, "gsm8k": 0.50, "humaneval": 0.30}
GPTQ4 = {"mmlu": 0.58, "arc_easy": 0.79, "gsm8k": 0.45, "humaneval": 0.31}


def small_rows(model="toy", settings=None):
    settings = settings or {("fp", "FP"): FP, ("gptq", "W4A16"): GPTQ4}
    return [row(model, m, b, t, v) for (m, b), values in settings.items() for t, v in values.items()]


def shifted(base: dict, drop_points: dict) -> dict:
    """`base` with each category's tasks lowered by the given number of points."""
    return {t: v - drop_points.get(task_category(t), 0.0) / 100 for t, v in base.items()}


def paper_like_rows(model: str, scale: float = 1.0) -> list[dict]:
    """A full grid whose numbers follow every finding of the paper (scale < 1: a more robust model)."""
    drops = {("gptq", "W4A16"): 0.5, ("awq", "W4A16"): 2.0, ("rtn", "W4A16"): 1.5,
             ("gptq", "W3A16"): 6.0, ("awq", "W3A16"): 8.0,
             ("smoothquant", "W8A8"): 0.3, ("quarot", "W8A8"): 0.2, ("duquant", "W8A8"): 0.1,
             ("smoothquant", "W4A4"): 30.0, ("quarot", "W4A4"): 6.6, ("duquant", "W4A4"): 5.1}
    settings = {("fp", "FP"): FP}
    for key, d in drops.items():  # math and code lose twice what general loses
        settings[key] = shifted(FP, {"general": d * scale * 0.5, "math": d * scale, "code": d * scale * 1.5})
    return small_rows(model, settings)


# --- classification ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("drop, expected", [
    (0.0, NEGLIGIBLE), (0.99, NEGLIGIBLE), (1.0, MODERATE), (2.5, MODERATE), (4.0, MODERATE), (4.01, SEVERE),
    (30.0, SEVERE), (-3.0, NEGLIGIBLE), (-10.0, NEGLIGIBLE)])
def test_classification_edges(drop, expected):
    assert classify(drop) == expected


def test_classification_ignores_float_noise_at_the_edges():
    assert 100 * (0.45 - 0.41) > 4.0 and 100 * (0.11 - 0.10) < 1.0   # binary floating point
    assert classify(100 * (0.45 - 0.41)) == MODERATE                 # still 4 points: moderate
    assert classify(100 * (0.11 - 0.10)) == MODERATE                 # still 1 point: moderate


def test_displayed_change_never_contradicts_its_class():
    for k in range(-600, 1200):
        drop = k / 137.0
        text = F.signed(drop)
        assert classify(-float(text)) == classify(drop), (drop, text)
    assert F.signed(2.14) == "-2.1" and F.signed(-0.3) == "+0.3" and F.signed(0.0) == "0.0"
    assert F.signed(0.96) == "-0.96"  # not a negligible '-1.0'


def test_bits_labels_and_the_papers_row_order():
    assert parse_bits("W4A16-g128") == (4, 16) and parse_bits("w3") == (3, 16) and parse_bits("W8A8") == (8, 8)
    assert parse_bits("FP") is None
    expected = [("fp", "FP"), ("rtn", "W4A16"), ("gptq", "W4A16"), ("awq", "W4A16"), ("rtn", "W3A16"),
                ("gptq", "W3A16"), ("awq", "W3A16"), ("smoothquant", "W8A8"), ("quarot", "W8A8"),
                ("duquant", "W8A8"), ("smoothquant", "W4A4"), ("quarot", "W4A4"), ("duquant", "W4A4")]
    shuffled = expected[5:] + expected[:5][::-1]
    assert sorted(shuffled, key=lambda s: Setting(*s).sort_key()) == expected


# --- tables ---------------------------------------------------------------------------------------------

def test_category_averages_and_drops_on_a_hand_computed_table():
    [table] = build_tables(normalize(small_rows())[0])
    assert table.tasks == ["mmlu", "arc_easy", "gsm8k", "humaneval"]
    assert table.categories == ["general", "math", "code"]
    fp, gptq = table.rows
    assert fp.setting.is_fp and gptq.setting == Setting("gptq", "W4A16")
    assert fp.categories["general"].value == pytest.approx(70.0) and fp.overall.value == pytest.approx(50.0)
    assert fp.overall.drop is None  # FP has no drop against itself
    # general: (58 + 79) / 2 = 68.5 -> drop 1.5; math 45 -> 5; code 31 -> a gain of 1
    g, m, c = (gptq.categories[k] for k in ("general", "math", "code"))
    assert g.value == pytest.approx(68.5) and g.drop == pytest.approx(1.5) and g.severity == MODERATE
    assert m.drop == pytest.approx(5.0) and m.severity == SEVERE
    assert c.drop == pytest.approx(-1.0) and c.severity == NEGLIGIBLE
    # overall = mean of category averages (each category weighs the same): (68.5 + 45 + 31) / 3
    assert gptq.overall.value == pytest.approx((68.5 + 45 + 31) / 3)
    assert gptq.overall.drop == pytest.approx((1.5 + 5.0 - 1.0) / 3) and gptq.overall.severity == MODERATE
    assert gptq.tasks["arc_easy"].drop == pytest.approx(1.0) and gptq.tasks["arc_easy"].severity == MODERATE
    # stderr: 1 point per task; a mean of two independent tasks has 1/sqrt(2); a drop adds FP's in quadrature
    assert gptq.tasks["mmlu"].stderr == pytest.approx(1.0)
    assert g.stderr == pytest.approx(2 ** -0.5) and g.drop_stderr == pytest.approx(1.0)
    assert table.drops() == {("gptq", "W4A16"): pytest.approx(
        {"general": 1.5, "math": 5.0, "code": -1.0, AVG: 5.5 / 3})}


def test_missing_tasks_leave_averages_unmeasured_and_extra_tasks_out_of_them():
    rows = small_rows(settings={("fp", "FP"): FP, ("gptq", "W4A16"): {k: GPTQ4[k] for k in ("mmlu", "gsm8k")}})
    rows.append(row("toy", "gptq", "W4A16", "mbpp", 0.2))  # a task FP never ran
    [table] = build_tables(normalize(rows)[0])
    gptq = table.rows[1]
    assert gptq.categories["general"].value is None and gptq.categories["general"].drop is None  # arc_easy missing
    assert gptq.categories["math"].drop == pytest.approx(5.0)
    assert gptq.categories["code"].value is None   # humaneval missing; mbpp has no FP so it is not averaged
    assert gptq.tasks["mbpp"].value == pytest.approx(20.0) and gptq.tasks["mbpp"].drop is None
    assert gptq.overall.value is None
    assert any("mbpp" in n for n in table.notes)
    assert table.drops() == {("gptq", "W4A16"): pytest.approx({"math": 5.0})}


def test_reruns_keep_the_newest_and_seeds_are_averaged():
    rows = small_rows() + [row("toy", "gptq", "W4A16", "gsm8k", 0.10, created=1.6e9, cell_key="old"),
                           row("toy", "gptq", "W4A16", "mmlu", 0.30, created=1.8e9, cell_key="new"),
                           row("toy", "gptq", "W4A16", "arc_easy", 0.71, stderr=0.02, seed=1)]
    ms, superseded = normalize(rows)
    assert superseded == 2
    [table] = build_tables(ms)
    gptq = table.rows[1].tasks
    assert gptq["gsm8k"].value == pytest.approx(45.0)   # the older re-run (10.0) lost
    assert gptq["mmlu"].value == pytest.approx(30.0)    # the newer re-run (30.0) won
    assert gptq["arc_easy"].value == pytest.approx((79.0 + 71.0) / 2)            # seeds 0 and 1: their mean
    assert gptq["arc_easy"].stderr == pytest.approx((1.0 ** 2 + 2.0 ** 2) ** 0.5 / 2)
    assert "seeds: 0, 1" in build_report(rows, plots=False).markdown


# --- findings -------------------------------------------------------------------------------------------

def d(avg, **cats):
    return {AVG: avg, **cats}


@pytest.mark.parametrize("check, holds, fails, unmeasured", [
    (F.sweet_spot_w4,
     {("gptq", "W4A16"): d(0.5), ("awq", "W4A16"): d(2.0), ("gptq", "W3A16-g128"): d(6.0)},
     {("gptq", "W4A16"): d(0.5), ("gptq", "W3A16"): d(1.4)},       # 3-bit only 0.9 worse
     {("gptq", "W4A16"): d(0.5), ("smoothquant", "W8A8"): d(0.1)}),  # no W3A16
    (F.w8a8_near_lossless,
     {("smoothquant", "W8A8"): d(0.3), ("quarot", "W8A8"): d(-0.2), ("duquant", "W8A8"): d(0.99)},
     {("smoothquant", "W8A8"): d(0.3), ("duquant", "W8A8"): d(1.0)},  # 1.0 is moderate
     {("gptq", "W4A16"): d(0.5)}),
    (F.w4a4_severe,
     {("smoothquant", "W4A4"): d(30.0), ("quarot", "W4A4"): d(6.6), ("duquant", "W4A4"): d(3.0)},  # 2 of 3
     {("smoothquant", "W4A4"): d(30.0), ("duquant", "W4A4"): d(4.0)},  # 1 of 2 is not more than half
     {("smoothquant", "W8A8"): d(0.3)}),
    (F.gptq_beats_awq,
     {("gptq", "W4A16"): d(0.3), ("awq", "W4A16"): d(3.5)},
     {("gptq", "W4A16"): d(2.0), ("awq", "W4A16"): d(2.0)},          # a tie is not a win
     {("gptq", "W4A16"): d(0.3), ("awq", "W3A16"): d(3.5)}),
    (F.rotation_beats_smoothing,
     {("smoothquant", "W4A4"): d(30.0), ("quarot", "W4A4"): d(6.6), ("duquant", "W4A4"): d(5.1)},
     {("smoothquant", "W4A4"): d(6.0), ("quarot", "W4A4"): d(6.6), ("duquant", "W4A4"): d(5.1)},
     {("quarot", "W4A4"): d(6.6), ("duquant", "W4A4"): d(5.1)}),
    (F.duquant_beats_quarot,
     {("quarot", "W4A4"): d(6.6), ("duquant", "W4A4"): d(5.1)},
     {("quarot", "W4A4"): d(5.1), ("duquant", "W4A4"): d(6.6)},
     {("duquant", "W4A4"): d(5.1), ("quarot", "W8A8"): d(0.1)}),
    (F.math_code_degrade_more,
     {("gptq", "W4A16"): d(1, general=0.5, math=1.0, code=1.5), ("gptq", "W3A16"): d(5, general=2, math=6, code=7)},
     {("gptq", "W4A16"): d(1, general=0.5, math=1.0, code=0.2), ("gptq", "W3A16"): d(5, general=2, math=6, code=2)},
     {("gptq", "W4A16"): d(1, general=0.5)}),
])
def test_each_finding_holds_fails_and_is_not_measured(check, holds, fails, unmeasured):
    yes, no, unknown = check(holds, "m"), check(fails, "m"), check(unmeasured, "m")
    assert yes.status == F.HOLDS, yes
    assert no.status == F.DOES_NOT_HOLD, no
    assert unknown.status == F.NOT_MEASURED, unknown
    assert re.search(r"[-+]\d+\.\d", yes.evidence) and re.search(r"[-+]\d+\.\d", no.evidence)  # numbers quoted


def test_finding_evidence_quotes_the_numbers():
    v = F.gptq_beats_awq({("gptq", "W4A16"): d(0.4, general=0.3), ("awq", "W4A16"): d(2.1, general=3.5),
                          ("gptq", "W3A16"): d(5.0), ("awq", "W3A16"): d(9.0)})
    assert "GPTQ -0.4 vs AWQ -2.1" in v.evidence and "W3A16 -5.0 vs -9.0" in v.evidence
    assert "general -0.3 vs -3.5" in v.evidence
    v = F.w8a8_near_lossless({("smoothquant", "W8A8"): d(0.2), ("duquant", "W8A8"): d(1.3)})
    assert v.status == F.DOES_NOT_HOLD and "not negligible: DuQuant" in v.evidence


@pytest.mark.parametrize("check, drops", [
    (F.gptq_beats_awq, {("gptq", "W4A16"): d(1.2), ("awq", "W4A16"): d(2.1)}),
    (F.rotation_beats_smoothing,
     {("smoothquant", "W4A4"): d(6.0), ("quarot", "W4A4"): d(1.0), ("duquant", "W4A4"): d(5.5)}),
    (F.duquant_beats_quarot, {("quarot", "W4A4"): d(6.6), ("duquant", "W4A4"): d(5.7)}),
    (F.math_code_degrade_more, {("gptq", "W4A16"): d(1, general=0.5, math=1.4, code=3.0)}),
])
def test_a_win_by_less_than_one_point_is_a_tie(check, drops):
    """One item of a 100-item task is a point: a smaller gap must not decide a finding either way."""
    v = check(drops, "m")
    assert v.status == F.DOES_NOT_HOLD and "a gap under 1 point is a tie" in v.evidence, v
    assert F.beats(1.0, 2.0) and not F.beats(1.0, 1.99) and F.beats(0.1 + 0.2, 1.3)  # float noise at the edge


@pytest.mark.parametrize("base, instruct", [
    ("LLaDA-8B-Base", "LLaDA-8B-Instruct"), ("dllmq-tiny", "dllmq-tiny-instruct"),
    ("Dream-v0-Base-7B", "Dream-v0-Instruct-7B"), ("/models/llada_base/", "/ckpt/llada_instruct")])
def test_base_instruct_pairs_are_recognised_by_name(base, instruct):
    assert F.instruct_pairs([instruct, base, "random-dream"]) == [(base, instruct)]


def test_instruct_robustness_both_ways_and_unmeasured():
    base = {("gptq", "W3A16"): d(10.0), ("gptq", "W4A16"): d(1.0), ("rtn", "W4A4"): d(20.0)}
    inst = {("gptq", "W3A16"): d(5.0), ("gptq", "W4A16"): d(0.5)}
    v = F.instruct_more_robust(base, inst)
    assert v.status == F.HOLDS and "over 2 shared settings" in v.evidence and "3-bit GPTQ -5.0 vs -10.0" in v.evidence
    assert F.instruct_more_robust(inst, base).status == F.DOES_NOT_HOLD
    assert F.instruct_more_robust(base, {("awq", "W4A16"): d(1.0)}).status == F.NOT_MEASURED
    tie = F.instruct_more_robust({("gptq", "W4A16"): d(0.24)}, {("gptq", "W4A16"): d(0.2)})
    assert tie.status == F.DOES_NOT_HOLD and "tie" in tie.evidence


def test_overall_verdicts_combine_models_and_never_hide_a_failure():
    table = {"A": {("gptq", "W4A16"): d(0.3), ("awq", "W4A16"): d(3.5)},
             "B": {("gptq", "W4A16"): d(3.0), ("awq", "W4A16"): d(1.0)},
             "C": {("rtn", "W4A16"): d(1.0)}}
    found = {f.key: f for f in F.evaluate_findings(table)}
    g = found["gptq_beats_awq"]
    assert g.status == F.MIXED and "holds for A" in g.summary and "does not hold for B" in g.summary
    assert "Not measured for C" in g.summary
    assert [v.status for v in g.verdicts] == [F.HOLDS, F.DOES_NOT_HOLD, F.NOT_MEASURED]
    assert found["w4a4_severe"].status == F.NOT_MEASURED
    assert found["instruct_robust"].status == F.NOT_MEASURED
    assert [f.number for f in found.values()] == list(range(1, 9))
    only_b = {f.key: f for f in F.evaluate_findings({"B": table["B"]})}["gptq_beats_awq"]
    assert only_b.status == F.DOES_NOT_HOLD and "GPTQ -3.0 vs AWQ -1.0" in only_b.summary


# --- the report -----------------------------------------------------------------------------------------

def test_report_from_a_database_html_is_self_contained(tmp_path):
    db = write_db(tmp_path / "runs.db", paper_like_rows("LLaDA-8B-Base") + paper_like_rows("LLaDA-8B-Instruct", 0.8))
    report = build_report(db)
    assert report.out_dir is None and not (tmp_path / "report").exists()
    assert all(f.status == F.HOLDS for f in report.findings), [f.line() for f in report.findings]
    page = report.html
    srcs = re.findall(r'\bsrc="([^"]*)"', page)
    assert len(srcs) == 2 and all(s.startswith("data:image/png;base64,") for s in srcs)
    for s in srcs:
        assert base64.b64decode(s.split(",", 1)[1]).startswith(PNG_MAGIC)
    assert not re.search(r"https?://", page) and "<script" not in page.lower() and "<link" not in page.lower()
    for cls in ("negligible", "moderate", "severe"):
        assert f'<td class="{cls}"' in page and f"td.{cls}" in page  # coloured cells, and the CSS colouring them
    assert "swatch severe" in page and "± " in page                      # legend, stderr tooltips


def test_markdown_has_the_legend_markers_tables_and_findings(tmp_path):
    db = write_db(tmp_path / "runs.db", paper_like_rows("toy"))
    md = build_report(db, plots=False).markdown
    assert "Legend:" in md and "negligible: drop < 1" in md and "severe: drop > 4" in md
    for marker in MARKERS.values():
        assert f" {marker})" in md
    assert "| GPTQ W4A16" in md and "| SmoothQuant W4A4" in md and "general avg" in md
    assert "(-30.0 !!)" in md  # SmoothQuant W4A4 math: 30 points lost, severe
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| setting") and rows[1].startswith("| FP ")
    assert "**GPTQ beats AWQ at W4A16**: holds" in md and "GPTQ -0.5 vs AWQ -2.0" in md
    assert "n=100" in md


def test_a_failing_finding_is_shown_as_such(tmp_path):
    rows = paper_like_rows("toy")
    awq = [r for r in rows if r["method"] == "awq" and r["bits"] == "W4A16"]
    for r in awq:   # AWQ now loses nothing: GPTQ no longer beats it
        r["value"] = FP[r["task"]]
    report = build_report(write_db(tmp_path / "runs.db", rows), plots=False)
    g = next(f for f in report.findings if f.key == "gptq_beats_awq")
    assert g.status == F.DOES_NOT_HOLD
    assert "[ ] 4. **GPTQ beats AWQ at W4A16**: does not hold" in report.markdown
    assert 'class="status does-not-hold"' in report.html


def test_missing_baselines_empty_and_absent_databases(tmp_path):
    rows = paper_like_rows("with-fp") + [r for r in paper_like_rows("no-fp") if r["method"] != "fp"]
    report = build_report(write_db(tmp_path / "some.db", rows), plots=False)
    assert "no-fp" in report.markdown and "no full-precision (FP) baseline" in report.markdown
    assert "Not measured for no-fp" in report.markdown
    no_fp = [r for r in paper_like_rows("x") if r["method"] != "fp"]
    with pytest.raises(DllmqError, match="full-precision baseline"):
        build_report(write_db(tmp_path / "nofp.db", no_fp))
    with pytest.raises(DllmqError, match="no results"):
        build_report(write_db(tmp_path / "empty.db", []))
    with pytest.raises(DllmqError, match="No study database"):
        build_report(tmp_path / "absent.db")
    assert not (tmp_path / "absent.db").exists()  # looking did not create it
    (tmp_path / "junk.db").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(DllmqError, match="not a readable study database"):
        build_report(tmp_path / "junk.db")


def test_outliers_directory_is_embedded_and_copied(tmp_path):
    outliers = tmp_path / "outl"
    outliers.mkdir()
    png = PNG_MAGIC + b"fake-plot-bytes"
    (outliers / "max_abs_by_depth.png").write_bytes(png)
    (outliers / "outliers.json").write_text(json.dumps({"model": "toy"}))
    db = write_db(tmp_path / "runs.db", small_rows())
    out = tmp_path / "rep"
    report = build_report(db, out, outliers_dir=outliers, plots=False)
    assert "Activation outliers" in report.html
    assert "data:image/png;base64," + base64.b64encode(png).decode() in report.html
    assert 'href="outliers/outliers.json"' in report.html
    assert (out / "outliers" / "max_abs_by_depth.png").read_bytes() == png
    assert "](outliers/max_abs_by_depth.png)" in (out / "report.md").read_text()
    with pytest.raises(DllmqError, match="not a directory"):
        build_report(db, outliers_dir=tmp_path / "nope")


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    import dllmq.study.report as R

    db = write_db(tmp_path / "runs.db", small_rows())
    monkeypatch.setattr(R, "HTML_NAME", "sub/dir/that/does/not/exist.html")  # writing it fails midway
    with pytest.raises(OSError):
        build_report(db, tmp_path / "rep", plots=False)
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("runs.db")] == []  # no out, no temp dir


# --- CLI ------------------------------------------------------------------------------------------------

def cli(capsys, *argv):
    """`dllmq report ...` as dllmq.cli.main runs it: a DllmqError is one line on stderr and exit code 2."""
    parser = argparse.ArgumentParser(prog="dllmq")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", *argv])
    assert args.func is run
    try:
        args.func(args)
        code = 0
    except DllmqError as err:
        print(f"error: {err}", file=__import__("sys").stderr)
        code = 2
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_the_report_directory_and_refuses_to_clobber_it(tmp_path, capsys):
    db = write_db(tmp_path / "runs.db", paper_like_rows("toy"))
    out = tmp_path / "report"
    code, stdout, _ = cli(capsys, "--db", str(db), "--out", str(out))
    assert code == 0 and "wrote" in stdout and "GPTQ beats AWQ at W4A16: holds" in stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == ["degradation_toy.png", "report.html", "report.md"]
    assert (out / "degradation_toy.png").read_bytes().startswith(PNG_MAGIC)
    assert "![toy: degradation vs FP](degradation_toy.png)" in (out / "report.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report")]  # no temp dir left

    (out / "marker.txt").write_text("mine")
    code, _, err = cli(capsys, "--db", str(db), "--out", str(out))
    assert code == 2 and "already exists" in err and "--overwrite" in err and err.count("\n") == 1
    assert (out / "marker.txt").exists()  # untouched
    code, _, _ = cli(capsys, "--db", str(db), "--out", str(out), "--overwrite", "--no-plots")
    assert code == 0 and not (out / "marker.txt").exists() and sorted(p.name for p in out.iterdir()) == \
        ["report.html", "report.md"]


def test_cli_terminal_mode_and_empty_database(tmp_path, capsys, monkeypatch):
    db = write_db(tmp_path / "runs.db", small_rows())
    code, stdout, _ = cli(capsys, "--db", str(db))
    assert code == 0 and stdout == terminal_report(db) and "| GPTQ W4A16" in stdout and "![" not in stdout
    empty = write_db(tmp_path / "empty.db", [])
    code, stdout, err = cli(capsys, "--db", str(empty))
    assert code == 2 and stdout == "" and err.startswith("error: ") and err.strip().count("\n") == 0
    assert "no results" in err
    code, _, err = cli(capsys, "--db", str(empty), "--out", str(tmp_path / "r"))
    assert code == 2 and not (tmp_path / "r").exists()
    monkeypatch.chdir(tmp_path)   # no --db: the study runner's default, runs/study.db, is not there
    code, _, err = cli(capsys)
    assert code == 2 and "No study database at runs/study.db" in err and not (tmp_path / "runs").exists()


def test_database_rows_round_trip_through_the_store(tmp_path):
    rows = small_rows()
    db = write_db(tmp_path / "runs.db", rows)
    from_db = build_report(db, plots=False)
    from_rows = build_report(rows, plots=False)
    assert [f.summary for f in from_db.findings] == [f.summary for f in from_rows.findings]
    assert from_db.tables[0].drops() == from_rows.tables[0].drops()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(DISTINCT cell_key) FROM results").fetchone()[0] == 2
    assert "cells: 2 (8 result rows)" in from_db.markdown


def test_the_same_results_give_the_same_report_bytes():
    rows = paper_like_rows("toy")
    a, b = build_report(rows), build_report(list(reversed(rows)))
    assert a.markdown == b.markdown and a.html == b.html and a.images == b.images
    assert list(a.images) == ["degradation_toy.png"] and a.images["degradation_toy.png"].startswith(PNG_MAGIC)
