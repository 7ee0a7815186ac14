"""`dllmq eval`: the study's benchmarks through lm-evaluation-harness, or the offline mini tasks."""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping
from pathlib import Path

from dllmq.cli.commands import help_of
from dllmq.cli.common import (add_backend_arg, add_kv_cache_arg, add_model_args, load, require_at_least,
                              require_fraction)
from dllmq.evaluate import evaluate_mini
from dllmq.evaluate.mini import ALIASES, TASKS
from dllmq.atomic import write_json_atomic
from dllmq.errors import DllmqError
from dllmq.evaluate.presets import PROFILES
from dllmq.evaluate.runner import EvalOptions, run_eval

EPILOG = """\
examples:
  dllmq eval MODEL --tasks general            # MMLU, ARC-E, ARC-C, HellaSwag, WinoGrande, PIQA
  dllmq eval MODEL --tasks math,code --allow-code-execution
  dllmq eval q/ --tasks gsm8k --limit 50 --out results.json
  dllmq eval MODEL --tasks humaneval --allow-code-execution   # works offline"""

# Flags that override a task preset's model settings (presets.OVERRIDABLE), all None = the preset's.
OVERRIDE_FLAGS = ("mc_num", "batch_size", "gen_batch_size", "gen_length", "steps", "block_length", "cfg",
                  "temperature", "top_p", "num_fewshot", "alg", "remasking", "chat", "nll_type")


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help=help_of("eval"),
                       description="Evaluate MODEL (full precision or a dllmq-quantized directory) the way LLaDA "
                                   "and Dream are evaluated: Monte Carlo likelihood for multiple choice, diffusion "
                                   "generation for math and code. Model-written code only runs with "
                                   "--allow-code-execution, inside dllmq's sandbox.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_backend_arg(p, "fake")
    p.add_argument("--tasks", default="general",
                   help="comma-separated groups (general, math, code, all), preset tasks (mmlu, arc_easy, "
                        "arc_challenge, hellaswag, winogrande, piqa, gsm8k, minerva_math, humaneval, mbpp) or "
                        "other lm-evaluation-harness tasks (default: general)")
    p.add_argument("--limit", type=float, default=None, help="at most this many samples per task (or a fraction < 1)")
    p.add_argument("--out", default=None, help="write the results JSON here (atomically)")
    p.add_argument("--log-samples", action="store_true", help="also write every sample to OUT.samples.jsonl")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="allow humaneval / mbpp to run model-written code inside dllmq's sandbox")
    p.add_argument("--data-dir", default=None,
                   help="folder with datasets downloaded elsewhere (DATA_DIR/<hf path>[/<config>]/<split>.jsonl, "
                        "save_to_disk folders or Hub snapshots); else HF datasets' network / cache")
    p.add_argument("--offline", action="store_true", help="never try the network for datasets (cache / data-dir only)")
    p.add_argument("--include-path", default=None, help="extra folder of lm-eval task YAMLs")
    for flag, typ, text in [("--mc-num", int, "Monte Carlo draws per likelihood (preset: 128, MMLU 1)"),
                            ("--batch-size", int, "rows per forward pass in the likelihood estimate"),
                            ("--gen-batch-size", int, "prompts generated together"),
                            ("--gen-length", int, "tokens to generate (preset per task)"),
                            ("--steps", int, "denoising steps (default: gen-length)"),
                            ("--block-length", int, "LLaDA block length (preset per task)"),
                            ("--cfg", float, "classifier-free guidance scale (default 0)"),
                            ("--temperature", float, "sampling temperature (LLaDA 0, Dream 0.1)"),
                            ("--top-p", float, "Dream nucleus sampling (preset 0.9)"),
                            ("--num-fewshot", int, "few-shot examples (preset per task)")]:
        p.add_argument(flag, type=typ, default=None, help=text)
    p.add_argument("--alg", default=None, choices=["origin", "maskgit_plus", "topk_margin", "entropy"],
                   help="Dream unmasking order (preset entropy)")
    p.add_argument("--remasking", default=None, choices=["low_confidence", "random"], help="LLaDA remasking")
    p.add_argument("--chat", action="store_true", default=None, help="wrap prompts in the chat template")
    p.add_argument("--nll-type", default=None, choices=["mc", "ar_ftb", "ar_btf"],
                   help="Dream's likelihood (--profile paper on Dream): mc (default), or its autoregressive-order "
                        "variants ar_ftb / ar_btf")
    p.add_argument("--sandbox-workers", type=int, default=None, help="programs run in parallel (default min(4, cores))")
    add_kv_cache_arg(p, "mini_math and mini_code only; ")
    p.add_argument("--profile", default="dllmq",
                   help="dllmq (default: the presets) or paper (the study's own evaluation where it differs: Dream's "
                        "likelihood estimator and generation settings; harness tasks; docs/fidelity.md)")
    p.set_defaults(func=run)


