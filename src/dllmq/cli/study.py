"""`dllmq study` (also `python -m dllmq.study`): run a study grid into a results database, resumably."""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

from dllmq.cli import Parser
from dllmq.cli.commands import help_of
from dllmq.cli.common import add_calib_device_arg, add_device_arg, check_runtime
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
work over network filesystems). With --ray the grid runs on a Ray cluster: each cell is split into
units (quantize, each task's shards of items, the measures) that run on the cluster's workers, and
this process alone writes --db (see docs/cluster.md)."""

EPILOG = """\
examples:
  dllmq study                                   # the paper's grid on dllmq-tiny and dllmq-tiny-instruct
  dllmq study --dry-run                         # list the cells and which are done
  dllmq study --config study.yaml --db runs.db  # any grid: models x methods x bit configs x tasks
  dllmq study --config families --db runs/families.db  # the shipped family grid (docs/study.md)
  dllmq study --config study.yaml --device cuda --limit 20
  dllmq report --db runs/study.db               # the degradation report of the results
  dllmq study --ray local --workers 2           # the grid as units on a local Ray (pip install 'dllmq[ray]')
  dllmq study --config grid.yaml --ray auto --device cuda --cache /shared/study-cache   # a Ray cluster

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
                   help="study YAML file, or a shipped grid by name: families (AR twin vs LLaDA-style vs "
                        "Dream-style), dllm-aware, default (the paper's grid, dllmq/study/default_study.yaml, "
                        "what runs without --config)")
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
    p.add_argument("--workers", default="auto",
                   help="runner processes sharing the grid (default auto: 2 on a CPU with 2+ cores for a grid of at "
                        f"least {MIN_CELLS_FOR_WORKERS} cells whose models have at most {SMALL_MODEL_GIB:g} GiB of "
                        "weights, else 1; with --ray local: the local Ray's CPUs, default all cores; ignored on a "
                        "cluster, whose resources decide). Results do not depend on it")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run the grid on Ray: local (a Ray on this machine with --workers CPUs), auto (the cluster "
                        "`ray start` brought up here, or RAY_ADDRESS), ray://HOST:PORT or HOST:PORT (a cluster's "
                        "client or GCS address). --cache must then be a folder every node sees")
    p.add_argument("--shard-items", default="auto",
                   help="with --ray: items of a task per unit - mini tasks' items, harness tasks' documents "
                        "(default auto: enough shards for every worker, at least 8; mini generation tasks round up "
                        "to whole batches). Results do not depend on it")
    p.add_argument("--retries", type=int, default=2,
                   help="with --ray: times a unit whose worker or node died is run again before its cell fails "
                        "(default 2)")
    p.add_argument("--threads", default="auto",
                   help="torch threads per runner while evaluating (default auto: the cores divided among the "
                        "workers; overrides the config's threads). Results do not depend on it; quantization uses "
                        "the config's calibration.threads (default 1). With --ray: CPUs and threads per CPU unit (default 1)")
    p.set_defaults(preflight=preflight)   # after add_device_arg's: --device is not checked here with --ray


def add_parser(sub) -> None:
    """Add the `study` subcommand to an argparse subparsers object."""
    p = sub.add_parser("study", help=help_of("study"),
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run)


SMALL_MODEL_GIB = 2.0
MIN_CELLS_FOR_WORKERS = 8   # a second runner costs a process start and its own FP references


def _small_models(config) -> bool:
    """Whether every model of the grid is small enough for two copies in memory (weights on disk, fp32)."""
    from dllmq.models.random_models import RANDOM_MODELS
    from dllmq.models.loading import resolve_model_dir

    for m in config.models:
        if m in RANDOM_MODELS:
            continue
        try:
            d = resolve_model_dir(m)
        except (DllmqError, OSError):
            return False
        size = sum(f.stat().st_size for f in d.iterdir() if f.suffix == ".safetensors")
        if size > SMALL_MODEL_GIB * 2 ** 30 / 2:  # bf16 on disk -> fp32 in memory
            return False
    return True


def _count(value: str, name: str) -> int | None:
    if value == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise DllmqError(f"--{name} must be a positive whole number or auto, got {value!r}.")
    return n


