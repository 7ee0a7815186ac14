"""The study's numbers arranged the way the paper reports them: one table per model, rows = FP then
each method x bit width, columns = tasks, category averages and the overall average, every quantized
cell with its drop versus FP and its class (negligible / moderate / severe).

Pure functions over result rows (dicts as `store.read_results` returns them); no I/O, no plotting.
Definitions (stated again in the report's legend):
- points = 100 x value; drop = FP points - quantized points (positive = worse, a gain is negative);
- class: negligible if drop < 1 (a gain included), moderate if 1 <= drop <= 4, severe if drop > 4;
- a category average is the mean over the category's tasks in the model's FP baseline; a row missing
  any of them has no average there (never an average over a different task set than FP's);
- the overall average is the mean of the category averages (each category weighs the same, however
  many tasks it has), defined only when every category average is.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from dllmq.quant.methods.base import EITHER, WEIGHT_ONLY
from dllmq.quant.registry import methods
from dllmq.study.store import CATEGORIES, TASK_CATEGORY, task_category

NEGLIGIBLE, MODERATE, SEVERE = "negligible", "moderate", "severe"
MODERATE_AT, SEVERE_ABOVE = 1.0, 4.0   # points: the paper's class edges
AVG = "avg"                            # key of the overall average in drop tables

FP_LABELS = {"fp", "fp16", "bf16", "fp32", "float16", "bfloat16", "float32"}
_BITS_RE = re.compile(r"^w(\d+)(?:a(\d+))?", re.IGNORECASE)


def classify(drop: float) -> str:
    """negligible / moderate / severe for a drop in points (positive = worse; a gain is negligible)."""
    d = round(drop, 9)  # 4.000000000000001 from float arithmetic is still 4.0: moderate
    if d < MODERATE_AT:
        return NEGLIGIBLE
    return MODERATE if d <= SEVERE_ABOVE else SEVERE


def parse_bits(label: str) -> tuple[int, int] | None:
    """(weight bits, activation bits) of a label like W4A16, W4A16-g128, W8A8, W3 (A16 implied); None if
    the label does not say (FP or an unknown scheme)."""
    m = _BITS_RE.match(label.strip())
    if not m:
        return None
    return int(m.group(1)), int(m.group(2) or 16)


_FORMAT_RE = re.compile(r"^(w\d+(?:a\d+)?(?:-g\d+)?)-((?:int|fp8|mxfp4|nvfp4)(?:-(?:int|fp8|mxfp4|nvfp4))?)$",
                        re.IGNORECASE)


def split_format(label: str) -> tuple[str, str]:
    """(bits, number formats) of a stored label: W8A8-fp8 -> (W8A8, fp8), W4A4-nvfp4-fp8 -> (W4A4, nvfp4-fp8),
    W8A8 -> (W8A8, "") — integer rows have no format suffix."""
    m = _FORMAT_RE.match(label.strip())
    return (m.group(1), m.group(2).lower()) if m else (label, "")


def is_integer_label(label: str) -> bool:
    """Whether a stored label is an integer setting (what the paper's findings are about)."""
    return split_format(label)[1] == ""


def method_name(method: str) -> str:
    """A method's display name (the registry's; FP for full precision; a stored label as it is)."""
    if method.lower() == "fp":
        return "FP"
    return next((m.display_name for m in methods() if m.name == method.lower()), method)


def method_rank(method: str) -> int:
    """The registry's order (the paper's for its methods); anything else sorts after them."""
    names = [m.name for m in methods()]
    return names.index(method) if method in names else len(names)


def weight_only_methods() -> tuple[str, ...]:
    """Methods whose weight-only results the findings compare (RTN included)."""
    return tuple(m.name for m in methods() if m.kind in (WEIGHT_ONLY, EITHER))


def rotation_methods() -> tuple[str, ...]:
    return tuple(m.name for m in methods() if m.transform == "rotation")


@dataclass(frozen=True)
class Setting:
    """One row of a model's table: a method at a bit width (FP is the method 'fp')."""

    method: str   # lowercase, as stored: fp, rtn, gptq, ...
    bits: str     # the stored label: FP, W4A16, W4A16-g128, ...

    @property
    def is_fp(self) -> bool:
        return self.method == "fp" or self.bits.lower() in FP_LABELS

    @property
    def wa(self) -> tuple[int, int] | None:
        return None if self.is_fp else parse_bits(self.bits)

    @property
    def weight_only(self) -> bool:
        wa = self.wa
        return wa is not None and wa[1] >= 16

    @property
    def format(self) -> str:
        """The number formats of a floating-point row (fp8, mxfp4, nvfp4, nvfp4-fp8); "" for integers."""
        return "" if self.is_fp else split_format(self.bits)[1]

    @property
    def label(self) -> str:
        if self.is_fp:
            return "FP"
        base, fmt = split_format(self.bits)
        return f"{method_name(self.method)} {base}" + (f" ({fmt})" if fmt else "")

    def sort_key(self) -> tuple:
        """FP; weight-only by bits (W4 before W3) then method; weight-activation (W8A8 before W4A4). A method's
        floating-point rows follow its integer row at the same bits (RTN W8A8, RTN W8A8 (fp8))."""
        if self.is_fp:
            return (0,)
        wa = self.wa
        rank = method_rank(self.method)
        if wa is None:
            return (3, self.bits, rank, self.method)
        group = 1 if wa[1] >= 16 else 2
        base, fmt = split_format(self.bits)
        return (group, -wa[0], -wa[1], base, rank, self.method, fmt)


@dataclass(frozen=True)
class TableCell:
    """One number of a table, in points, with its drop versus FP when FP has it."""

    value: float | None                 # points; None = not measured
    stderr: float | None = None         # points
    n: int | None = None                # samples behind the value (per task; summed for averages)
    drop: float | None = None           # points, FP - value (positive = worse)
    drop_stderr: float | None = None    # points; treats FP and quantized as independent (an upper bound)
    tasks: int = 1                      # tasks behind the value

    @property
    def severity(self) -> str | None:
        return None if self.drop is None else classify(self.drop)


MISSING = TableCell(None, tasks=0)


@dataclass
class Row:
    setting: Setting
    tasks: dict[str, TableCell]
    categories: dict[str, TableCell]
    overall: TableCell


@dataclass
class ModelTable:
    """Everything the report shows for one model."""

    model: str
    tasks: list[str]                    # columns, by category then the study's task order
    category_of: dict[str, str]
    categories: list[str]               # categories with at least one FP (or, without FP, any) task
    rows: list[Row]                     # FP first when present, then the paper's order
    has_baseline: bool
    notes: list[str] = field(default_factory=list)

    def quantized_rows(self) -> list[Row]:
        return [r for r in self.rows if not r.setting.is_fp]

    def drops(self) -> dict[tuple[str, str], dict[str, float]]:
        """(method, bits) -> {category: drop, 'avg': drop} for every measured drop (what findings read)."""
        out: dict[tuple[str, str], dict[str, float]] = {}
        for row in self.quantized_rows():
            d = {c: cell.drop for c, cell in row.categories.items() if cell.drop is not None}
            if row.overall.drop is not None:
                d[AVG] = row.overall.drop
            out[(row.setting.method, row.setting.bits)] = d
        return out


@dataclass(frozen=True)
class Measurement:
    """One model x method x bits x task number: the newest run of each seed, averaged over seeds."""

    model: str
    method: str
    bits: str
    task: str
    category: str
    metric: str
    value: float
    stderr: float | None
    n: int | None
    created: float | None
    seeds: tuple[int | None, ...] = (None,)


def normalize(rows: Iterable[Mapping]) -> tuple[list[Measurement], int]:
    """Rows as Measurements. Of rows repeating a model, method, bits, task and seed (a re-run, e.g. with
    another limit) the newest is kept; different seeds are averaged (the study runs each seed as its own
    cells). Returns the measurements and how many rows were superseded."""
    latest: dict[tuple, Measurement] = {}
    total = 0
    for r in rows:
        total += 1
        task = str(r["task"])
        seed = _opt_int(r.get("seed"))
        m = Measurement(model=str(r["model"]), method=str(r["method"]).strip().lower(), bits=str(r["bits"]).strip(),
                        task=task, category=str(r.get("category") or task_category(task)),
                        metric=str(r.get("metric") or ""), value=float(r["value"]),
                        stderr=_opt_float(r.get("stderr")), n=_opt_int(r.get("n")),
                        created=_opt_float(r.get("created")), seeds=(seed,))
        key = (m.model, m.method, m.bits, m.task, seed)
        old = latest.get(key)
        if old is None or (m.created or 0.0) >= (old.created or 0.0):
            latest[key] = m
    by_cell: dict[tuple, list[Measurement]] = {}
    for (model, method, bits, task, _), m in sorted(latest.items(), key=lambda kv: repr(kv[0])):
        by_cell.setdefault((model, method, bits, task), []).append(m)
    return [_seed_mean(ms) for ms in by_cell.values()], total - len(latest)


def _seed_mean(ms: list[Measurement]) -> Measurement:
    if len(ms) == 1:
        return ms[0]
    first, k = ms[0], len(ms)
    ns = [m.n for m in ms]
    return Measurement(first.model, first.method, first.bits, first.task, first.category, first.metric,
                       value=sum(m.value for m in ms) / k, stderr=_mean_stderr([m.stderr for m in ms]),
                       n=None if None in ns else max(ns), created=max((m.created or 0.0) for m in ms) or None,
                       seeds=tuple(s for m in ms for s in m.seeds))


def _opt_float(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _opt_int(x) -> int | None:
    return None if x is None else int(x)


def task_sort_key(task: str, category: str) -> tuple:
    known = list(TASK_CATEGORY)
    cat = CATEGORIES.index(category) if category in CATEGORIES else len(CATEGORIES)
    return (cat, known.index(task) if task in known else len(known), task)


def _mean_cell(cells: list[TableCell], baseline: list[TableCell] | None) -> TableCell:
    """The mean of `cells` (all measured) and, when the baseline cells are all measured, its drop."""
    if not cells or any(c.value is None for c in cells):
        return MISSING
    k = len(cells)
    value = sum(c.value for c in cells) / k
    stderr = _mean_stderr([c.stderr for c in cells])
    n = sum(c.n for c in cells) if all(c.n is not None for c in cells) else None
    drop = drop_se = None
    if baseline is not None and baseline and all(b.value is not None for b in baseline):
        base = sum(b.value for b in baseline) / k
        drop = base - value
        drop_se = _diff_stderr(_mean_stderr([b.stderr for b in baseline]), stderr)
    return TableCell(value, stderr, n, drop, drop_se, tasks=sum(c.tasks for c in cells))


def _mean_stderr(errs: list[float | None]) -> float | None:
    """Standard error of a mean of independent estimates."""
    if not errs or any(e is None for e in errs):
        return None
    return math.sqrt(sum(e * e for e in errs)) / len(errs)


def _diff_stderr(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else math.sqrt(a * a + b * b)


def build_tables(measurements: list[Measurement]) -> list[ModelTable]:
    """One ModelTable per model, models in first-seen order of a sorted listing (stable across runs)."""
    by_model: dict[str, list[Measurement]] = {}
    for m in sorted(measurements, key=lambda m: (m.model, m.method, m.bits, m.task)):
        by_model.setdefault(m.model, []).append(m)
    return [_model_table(model, ms) for model, ms in by_model.items()]


def _model_table(model: str, ms: list[Measurement]) -> ModelTable:
    category_of = {m.task: m.category for m in ms}
    tasks = sorted(category_of, key=lambda t: task_sort_key(t, category_of[t]))
    grid: dict[Setting, dict[str, Measurement]] = {}
    for m in ms:
        grid.setdefault(Setting(m.method, m.bits), {})[m.task] = m
    settings = sorted(grid, key=Setting.sort_key)
    fp_settings = [s for s in settings if s.is_fp]
    notes: list[str] = []
    if len(fp_settings) > 1:  # e.g. 'fp' stored under both FP and BF16: the first in order is the baseline
        notes.append(f"several full-precision rows ({', '.join(s.bits for s in fp_settings)}); "
                     f"drops are against {fp_settings[0].bits}.")
    fp = grid[fp_settings[0]] if fp_settings else None

    # Averages run over the baseline's tasks, so every row's average means the same task set.
    avg_tasks = [t for t in tasks if fp is None or t in fp]
    categories = [c for c in CATEGORIES if any(category_of[t] == c for t in avg_tasks)]
    categories += sorted({category_of[t] for t in avg_tasks} - set(categories))
    if fp is None:
        notes.append("no full-precision (FP) baseline in the database, so no drops are computed for this model.")
    else:
        extra = [t for t in tasks if t not in fp]
        if extra:
            notes.append(f"tasks without an FP result ({', '.join(extra)}) have no drop and are left out of "
                         "the averages.")

    rows: list[Row] = []
    for s in settings:
        base_cells = None if fp is None or s in fp_settings[:1] else fp
        task_cells = {t: _task_cell(grid[s].get(t), None if base_cells is None else base_cells.get(t)) for t in tasks}
        cat_cells: dict[str, TableCell] = {}
        for c in categories:
            ts = [t for t in avg_tasks if category_of[t] == c]
            cells = [task_cells[t] for t in ts]
            baseline = None if base_cells is None else [_task_cell(base_cells.get(t), None) for t in ts]
            cat_cells[c] = _mean_cell(cells, baseline)
        overall = _overall(list(cat_cells.values()))
        rows.append(Row(s, task_cells, cat_cells, overall))
    return ModelTable(model, tasks, category_of, categories, rows, fp is not None, notes)


def _task_cell(m: Measurement | None, base: Measurement | None) -> TableCell:
    if m is None:
        return MISSING
    value = 100.0 * m.value
    se = None if m.stderr is None else 100.0 * m.stderr
    drop = drop_se = None
    if base is not None:
        drop = 100.0 * base.value - value
        drop_se = _diff_stderr(None if base.stderr is None else 100.0 * base.stderr, se)
    return TableCell(value, se, m.n, drop, drop_se)


def _overall(cats: list[TableCell]) -> TableCell:
    """Mean of the category averages (and of their drops): each category weighs the same."""
    if not cats or any(c.value is None for c in cats):
        return MISSING
    k = len(cats)
    value = sum(c.value for c in cats) / k
    drop = None if any(c.drop is None for c in cats) else sum(c.drop for c in cats) / k
    drop_se = None if drop is None else _mean_stderr([c.drop_stderr for c in cats])
    n = sum(c.n for c in cats) if all(c.n is not None for c in cats) else None
    return TableCell(value, _mean_stderr([c.stderr for c in cats]), n, drop, drop_se,
                     tasks=sum(c.tasks for c in cats))
