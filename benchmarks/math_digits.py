"""Answer-digit accuracy on held-out mini_math items: a finer measure of arithmetic than exact-match generation.

Each item is laid out as the model was trained to answer it (the chat turn, or the base prompt) with only the
answer's tokens masked and what follows the answer (<|eot_id|> / EOS) visible, so the model is told the answer's
length; one forward, argmax at the masked positions. Reports the share of answer tokens and of whole answers
predicted right (docs/embedded-models.md, "Math").

    OMP_NUM_THREADS=1 python benchmarks/math_digits.py dllmq-tiny dllmq-tiny-instruct runs/instruct/final --limit 200
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from dllmq.evaluate.mini import is_chat_model, load_items
from dllmq.models.loading import load_plain_model


def answer_masked_row(tokenizer, item: dict, chat: bool, min_response: int = 0) -> tuple[list[int], list[int]]:
    """(ids with the answer masked, the answer's token ids), the response EOS-padded to `min_response` tokens as
    a run trained with that --sft-min-response saw it."""
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": item["question"]}], tokenize=False,
                                             add_generation_prompt=True)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        answer = tokenizer(str(item["answer"]), add_special_tokens=False)["input_ids"]
        tail = [tokenizer.convert_tokens_to_ids("<|eot_id|>"), tokenizer.eos_token_id]
    else:
        prompt = tokenizer(item["prompt"], add_special_tokens=True)["input_ids"]
        answer = tokenizer(f" {item['answer']}", add_special_tokens=False)["input_ids"]
        tail = [tokenizer.eos_token_id]
    tail += [tokenizer.eos_token_id] * max(0, min_response - len(answer) - len(tail))
    return prompt + [tokenizer.mask_token_id] * len(answer) + tail, answer


@torch.no_grad()
def answer_digit_accuracy(model, tokenizer, items: list[dict], chat: bool, min_response: int = 0) -> dict:
    tokens = right = whole = 0
    for item in items:
        ids, answer = answer_masked_row(tokenizer, item, chat, min_response)
        start = ids.index(tokenizer.mask_token_id)
        logits = model(torch.tensor([ids]))
        logits = getattr(logits, "logits", logits)
        ok = [p == a for p, a in zip(logits[0, start:start + len(answer)].argmax(-1).tolist(), answer)]
        tokens, right, whole = tokens + len(ok), right + sum(ok), whole + all(ok)
    return {"digits": right / tokens, "whole": whole / len(items), "n": len(items)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="built-in names or model directories (diffusion models)")
    p.add_argument("--limit", type=int, default=200, help="first N mini_math items (default 200)")
    p.add_argument("--min-response", type=int, default=0,
                   help="EOS-pad the response to N tokens, as the model's training run did (--sft-min-response)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    items = load_items("mini_math", args.limit)
    for name in args.models:
        model, tokenizer, _ = load_plain_model(Path(name) if Path(name).is_dir() else name, dtype="float32")
        t0 = time.process_time()
        r = answer_digit_accuracy(model.eval(), tokenizer, items, is_chat_model(model), args.min_response)
        print(f"{name}: answer tokens {100 * r['digits']:.1f} %, whole answers {100 * r['whole']:.1f} % "
              f"(n={r['n']}, {time.process_time() - t0:.0f} CPU-s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
