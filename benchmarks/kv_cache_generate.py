"""The opt-in approximate KV cache (Fast-dLLM prefix / dual) against exact decoding: time, accuracy, flips.

For each model and mini generation task, the items are generated exactly as `dllmq eval` does (the
task's prompts and GEN_SETTINGS, batches of 32, seed 0) with kv_cache none, prefix and dual; the
generation alone is timed (wall and CPU time of this process), then scored as the mini benchmark
scores it. Flips are counted against exact decoding: the items whose answer differs (the extracted
integer for mini_math, the tested program for mini_code), and how many went right->wrong and
wrong->right. The mini settings are short (math 8 tokens in blocks of 4, code 32 in blocks of 8), so
a longer generation (default gen_length 128, block 32, steps 128 on a few mini_code prompts) is timed
too, with the fraction of generated tokens that match exact decoding.

    python benchmarks/kv_cache_generate.py                                 # both tiny models, all items
    python benchmarks/kv_cache_generate.py --code-limit 100 --math-limit 400 --threads 1
    python benchmarks/kv_cache_generate.py --models dllmq-tiny --tasks mini_math --math-limit 32   # smoke

Run it in a quiet machine for absolute times; the ratios within one run are what to compare (under
load the CPU-time ratio is the steadier one).
"""
from __future__ import annotations

import argparse
import time

import torch

from dllmq.api import load_model
from dllmq.diffusion import encode_prompts, format_prompt, generate, generate_text
from dllmq.diffusion.kv_cache import KV_CACHE_MODES
from dllmq.evaluate.mini import (GEN_SETTINGS, code_program, first_integer, generation_prompts, is_chat_model,
                                 load_items, program_with_tests)
from dllmq.evaluate.sandbox import run_programs, with_limits
from dllmq.quant.qlinear import keep_dequantized_weights

BATCH = 32


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def generate_task(model, tok, task, items, chat, kv_cache):
    prompts = generation_prompts(task, items, chat)
    outs = []
    for start in range(0, len(prompts), BATCH):
        outs += generate_text(model, tok, prompts[start:start + BATCH], chat=chat, sampler="llada", seed=0,
                              kv_cache=kv_cache, **GEN_SETTINGS[task, chat])
    return outs


def score(task, items, outputs, chat):
    """(correct, answers) per item, as dllmq.evaluate.mini scores them."""
    if task == "mini_math":
        answers = [first_integer(o) for o in outputs]
        return [a == it["answer"] for a, it in zip(answers, items)], answers
    programs = [code_program(it["prompt"], o, chat) for it, o in zip(items, outputs)]
    results = run_programs([program_with_tests(p, it["tests"]) for p, it in zip(programs, items)],
                           allow_code_execution=True, limits=with_limits(timeout_s=5.0, cpu_s=5), workers=2,
                           progress=False)
    return [r.passed for r in results], programs


def long_generation(model, tok, chat, n_prompts, gen_length, block_length, steps):
    items = load_items("mini_code", n_prompts)
    texts = [format_prompt(tok, p, chat) for p in generation_prompts("mini_code", items, chat)]
    ids, mask = encode_prompts(tok, texts, chat=chat)
    kw = dict(gen_length=gen_length, block_length=block_length, steps=steps, sampler="llada")
    rows, exact = [], None
    for mode in KV_CACHE_MODES:
        out, wall, cpu = timed(lambda: generate(model, tok, ids, attention_mask=None if mask.all() else mask,
                                                kv_cache=mode, **kw))
        gen = out[:, ids.shape[1]:]
        exact = gen if exact is None else exact
        rows.append((mode, wall, cpu, (gen == exact).float().mean().item()))
    return ids.shape, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="dllmq-tiny,dllmq-tiny-instruct")
    ap.add_argument("--tasks", default="mini_math,mini_code")
    ap.add_argument("--math-limit", type=int, default=None, help="first N mini_math items (default all 400)")
    ap.add_argument("--code-limit", type=int, default=None, help="first N mini_code items (default all 301)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--long", default="4,128,32,128", help="prompts,gen_length,block_length,steps ('' to skip)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    limits = {"mini_math": args.math_limit, "mini_code": args.code_limit}
    print(f"threads {args.threads}; times are the generation alone (scoring excluded); flips vs exact decoding")
    header = (f"{'model':<20} {'task':<10} {'n':>4} {'cache':<7} {'wall s':>8} {'cpu s':>8} {'wall x':>7} "
              f"{'cpu x':>6} {'acc %':>6} {'differ %':>8} {'R->W':>5} {'W->R':>5}")
    print(header)
    long_rows = []
    for name in args.models.split(","):
        model, tok, _ = load_model(name)
        chat = is_chat_model(model)
        with torch.no_grad(), keep_dequantized_weights(model):
            for task in args.tasks.split(","):
                items = load_items(task, limits[task])
                base = None
                for mode in KV_CACHE_MODES:
                    outs, wall, cpu = timed(lambda: generate_task(model, tok, task, items, chat, mode))
                    correct, answers = score(task, items, outs, chat)
                    if base is None:
                        base = (wall, correct, answers, cpu)
                    differ = sum(a != b for a, b in zip(answers, base[2]))
                    r2w = sum(b and not c for b, c in zip(base[1], correct))
                    w2r = sum(c and not b for b, c in zip(base[1], correct))
                    print(f"{name:<20} {task:<10} {len(items):>4} {mode:<7} {wall:>8.1f} {cpu:>8.1f} "
                          f"{base[0] / wall:>6.2f}x {base[3] / cpu:>5.2f}x {100 * sum(correct) / len(items):>6.1f} "
                          f"{100 * differ / len(items):>8.1f} {r2w:>5} {w2r:>5}", flush=True)
            if args.long:
                n, gen_length, block_length, steps = (int(v) for v in args.long.split(","))
                shape, rows = long_generation(model, tok, chat, n, gen_length, block_length, steps)
                long_rows += [(name, shape, *r) for r in rows]
    if long_rows:
        print(f"\nlonger generation: gen_length/block/steps = {args.long.split(',', 1)[1]}, "
              f"prompts x prompt tokens as shown")
        print(f"{'model':<20} {'batch':>9} {'cache':<7} {'wall s':>8} {'cpu s':>8} {'wall x':>7} {'cpu x':>6} "
              f"{'same tokens %':>13}")
        for name, shape, mode, wall, cpu, same in long_rows:
            exact = next(r for r in long_rows if r[0] == name and r[2] == "none")
            print(f"{name:<20} {f'{shape[0]}x{shape[1]}':>9} {mode:<7} {wall:>8.1f} {cpu:>8.1f} "
                  f"{exact[3] / wall:>6.2f}x {exact[4] / cpu:>5.2f}x {100 * same:>13.1f}")


if __name__ == "__main__":
    main()
