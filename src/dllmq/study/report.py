"""The study report: per-model degradation tables (the paper's layout), degradation plots, the paper's
findings checked against this run, and optionally the activation-outlier plots of `dllmq outliers`.

    dllmq report --db runs.db --out report/    # report.md + report.html (one self-contained file) + PNGs
    dllmq report --db runs.db                  # Markdown tables to the terminal

`build_report` is the Python API; the `report` subcommand is dllmq.cli.report.
The tables and classes come from `grid`, the checklist from `findings`, the figures from `plots`.
"""
from __future__ import annotations

import base64
import html
import os
import shutil
import sqlite3
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from dllmq.atomic import atomic_directory, refuse_existing
from dllmq.errors import DllmqError
from dllmq.study.ablation import AblationRow, ablation_rows
from dllmq.study.evidence import DEFAULT_KL_RATIO, ModelEvidence, build_evidence, format_ci
from dllmq.study.families import FAMILY_NOTE, OUTLIER_NOTE, FamilyComparison, family_comparison, unavailable_models
from dllmq.study.findings import (DOES_NOT_HOLD, HOLDS, INCONCLUSIVE, MIXED, NOT_MEASURED, Finding,
                                  evaluate_findings, signed)
from dllmq.study.grid import (MISSING, MODERATE, NEGLIGIBLE, SEVERE, Measurement, ModelTable, TableCell,
                              build_tables, normalize, task_sort_key)
from dllmq.study.plots import degradation_png, kl_ratio_png, plot_name, trajectory_png
from dllmq.study.stats import LEVEL
from dllmq.study.store import read_cells, read_items, read_measures, read_results
from dllmq.study.verdicts import decided
from dllmq.study.verdicts import evaluate_findings as interval_findings

MARKDOWN_NAME, HTML_NAME, OUTLIERS_SUBDIR = "report.md", "report.html", "outliers"
OUTLIERS_JSON = "outliers.json"

# Terminal-safe markers: one per class, after the change vs FP.
MARKERS = {NEGLIGIBLE: "·", MODERATE: "!", SEVERE: "!!"}
CHECKBOX = {HOLDS: "[x]", DOES_NOT_HOLD: "[ ]", MIXED: "[~]", NOT_MEASURED: "[?]", INCONCLUSIVE: "[-]"}
KL_PLOT, TRAJECTORY_PLOT = "kl_vs_mask_ratio.png", "trajectory_flips_by_step.png"
NA = "—"


@dataclass
class RunFacts:
    """What the header says about the run."""

    source: str
    models: list[str]
    cells: int                  # distinct cells (model x method x bits x evaluation setting) with results
    results: int                # result rows read
    superseded: int             # older re-runs (same cell, same seed) not shown
    tasks: list[tuple[str, str, str, str]]   # (task, category, metric, n as text)
    first: float | None
    last: float | None
    noise: float | None         # median stderr of an overall-average drop, points
    seeds: list[int] = field(default_factory=list)
    evidence: dict[str, ModelEvidence] = field(default_factory=dict)   # paired measures vs FP, per model
    kl_ratio: float = DEFAULT_KL_RATIO
    decided: int | None = None  # findings decided with confidence (None: no per-item data)
    ablation: list[AblationRow] = field(default_factory=list)   # dLLM-aware cells vs their clean-text baselines
    families: FamilyComparison | None = None   # models of several families (or a grid's model not shipped)


@dataclass
class OutlierFiles:
    directory: Path
    pngs: list[Path]
    json: Path | None


@dataclass
class Report:
    markdown: str
    html: str
    findings: list[Finding]
    tables: list[ModelTable]
    facts: RunFacts
    images: dict[str, bytes] = field(default_factory=dict)   # file name in out_dir -> PNG bytes
    out_dir: Path | None = None


# --- reading ---------------------------------------------------------------------------------------------

def load_rows(db: str | os.PathLike) -> list[dict]:
    """The result rows of a study database, or a one-sentence DllmqError when it is not one."""
    path = Path(db)
    if not path.is_file():  # connect() would silently create an empty database here
        raise DllmqError(f"No study database at {path}; pass the --db file the study runner wrote.")
    try:
        return read_results(path)
    except sqlite3.DatabaseError as err:
        raise DllmqError(f"{path} is not a readable study database ({err}).") from None


