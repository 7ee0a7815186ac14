"""Quantization x denoising steps (issue 19): accuracy, flips and per-step disagreement with FP of each method
at several LLaDA step counts and both remasking strategies (dllmq.study.steps has the definitions).

    OMP_NUM_THREADS=1 python benchmarks/steps_study.py --cache runs/study-cache --out runs/steps-study
    python benchmarks/steps_study.py --quick --out /tmp/steps            # seconds: random-llada, 2 methods

Writes OUT.md (the tables) and OUT.json (every row, the per-step curves, the grid and the CPU time),
atomically. Bad settings: one sentence, exit code 2.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from dllmq.atomic import write_json_atomic, write_text_atomic
from dllmq.errors import DllmqError
from dllmq.study.steps import StepsGrid, format_table, run_steps_study

# seconds on a CPU: a random model, RTN (no calibration), 4 items, 2 step counts
QUICK = StepsGrid(model="random-llada", methods=("fp", "rtn:W4A16-g128"), tasks=("mini_math",), limit=4,
                  gen_length=8, block_length=4, steps=(2, 8), batch_size=4)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise DllmqError(f"--steps takes whole numbers separated by commas, got {text!r}.") from None


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (mini_code's sandbox)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def main(argv=None) -> int:
    d = StepsGrid()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=d.model)
    p.add_argument("--methods", default=",".join(d.methods), help="fp first, then method:PRESET entries")
    p.add_argument("--tasks", default=",".join(d.tasks))
    p.add_argument("--limit", type=int, default=d.limit, help="the first N items of each task")
    p.add_argument("--gen-length", type=int, default=d.gen_length)
    p.add_argument("--block-length", type=int, default=d.block_length)
    p.add_argument("--steps", default=",".join(map(str, d.steps)))
    p.add_argument("--remasking", default=",".join(d.remasking))
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="prompts generated together")
    p.add_argument("--cache", default=None, help="the study's cache of quantized models (read and filled)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (results do not depend on it)")
    p.add_argument("--quick", action="store_true", help="a seconds-long grid on random-llada (for tests)")
    p.add_argument("--out", required=True, help="writes OUT.md and OUT.json")
    args = p.parse_args(argv)
    try:
        if args.quick:
            grid = QUICK
        else:
            grid = replace(d, model=args.model, methods=_names(args.methods), tasks=_names(args.tasks),
                           limit=args.limit, gen_length=args.gen_length, block_length=args.block_length,
                           steps=_ints(args.steps), remasking=_names(args.remasking), seed=args.seed,
                           batch_size=args.batch_size)
        if args.threads is not None:
            if args.threads < 1:
                raise DllmqError(f"--threads must be at least 1, got {args.threads}.")
            torch.set_num_threads(args.threads)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        start = (_cpu_seconds(), time.perf_counter())

        def write(result: dict, done: bool = False) -> str:
            """OUT.md and OUT.json of the methods finished so far (rewritten after each one)."""
            cpu, wall = _cpu_seconds() - start[0], time.perf_counter() - start[1]
            result["cost"] = {"cpu_seconds": round(cpu, 1), "wall_seconds": round(wall, 1),
                              "threads": torch.get_num_threads(), "complete": done}
            table = format_table(result["rows"])
            write_text_atomic(out.with_suffix(".md"), f"{grid.model}, {', '.join(grid.methods)}; gen_length "
                              f"{grid.gen_length}, block_length {grid.block_length}, seed {grid.seed}; "
                              f"{cpu / 60:.1f} CPU-minutes{'' if done else ' (partial)'}\n\n{table}")
            write_json_atomic(out.with_suffix(".json"), result)
            return table

        result = run_steps_study(grid, args.cache, log=lambda s: print(s, file=sys.stderr, flush=True),
                                 partial=write)
    except DllmqError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = write(result, done=True)
    cpu, wall = result["cost"]["cpu_seconds"], result["cost"]["wall_seconds"]
    print(table)
    print(f"{cpu:.0f} s CPU ({wall:.0f} s wall); wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
