"""`dllmq bench`: forward latency, generation speed and memory of MODEL."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict

import torch

from dllmq.bench import bench_model, format_result
from dllmq.cli.commands import help_of
from dllmq.cli.common import add_backend_arg, add_model_args, load, model_config, require_at_least
from dllmq.diffusion.generate import family_sampler
from dllmq.diffusion.llada_sampler import check_llada_settings
from dllmq.errors import DllmqError
from dllmq.models.registry import get_family
from dllmq.quant.backend import set_backend

EXAMPLES = """\
examples:
  dllmq bench random-llada --seq-len 128 --gen-length 64 --steps 4
  dllmq bench q/ --backend both                    # kernel vs fake on one quantized model
  dllmq bench q/ --dtype bfloat16 --seq-len 512 --gen-length 256 --steps 16 --json
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help=help_of("bench"),
        description="Time MODEL (a built-in name, checkpoint or quantized directory): forward latency at "
                    "--seq-len, diffusion generation of --gen-length tokens in --steps steps after a random "
                    "prompt, weights in memory and peak RSS. --backend picks how quantized layers compute "
                    "(kernel: real integer matmuls; fake: quantize-dequantize; both: one after the other).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, model_help="built-in name, checkpoint directory or quantized directory",
                   seed_help="seed for the random prompt (default: 0)")
    add_backend_arg(p, "kernel", both=True, help="how quantized layers compute: kernel (each layer converted as the "
                                                  "checkpoint streams in), fake, or both: kernel then fake "
                                                  "(default: kernel)")
    p.add_argument("--seq-len", type=int, default=512, help="total tokens per step: prompt + generation (default 512)")
    p.add_argument("--gen-length", type=int, default=256, help="tokens to generate (default 256)")
    p.add_argument("--steps", type=int, default=16, help="diffusion steps (default 16)")
    p.add_argument("--block-length", type=int, default=None, help="LLaDA block length (default: gen-length)")
    p.add_argument("--batch", type=int, default=1, help="sequences per forward (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed forward passes (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-generate", action="store_true", help="forward latency only")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def check_args(args) -> None:
    """What bench_model would refuse after loading the model, refused before."""
    require_at_least(args, 1, "--seq-len", "--steps", "--block-length", "--batch", "--repeats", "--threads")
    config = model_config(args.model)
    if args.seq_len > config.max_seq_len:
        raise DllmqError(f"--seq-len {args.seq_len} is longer than the model's context of {config.max_seq_len}.")
    if args.no_generate:
        return
    if not 0 < args.gen_length < args.seq_len:
        raise DllmqError(f"--gen-length must be between 1 and --seq-len - 1 ({args.seq_len - 1}); "
                         "the rest is the prompt.")
    if family_sampler(get_family(config.family)) == "llada":
        check_llada_settings(args.gen_length, args.steps, args.block_length or args.gen_length, "low_confidence",
                             0.0, 0.0)


def run(args) -> None:
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = ["kernel", "fake"] if args.backend == "both" else [args.backend]
    model, tokenizer, _ = load(args, backend=backends[0])
    results = []
    for i, backend in enumerate(backends):
        if i:
            set_backend(model, backend)
        results.append(bench_model(model, tokenizer, name=str(args.model), seq_len=args.seq_len,
                                   gen_length=args.gen_length, steps=args.steps, block_length=args.block_length,
                                   batch=args.batch, repeats=args.repeats, seed=args.seed,
                                   generate=not args.no_generate))
        if not results[-1].kernels:  # full precision: the backend changes nothing
            results[-1].backend = "full precision"
            break
        results[-1].backend = backend
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
        return
    for r in results:
        print(format_result(r))
    if len(results) == 2 and results[0].kernels:
        k, f = results
        speed = f.forward_ms / k.forward_ms if k.forward_ms else float("nan")
        line = f"kernel vs fake: forward {speed:.2f}x faster"
        if k.generate_s:
            line += f", generation {f.generate_s / k.generate_s:.2f}x faster"
        print(line)
