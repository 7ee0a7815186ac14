"""Answer-only masked-diffusion training from scratch on arithmetic alone: how many rows a dllmq-tiny-sized
model needs to learn held-out sums, and what the EOS padding of the response does to generation.

A fresh LLaDA model of dllmq-tiny's shape (or --d-model / --layers) is trained with LLaDA's SFT loss (only the
answer and its EOS tail masked) on `Question: What is a + b? Answer: c` rows from the training key space, then
scored on the held-out mini_math items of the same kinds: answer tokens and whole answers given the length
(benchmarks/math_digits.py) and exact match by the benchmark's generation (gen_length 8) and with 4 slots.

    OMP_NUM_THREADS=1 python benchmarks/addition_from_scratch.py --steps 2000 --min-response 8
    OMP_NUM_THREADS=1 python benchmarks/addition_from_scratch.py --steps 2000 --min-response 0

docs/embedded-models.md ("Math") has the measured rows.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from math_digits import answer_digit_accuracy  # noqa: E402

from dllmq.evaluate.mini import load_items, score_math  # noqa: E402
from dllmq.models.loading import load_tokenizer  # noqa: E402
from dllmq.tiny import checkpoint_dir  # noqa: E402
from dllmq.train import corpus  # noqa: E402
from dllmq.train.config import TrainConfig  # noqa: E402
from dllmq.train.loop import make_model, sft_loss  # noqa: E402


def rows(tok, kinds: list[str], n: int, rng: random.Random, min_response: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of n answer-only rows (BOS + prompt | answer + EOS, EOS-padded; responses >= min_response)."""
    pairs = []
    while len(pairs) < n:
        kind = rng.choice(kinds)
        item = corpus._math_item(kind, *corpus.MATH_KINDS[kind][1](rng), rng)
        if corpus.is_heldout(item.key):
            continue
        prompt = [tok.bos_token_id] + tok(item.prompt, add_special_tokens=False)["input_ids"]
        pairs.append((prompt, tok(f" {item.answer}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]))
    width = max(max(len(p) + len(r) for p, r in pairs), max(len(p) + min_response for p, _ in pairs))
    ids = torch.full((n, width), tok.eos_token_id)
    response = torch.zeros((n, width), dtype=torch.bool)
    for i, (p, r) in enumerate(pairs):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        response[i, len(p):] = True
    return ids, response


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", default="add", help="comma-separated math kinds (add, sub, add3, wadd, wsub)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-response", type=int, default=8, help="EOS-pad each response to this many tokens")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--eval-every", type=int, default=500)
    args = p.parse_args(argv)
    kinds = args.kinds.split(",")
    if set(kinds) - set(corpus.MATH_KINDS):
        print(f"error: unknown kind in {args.kinds!r}; use {', '.join(corpus.MATH_KINDS)}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tok = load_tokenizer(checkpoint_dir("dllmq-tiny"))
    model = make_model(TrainConfig(stage="base", d_model=args.d_model, n_layers=args.layers,
                                   n_heads=args.d_model // 64), tok)
    items = [i for i in load_items("mini_math") if i["key"].split("/")[1] in kinds]
    print(f"{sum(q.numel() for q in model.parameters()) / 1e6:.2f} M parameters; {len(items)} held-out items",
          flush=True)
    matrices = [q for q in model.parameters() if q.dim() > 1]
    vectors = [q for q in model.parameters() if q.dim() <= 1]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    rng, noise = random.Random(0), torch.Generator().manual_seed(0)
    started, cpu0, losses = time.time(), time.process_time(), []
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:  # 100 warmup steps, cosine to 0.1x (dllmq.train's schedule)
            group["lr"] = args.lr * min(1, step / 100) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / args.steps)))
        ids, response = rows(tok, kinds, args.batch_size, rng, args.min_response)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = sft_loss(model, ids, response, tok.mask_token_id, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            given = answer_digit_accuracy(model, tok, items, chat=False, min_response=args.min_response)
            gen8, _ = score_math(model, tok, items, chat=False, progress=False)
            gen4, _ = score_math(model, tok, items, chat=False, progress=False,
                                 settings=dict(gen_length=4, steps=4, block_length=4))
            model.train()
            print(json.dumps({"step": step, "rows": step * args.batch_size,
                              "loss": round(sum(losses[-100:]) / len(losses[-100:]), 4),
                              "digits_given_length": round(given["digits"], 3),
                              "whole_given_length": round(given["whole"], 3),
                              "generation_exact": round(sum(gen8) / len(gen8), 3),
                              "generation_exact_4_slots": round(sum(gen4) / len(gen4), 3),
                              "wall_s": round(time.time() - started), "cpu_s": round(time.process_time() - cpu0)}),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
