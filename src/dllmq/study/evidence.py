"""Each study cell against its model's full precision, with paired bootstrap confidence intervals.

From a study database's per-item answers (`items`) and per-window measures (`measures`), for every
quantized setting of every model:

- the accuracy drop (FP - cell, points) per task, per category and overall, the way the report's
  tables average them (a category is the mean of its tasks, overall the mean of the categories);
- flips: the fraction of items whose answer differs from FP's, split into right->wrong and
  wrong->right (and changed answers that kept their verdict);
- masked-prediction KL and top-1 agreement with FP at each mask ratio; the ELBO perplexity of the
  cell minus FP's on the same masks; the teacher-forced trajectory flip rate (overall and by step);
  for a causal model, the next-token KL and top-1 agreement on the same windows and the exact
  perplexity instead (dllmq.diffusion.next_token);
- of the FP cell, the massive-activation profile when the grid measured it (measures.outliers): the
  share of tokens carrying a massive value by mask ratio and by position (the family comparison).

Every number is an `Estimate`: the point value and its bootstrap replicates from one `Resampler`
shared by the whole report (stats.py). Items are resampled per task and seed, windows per measure
setup, with the same indices for every setting and every model that has the same units - so
contrasts (A's drop - B's drop, base's KL - instruct's KL) are paired and get their own intervals.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from dllmq.study.grid import AVG, Setting
from dllmq.study.stats import LEVEL, REPS, Interval, Resampler, interval
from dllmq.study.store import CATEGORIES, task_category

DEFAULT_KL_RATIO = 0.5


@dataclass(frozen=True)
class Estimate:
    """A point value with bootstrap replicates (same resampled units as every other Estimate of a report)."""

    value: float
    reps: np.ndarray

    def ci(self, level: float = LEVEL) -> Interval:
        return interval(self.value, self.reps, level)

    def __sub__(self, other: "Estimate") -> "Estimate":
        return Estimate(self.value - other.value, self.reps - other.reps)

    def scaled(self, k: float) -> "Estimate":
        return Estimate(self.value * k, self.reps * k)


def format_ci(e: Estimate | None, digits: int = 1, scale: float = 1.0, neg: bool = False, na: str = "—") -> str:
    """'value [lo, hi]' of an estimate's interval, scaled; neg: negated and signed (a drop shown as a change)."""
    if e is None:
        return na
    iv = e.ci()
    lo, hi, v = iv.lo * scale, iv.hi * scale, iv.value * scale
    if neg:
        v, lo, hi = -v + 0.0, -hi + 0.0, -lo + 0.0   # + 0.0: no "-0.0"
    sign = "+" if neg else ""
    return f"{v:{sign}.{digits}f} [{lo:{sign}.{digits}f}, {hi:{sign}.{digits}f}]"


def mean_of(estimates: Sequence[Estimate]) -> Estimate:
    """The mean of several estimates (their replicates averaged replicate by replicate)."""
    return Estimate(float(np.mean([e.value for e in estimates])), np.mean([e.reps for e in estimates], axis=0))


@dataclass
class SettingEvidence:
    setting: Setting
    drop: dict[str, Estimate] = field(default_factory=dict)        # task / category / AVG -> points
    flips: dict[str, dict[str, Estimate]] = field(default_factory=dict)  # task / "all" -> kind -> fraction
    kl: dict[float, Estimate] = field(default_factory=dict)       # mask ratio -> nats per masked token
    top1: dict[float, Estimate] = field(default_factory=dict)     # mask ratio -> fraction
    ppl_delta: Estimate | None = None                            # ELBO perplexity, cell - FP
    ppl: float | None = None                                     # the cell's ELBO perplexity
    ppl_fp: float | None = None
    ppl_exact: bool = False                                      # a causal model's exact perplexity, not the ELBO
    kl_next: Estimate | None = None                              # causal: next-token KL, nats per token
    top1_next: Estimate | None = None                            # causal: fraction of next tokens with FP's argmax
    traj: dict[str, Estimate] = field(default_factory=dict)       # task -> fraction of steps flipped
    traj_steps: dict[str, list[float]] = field(default_factory=dict)  # task -> flip rate at step 1, 2, ...

    def kl_at(self, ratio: float) -> tuple[float, Estimate] | None:
        """(ratio used, KL) at the ratio nearest to `ratio`."""
        if not self.kl:
            return None
        r = min(self.kl, key=lambda x: (abs(x - ratio), x))
        return r, self.kl[r]


@dataclass
class ModelEvidence:
    model: str
    settings: dict[tuple[str, str], SettingEvidence] = field(default_factory=dict)
    fp_ppl: float | None = None
    items: int = 0                    # FP items the drops are computed on (all tasks and seeds)
    windows: int = 0                  # measure windows per setup
    massive_ratio: dict[float, Estimate] = field(default_factory=dict)  # FP: share of tokens with a massive value
    massive_pos: dict[str, Estimate] = field(default_factory=dict)      # FP, clean text: the same per position bucket

    @property
    def has_items(self) -> bool:
        return any(e.drop for e in self.settings.values())

    @property
    def has_kl(self) -> bool:
        return any(e.kl for e in self.settings.values())


