"""The study on a local Ray vs the local runner: wall time, Ray's start-up and per-unit overhead, equal rows.

Part 1 (Ray alone): `ray.init(num_cpus=W)`, the first task (a worker process starting), the round trip
of an empty task once workers are up (the driver's cost per unit), and `ray.shutdown()`.
Part 2: the same small grid three times, each with its own database and cache (so each quantizes):
`dllmq study --workers 2` (the local runner's processes; with --single also `--workers 1`) and
`--ray local --workers 2`,
as subprocesses, timed from outside; then checks that the three databases hold the same rows
(results, items, measures; timings left out).

    python benchmarks/study_ray.py [--limit 20] [--workers 2] [--out /tmp/study-ray] [--skip-grid] [--single]

The grid (4 cells on dllmq-tiny: FP, RTN W4A16, GPTQ W4A16, QuaRot W8A8; the mini tasks; the default
measures) is written to OUT/grid.yaml. Numbers depend on the machine's load; the script prints the
load average next to them. Never a timed test.
"""
from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

GRID = {"models": ["dllmq-tiny"],
        "methods": ["fp", {"name": "rtn", "bits": ["W4A16-g128"]}, {"name": "gptq", "bits": ["W4A16-g128"]},
                    {"name": "quarot", "bits": ["W8A8"]}],
        "tasks": ["mini_general", "mini_math", "mini_code"]}


def ray_overhead(workers: int, repeats: int = 50) -> None:
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, logging_level=logging.WARNING, configure_logging=False)
    t_init = time.perf_counter() - t0

    @ray.remote(num_cpus=1)
    def noop(x):
        return x

    t0 = time.perf_counter()
    ray.get([noop.remote(i) for i in range(workers)])
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(repeats):
        ray.get(noop.remote(i))
    t_rt = (time.perf_counter() - t0) / repeats
    t0 = time.perf_counter()
    ray.shutdown()
    t_down = time.perf_counter() - t0
    print(f"ray {ray.__version__}, num_cpus {workers}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"  ray.init             {t_init:6.2f} s")
    print(f"  first tasks (workers starting) {t_first:6.2f} s")
    print(f"  empty task round trip {1000 * t_rt:6.1f} ms (mean of {repeats}, one after the other)")
    print(f"  ray.shutdown         {t_down:6.2f} s")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and the processes it waited for). Ray's worker processes
    belong to its raylet, which the command stops at the end; what they used is counted when they were
    reaped by it, which Ray does not promise - read the Ray run's CPU time as a lower bound."""
    t0, c0 = time.perf_counter(), children_cpu()
    proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds, cpu = time.perf_counter() - t0, children_cpu() - c0
    if proc.returncode:
        print(proc.stdout)
        raise SystemExit(f"{' '.join(argv)} failed with exit code {proc.returncode}")
    print("   ", proc.stdout.strip().splitlines()[-2])   # the summary line
    return seconds, cpu


def written(db: Path) -> dict:
    from dllmq.study import store
    timing = {"eval_seconds", "quant_seconds", "created"}
    return {"results": [{k: v for k, v in r.items() if k not in timing} for r in store.read_results(db)],
            "items": store.read_items(db),
            "measures": [{k: v for k, v in m.items() if k != "seconds"} for m in store.read_measures(db)]}


def grid(out: Path, limit: int, workers: int, single: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    config = out / "grid.yaml"
    config.write_text(yaml.safe_dump({**GRID, "limit": limit}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {"local, --workers 1": ["--workers", "1", "--threads", "1"]} if single else {}
    runs |= {f"local, --workers {workers}": ["--workers", str(workers), "--threads", "1"],
            f"--ray local --workers {workers}": ["--ray", "local", "--workers", str(workers)]}
    seconds, dbs = {}, {}
    for i, (name, extra) in enumerate(runs.items()):
        db, cache = out / f"run{i}.db", out / f"cache{i}"
        for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            p.unlink(missing_ok=True)
        shutil.rmtree(cache, ignore_errors=True)
        print(f"{name}: load average {os.getloadavg()[0]:.1f}", flush=True)
        seconds[name] = timed([sys.executable, "-m", "dllmq.study", "--config", str(config), "--db", str(db),
                               "--cache", str(cache), *extra], env)
        dbs[name] = db
        print(f"    {seconds[name][0]:.1f} s wall, {seconds[name][1]:.1f} s CPU", flush=True)
    print(f"\n{len(GRID['methods'])} cells on dllmq-tiny, mini tasks at --limit {limit}, default measures:")
    for name, (s, cpu) in seconds.items():
        print(f"  {name:<28} {s:7.1f} s wall {cpu:7.1f} s CPU (waited-for processes)")
    first = written(next(iter(dbs.values())))
    same = all(written(db) == first for db in dbs.values())
    print(f"rows, items and measures identical across the {len(dbs)} runs: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="/tmp/study-ray")
    parser.add_argument("--skip-grid", action="store_true", help="only Ray's own start-up and round trip")
    parser.add_argument("--single", action="store_true", help="also time the local runner with one worker")
    args = parser.parse_args()
    ray_overhead(args.workers)
    if not args.skip_grid:
        grid(Path(args.out), args.limit, args.workers, args.single)


if __name__ == "__main__":
    main()
