"""What the mini evaluation costs per task and per quantization setting on dllmq-tiny (CPU, 1 thread), and
what the fast path saves against the plain one (dllmq.quant.plain_paths; likelihood pair by pair), measured
in the same run on the same quantized model.

Settings: fp; rtn W4A16; smoothquant / quarot (weight_method rtn) / duquant at W8A8 and W4A4. Each is
quantized once (calibration: --nsamples windows of --seqlen tokens; not timed), then evaluate_mini runs per
task on the first --limit items (the default seed), timed: wall seconds and CPU seconds of this process
(mini_code's sandboxed test programs run in child processes, counted apart as "child CPU"). For a
weight-activation setting, and for mini_general (likelihood batches stacked into shared forwards), the
plain path runs too, and "speed-up" is its CPU time over the fast one's; the two must give the same answers
on every item (the script stops if not).

    python benchmarks/eval_speed.py [--limit 32] [--tasks mini_general mini_math mini_code]
        [--settings fp rtn-W4A16 smoothquant-W8A8 ...] [--no-plain]
"""
from __future__ import annotations

import argparse
import os
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from dllmq.evaluate.mini import evaluate_mini  # noqa: E402
from dllmq.models.loading import load_plain_model  # noqa: E402
from dllmq.quant import QuantConfig, quantize  # noqa: E402
from dllmq.diffusion import likelihood  # noqa: E402
from dllmq.quant.plain_paths import plain_paths  # noqa: E402

SETTINGS = {
    "fp": None,
    "rtn-W4A16": ("rtn", dict(wbits=4)),
    "smoothquant-W8A8": ("smoothquant", dict(wbits=8, abits=8)),
    "smoothquant-W4A4": ("smoothquant", dict(wbits=4, abits=4)),
    "quarot-W8A8": ("quarot", dict(wbits=8, abits=8, weight_method="rtn")),
    "quarot-W4A4": ("quarot", dict(wbits=4, abits=4, weight_method="rtn")),
    "duquant-W8A8": ("duquant", dict(wbits=8, abits=8)),
    "duquant-W4A4": ("duquant", dict(wbits=4, abits=4)),
}
TASKS = ("mini_general", "mini_math", "mini_code")


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@contextmanager
def plain_evaluation() -> Iterator[None]:
    """The straightforward path: plain weight-activation pieces, and every likelihood batch in its own
    forward (nothing stacked: mc_loglikelihood pair by pair)."""
    saved = likelihood.MIN_ROWS_TO_STACK
    likelihood.MIN_ROWS_TO_STACK = float("inf")
    try:
        with plain_paths():
            yield
    finally:
        likelihood.MIN_ROWS_TO_STACK = saved


def timed_eval(model, tokenizer, task: str, limit: int) -> tuple[dict, float, float, float]:
    wall, cpu, child = time.perf_counter(), time.process_time(), _children_cpu()
    result = evaluate_mini(model, tokenizer, [task], limit=limit, progress=False, return_samples=True)[task]
    return result, time.perf_counter() - wall, time.process_time() - cpu, _children_cpu() - child


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--no-plain", action="store_true", help="skip the plain path (no speed-up column)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    rows = []
    for name in args.settings:
        lm = load_plain_model("dllmq-tiny")
        if SETTINGS[name] is not None:
            method, kw = SETTINGS[name]
            quantize(lm.model, lm.tokenizer, QuantConfig(method, **kw, nsamples=args.nsamples, seqlen=args.seqlen),
                     progress=False)
        weight_activation = SETTINGS[name] is not None and "abits" in SETTINGS[name][1]
        for task in args.tasks:
            result, wall, cpu, child = timed_eval(lm.model, lm.tokenizer, task, args.limit)
            row = [name, task, f"{result['acc']:.3f}", f"{wall:.1f}", f"{cpu:.1f}", f"{child:.1f}", "", "", ""]
            if (weight_activation or task == "mini_general") and not args.no_plain:
                with plain_evaluation():
                    plain, pwall, pcpu, _ = timed_eval(lm.model, lm.tokenizer, task, args.limit)
                if plain != result:
                    raise SystemExit(f"{name} {task}: the plain path's answers differ from the fast one's "
                                     f"(acc {plain['acc']} vs {result['acc']}); they must be equal.")
                row[6:] = [f"{pwall:.1f}", f"{pcpu:.1f}", f"{pcpu / cpu:.2f}x"]
            rows.append(row)
            print(" ".join(row), flush=True)

    header = ["setting", "task", "acc", "wall s", "CPU s", "child CPU s", "plain wall s", "plain CPU s",
              "speed-up (CPU)"]
    print(f"\nevaluate_mini on dllmq-tiny, limit {args.limit}, 1 thread, torch {torch.__version__}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(c or "-" for c in row) + " |")


if __name__ == "__main__":
    main()