def check_args(args, mini: bool) -> None:
    """The flags that can be judged before any task or model loads."""
    limit = args.limit
    if limit is not None:
        if not 0 < limit < math.inf:
            raise DllmqError(f"--limit must be a positive number of samples per task (or a fraction below 1), "
                             f"got {limit:g}.")
        if not float(limit).is_integer():
            if mini:
                raise DllmqError(f"--limit {limit:g} is not a whole number; the mini tasks take a number of items "
                                 "(fractions are for harness tasks).")
            if limit > 1:
                raise DllmqError(f"--limit must be a whole number of samples or a fraction below 1, got {limit:g}.")
    require_at_least(args, 1, "--mc-num", "--batch-size", "--gen-batch-size", "--gen-length", "--steps",
                     "--block-length", "--sandbox-workers")
    require_at_least(args, 0, "--num-fewshot", "--temperature", "--cfg")
    require_fraction(args, "--top-p")
    for flag in ("--data-dir", "--include-path"):
        folder = getattr(args, flag[2:].replace("-", "_"))
        if folder is not None and not Path(folder).is_dir():
            raise DllmqError(f"{flag} {folder} is not a directory; give the folder that holds the "
                             f"{'datasets' if flag == '--data-dir' else 'task YAML files'}.")


def run(args) -> None:
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    mini = bool(names) and all(t in TASKS or t in ALIASES for t in names)
    check_args(args, mini)
    if args.profile not in PROFILES:
        raise DllmqError(f"Unknown --profile {args.profile!r}; choose {' or '.join(PROFILES)}.")
    if args.kv_cache != "none" and not mini:
        raise DllmqError(f"--kv-cache {args.kv_cache} applies to the mini generation tasks only; harness tasks "
                         "always decode exactly, so leave --kv-cache out.")
    if mini:
        if args.profile != "dllmq":
            print("note: --profile paper changes the harness tasks only; the mini tasks run as they always do",
                  file=sys.stderr)
        return _eval_mini(args, names)
    _eval_harness(args)


def _eval_mini(args, names) -> None:
    """The offline mini benchmark (no harness, no datasets): mini_general, mini_math, mini_code."""
    model, tokenizer, _ = load(args)
    limit = None if args.limit is None else int(args.limit)
    results = evaluate_mini(model, tokenizer, names, limit=limit, seed=args.seed, chat=args.chat,
                            kv_cache=args.kv_cache)
    if args.kv_cache != "none":
        print(f"note: approximate decoding (--kv-cache {args.kv_cache}); not comparable with exact results",
              file=sys.stderr)
    print(f"{'task':<14} {'acc':>7} {'stderr':>7} {'n':>5} {'chance':>7} {'acc_norm':>8}")
    for task, r in results.items():
        norm = f"{100 * r['acc_norm']:.2f}" if "acc_norm" in r else "-"  # mini_general only
        print(f"{task:<14} {100 * r['acc']:>7.2f} {100 * r['stderr']:>7.2f} {r['n']:>5} {100 * r['chance']:>7.1f} "
              f"{norm:>8}")
    if args.out:
        write_json_atomic(Path(args.out), {"model": str(args.model), "tasks": results, "limit": limit,
                                           "seed": args.seed, "profile": args.profile,
                                           **({"kv_cache": args.kv_cache} if args.kv_cache != "none" else {})})
        print(f"results written to {args.out}")


def _eval_harness(args) -> dict:
    """run_eval from the parsed flags; prints a table; returns the report."""
    overrides = {k: getattr(args, k) for k in OVERRIDE_FLAGS}
    limit = args.limit
    if limit is not None and float(limit).is_integer() and limit >= 1:
        limit = int(limit)
    options = EvalOptions(limit=limit, out=args.out, allow_code_execution=args.allow_code_execution,
                          data_dir=args.data_dir, overrides=overrides, dtype=args.dtype, device=args.device,
                          seed=args.seed, offline=True if args.offline else None, include_path=args.include_path,
                          log_samples=args.log_samples, sandbox_workers=args.sandbox_workers, profile=args.profile)
    report = run_eval(args.model, args.tasks, options)
    print(format_table(report))
    if args.out:
        print(f"results written to {args.out}")
    return report


def format_table(report: Mapping) -> str:
    rows = [("task", "metric", "value", "stderr", "n")]
    for name, t in report["tasks"].items():
        value = "-" if t["value"] is None else f"{100 * t['value']:.2f}"
        stderr = "-" if t["stderr"] is None else f"{100 * t['stderr']:.2f}"
        rows.append((name, t["metric"], value, stderr, str(t["n_samples"])))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
