"""`dllmq quantize`: quantize MODEL block by block and save a directory every command accepts as MODEL.

The shared flags map onto QuantConfig's shared settings; the methods and each method's own flags come from
the quantization method registry, so a registered method shows up here without an edit."""
from __future__ import annotations

import argparse
import sys
from dataclasses import Field, fields
from pathlib import Path

from dllmq.cli.commands import help_of
from dllmq.cli.common import add_calib_device_arg, add_model_args, load, model_config
from dllmq.data import check_corpus
from dllmq.errors import DllmqError
from dllmq.models.describe import human_bytes
from dllmq.quant import QuantConfig, format_report, preset_settings, quantize, save_quantized
from dllmq.quant.api import directory_bytes, theoretical_bytes
from dllmq.quant.dllm_calib import SCHEDULE_HELP, WEIGHTING_HELP
from dllmq.quant.config import CALIB_WINDOWS, DEFAULT_PROFILE, PROFILES, merge_preset, parse_keep_fp
from dllmq.quant.formats import FORMAT_NAMES
from dllmq.quant.methods.base import EITHER, WEIGHT_ACTIVATION, WEIGHT_ONLY, Method
from dllmq.quant.registry import get_method, methods

EPILOG = ("presets: W4A16-g128, W3A16-g128 (the study's), W4A16, W3A16 (per-channel), "
          "W8A8, W4A4 (weight-activation, per-channel weights, per-token activations); floating point: "
          "W8A8-fp8, W8A16-fp8, W4A4-mxfp4, W4A16-mxfp4, W4A4-nvfp4, W4A16-nvfp4\n"
          "examples:\n"
          "  dllmq quantize MODEL --method gptq --wbits 4 --group-size 128 --calib wikitext2 "
          "--nsamples 128 --seqlen 2048 --out q/\n"
          "  dllmq quantize MODEL --method awq --wbits 3 --calib pile --out q3/\n"
          "  dllmq quantize MODEL --preset W4A16-g128 --method rtn --out r/\n"
          "  dllmq quantize MODEL --method smoothquant --wbits 8 --abits 8 --alpha 0.5 --out sq/\n"
          "  dllmq quantize MODEL --method quarot --wbits 4 --abits 4 --kv-bits 4 "
          "--weight-method gptq --out qr/\n"
          "  dllmq quantize MODEL --method duquant --preset W4A4 --out dq/\n"
          "  dllmq quantize MODEL --method rtn --wformat fp8 --aformat fp8 --out f8/   # = --preset W8A8-fp8\n"
          "  dllmq quantize MODEL --method quarot --preset W4A4-nvfp4 --out qn/\n"
          "  dllmq quantize MODEL --method gptq --preset W3A16-g128 --mask-schedule uniform --weighting certainty "
          "--out qd/   # dLLM-aware")