FLIP_KINDS = ("changed", "right_to_wrong", "wrong_to_right")


# ----------------------------------------------------------------------------------------------- building
def _latest_cells(rows: Iterable[Mapping]) -> dict[tuple[str, str, str, int | None], str]:
    """(model, method, bits, seed) -> the cell_key of its newest results."""
    newest: dict[tuple, tuple[float, str]] = {}
    for r in rows:
        key = r.get("cell_key")
        if key is None:
            continue
        k = (str(r["model"]), str(r["method"]).strip().lower(), str(r["bits"]).strip(),
             None if r.get("seed") is None else int(r["seed"]))
        created = float(r.get("created") or 0.0)
        if k not in newest or created >= newest[k][0]:
            newest[k] = (created, key)
    return {k: v[1] for k, v in newest.items()}


def build_evidence(rows: Sequence[Mapping], items: Sequence[Mapping], measures: Sequence[Mapping], *,
                   reps: int = REPS, seed: int = 0) -> dict[str, ModelEvidence]:
    """model -> ModelEvidence from result rows, item rows and measure rows (as the store reads them)."""
    cells = _latest_cells(rows)
    by_cell_items: dict[str, dict[str, dict[str, tuple[str | None, int]]]] = {}
    for it in items:
        by_cell_items.setdefault(it["cell_key"], {}).setdefault(it["task"], {})[str(it["item"])] = \
            (it.get("answer"), int(it["correct"]))
    by_cell_measures: dict[str, dict[tuple[str, str], Mapping]] = {}
    for m in measures:
        by_cell_measures.setdefault(m["cell_key"], {})[(m["measure"], str(m["param"]))] = m
    rs = Resampler({}, reps=reps, seed=seed)

    def kind(name: str, n: int) -> str:
        rs.sizes.setdefault(name, n)
        return name

    out: dict[str, ModelEvidence] = {}
    models = sorted({k[0] for k in cells})
    for model in models:
        ev = ModelEvidence(model)
        fp_cells = {k[3]: key for k, key in cells.items() if k[0] == model and Setting(k[1], k[2]).is_fp}
        if not fp_cells:
            out[model] = ev
            continue
        fp_seed = min(fp_cells, key=lambda s: -1 if s is None else s)
        for (m, method, bits, s), key in sorted(cells.items(), key=lambda kv: repr(kv[0])):
            setting = Setting(method, bits)
            if m != model or setting.is_fp or s not in fp_cells:
                continue
            se = ev.settings.setdefault((method, bits), SettingEvidence(setting))
            _item_evidence(se, by_cell_items.get(fp_cells[s], {}), by_cell_items.get(key, {}), s, kind, rs)
            if s == fp_seed:
                _measure_evidence(se, by_cell_measures.get(key, {}), kind, rs)
        for se in ev.settings.values():
            _finish_drops(se)
        fp_items = by_cell_items.get(fp_cells[fp_seed], {})
        ev.items = sum(len(v) for v in fp_items.values())
        fp_measures = by_cell_measures.get(fp_cells[fp_seed], {})
        nll_fp = fp_measures.get(("elbo_nll", "")) or fp_measures.get(("nll", ""))
        if nll_fp and nll_fp.get("units"):
            ev.fp_ppl = math.exp(float(np.mean(nll_fp["units"])))
        ev.windows = max((len(m.get("units") or []) for m in fp_measures.values()
                          if m["measure"] in ("kl", "kl_next")), default=0)
        _massive_evidence(ev, fp_measures, kind, rs)
        out[model] = ev
    return out


def _item_evidence(se: SettingEvidence, fp: Mapping[str, Mapping], q: Mapping[str, Mapping], seed, kind, rs) -> None:
    """Per task of this seed: drop (points) and flips, if the cell answered every FP item."""
    for task, fp_items in fp.items():
        mine = q.get(task)
        if not mine or any(i not in mine for i in fp_items):
            continue
        ids = sorted(fp_items)
        k = kind(f"items:{task}:{seed}:{len(ids)}", len(ids))
        c = item_contrast([fp_items[i][1] for i in ids], [mine[i][1] for i in ids], k, rs,
                          [fp_items[i][0] for i in ids], [mine[i][0] for i in ids])
        se.drop.setdefault(f"task:{task}", []).append(c["drop"])
        flips = se.flips.setdefault(task, {})
        for name in FLIP_KINDS:
            flips.setdefault(name, []).append(c[name])


