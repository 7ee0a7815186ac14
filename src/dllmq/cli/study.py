"""`dllmq study` (also `python -m dllmq.study`): run a study grid into a results database, resumably."""
from __future__ import annotations

import argparse
import logging
import sys

from dllmq.cli import Parser
from dllmq.cli.commands import help_of
from dllmq.cli.common import add_calib_device_arg, add_device_arg
from dllmq.errors import DllmqError
from dllmq.study.config import load_config
from dllmq.study.runner import DEFAULT_CACHE, format_dry_run, format_summary, format_table, run_study
from dllmq.study.store import DEFAULT_DB

DESCRIPTION = """\
Run the study grid: every model x method x bit config (full precision once per model) x seed is a
cell; each cell quantizes the model (or loads it from the cache), runs every task and writes its
results to the SQLite database --db in one transaction. Resumable: rerun the same command after a
crash or Ctrl-C and only the missing cells run; several runners on one machine can work on one
grid at once and never compute a cell twice (keep --db on a local disk: SQLite's WAL mode does not
work over network filesystems)."""

EPILOG = """\
examples:
  dllmq study                                   # the paper's grid on dllmq-tiny and dllmq-tiny-instruct
  dllmq study --dry-run                         # list the cells and which are done
  dllmq study --config study.yaml --db runs.db  # any grid: models x methods x bit configs x tasks
  dllmq study --config study.yaml --device cuda --limit 20
  dllmq report --db runs/study.db               # the degradation report of the results

A study config (YAML; the default is dllmq/study/default_study.yaml):
  models: [random-llada, /path/to/LLaDA-8B-Instruct]
  methods:
    - fp
    - {name: rtn, bits: [W4A16-g128, W3A16-g128]}
    - {name: gptq, bits: [W4A16-g128], act_order: true, label: gptq-ao}
    - {name: quarot, bits: [W8A8, W4A4]}
  tasks: [mini_general, mini_math, mini_code]   # or harness tasks: general, gsm8k, ...
  limit: 100
  calibration: {calib: wiki, nsamples: 32, seqlen: 256}
  seeds: [0]
"""


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="study YAML file (default: the paper's grid, dllmq/study/default_study.yaml)")
    p.add_argument("--db", default=DEFAULT_DB, help=f"results database (SQLite; default {DEFAULT_DB})")
    p.add_argument("--cache", default=DEFAULT_CACHE,
                   help=f"folder of quantized models reused across cells and runs (default {DEFAULT_CACHE})")
    p.add_argument("--no-cache", action="store_true", help="do not keep quantized models (saves disk; a resumed "
                                                          "cell quantizes again)")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their state, run nothing")
    p.add_argument("--limit", type=int, default=None, help="items per task, overriding the config's limit")
    add_device_arg(p, "where models run: cpu, cuda, ... (default cpu)")
    add_calib_device_arg(p)
    p.add_argument("--stale-after", type=float, default=120.0,
                   help="seconds without a heartbeat after which another runner's claim is taken over (default 120)")
    p.add_argument("--no-retry-failed", action="store_true", help="leave cells that failed in earlier runs failed")


def add_parser(sub) -> None:
    """Add the `study` subcommand to an argparse subparsers object."""
    p = sub.add_parser("study", help=help_of("study"),
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> None:
    """`dllmq study`: dry run, or run the grid, print the table and summary; exit code 1 if a cell failed."""
    if args.stale_after <= 0:
        raise DllmqError(f"--stale-after must be a positive number of seconds, got {args.stale_after}.")
    if args.limit is not None and args.limit < 1:
        raise DllmqError(f"--limit must be a positive number of items per task, got {args.limit}.")
    config = load_config(args.config)
    if args.limit is not None:
        config = config.with_limit(args.limit)
    if args.dry_run:
        print(format_dry_run(config, args.db, args.device))
        return
    summary = run_study(config, args.db, None if args.no_cache else args.cache, device=args.device,
                        calib_device=args.calib_device, stale_after=args.stale_after,
                        retry_failed=not args.no_retry_failed, progress=sys.stderr.isatty(),
                        log_lines=not sys.stderr.isatty())
    print(format_table(args.db, summary.cells))
    print(format_summary(summary))
    print(f"report: dllmq report --db {args.db}")
    if not summary.ok:
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> int:
    """`python -m dllmq.study`: the same as `dllmq study`."""
    parser = Parser(prog="dllmq study", description=DESCRIPTION, epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    _add_arguments(parser)
    try:
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        args.preflight(args)
        run(args)
    except DllmqError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