DEFAULT_SEQLEN = 2048   # the study's calibration window, where the model's context allows


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help=help_of("quantize"),
                       description="Quantize MODEL's block linears and save a model directory that every dllmq "
                                   "command accepts as MODEL. Calibration runs one block at a time, so the "
                                   "device only ever holds one block plus the calibration activations.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--method", default="rtn", help=f"{_methods_by_kind()} (default rtn)")
    p.add_argument("--preset", default=None, help="named bit config; explicit --wbits / --group-size win")
    p.add_argument("--wbits", type=int, default=None, help="weight bits, 2..8 (default 4)")
    p.add_argument("--group-size", type=int, default=None, help="inputs per scale, -1 = per channel (default 128)")
    p.add_argument("--sym", action="store_true", help="symmetric weight grid (default asymmetric; QuaRot symmetric)")
    p.add_argument("--abits", type=int, default=None,
                   help="activation bits for smoothquant / quarot / duquant (per-token dynamic; 16 = off)")
    p.add_argument("--wformat", choices=FORMAT_NAMES, default=None,
                   help="weight number format: int (default), fp8 (E4M3, per-channel scales), mxfp4 (E2M1, E8M0 "
                        "scale per 32), nvfp4 (E2M1, E4M3 scale per 16 x tensor scale); the bits come with it")
    p.add_argument("--aformat", choices=FORMAT_NAMES, default=None,
                   help="activation number format, per token: int (default), fp8, mxfp4, nvfp4")
    p.add_argument("--kv-bits", type=int, default=None, help="K/V cache bits (per head, group 128; default 16 = off)")
    p.add_argument("--act-clip", type=float, default=None, help="activation clip ratio (default: the method's)")
    p.add_argument("--weight-clip", type=float, default=None, help="weight clip ratio (default: the method's)")
    p.add_argument("--calib", default="wiki",
                   help="calibration text: wiki (offline, shipped; default), wikitext2, pile, or a .txt/.jsonl file")
    p.add_argument("--nsamples", type=int, default=None,
                   help="calibration windows (default 128; AWQ's paper profile: 128 documents)")
    p.add_argument("--seqlen", type=int, default=None,
                   help=f"tokens per window (default {DEFAULT_SEQLEN}, or the model's context when that is shorter)")
    p.add_argument("--calib-windows", choices=CALIB_WINDOWS, default=None,
                   help="how --calib becomes windows: random starts (default), documents (AWQ's: short documents "
                        "concatenated), chat (a .jsonl with \"prompt\" and \"response\" per line, one window each in the "
                        "chat template; --mask-schedule never masks the prompt)")
    p.add_argument("--mask-schedule", default=None, metavar="SCHEDULE",
                   help="dLLM-aware calibration: mask each calibration window as the model sees text while denoising, "
                        "with a ratio per window from " + SCHEDULE_HELP + "; masks are placed per token as in LLaDA's "
                        "pre-training (docs/dllm-aware.md)")
    p.add_argument("--weighting", default=None, metavar="WEIGHTS",
                   help="with --mask-schedule: weigh calibration tokens in GPTQ's Hessian and AWQ's losses by mask status "
                        "and the FP model's confidence (masked, unmasked, and the frontier the sampler commits within "
                        "k steps): " + WEIGHTING_HELP)
    add_calib_device_arg(p)
    p.add_argument("--offload-activations", action="store_true",
                   help="keep calibration activations on the CPU between blocks (less device memory)")
    p.add_argument("--profile", default=DEFAULT_PROFILE,
                   help="whose defaults fill the settings not given: dllmq (default) or paper (the study code's, per "
                        "method and model family; docs/fidelity.md)")
    p.add_argument("--keep-fp", default=None, metavar="NAMES",
                   help="linears left in full precision, comma-separated: roles (qkv, attn_out, gate_up, down) or block "
                        "linear names (q_proj, self_attn.o_proj, ...); weight-only methods")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_method_arguments(p)
    p.set_defaults(func=run, seed=None)   # --seed given or not: the paper profile has its own calibration seed


def run(args) -> None:
    out = Path(args.out)
    if out.exists() and not args.overwrite:  # refuse before hours of calibration, not after
        raise DllmqError(f"{out} already exists; choose another --out or pass --overwrite.")
    flags = dict(wbits=args.wbits, group_size=args.group_size, abits=args.abits, kv_bits=args.kv_bits,
                 act_clip=args.act_clip, weight_clip=args.weight_clip, sym=True if args.sym else None,
                 wformat=args.wformat, aformat=args.aformat)
    # explicit flags beat the preset
    settings = merge_preset(preset_settings(args.preset), {k: v for k, v in flags.items() if v is not None})
    if args.profile not in PROFILES:
        raise DllmqError(f"Unknown --profile {args.profile!r}; choose {' or '.join(PROFILES)}.")
    given = dict(method=args.method, calib=args.calib, **settings, **method_settings_from_args(args, args.method))
    if args.seed is not None:   # given, it wins; left out, the profile's seed (the paper's SmoothQuant/DuQuant: 2)
        given["seed"] = args.seed
    if args.nsamples is not None:
        given["nsamples"] = args.nsamples
    for key in ("calib_windows", "mask_schedule", "weighting"):
        if getattr(args, key) is not None:
            given[key] = getattr(args, key)
    if args.keep_fp is not None:
        given["keep_fp"] = parse_keep_fp(args.keep_fp)
        if not given["keep_fp"]:
            raise DllmqError("--keep-fp is empty; give linear roles or names separated by commas, or leave it out.")
    family = model_config(args.model).family if args.profile == "paper" or args.keep_fp is not None else None
    config = QuantConfig(profile=args.profile, family=family, **given,
                         **({} if args.seqlen is None else {"seqlen": args.seqlen}))
    if config.needs_calibration:  # the calibration text and window, before the model loads
        check_corpus(args.calib)
        context = model_config(args.model).max_seq_len
        if args.seqlen is None:
            seqlen = config.calibration.seqlen if args.profile == "paper" else DEFAULT_SEQLEN
            config = QuantConfig(profile=args.profile, family=family, seqlen=min(seqlen, context), **given)
            print(f"note: --seqlen not given: calibration windows of {config.calibration.seqlen} tokens (the smaller "
                  f"of {seqlen} and the model's context of {context})", file=sys.stderr)
        elif config.calibration.seqlen > context:
            raise DllmqError(f"--seqlen {config.calibration.seqlen} is longer than the model's context of {context} "
                             "tokens; use a shorter calibration window.")
    if args.profile == "paper":
        for line in paper_lines(config):
            print(line, file=sys.stderr)
    if args.seed is None:
        args.seed = 0   # what a built-in random model is built with, whatever the calibration seed
    model, tokenizer, family = load(args)
    report = quantize(model, tokenizer, config, device=args.calib_device or args.device,
                      offload_activations=args.offload_activations, progress=True)
    save_quantized(model, tokenizer, out, overwrite=args.overwrite)
    print(format_report(report))
    on_disk, target = directory_bytes(out), theoretical_bytes(model)
    print(f"saved {out}: {human_bytes(on_disk)} of safetensors (packed target {human_bytes(target)}, "
          f"{100 * (on_disk / target - 1):+.1f}%)")