def load_evidence_rows(db: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(items, measures) rows of a study database ([] and [] for one written before they existed)."""
    try:
        return read_items(db), read_measures(db)
    except sqlite3.DatabaseError as err:
        raise DllmqError(f"{db} is not a readable study database ({err}).") from None


def analyze(rows_or_db: str | os.PathLike | Iterable[Mapping], items: Iterable[Mapping] | None = None,
            measures: Iterable[Mapping] | None = None, kl_ratio: float = DEFAULT_KL_RATIO,
            ) -> tuple[list[ModelTable], list[Finding], RunFacts]:
    """Tables, findings and run facts of a database path or of result rows (dicts like read_results'), with
    the per-item answers and measures (read from the database, or given) deciding the findings with
    confidence intervals where they exist."""
    cells: list[dict] = []
    if isinstance(rows_or_db, (str, os.PathLike)):
        source, rows = str(rows_or_db), load_rows(rows_or_db)
        if items is None and measures is None:
            items, measures = load_evidence_rows(rows_or_db)
        cells = read_cells(rows_or_db)
        if not rows:
            raise DllmqError(f"The study database {source} has no results yet; run the study first "
                             "(a cell's results are stored when it finishes).")
    else:
        source, rows = "the result rows given", list(rows_or_db)
        if not rows:
            raise DllmqError("No result rows were given, so there is nothing to report.")
    measurements, superseded = normalize(rows)
    tables = build_tables(measurements)
    if not any(t.has_baseline for t in tables):
        raise DllmqError(f"No model in {source} has a full-precision baseline (method fp), so no drop can be "
                         "computed; run the FP cells first.")
    items, measures = list(items or []), list(measures or [])
    evidence = build_evidence(rows, items, measures) if (items or measures) else {}
    drops = {t.model: t.drops() for t in tables}
    if any(e.has_items for e in evidence.values()):
        findings = interval_findings(drops, evidence, kl_ratio)
    else:
        findings = evaluate_findings(drops)
    facts = _facts(source, rows, measurements, superseded, tables)
    facts.evidence, facts.kl_ratio = evidence, kl_ratio
    facts.ablation = ablation_rows(cells, evidence) if evidence else []
    facts.decided = decided(findings) if any(e.has_items for e in evidence.values()) else None
    facts.families = family_comparison(tables, evidence, kl_ratio, unavailable_models(cells, facts.models))
    return tables, findings, facts


def _facts(source: str, rows: list[Mapping], ms: list[Measurement], superseded: int,
           tables: list[ModelTable]) -> RunFacts:
    keys = {r.get("cell_key") for r in rows}
    cells = len(keys) if None not in keys else len({(m.model, m.method, m.bits) for m in ms})
    tasks = []
    seen = sorted({t: tb.category_of[t] for tb in tables for t in tb.tasks}.items(),
                  key=lambda kv: task_sort_key(kv[0], kv[1]))
    for task, category in seen:
        metrics = sorted({m.metric for m in ms if m.task == task and m.metric})
        ns = sorted({m.n for m in ms if m.task == task and m.n is not None})
        n = "?" if not ns else str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
        tasks.append((task, category, "/".join(metrics) or "?", n))
    times = [float(r["created"]) for r in rows if r.get("created") is not None]
    errs = [r.overall.drop_stderr for t in tables for r in t.quantized_rows() if r.overall.drop_stderr is not None]
    return RunFacts(source, [t.model for t in tables], cells, len(rows), superseded, tasks,
                    min(times) if times else None, max(times) if times else None,
                    statistics.median(errs) if errs else None,
                    sorted({int(r["seed"]) for r in rows if r.get("seed") is not None}))


def find_outliers(directory: str | os.PathLike) -> OutlierFiles:
    """The PNG plots and outliers.json of a `dllmq outliers --out` directory."""
    d = Path(directory)
    if not d.is_dir():
        raise DllmqError(f"--outliers {d} is not a directory; pass the --out directory of `dllmq outliers`.")
    pngs = sorted(p for p in d.iterdir() if p.suffix.lower() == ".png" and p.is_file())
    js = d / OUTLIERS_JSON
    return OutlierFiles(d, pngs, js if js.is_file() else None)


# --- text helpers ------------------------------------------------------------------------------------------

def _when(t: float | None) -> str:
    return "?" if t is None else datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _num(x: float | None) -> str:
    return NA if x is None else f"{x:.1f}"


LEGEND_LINES = (
    "Cells show points (100 x the metric) and, in brackets, the change vs FP in points (a loss reads -2.9).",
    f"{MARKERS[NEGLIGIBLE]}  negligible: drop < 1 point (a gain counts as negligible)",
    f"{MARKERS[MODERATE]}  moderate: 1 <= drop <= 4 points",
    f"{MARKERS[SEVERE]} severe: drop > 4 points",
    f"{NA}  not measured",
    "A category average is the mean over that category's tasks (the FP baseline's tasks); overall is the "
    "mean of the category averages, so general, math and code weigh the same.",
)


def _header_lines(f: RunFacts) -> list[str]:
    lines = [f"- database: {f.source}",
             f"- models: {', '.join(f.models)}",
             f"- cells: {f.cells} ({f.results} result rows"
             + (f", {f.superseded} superseded by newer runs of the same cell and seed" if f.superseded else "") + ")",
             "- tasks: " + ", ".join(f"{t} ({c}, {m}, n={n})" for t, c, m, n in f.tasks),
             *([f"- seeds: {', '.join(map(str, f.seeds))} (each number is the mean over the seeds run)"]
               if len(f.seeds) > 1 else []),
             f"- results dated: {_when(f.first)}" + (f" to {_when(f.last)}" if _when(f.last) != _when(f.first) else "")]
    if f.noise is not None:
        lines.append(f"- noise: the median standard error of an overall-average drop is {f.noise:.1f} points; "
                     "differences smaller than about twice that are within noise.")
    if f.decided is not None:
        lines.append(f"- findings decided with {100 * LEVEL:g} % confidence (paired bootstrap intervals over items "
                     f"and text windows): {f.decided} of 8")
    return lines


# --- the paired measures vs FP --------------------------------------------------------------------------------

VS_FP_LEGEND = (
    "Against FP, paired (each cell and FP on the same items and the same masked windows; [95 % bootstrap CI]): "
    "accuracy change in points (overall average, as above); flips: % of items right at FP and wrong here "
    "(R>W) / wrong at FP and right here (W>R); KL@r: mean KL(p_FP || p) of the predicted token distribution "
    "at masked positions, r of each window masked (nats); top-1: % of masked positions with FP's argmax; "
    "ELBO ΔPPL: the Monte Carlo perplexity bound minus FP's, same masks; trajectory: % of denoising steps where, "
    "from FP's state, the cell unmasks another token than FP (generation tasks, teacher-forced). A causal "
    "(autoregressive) model has no mask: its KL and top-1 are of the next-token distribution given the true prefix "
    "on the same windows, its ΔPPL is of the exact perplexity, and its continuation flips are the % of FP's greedy "
    "continuation where, given FP's prefix, the cell predicts another next token.")


_ci = format_ci


def vs_fp_rows(t: ModelTable, ev: ModelEvidence | None, kl_ratio: float) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a model's 'against FP' table ([] rows when nothing was measured item by item)."""
    if ev is None or not ev.settings:
        return [], []
    ratios = sorted({r for s in ev.settings.values() for r in s.kl})
    r = min(ratios, key=lambda x: (abs(x - kl_ratio), x)) if ratios else kl_ratio
    causal = not ratios and any(s.kl_next is not None for s in ev.settings.values())
    tasks = sorted({task for s in ev.settings.values() for task in s.traj})
    head = ["setting", "Δacc (points)", "flips R>W %", "flips W>R %"]
    head += ["KL next-token", "top-1 next-token %", "exact ΔPPL"] if causal else \
        [f"KL@{r:g}", f"top-1@{r:g} %", "ELBO ΔPPL"]
    head += [f"{'continuation' if causal else 'trajectory'} {task.replace('mini_', '')} %" for task in tasks]
    body = []
    for row in t.quantized_rows():
        se = ev.settings.get((row.setting.method, row.setting.bits))
        if se is None:
            continue
        flips = se.flips.get("all", {})
        kl, top1 = (se.kl_next, se.top1_next) if causal else (se.kl.get(r), se.top1.get(r))
        cells = [row.setting.label, _ci(se.drop.get("avg"), neg=True),
                 _ci(flips.get("right_to_wrong"), scale=100.0), _ci(flips.get("wrong_to_right"), scale=100.0),
                 _ci(kl, digits=4), _ci(top1, scale=100.0), _ci(se.ppl_delta, digits=2)]
        cells += [_ci(se.traj.get(task), scale=100.0) for task in tasks]
        body.append(cells)
    return head, body


def _vs_fp_note(ev: ModelEvidence) -> str:
    parts = []
    if ev.items:
        parts.append(f"{ev.items} items")
    if ev.windows:
        parts.append(f"{ev.windows} text windows")
    if ev.fp_ppl is not None:
        exact = any(s.ppl_exact for s in ev.settings.values())
        parts.append(f"FP {'exact' if exact else 'ELBO'} perplexity {ev.fp_ppl:.1f}")
    return ", ".join(parts)


def ablation_table(rows: list[AblationRow], kl_ratio: float) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the dLLM-aware calibration table (each option against its clean-text baseline)."""
    if not rows:
        return [], []
    ratios = sorted({r for row in rows for r in row.kl_change})
    goal_at = min(ratios, key=lambda x: (abs(x - kl_ratio), x)) if ratios else kl_ratio
    head = ["model", "setting", "vs", "options"] + [f"KL@{r:g} change %" for r in ratios]
    head += ["ELBO ΔPPL change", "Δacc drop change", "R>W flips change %", f"-20 % at {goal_at:g}"]
    body = []
    for row in rows:
        options = ", ".join(f"{k}={v}" for k, v in row.options.items())
        cells = [row.model, row.variant.label, row.baseline.label, options]
        cells += [_ci(row.kl_change.get(r), scale=100.0) for r in ratios]
        cells += [_ci(row.ppl_delta, digits=2), _ci(row.drop), _ci(row.right_to_wrong, scale=100.0),
                  row.goal(kl_ratio) or NA]
        body.append(cells)
    return head, body


ABLATION_NOTE = ("Each dLLM-aware cell against the cell with the same settings calibrated on clean text; "
                 "paired on the same windows and items, 95 % CI in brackets; negative = lower than clean text "
                 "(better for KL, ELBO and drops). The last column is the issue's goal, KL vs FP at least 20 % lower: "
                 "reached when the whole interval is at or below -20 %.")


FAMILY_TITLE = "Model families: autoregressive vs LLaDA-style vs Dream-style"


def family_markdown(fc: FamilyComparison | None) -> list[str]:
    if fc is None:
        return []
    lines = [f"## {FAMILY_TITLE}", ""] + [f"Note: {n}" for n in fc.notes] + ([""] if fc.notes else [])
    for (head, body), note, title in ((fc.degradation, FAMILY_NOTE, "Degradation per family"),
                                      (fc.outliers, OUTLIER_NOTE, "Massive activations of FP")):
        if body:
            lines += [f"{title}. {note}", ""] + _md_table(head, body) + [""]
    return lines


# --- Markdown ----------------------------------------------------------------------------------------------

def _md_cell(cell: TableCell) -> str:
    if cell.value is None:
        return NA
    if cell.drop is None:
        return f"{cell.value:.1f}"
    return f"{cell.value:.1f} ({signed(cell.drop)} {MARKERS[cell.severity]})"


def _md_table(header: list[str], body: list[list[str]]) -> list[str]:
    """A Markdown table padded to aligned columns, so it also reads well as plain text."""
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:  # first column left-aligned, numbers right-aligned
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    sep = "|" + "|".join(("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|"
    return [fmt(header), sep] + [fmt(r) for r in body]


def _finding_md(f: Finding) -> list[str]:
    lines = [f"- {CHECKBOX[f.status]} {f.number}. **{f.title}**: {f.summary}"]
    if len(f.verdicts) > 1:
        lines += [f"    - {v.subject}: {v.status}: {v.evidence}" for v in f.verdicts]
    if f.metric:
        lines.append(f"    - decided by: {f.metric}")
    lines.append(f"    - paper: {f.paper} Rule here: {f.rule}")
    return lines


def model_markdown(t: ModelTable, image: str | None = None, ev: ModelEvidence | None = None,
                   kl_ratio: float = DEFAULT_KL_RATIO) -> list[str]:
    lines = [f"## {t.model}", ""]
    lines += [f"Note: {n}" for n in t.notes]
    if t.notes:
        lines.append("")
    if t.categories:
        head = ["setting"] + [f"{c} avg" for c in t.categories] + ["overall"]
        body = [[r.setting.label] + [_md_cell(r.categories[c]) for c in t.categories] + [_md_cell(r.overall)]
                for r in t.rows]
        lines += ["Averages:", ""] + _md_table(head, body) + [""]
    head = ["setting"] + t.tasks
    body = [[r.setting.label] + [_md_cell(r.tasks[x]) for x in t.tasks] for r in t.rows]
    lines += ["Per task:", ""] + _md_table(head, body) + [""]
    fp = next((r for r in t.rows if r.setting.is_fp), None)
    if fp is not None:
        errs = [f"{x} ±{fp.tasks[x].stderr:.1f} (n={fp.tasks[x].n})" for x in t.tasks
                if fp.tasks[x].stderr is not None]
        if errs:
            lines += ["Standard error at FP (points): " + ", ".join(errs) + ".", ""]
    head, body = vs_fp_rows(t, ev, kl_ratio)
    if body:
        lines += [f"Against FP, paired ({_vs_fp_note(ev)}; 95 % CI in brackets):", ""] + _md_table(head, body) + [""]
    if image:
        lines += [f"![{t.model}: degradation vs FP]({image})", ""]
    return lines


def render_markdown(tables: list[ModelTable], findings: list[Finding], facts: RunFacts,
                    images: Mapping[str, str] | None = None, outliers: OutlierFiles | None = None,
                    outlier_links: Mapping[str, str] | None = None) -> str:
    """The whole report as Markdown. `images` maps a model to its plot file (relative to the report);
    `outlier_links` maps an outlier file name to the link to use (default: its path)."""
    images = images or {}
    lines = ["# dllmq study report", "", "Run:", ""] + _header_lines(facts) + ["", "Legend:", ""]
    lines += [f"    {x}" for x in LEGEND_LINES]
    if facts.evidence:
        lines += [f"    {VS_FP_LEGEND}"]
    lines += ["", "## Findings of the paper, checked on this run", "",
              "[x] holds, [ ] does not hold, [~] mixed across models, "
              "[?] not measured (cells missing)"
              + (", [-] inconclusive (the 95 % interval does not decide it)." if facts.decided is not None else "."),
              ""]
    for f in findings:
        lines += _finding_md(f)
    lines.append("")
    for name in (KL_PLOT, TRAJECTORY_PLOT):
        if name in images.values():
            lines += [f"![{name[:-4].replace('_', ' ')}]({name})", ""]
    for t in tables:
        lines += model_markdown(t, images.get(t.model), facts.evidence.get(t.model), facts.kl_ratio)
    lines += family_markdown(facts.families)
    head, body = ablation_table(facts.ablation, facts.kl_ratio)
    if body:
        lines += ["## dLLM-aware calibration against clean text", "", ABLATION_NOTE, ""] + _md_table(head, body) + [""]
    if outliers is not None:
        links = outlier_links or {}
        lines += ["## Activation outliers", "", f"From `{outliers.directory}`."]
        if outliers.json is not None:
            lines.append(f"Data: [{OUTLIERS_JSON}]({links.get(OUTLIERS_JSON, str(outliers.json))})")
        lines.append("")
        lines += [f"![{p.name}]({links.get(p.name, str(p))})" for p in outliers.pngs] or ["No PNG plots found."]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# --- HTML --------------------------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em; color: #222; max-width: 1400px; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; } h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.55em; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; } td.setting { text-align: left; font-weight: 600; }
td small { color: #444; } tr.fp td { background: #eef2f8; font-weight: 600; }
td.negligible, .swatch.negligible { background: #c9ecc9; }
td.moderate, .swatch.moderate { background: #ffe1a8; }
td.severe, .swatch.severe { background: #f6b8b8; }
td.na, .swatch.na { background: #f4f4f4; color: #999; }
.swatch { display: inline-block; width: 1.2em; height: 1em; border: 1px solid #999; vertical-align: middle; }
.legend li, .facts li { margin: 0.15em 0; }
.status { font-weight: 700; padding: 0 0.4em; border-radius: 3px; }
.status.holds { background: #c9ecc9; } .status.does-not-hold { background: #f6b8b8; }
.status.mixed { background: #ffe1a8; } .status.not-measured { background: #e4e4e4; }
.status.inconclusive { background: #dde6f4; } table.vsfp td { text-align: right; }
.findings > li { margin: 0.6em 0; } .findings .rule { color: #555; font-size: 0.9em; }
.note { color: #8a5a00; } img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: 0.85em; }
"""

_STATUS_ICON = {HOLDS: "&#10003;", DOES_NOT_HOLD: "&#10007;", MIXED: "~", NOT_MEASURED: "?", INCONCLUSIVE: "&#8211;"}


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _html_cell(cell: TableCell, label: str, column: str, is_fp: bool) -> str:
    if cell.value is None:
        return f'<td class="na" title="{_e(label)} · {_e(column)}: not measured">{NA}</td>'
    parts = [f"{label} · {column}: {cell.value:.2f}"]
    if cell.stderr is not None:
        parts[0] += f" ± {cell.stderr:.2f}"
    if cell.n is not None:
        parts[0] += f" (n={cell.n})"
    if cell.tasks > 1:
        parts[0] += f", mean of {cell.tasks} tasks"
    inner = f"{cell.value:.1f}"
    cls = ""
    if cell.drop is not None:
        parts.append(f"FP {cell.value + cell.drop:.2f}")
        change = f"change {-cell.drop:+.2f}" + (f" ± {cell.drop_stderr:.2f}" if cell.drop_stderr is not None else "")
        parts.append(f"{change} points: {cell.severity}")
        inner += f"<br><small>{_e(signed(cell.drop))}</small>"
        cls = f' class="{cell.severity}"'
    elif is_fp and cell.stderr is not None:
        inner += f"<br><small>±{cell.stderr:.1f}</small>"
    return f'<td{cls} title="{_e("; ".join(parts))}">{inner}</td>'


def _html_table(t: ModelTable, columns: list[tuple[str, str]], pick) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for _, h in [("", "setting")] + columns)
    rows = []
    for r in t.rows:
        cells = "".join(_html_cell(pick(r, key), r.setting.label, h, r.setting.is_fp) for key, h in columns)
        cls = ' class="fp"' if r.setting.is_fp else ""
        rows.append(f'<tr{cls}><td class="setting">{_e(r.setting.label)}</td>{cells}</tr>')
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _html_numbers(head: list[str], body: list[list[str]]) -> str:
    """A table of already formatted cells: the first column a row label, the others right-aligned."""
    return ('<table class="vsfp"><thead><tr>' + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join('<tr><td class="setting">' + _e(r[0]) + "</td>" + "".join(f"<td>{_e(c)}</td>" for c in r[1:])
                      + "</tr>" for r in body) + "</tbody></table>")


def _pick_category(row, key):
    return row.overall if key == "" else row.categories.get(key, MISSING)


def _html_findings(findings: list[Finding]) -> str:
    items = []
    for f in findings:
        cls = f.status.replace(" ", "-")
        sub = ""
        if len(f.verdicts) > 1:
            sub = "<ul>" + "".join(f'<li><span class="status {v.status.replace(" ", "-")}">{_e(v.status)}</span> '
                                   f"{_e(v.subject)}: {_e(v.evidence)}</li>" for v in f.verdicts) + "</ul>"
        by = f'<div class="rule">Decided by: {_e(f.metric)}</div>' if f.metric else ""
        items.append(f'<li><span class="status {cls}">{_STATUS_ICON[f.status]} {_e(f.status)}</span> '
                     f"<b>{f.number}. {_e(f.title)}</b>: {_e(f.summary)}{sub}{by}"
                     f'<div class="rule">Paper: {_e(f.paper)} Rule here: {_e(f.rule)}</div></li>')
    return f'<ol class="findings" style="list-style: none; padding-left: 0">{"".join(items)}</ol>'


def render_html(tables: list[ModelTable], findings: list[Finding], facts: RunFacts,
                pngs: Mapping[str, bytes] | None = None, outliers: OutlierFiles | None = None,
                outliers_json_href: str | None = None) -> str:
    """The whole report as one HTML file: inline CSS, images as data: URIs, no script, no external resource.
    `pngs` maps a model to its degradation plot."""
    pngs = pngs or {}
    out = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
           "<title>dllmq study report</title>", f"<style>{CSS}</style></head><body>",
           "<h1>dllmq study report</h1>", '<h2>Run</h2><ul class="facts">']
    out += [f"<li>{_e(line[2:])}</li>" for line in _header_lines(facts)]
    out += ['</ul><h3>Legend</h3><ul class="legend">',
            f"<li>{_e(LEGEND_LINES[0])} Hover a cell for its standard error, n and the FP value.</li>"]
    for cls, text in ((NEGLIGIBLE, LEGEND_LINES[1][3:]), (MODERATE, LEGEND_LINES[2][3:]),
                      (SEVERE, LEGEND_LINES[3][3:]), ("na", LEGEND_LINES[4][3:])):
        out.append(f'<li><span class="swatch {cls}"></span> {_e(text.strip())}</li>')
    out += [f"<li>{_e(LEGEND_LINES[5])}</li>"] + ([f"<li>{_e(VS_FP_LEGEND)}</li>"] if facts.evidence else [])
    out += ["</ul>", "<h2>Findings of the paper, checked on this run</h2>", _html_findings(findings)]
    for name in (KL_PLOT, TRAJECTORY_PLOT):
        if name in pngs:
            out.append(f'<figure><img alt="{_e(name)}" src="{_data_uri(pngs[name])}"><figcaption>'
                       + ("Masked-prediction KL to FP by mask ratio (log scale), one line per setting, one panel "
                          "per model." if name == KL_PLOT else
                          "Teacher-forced trajectory: fraction of items whose unmasked token differs from FP's, by "
                          "denoising step.") + "</figcaption></figure>")
    for t in tables:
        out.append(f"<h2>{_e(t.model)}</h2>")
        out += [f'<p class="note">Note: {_e(n)}</p>' for n in t.notes]
        if t.categories:
            cols = [(c, f"{c} avg") for c in t.categories] + [("", "overall")]
            out += ["<h3>Averages</h3>", _html_table(t, cols, _pick_category)]
        out += ["<h3>Per task</h3>", _html_table(t, [(x, x) for x in t.tasks], lambda r, k: r.tasks[k])]
        head, body = vs_fp_rows(t, facts.evidence.get(t.model), facts.kl_ratio)
        if body:
            out += [f"<h3>Against FP, paired ({_e(_vs_fp_note(facts.evidence[t.model]))}; 95 % CI)</h3>",
                    _html_numbers(head, body)]
        if t.model in pngs:
            out.append(f'<figure><img alt="{_e(t.model)}: degradation vs FP" src="{_data_uri(pngs[t.model])}">'
                       "<figcaption>Drop vs FP in points by method and bit width (up = worse; dashed lines: "
                       "moderate at 1, severe at 4; whiskers: standard error).</figcaption></figure>")
    fc = facts.families
    if fc is not None:
        out += [f"<h2>{_e(FAMILY_TITLE)}</h2>"] + [f'<p class="note">{_e(n)}</p>' for n in fc.notes]
        for (head, body), note, title in ((fc.degradation, FAMILY_NOTE, "Degradation per family"),
                                          (fc.outliers, OUTLIER_NOTE, "Massive activations of FP")):
            if body:
                out += [f"<h3>{title}</h3>", f"<p>{_e(note)}</p>", _html_numbers(head, body)]
    head, body = ablation_table(facts.ablation, facts.kl_ratio)
    if body:
        out += ["<h2>dLLM-aware calibration against clean text</h2>", f"<p>{_e(ABLATION_NOTE)}</p>",
                _html_numbers(head, body)]
    if outliers is not None:
        out += ["<h2>Activation outliers</h2>", f"<p>From <code>{_e(outliers.directory)}</code>."]
        if outliers.json is not None:
            href = outliers_json_href or outliers.json.resolve().as_uri()
            out.append(f' Data: <a href="{_e(href)}">{OUTLIERS_JSON}</a>.')
        out.append("</p>")
        if not outliers.pngs:
            out.append("<p>No PNG plots found.</p>")
        for p in outliers.pngs:
            out.append(f'<figure><img alt="{_e(p.name)}" src="{_data_uri(p.read_bytes())}">'
                       f"<figcaption>{_e(p.name)}</figcaption></figure>")
    out.append("</body></html>\n")
    return "\n".join(out)


