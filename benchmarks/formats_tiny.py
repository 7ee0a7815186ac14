"""Integer vs floating-point formats at equal bits on dllmq-tiny: the ELBO perplexity bound (what `dllmq ppl`
reports) of RTN and QuaRot (RTN weights) at W8A8 int / fp8, W4A4 int / mxfp4 / nvfp4 and W4A16 int / mxfp4 /
nvfp4, all on the same held-out windows and the same Monte Carlo masks (seed 0), so the rows compare pair-wise.

    python benchmarks/formats_tiny.py                      # 24 windows of 256 tokens, mc_num 8
    python benchmarks/formats_tiny.py --windows 8 --methods rtn

One `dllmq ppl` row by hand is the same number:
    dllmq quantize dllmq-tiny --method rtn --preset W4A4-nvfp4 --out q/ &&
    dllmq ppl q/ --seqlen 256 --mc-num 8 --max-windows 24
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import dllmq
from dllmq.data import load_corpus, tokenize_text
from dllmq.diffusion import perplexity
from dllmq.quant import PRESETS, QuantConfig, quantize

ROWS = {"W8A8": ["W8A8", "W8A8-fp8"], "W4A4": ["W4A4", "W4A4-mxfp4", "W4A4-nvfp4"],
        "W4A16": ["W4A16-g128", "W4A16-mxfp4", "W4A16-nvfp4"]}
SETTINGS = {"rtn": {}, "quarot": {"weight_method": "rtn"}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dllmq-tiny")
    p.add_argument("--windows", type=int, default=24)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--mc-num", type=int, default=8)
    p.add_argument("--methods", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = p.parse_args()
    _, tokenizer, _ = dllmq.load_model(args.model)
    ids = tokenize_text(tokenizer, load_corpus("wiki", "heldout"))

    def ppl(model) -> float:
        return perplexity(model, ids, seqlen=args.seqlen, mc_num=args.mc_num, max_windows=args.windows, seed=0,
                          progress=False).ppl

    fp, _, _ = dllmq.load_model(args.model)
    with torch.no_grad():
        base = ppl(fp)
    lines = [f"{args.model}: ELBO perplexity bound, {args.windows} held-out windows of {args.seqlen} tokens, "
             f"mc_num {args.mc_num}, seed 0\n", "| method | bits | int | fp8 / mxfp4 | nvfp4 |",
             "|---|---|---:|---:|---:|", f"| FP | | {base:.2f} | | |"]
    for method in args.methods:
        for bits, presets in ROWS.items():
            if method == "quarot" and bits == "W4A16":
                continue
            cells = []
            for preset in presets:
                start = time.perf_counter()
                model, tok, _ = dllmq.load_model(args.model)
                quantize(model, tok, QuantConfig(method, **PRESETS[preset], **SETTINGS[method]), progress=False)
                with torch.no_grad():
                    cells.append(f"{ppl(model):.2f}")
                print(f"{method} {preset}: {cells[-1]} ({time.perf_counter() - start:.0f} s)", file=sys.stderr,
                      flush=True)
            cells += [""] * (3 - len(cells))    # W8A8: int and fp8 only
            lines.append(f"| {method} | {bits} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