def paper_lines(config: QuantConfig) -> list[str]:
    """What a paper run says before it starts: the resolved settings and how its calibration text is cut."""
    cal = config.calibration
    flat = config.to_dict()
    lines = [f"paper profile ({config.method} on {config.family}): " +
             ", ".join(f"{k}={flat[k]}" for k in config.method_class.paper_settings(config.family) if k in flat)]
    if config.needs_calibration:
        cut = (f"the first {cal.nsamples} documents of at most 512 tokens (AWQ's way, shuffled with seed 42) "
               f"concatenated and cut into {cal.seqlen}-token windows" if cal.windows == "documents" else
               f"{cal.nsamples} prompt/response records, one {cal.seqlen}-token window each" if cal.windows == "chat"
               else f"{cal.nsamples} windows of {cal.seqlen} tokens at random starts (GPTQ's way, seed {config.seed})")
        lines.append(f"note: the study's calibration windowing applied to --calib {cal.source}: {cut}")
    return lines   # the method's warning, where it has one, is logged when quantization starts


# -- the method flags, from the registry -------------------------------------------------------------
def _methods_by_kind() -> str:
    def names(*kinds: str) -> str:
        return ", ".join(m.name for m in methods() if m.kind in kinds)
    either = names(EITHER)
    return (f"weight-only: {names(EITHER, WEIGHT_ONLY)}; weight-activation: {names(WEIGHT_ACTIVATION)}"
            + (f" ({either} too, given --abits)" if either else ""))


def _method_flags() -> dict[str, list[tuple[type[Method], Field]]]:
    """flag -> [(method, settings field)] for every setting a registered method exposes on the command line."""
    flags: dict[str, list[tuple[type[Method], Field]]] = {}
    for m in methods():
        for f in fields(m.Settings):
            if f.metadata.get("flag"):
                flags.setdefault(f.metadata["flag"], []).append((m, f))
    return flags


def add_method_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per method setting the registry's methods expose; its help names the methods it applies to."""
    group = p.add_argument_group("method settings (each applies only to the methods it names)")
    for flag, users in _method_flags().items():
        first = users[0][1]
        meta = first.metadata
        if any(f.name != first.name for _, f in users):
            raise TypeError(f"{flag} stands for different settings in different methods")
        who = ", ".join(m.display_name for m, _ in users)
        if isinstance(first.default, bool):
            group.add_argument(flag, dest=first.name, action="store_const", const=not meta["invert"], default=None,
                               help=f"{meta['help']} ({who})")
            continue
        if len({f.default for _, f in users}) == 1:
            defaults = f"{who}; default {first.default}"
        else:
            defaults = "default " + ", ".join(f"{m.display_name} {f.default}" for m, f in users)
        group.add_argument(flag, dest=first.name, type=type(first.default), choices=meta["choices"], default=None,
                           help=f"{meta['help']} ({defaults})")


def method_settings_from_args(args: argparse.Namespace, method: str) -> dict:
    """The method settings given on the command line; a flag of another method is an error."""
    cls = get_method(method)
    given = {}
    for flag, users in _method_flags().items():
        value = getattr(args, users[0][1].name)
        if value is None:
            continue
        if cls not in [m for m, _ in users]:
            raise DllmqError(f"{flag} is a setting of {', '.join(m.name for m, _ in users)}, not of {cls.name}; "
                             "leave it out or choose one of those methods.")
        given[users[0][1].name] = value
    return given
