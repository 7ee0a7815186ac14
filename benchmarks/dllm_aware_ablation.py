"""Clean-text vs dLLM-aware calibration (issue 19) on one model and method: masked-prediction KL vs FP
at several mask ratios (dllmq.diffusion.divergence, the study's measure), per setting, with 95 % paired
bootstrap intervals over the windows, and the relative change of KL against the clean-text baseline.

    OMP_NUM_THREADS=1 python benchmarks/dllm_aware_ablation.py --model dllmq-tiny --method gptq \
        --preset W3A16-g128 --windows 32

Settings: baseline (clean text), masked (--mask-schedule uniform), sampler (--mask-schedule sampler),
weighted (uniform + --weighting certainty), trajectory (4 FP sampler states per prompt). Prints the calibration CPU time of each.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from dllmq.api import load_model
from dllmq.data.text import eval_token_ids
from dllmq.diffusion.divergence import build_reference, compare, measure_windows
from dllmq.quant import QuantConfig, quantize
from dllmq.quant.config import PRESETS
from dllmq.study.stats import Resampler, interval

SETTINGS = {"baseline": {}, "masked": dict(mask_schedule="uniform"), "sampler": dict(mask_schedule="sampler"),
            "weighted": dict(mask_schedule="uniform", weighting="certainty"),
            "trajectory": dict(mask_schedule="trajectory:steps=64,gen_length=64,block_length=64,states=4")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dllmq-tiny")
    p.add_argument("--method", default="gptq")
    p.add_argument("--preset", default="W3A16-g128")
    p.add_argument("--settings", default="baseline,masked,weighted")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--ratios", default="0.25,0.5,0.75,1.0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--against", default="baseline", help="the setting the relative changes are taken against")
    args = p.parse_args()
    torch.set_num_threads(1)
    ratios = tuple(float(r) for r in args.ratios.split(","))
    fp, tokenizer, _ = load_model(args.model, dtype="float32")
    windows = measure_windows(eval_token_ids(tokenizer, "wiki"), args.windows, 128)
    ref = build_reference(fp, windows, ratios=ratios, elbo_mc=0, seed=args.seed)
    results = {}
    for name in args.settings.split(","):
        model, tokenizer, _ = load_model(args.model, dtype="float32")
        config = QuantConfig(args.method, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                             **PRESETS[args.preset], **SETTINGS[name])
        cpu, wall = time.process_time(), time.perf_counter()
        quantize(model, tokenizer, config, progress=False)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        results[name] = compare(model, ref).kl
        print(f"{name:9s} calibration {cpu:6.1f} s CPU ({wall:6.1f} s wall)  " + "  ".join(
            f"KL@{r:g} {np.mean(results[name][r]):.4f}" for r in ratios), flush=True)
    rs = Resampler({"windows": args.windows})
    base = results.get(args.against)
    print(f"\n{args.model} {args.method} {args.preset}, {args.windows} windows x 128 tokens, 95 % paired bootstrap, "
          f"changes against {args.against}")
    for name, kl in results.items():
        cells = []
        for r in ratios:
            iv = interval(float(np.mean(kl[r])), rs.mean("windows", kl[r]))
            cell = f"KL@{r:g} {iv.value:.4f} [{iv.lo:.4f}, {iv.hi:.4f}]"
            if base is not None and name != args.against:
                rel = rs.mean("windows", kl[r]) / rs.mean("windows", base[r]) - 1
                rv = interval(float(np.mean(kl[r]) / np.mean(base[r]) - 1), rel)
                cell += f" ({100 * rv.value:+.1f} % [{100 * rv.lo:+.1f}, {100 * rv.hi:+.1f}])"
            cells.append(cell)
        print(f"  {name:9s} " + "; ".join(cells))


if __name__ == "__main__":
    main()
