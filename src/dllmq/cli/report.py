"""`dllmq report`: the degradation report of a study database, to the terminal or a directory."""
from __future__ import annotations

import argparse

from dllmq.cli.commands import help_of
from dllmq.errors import DllmqError
from dllmq.study.report import CHECKBOX, HTML_NAME, MARKDOWN_NAME, OUTLIERS_SUBDIR, build_report, terminal_report
from dllmq.study.store import DEFAULT_DB

DESCRIPTION = """\
Report a study database the way "Quantization Meets dLLMs" does: per model, FP and every method x bit
width on each task, each category average (general / math / code) and overall, with the change vs FP in
points classified negligible (< 1), moderate (1-4) or severe (> 4); degradation plots; and the paper's
findings checked against this run's numbers (holds / does not hold / inconclusive / not measured: with
per-item answers and the measures against FP in the database, each finding is decided by the 95 % paired
bootstrap interval of the metric it is about, and the report names that metric). With --out, writes
report.md, report.html (a single self-contained file: inline CSS, images embedded) and the PNG plots;
without it, prints the Markdown tables to the terminal."""

EPILOG = """\
examples:
  dllmq report                                       # runs/study.db (dllmq study's default) to the terminal
  dllmq report --db runs.db                          # Markdown to the terminal
  dllmq report --db runs.db --out report/            # report.md + report.html + PNGs
  dllmq report --db runs.db --out report/ --overwrite
  dllmq report --db runs.db --out report/ --outliers llada_outliers/   # + the `dllmq outliers` plots
"""


def add_parser(sub) -> None:
    """Add the `report` subcommand to an argparse subparsers object."""
    p = sub.add_parser("report", help=help_of("report"),
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default=DEFAULT_DB,
                   help=f"the study's SQLite database, as `dllmq study --db` wrote it (default {DEFAULT_DB})")
    p.add_argument("--out", default=None,
                   help="directory for report.md, report.html and PNGs (written atomically); "
                        "without it the Markdown goes to the terminal")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--outliers", default=None, metavar="DIR",
                   help="a `dllmq outliers --out` directory: its PNG plots are embedded in an "
                        "'Activation outliers' section and outliers.json is linked")
    p.add_argument("--no-plots", action="store_true", help="skip the degradation plots (no matplotlib needed)")
    p.add_argument("--kl-ratio", type=float, default=0.5,
                   help="mask ratio whose KL to FP the tables show and the comparisons are decided on (default 0.5; "
                        "the nearest ratio measured is used)")
    p.set_defaults(func=run)


def run(args) -> None:
    if not 0 < args.kl_ratio <= 1:
        raise DllmqError(f"--kl-ratio must be a mask ratio in (0, 1], got {args.kl_ratio}.")
    if args.out is None:
        if args.overwrite:
            raise DllmqError("--overwrite only applies with --out; pass --out DIR or drop --overwrite.")
        print(terminal_report(args.db, args.outliers, kl_ratio=args.kl_ratio), end="")
        return
    report = build_report(args.db, args.out, args.outliers, overwrite=args.overwrite, plots=not args.no_plots,
                          kl_ratio=args.kl_ratio)
    for f in report.findings:
        print(f"{CHECKBOX[f.status]} {f.number}. {f.line()}")
    files = [MARKDOWN_NAME, HTML_NAME] + sorted(report.images)
    extra = f" and {OUTLIERS_SUBDIR}/" if args.outliers else ""
    print(f"wrote {args.out}: {', '.join(files)}{extra}")