def item_contrast(fp: Sequence, mine: Sequence, kind: str, rs: Resampler, fp_answers: Sequence | None = None,
                  answers: Sequence | None = None) -> dict[str, Estimate]:
    """A setting against FP on the same items (per-item correctness, 0/1, in the same order; `kind` is their
    unit kind in `rs`): "drop" (FP - setting, points), "right_to_wrong" / "wrong_to_right" (fractions of
    items whose correctness flipped each way), and "changed" (answers differ) when the answers are given."""
    a = np.asarray(fp, dtype=float)
    b = np.asarray(mine, dtype=float)
    series = {"drop": 100.0 * (a - b), "right_to_wrong": ((a == 1) & (b == 0)).astype(float),
              "wrong_to_right": ((a == 0) & (b == 1)).astype(float)}
    if fp_answers is not None and answers is not None:
        series["changed"] = np.array([x != y for x, y in zip(fp_answers, answers)], dtype=float)
    return {name: Estimate(float(v.mean()), rs.mean(kind, v)) for name, v in series.items()}


def _finish_drops(se: SettingEvidence) -> None:
    """Seeds averaged; then the categories and the overall average as the tables compute them."""
    tasks = {}
    for key, ests in list(se.drop.items()):
        if key.startswith("task:"):
            tasks[key[5:]] = mean_of(ests)
    se.drop = dict(tasks)
    for task, kinds in se.flips.items():
        se.flips[task] = {k: mean_of(v) for k, v in kinds.items()}
    if se.flips:
        se.flips["all"] = {k: mean_of([se.flips[t][k] for t in tasks if t in se.flips]) for k in FLIP_KINDS}
    cats: dict[str, list[Estimate]] = {}
    for task, e in tasks.items():
        cats.setdefault(task_category(task), []).append(e)
    for c, es in cats.items():
        se.drop[c] = mean_of(es)
    present = [c for c in CATEGORIES if c in cats] + sorted(set(cats) - set(CATEGORIES))
    if present:
        se.drop[AVG] = mean_of([se.drop[c] for c in present])


def _measure_evidence(se: SettingEvidence, ms: Mapping[tuple[str, str], Mapping], kind, rs) -> None:
    for (measure, param), m in ms.items():
        units = m.get("units") or []
        if not units:
            continue
        k = kind(f"windows:{m.get('setup')}:{len(units)}", len(units))
        est = Estimate(float(np.mean(units)), rs.mean(k, units))
        if measure in ("kl", "top1"):
            getattr(se, measure)[float(param)] = est
        elif measure in ("kl_next", "top1_next"):
            setattr(se, measure, est)
        elif measure == "traj_flip":
            k = kind(f"traj:{param}:{m.get('setup')}:{len(units)}", len(units))
            se.traj[param] = Estimate(float(np.mean(units)), rs.mean(k, units))
    for (measure, param), m in sorted(ms.items()):
        if measure == "traj_flip_step":
            task, _, step = param.rpartition(":")
            se.traj_steps.setdefault(task, []).append((int(step), float(m["value"])))
    se.traj_steps = {t: [v for _, v in sorted(s)] for t, s in se.traj_steps.items()}
    q, f = ms.get(("elbo_nll", "")), ms.get(("elbo_nll_fp", ""))
    if q is None and ms.get(("nll", "")) is not None:   # a causal model: the exact NLL
        q, f, se.ppl_exact = ms.get(("nll", "")), ms.get(("nll_fp", "")), True
    if q and f and q.get("units") and len(q["units"]) == len(f["units"]):
        k = kind(f"windows:{q.get('setup')}:{len(q['units'])}", len(q["units"]))
        nq, nf = np.asarray(q["units"], float), np.asarray(f["units"], float)
        se.ppl, se.ppl_fp = math.exp(nq.mean()), math.exp(nf.mean())
        idx = rs.indices(k)
        reps = np.exp(nq[idx].mean(axis=1)) - np.exp(nf[idx].mean(axis=1))
        se.ppl_delta = Estimate(se.ppl - se.ppl_fp, reps)


def _massive_evidence(ev: ModelEvidence, ms: Mapping[tuple[str, str], Mapping], kind, rs) -> None:
    """The FP cell's massive-activation shares (per window units) as Estimates."""
    for (measure, param), m in ms.items():
        units = m.get("units") or []
        if measure not in ("massive_frac", "massive_pos") or not units:
            continue
        k = kind(f"windows:{m.get('setup')}:{len(units)}", len(units))
        est = Estimate(float(np.mean(units)), rs.mean(k, units))
        if measure == "massive_frac":
            ev.massive_ratio[float(param)] = est
        else:
            ev.massive_pos[param] = est
    ev.massive_ratio = dict(sorted(ev.massive_ratio.items()))
    ev.massive_pos = dict(sorted(ev.massive_pos.items(), key=lambda kv: int(kv[0].split("-")[0])))


__all__ = ["DEFAULT_KL_RATIO", "Estimate", "format_ci", "FLIP_KINDS", "ModelEvidence", "SettingEvidence", "build_evidence",
           "item_contrast", "mean_of"]