def resolve_workers(args, config) -> tuple[int, int | None]:
    """(workers, threads per worker) from --workers / --threads (auto: see their help)."""
    cores = os.cpu_count() or 1
    workers = _count(args.workers, "workers")
    threads = _count(args.threads, "threads")
    if workers is None:
        on_cpu = str(args.device).split(":")[0] == "cpu"
        cells = len(config.models) * len(config.seeds) * sum(len(m.bits) for m in config.methods)
        workers = 2 if on_cpu and cores >= 2 and cells >= MIN_CELLS_FOR_WORKERS and _small_models(config) else 1
    if threads is None:
        threads = config.threads if config.threads is not None else (max(1, cores // workers) if workers > 1 else None)
    return workers, threads


def _die_with_parent() -> None:
    """In a worker, before exec: be killed when the runner that started it dies (even by kill -9), so no
    orphan keeps computing cells (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _worker_argv(args, threads: int | None) -> list[str]:
    argv = ["--db", str(args.db), "--workers", "1", "--stale-after", str(args.stale_after),
            "--device", str(args.device)]
    if args.config:
        argv += ["--config", str(args.config)]
    argv += ["--no-cache"] if args.no_cache else ["--cache", str(args.cache)]
    if args.limit is not None:
        argv += ["--limit", str(args.limit)]
    if args.calib_device:
        argv += ["--calib-device", str(args.calib_device)]
    if args.no_retry_failed:
        argv.append("--no-retry-failed")
    if threads is not None:
        argv += ["--threads", str(threads)]
    return argv


def preflight(args) -> None:
    """The runtime flags, checked before anything runs: --device is checked here unless the units run on
    Ray's workers (where this machine's devices do not matter)."""
    if getattr(args, "ray", None) is None:
        check_runtime(args)


def run_on_ray(args, config) -> None:
    """`dllmq study --ray ...`: the grid as Ray units; this process writes the database."""
    from dllmq.study.ray_runner import run_study_ray

    workers = _count(args.workers, "workers")
    threads = _count(args.threads, "threads")
    shard_items = _count(args.shard_items, "shard-items")
    if args.retries < 0:
        raise DllmqError(f"--retries must be 0 or more, got {args.retries}.")
    if threads is not None:
        config = config.with_threads(threads)
    summary = run_study_ray(config, args.db, None if args.no_cache else args.cache, address=args.ray,
                            workers=workers, device=args.device, calib_device=args.calib_device,
                            stale_after=args.stale_after, retry_failed=not args.no_retry_failed,
                            shard_items=shard_items, retries=args.retries, progress=sys.stderr.isatty(),
                            log_lines=not sys.stderr.isatty())
    print(format_table(args.db, summary.cells))
    print(format_summary(summary, f" (on Ray, {args.ray})"))
    print(f"report: dllmq report --db {args.db}")
    if not summary.ok:
        raise SystemExit(1)


def run(args) -> None:
    """`dllmq study`: dry run, or run the grid, print the table and summary; exit code 1 if a cell failed."""
    if getattr(args, "ray", None) is not None:
        from dllmq.study.ray_runner import import_ray
        import_ray()   # without Ray: the one sentence that says how to install it
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
    if args.ray is not None:
        run_on_ray(args, config)
        return
    workers, threads = resolve_workers(args, config)
    config = config.with_threads(threads)
    children = []
    if workers > 1:  # the other runners: the same grid on the same database; claims keep them apart
        tty = sys.stderr.isatty()
        for _ in range(workers - 1):
            children.append(subprocess.Popen([sys.executable, "-m", "dllmq.study", *_worker_argv(args, threads)],
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL if tty else None,
                                             preexec_fn=_die_with_parent))
    try:
        summary = run_study(config, args.db, None if args.no_cache else args.cache, device=args.device,
                            calib_device=args.calib_device, stale_after=args.stale_after,
                            retry_failed=not args.no_retry_failed, progress=sys.stderr.isatty(),
                            log_lines=not sys.stderr.isatty())
    except BaseException:
        for c in children:  # this runner failed or was interrupted: the others stop too
            c.terminate()
        for c in children:
            c.wait()
        raise
    codes = [c.wait() for c in children]
    print(format_table(args.db, summary.cells))
    print(format_summary(summary, f" ({workers} runners, {threads or 'default'} threads each)" if workers > 1 else ""))
    print(f"report: dllmq report --db {args.db}")
    if not summary.ok or any(codes):
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
