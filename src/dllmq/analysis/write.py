"""An outlier report on disk: outliers.json and its PNG plots, written into a folder in one step."""
from __future__ import annotations

import json
import os
from pathlib import Path

from dllmq.analysis.outlier_report import JSON_NAME, OutlierReport
from dllmq.analysis.plots import plot_all
from dllmq.atomic import atomic_directory


def write_outlier_report(report: OutlierReport, out_dir: str | os.PathLike, plots: bool = True,
                         overwrite: bool = False) -> list[Path]:
    """Write outliers.json (+ PNG plots) to `out_dir` atomically: everything goes to a staging
    directory beside it, which then takes its place in one step. Returns the written files."""
    out = Path(out_dir)
    with atomic_directory(out, overwrite=overwrite, what="--out") as tmp:
        names: list[str] = []
        if plots:
            names = [p.name for p in plot_all(report, tmp)]
        report.plots = names
        with open(tmp / JSON_NAME, "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, indent=1)
            f.write("\n")
    return [out / JSON_NAME] + [out / n for n in names]