# --- building and writing ----------------------------------------------------------------------------------

def build_report(rows_or_db: str | os.PathLike | Iterable[Mapping], out_dir: str | os.PathLike | None = None,
                 outliers_dir: str | os.PathLike | None = None, overwrite: bool = False,
                 plots: bool = True, kl_ratio: float = DEFAULT_KL_RATIO) -> Report:
    """Analyze a study database (path) or result rows and render the report. With `out_dir`, also write
    report.md, report.html, the plots (and a copy of the outlier files under outliers/) there, atomically:
    an existing `out_dir` is refused unless `overwrite`."""
    out = None if out_dir is None else Path(out_dir)
    if out is not None:
        refuse_existing(out, overwrite, "--out")
    outliers = None if outliers_dir is None else find_outliers(outliers_dir)
    tables, findings, facts = analyze(rows_or_db, kl_ratio=kl_ratio)

    pngs: dict[str, bytes] = {}          # model (or a figure's file name) -> PNG
    names: dict[str, str] = {}           # model (or a figure's file name) -> file name
    taken: set[str] = {MARKDOWN_NAME, HTML_NAME, KL_PLOT, TRAJECTORY_PLOT}
    for t in tables if plots else []:
        png = degradation_png(t)
        if png is not None:
            pngs[t.model], names[t.model] = png, plot_name(t.model, taken)
    if plots and facts.evidence:
        for name, draw in ((KL_PLOT, kl_ratio_png), (TRAJECTORY_PLOT, trajectory_png)):
            png = draw(tables, facts.evidence)
            if png is not None:
                pngs[name], names[name] = png, name

    in_dir = out is not None
    links = {}
    if outliers is not None and in_dir:
        links = {p.name: f"{OUTLIERS_SUBDIR}/{p.name}" for p in outliers.pngs}
        if outliers.json is not None:
            links[OUTLIERS_JSON] = f"{OUTLIERS_SUBDIR}/{OUTLIERS_JSON}"
    markdown = render_markdown(tables, findings, facts, images=names if in_dir else None, outliers=outliers,
                               outlier_links=links)
    page = render_html(tables, findings, facts, pngs, outliers, links.get(OUTLIERS_JSON))
    images = {names[m]: png for m, png in pngs.items()}
    report = Report(markdown, page, findings, tables, facts, images, out)
    if out is not None:
        write_report(report, out, outliers, overwrite=overwrite)
    return report


def write_report(report: Report, out: Path, outliers: OutlierFiles | None = None, overwrite: bool = False) -> None:
    """Write the report directory atomically: fill a staging directory beside `out`, then put it in place."""
    with atomic_directory(out, overwrite=overwrite, what="--out") as tmp:
        (tmp / MARKDOWN_NAME).write_text(report.markdown, encoding="utf-8")
        (tmp / HTML_NAME).write_text(report.html, encoding="utf-8")
        for name, png in report.images.items():
            (tmp / name).write_bytes(png)
        if outliers is not None:
            sub = tmp / OUTLIERS_SUBDIR
            sub.mkdir()
            for p in outliers.pngs + ([outliers.json] if outliers.json else []):
                shutil.copyfile(p, sub / p.name)


def terminal_report(rows_or_db: str | os.PathLike | Iterable[Mapping],
                    outliers_dir: str | os.PathLike | None = None, kl_ratio: float = DEFAULT_KL_RATIO) -> str:
    """The Markdown report without plots (what `dllmq report` prints without --out)."""
    outliers = None if outliers_dir is None else find_outliers(outliers_dir)
    tables, findings, facts = analyze(rows_or_db, kl_ratio=kl_ratio)
    return render_markdown(tables, findings, facts, outliers=outliers)
