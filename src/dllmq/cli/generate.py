"""`dllmq generate`: answer a prompt with the model family's own sampler."""
from __future__ import annotations

import argparse
import logging
import sys
import time

from dllmq.cli.commands import help_of
from dllmq.cli.common import (add_backend_arg, add_kv_cache_arg, add_model_args, load, model_config,
                              require_at_least, require_fraction)
from dllmq.diffusion import generate_text
from dllmq.diffusion.generate import family_sampler
from dllmq.diffusion.llada_sampler import check_llada_settings
from dllmq.errors import DllmqError
from dllmq.evaluate.mini import is_chat_model
from dllmq.models.registry import get_family
from dllmq.quant.format import read_quantization
from dllmq.quant.staged import load_staged, parse_staged


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help=help_of("generate"),
                       description="Generate an answer to a prompt. LLaDA-family models use semi-autoregressive "
                                   "block generation with low-confidence remasking; Dream-family models use Dream's "
                                   "diffusion_generate algorithms; Llama models decode autoregressively.")
    add_model_args(p)
    add_backend_arg(p, "kernel")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the tokenizer's chat template (default: on when the tokenizer has one "
                        "and the model is an instruct checkpoint, i.e. its path mentions 'instruct')")
    p.add_argument("--gen-length", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: gen-length)")
    p.add_argument("--block-length", type=int, default=None, help="LLaDA block length (default: gen-length)")
    p.add_argument("--remasking", default="low_confidence", choices=["low_confidence", "random"], help="LLaDA remasking")
    p.add_argument("--alg", default="entropy", choices=["origin", "maskgit_plus", "topk_margin", "entropy"],
                   help="Dream unmasking order (default entropy)")
    p.add_argument("--sampler", default="auto", choices=["auto", "llada", "dream"],
                   help="force a diffusion sampler (default: the model family's own)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=None, help="Dream nucleus sampling")
    p.add_argument("--top-k", type=int, default=None, help="Dream top-k sampling")
    p.add_argument("--cfg", type=float, default=0.0, help="LLaDA classifier-free guidance scale (default 0)")
    add_kv_cache_arg(p)
    p.add_argument("--staged", default=None, metavar="HIGH:WHERE=FRACTION",
                   help="staged precision (docs/dllm-aware.md): run round(FRACTION x steps) denoising steps, the first "
                        "(first) or the last (last), at high precision (fp: the --staged-source weights, w8a8: their "
                        "RTN W8A8 quantization) and the rest with the quantized MODEL, e.g. fp:first=0.25")
    p.add_argument("--staged-source", default=None, metavar="FP_MODEL",
                   help="with --staged: the full-precision model MODEL was quantized from")
    p.set_defaults(func=run)


def check_args(args) -> None:
    """The flags that can be judged without the model."""
    if not args.prompt.strip():
        raise DllmqError("The prompt is empty; pass some text with --prompt.")
    require_at_least(args, 1, "--gen-length", "--top-k")
    require_at_least(args, 1, "--steps", hint=" (leave it out for one step per generated token)")
    require_at_least(args, 1, "--block-length", hint=" (leave it out for one block of --gen-length)")
    require_at_least(args, 0, "--temperature", "--cfg")
    require_fraction(args, "--top-p")
    sampler = args.sampler
    if sampler == "auto":
        sampler = family_sampler(get_family(model_config(args.model).family))
    if args.kv_cache != "none" and sampler != "llada":
        raise DllmqError(f"--kv-cache {args.kv_cache} needs LLaDA's block-wise sampler; the {sampler} sampler has no "
                         "finished blocks to cache, so leave --kv-cache out.")
    if args.staged is not None or args.staged_source is not None:
        check_staged_args(args, sampler)
    if sampler == "llada":  # the block / step arithmetic, before the model loads rather than after
        check_llada_settings(args.gen_length, args.steps or args.gen_length, args.block_length or args.gen_length,
                             args.remasking, args.temperature, args.cfg)


def check_staged_args(args, sampler: str) -> None:
    if args.staged is None:
        raise DllmqError("--staged-source names the high-precision side of --staged; give --staged too (e.g. "
                         "--staged fp:first=0.25) or leave it out.")
    parse_staged(args.staged)
    if args.staged_source is None:
        raise DllmqError("--staged needs --staged-source, the full-precision model MODEL was quantized from.")
    if sampler == "causal":
        raise DllmqError("--staged switches precision between denoising steps; an autoregressive model has none.")
    if read_quantization(model_config(args.model).raw) is None:
        raise DllmqError(f"{args.model} is a full-precision model; --staged runs a quantized MODEL (from `dllmq "
                         "quantize`) against --staged-source.")


def run(args) -> None:
    check_args(args)
    if args.staged is not None:
        model, tokenizer, family = load_staged(args.model, args.staged_source, args.staged, backend=args.backend,
                                               dtype=args.dtype, device=args.device, seed=args.seed)
    else:
        model, tokenizer, family = load(args)
    if tokenizer is None:
        raise DllmqError(f"{args.model} has no tokenizer files, so it cannot take a text prompt.")
    chat = args.chat
    if chat is None:  # a chat model by its config (dllmq-tiny-instruct) or, for others, by its name
        chat = bool(getattr(tokenizer, "chat_template", None)) and (
            is_chat_model(model) or "instruct" in str(args.model).lower())
    # Every sampler takes what applies to it; the dispatcher drops (and logs) the rest.
    settings = dict(gen_length=args.gen_length, steps=args.steps or args.gen_length,
                    block_length=args.block_length or args.gen_length, remasking=args.remasking, cfg=args.cfg,
                    alg=args.alg, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    if args.kv_cache != "none":  # only the LLaDA sampler takes it (check_args refused the others)
        settings["kv_cache"] = args.kv_cache
    sampler = None if args.sampler == "auto" else args.sampler
    if args.staged is not None:
        spec, steps = model.staged.spec, settings["steps"]
        high = spec.high_steps(steps)
        logging.getLogger("dllmq").info("staged %s: %d of %d steps at %s (%s), the rest with %s", spec, len(high),
                                        steps, spec.high, f"steps {high.start}-{high.stop - 1}" if high else "none",
                                        args.model)
    start = time.perf_counter()
    [text] = generate_text(model, tokenizer, [args.prompt], chat=chat, sampler=sampler,
                           progress=sys.stderr.isatty(), **settings)
    print(text)
    logging.getLogger("dllmq").info("generated %d tokens in %.2f s", args.gen_length, time.perf_counter() - start)
