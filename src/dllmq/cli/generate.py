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
    if sampler == "llada":  # the block / step arithmetic, before the model loads rather than after
        check_llada_settings(args.gen_length, args.steps or args.gen_length, args.block_length or args.gen_length,
                             args.remasking, args.temperature, args.cfg)


def run(args) -> None:
    check_args(args)
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
    start = time.perf_counter()
    [text] = generate_text(model, tokenizer, [args.prompt], chat=chat, sampler=sampler,
                           progress=sys.stderr.isatty(), **settings)
    print(text)
    logging.getLogger("dllmq").info("generated %d tokens in %.2f s", args.gen_length, time.perf_counter() - start)
