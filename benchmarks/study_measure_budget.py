"""How many text windows and items the findings need: re-decide a finished study on subsets of its units.

    python benchmarks/study_measure_budget.py runs/study.db
    python benchmarks/study_measure_budget.py runs/study.db --windows 2 4 8 16 --items 25 50 100

For each budget (the first W measure windows of every cell, the first N items of every task) the paired
evidence is rebuilt from the database's stored per-unit values and the eight findings are decided again;
it prints, per budget, how many are decided with 95 % confidence and each finding's status. Nothing is
re-run: a smaller budget is exactly a run that had stopped at W windows / N items (the windows and the
items are fixed lists, their order does not depend on the budget). Prints numbers; asserts nothing.
"""
from __future__ import annotations

import argparse
import time

from dllmq.study import store
from dllmq.study.evidence import build_evidence
from dllmq.study.grid import build_tables, normalize
from dllmq.study.verdicts import decided, evaluate_findings

SHORT = {"holds": "H", "does not hold": "N", "inconclusive": "?", "mixed": "M", "not measured": "-"}


def _subset(items, measures, windows: int | None, n_items: int | None):
    if n_items is not None:
        keep: dict[tuple, set] = {}
        for it in items:
            keep.setdefault((it["cell_key"], it["task"]), set()).add(it["item"])
        first = {k: set(sorted(v, key=lambda s: (len(s), s))[:n_items]) for k, v in keep.items()}
        items = [it for it in items if it["item"] in first[(it["cell_key"], it["task"])]]
    if windows is not None:
        measures = [dict(m, units=m["units"][:windows]) if m["measure"] in ("kl", "top1", "elbo_nll", "elbo_nll_fp")
                    else m for m in measures]
    return items, measures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("db")
    p.add_argument("--windows", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--items", type=int, nargs="+", default=[25, 50, 100])
    p.add_argument("--kl-ratio", type=float, default=0.5)
    args = p.parse_args()
    rows, items, measures = store.read_results(args.db), store.read_items(args.db), store.read_measures(args.db)
    tables = build_tables(normalize(rows)[0])
    drops = {t.model: t.drops() for t in tables}
    print(f"{args.db}: {len(rows)} result rows, {len(items)} items, {len(measures)} measure rows")
    print("windows  items  decided  per finding (H holds, N does not hold, ? inconclusive, M mixed)  seconds")
    for n in args.items:
        for w in args.windows:
            start = time.perf_counter()
            it, ms = _subset(items, measures, w, n)
            findings = evaluate_findings(drops, build_evidence(rows, it, ms), args.kl_ratio)
            marks = " ".join(f"{f.number}{SHORT[f.status]}" for f in findings)
            print(f"{w:7d}  {n:5d}  {decided(findings):7d}  {marks}  {time.perf_counter() - start:.1f}")


if __name__ == "__main__":
    main()
