"""The `dllmq` command. Thin: parse flags, call the layers, print. Errors are one sentence and exit code 2."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from dllmq.errors import DllmqError

DEFAULT_MODEL = "dllmq-tiny"

EPILOG = """\
MODEL is a built-in name, a checkpoint directory (config.json + safetensors, e.g. a downloaded
LLaDA-8B-Instruct or Dream-v0-Base-7B), or a Hub id when network or the Hugging Face cache allows
(HF_HUB_OFFLINE=1 reads the cache only). Built-in: dllmq-tiny (the default) and dllmq-tiny-instruct,
small LLaDA-architecture diffusion models trained by dllmq and shipped with it; random-llada,
random-dream, random-llama, untrained models with the real architectures, for tests.

examples:
  dllmq generate --prompt "Question: What is 17 + 25? Answer:" --gen-length 8 --block-length 4
  dllmq eval dllmq-tiny-instruct --tasks mini
  dllmq inspect random-llada
  dllmq inspect llada-8b                      # the real LLaDA-8B config, no weights needed
  dllmq generate random-llada --prompt "Hello" --gen-length 64 --steps 64 --block-length 32
  dllmq ppl random-dream --data notes.txt --seqlen 256
  dllmq quantize random-llada --method gptq --preset W4A16-g128 --nsamples 16 --seqlen 256 --out q/
  dllmq generate q/ --prompt "Hello"          # a saved quantized model is a MODEL everywhere
"""


def _add_model_args(p: argparse.ArgumentParser, with_runtime: bool = True) -> None:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL",
                   help=f"built-in name, checkpoint directory or Hub id (default: {DEFAULT_MODEL})")
    if with_runtime:
        p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
        p.add_argument("--seed", type=int, default=0, help="seed for every random choice (default: 0)")


def _add_backend_arg(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--backend", choices=("kernel", "fake"), default=default,
                   help="how a dllmq-quantized MODEL computes: kernel = real int8 / int4 matmuls where one fits "
                        "(other layers stay fake; `dllmq bench` lists them), fake = quantize-dequantize, the "
                        f"study's exact reference numbers (default: {default})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dllmq", description="Quantize diffusion LLMs (LLaDA, Dream) and measure what each choice costs.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--version", action="version", version=f"dllmq {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("inspect", help="family, shapes, parameter count and memory at bf16 / W8 / W4 / W3",
                       description="Describe a model from its config.json alone (no weights are read). "
                                   "Also accepts llada-8b, dream-7b and smollm2-135m: the real configs shipped with dllmq.")
    _add_model_args(p, with_runtime=False)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("generate", help="diffusion generation (LLaDA blocks / Dream algorithms) or causal decoding",
                       description="Generate an answer to a prompt. LLaDA-family models use semi-autoregressive "
                                   "block generation with low-confidence remasking; Dream-family models use Dream's "
                                   "diffusion_generate algorithms; Llama models decode autoregressively.")
    _add_model_args(p)
    _add_backend_arg(p, "kernel")
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

    p = sub.add_parser("ppl", help="perplexity: Monte Carlo ELBO bound for diffusion models, exact for causal ones",
                       description="Perplexity of MODEL on a text file. For a masked diffusion model this is "
                                   "exp(Monte Carlo ELBO bound on the per-token NLL), an upper bound on the true "
                                   "perplexity, comparable across quantizations of the same model; for a causal "
                                   "model it is the ordinary perplexity.")
    _add_model_args(p)
    _add_backend_arg(p, "fake")
    p.add_argument("--data", default="wiki",
                   help="wiki (held-out offline Wikipedia shipped with dllmq; default), wikitext2 (test split, "
                        "needs HF datasets + network or cache), or a .txt / .jsonl file")
    p.add_argument("--seqlen", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--mc-num", type=int, default=16, help="Monte Carlo samples per window (diffusion; default 16)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default 8)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows")

    p = sub.add_parser("quantize", help="RTN / GPTQ / AWQ / SmoothQuant / QuaRot / DuQuant, block by block, saved to --out",
                       description="Quantize MODEL's block linears and save a model directory that every dllmq "
                                   "command accepts as MODEL. Calibration runs one block at a time, so the "
                                   "device only ever holds one block plus the calibration activations.",
                       epilog="presets: W4A16-g128, W3A16-g128 (the study's), W4A16, W3A16 (per-channel), "
                              "W8A8, W4A4 (weight-activation, per-channel weights, per-token activations)\n"
                              "examples:\n"
                              "  dllmq quantize MODEL --method gptq --wbits 4 --group-size 128 --calib wikitext2 "
                              "--nsamples 128 --seqlen 2048 --out q/\n"
                              "  dllmq quantize MODEL --method awq --wbits 3 --calib pile --out q3/\n"
                              "  dllmq quantize MODEL --preset W4A16-g128 --method rtn --out r/\n"
                              "  dllmq quantize MODEL --method smoothquant --wbits 8 --abits 8 --alpha 0.5 --out sq/\n"
                              "  dllmq quantize MODEL --method quarot --wbits 4 --abits 4 --kv-bits 4 "
                              "--weight-method gptq --out qr/\n"
                              "  dllmq quantize MODEL --method duquant --preset W4A4 --out dq/",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p)
    p.add_argument("--method", default="rtn", help=f"{_methods_by_kind()} (default rtn)")
    p.add_argument("--preset", default=None, help="named bit config; explicit --wbits / --group-size win")
    p.add_argument("--wbits", type=int, default=None, help="weight bits, 2..8 (default 4)")
    p.add_argument("--group-size", type=int, default=None, help="inputs per scale, -1 = per channel (default 128)")
    p.add_argument("--sym", action="store_true", help="symmetric weight grid (default asymmetric; QuaRot symmetric)")
    p.add_argument("--abits", type=int, default=None,
                   help="activation bits for smoothquant / quarot / duquant (per-token dynamic; 16 = off)")
    p.add_argument("--kv-bits", type=int, default=None, help="K/V cache bits (per head, group 128; default 16 = off)")
    p.add_argument("--act-clip", type=float, default=None, help="activation clip ratio (default: the method's)")
    p.add_argument("--weight-clip", type=float, default=None, help="weight clip ratio (default: the method's)")
    p.add_argument("--calib", default="wiki",
                   help="calibration text: wiki (offline, shipped; default), wikitext2, pile, or a .txt/.jsonl file")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048)")
    add_method_arguments(p)
    p.add_argument("--calib-device", default=None, help="device for calibration (default: --device)")
    p.add_argument("--offload-activations", action="store_true",
                   help="keep calibration activations on the CPU between blocks (less device memory)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = sub.add_parser("eval", help="the study's benchmarks (lm-evaluation-harness) and the offline mini tasks",
                       description="Evaluate MODEL (full precision or a dllmq-quantized directory) the way LLaDA "
                                   "and Dream are evaluated: Monte Carlo likelihood for multiple choice, diffusion "
                                   "generation for math and code. Model-written code only runs with "
                                   "--allow-code-execution, inside dllmq's sandbox.",
                       epilog="examples:\n"
                              "  dllmq eval MODEL --tasks general            # MMLU, ARC-E, ARC-C, HellaSwag, WinoGrande, PIQA\n"
                              "  dllmq eval MODEL --tasks math,code --allow-code-execution\n"
                              "  dllmq eval q/ --tasks gsm8k --limit 50 --out results.json\n"
                              "  dllmq eval MODEL --tasks humaneval --allow-code-execution   # works offline",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p)
    _add_backend_arg(p, "fake")
    from dllmq.evaluate.runner import add_cli_arguments
    add_cli_arguments(p)

    # The study's commands live beside their layers; each adds its parser and sets `func`.
    from dllmq.analysis import outliers_cli
    from dllmq import bench
    from dllmq.study import report, runner
    bench.add_parser(sub)
    outliers_cli.add_parser(sub)
    runner.add_parser(sub)
    report.add_parser(sub)
    return parser


def _version() -> str:
    from dllmq import __version__
    return __version__


def cmd_inspect(args) -> None:
    from dllmq.models.config import REAL_CONFIGS, read_config_json, real_config
    from dllmq.models.describe import describe, format_description
    from dllmq.models.loading import resolve_model_dir
    from dllmq.models.random_models import RANDOM_MODELS, random_config
    from dllmq.models.registry import get_family, parse_config

    name = args.model
    if name in RANDOM_MODELS and not Path(name).exists():
        raw = random_config(name)
    elif name in REAL_CONFIGS and not Path(name).exists():
        raw = real_config(name)
    else:
        raw = read_config_json(resolve_model_dir(name))
    config = parse_config(raw)
    family = get_family(config.family)
    from dllmq.quant.format import describe_quantization
    quantized = describe_quantization(raw)
    if args.json:
        print(json.dumps({"model": name, **describe(config, family),
                          "quantization_config": raw.get("quantization_config")}, indent=2))
    else:
        print(format_description(name, config, family))
        if quantized:
            from dllmq.quant.backend import plan_kernels
            print(quantized)
            print(f"kernels      {plan_kernels(raw).summary()} (CPU, --backend kernel)")


def _load(args):
    from dllmq.api import load_model
    start = time.perf_counter()
    loaded = load_model(args.model, dtype=args.dtype, device=args.device, seed=args.seed,
                        backend=getattr(args, "backend", "fake"))
    logging.getLogger("dllmq").info("loaded %s in %.1f s", args.model, time.perf_counter() - start)
    return loaded


def cmd_generate(args) -> None:
    from dllmq.diffusion import generate_text

    if not args.prompt.strip():
        raise DllmqError("The prompt is empty; pass some text with --prompt.")
    model, tokenizer, family = _load(args)
    if tokenizer is None:
        raise DllmqError(f"{args.model} has no tokenizer files, so it cannot take a text prompt.")
    chat = args.chat
    if chat is None:  # a chat model by its config (dllmq-tiny-instruct) or, for others, by its name
        from dllmq.evaluate.mini import is_chat_model
        chat = bool(getattr(tokenizer, "chat_template", None)) and (
            is_chat_model(model) or "instruct" in str(args.model).lower())
    # Every sampler takes what applies to it; the dispatcher drops (and logs) the rest.
    settings = dict(gen_length=args.gen_length, steps=args.steps or args.gen_length,
                    block_length=args.block_length or args.gen_length, remasking=args.remasking, cfg=args.cfg,
                    alg=args.alg, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    sampler = None if args.sampler == "auto" else args.sampler
    start = time.perf_counter()
    [text] = generate_text(model, tokenizer, [args.prompt], chat=chat, sampler=sampler,
                           progress=sys.stderr.isatty(), **settings)
    print(text)
    logging.getLogger("dllmq").info("generated %d tokens in %.2f s", args.gen_length, time.perf_counter() - start)


def cmd_ppl(args) -> None:
    from dllmq.data import CORPORA, load_corpus, tokenize_text
    from dllmq.diffusion import perplexity

    text = load_corpus(args.data, "heldout")   # files are read whole; named sets give their held-out split
    model, tokenizer, family = _load(args)
    if tokenizer is None:
        raise DllmqError(f"{args.model} has no tokenizer files, so it cannot read text.")
    result = perplexity(model, tokenize_text(tokenizer, text), seqlen=args.seqlen, mc_num=args.mc_num,
                        batch_size=args.batch_size, max_windows=args.max_windows, seed=args.seed, progress=True)
    kind = "ELBO bound (upper bound on perplexity)" if result.is_bound else "exact causal perplexity"
    source = f"{args.data} (held out)" if args.data in CORPORA else args.data
    print(f"ppl {result.ppl:.4f}  nll/token {result.nll:.4f}  tokens {result.n_tokens}  windows {result.n_windows}"
          f"  [{kind}; {source}]")


def cmd_quantize(args) -> None:
    from dllmq.models.describe import human_bytes
    from dllmq.quant import QuantConfig, format_report, preset_settings, quantize, save_quantized
    from dllmq.quant.api import directory_bytes, theoretical_bytes

    out = Path(args.out)
    if out.exists() and not args.overwrite:  # refuse before hours of calibration, not after
        raise DllmqError(f"{out} already exists; choose another --out or pass --overwrite.")
    settings = preset_settings(args.preset)
    flags = dict(wbits=args.wbits, group_size=args.group_size, abits=args.abits, kv_bits=args.kv_bits,
                 act_clip=args.act_clip, weight_clip=args.weight_clip, sym=True if args.sym else None)
    settings.update({k: v for k, v in flags.items() if v is not None})  # explicit flags beat the preset
    config = QuantConfig(method=args.method, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
                         seed=args.seed, **settings, **method_settings_from_args(args, args.method))
    model, tokenizer, family = _load(args)
    report = quantize(model, tokenizer, config, device=args.calib_device or args.device,
                      offload_activations=args.offload_activations, progress=True)
    save_quantized(model, tokenizer, out, overwrite=args.overwrite)
    print(format_report(report))
    on_disk, target = directory_bytes(out), theoretical_bytes(model)
    print(f"saved {out}: {human_bytes(on_disk)} of safetensors (packed target {human_bytes(target)}, "
          f"{100 * (on_disk / target - 1):+.1f}%)")


def _methods_by_kind() -> str:
    from dllmq.quant.methods.base import EITHER, WEIGHT_ACTIVATION
    from dllmq.quant.registry import methods

    def names(*kinds):
        return ", ".join(m.name for m in methods() if m.kind in kinds)
    either = names(EITHER)
    return (f"weight-only: {names(EITHER, 'weight-only')}; weight-activation: {names(WEIGHT_ACTIVATION)}"
            + (f" ({either} too, given --abits)" if either else ""))


def _method_flags() -> dict[str, list]:
    """flag -> [(method class, settings field)], for every setting a method exposes on the command line."""
    from dataclasses import fields

    from dllmq.quant.registry import methods
    flags: dict[str, list] = {}
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


def method_settings_from_args(args, method: str) -> dict:
    """The method settings given on the command line; a flag of another method is an error."""
    from dllmq.quant.registry import get_method
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


def cmd_eval(args) -> None:
    from dllmq.evaluate.mini import ALIASES, TASKS

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if names and all(t in TASKS or t in ALIASES for t in names):
        return _eval_mini(args, names)
    from dllmq.evaluate.runner import run_from_args
    run_from_args(args)


def _eval_mini(args, names) -> None:
    """The offline mini benchmark (no harness, no datasets): mini_general, mini_math, mini_code."""
    from dllmq.evaluate import evaluate_mini
    from dllmq.evaluate.runner import write_json_atomic

    model, tokenizer, _ = _load(args)
    limit = None if args.limit is None else int(args.limit)
    results = evaluate_mini(model, tokenizer, names, limit=limit, seed=args.seed, chat=args.chat)
    print(f"{'task':<14} {'acc':>7} {'stderr':>7} {'n':>5} {'chance':>7}")
    for task, r in results.items():
        print(f"{task:<14} {100 * r['acc']:>7.2f} {100 * r['stderr']:>7.2f} {r['n']:>5} {100 * r['chance']:>7.1f}")
    if args.out:
        write_json_atomic(Path(args.out), {"model": str(args.model), "tasks": results, "limit": limit,
                                           "seed": args.seed})
        print(f"results written to {args.out}")


COMMANDS = {"inspect": cmd_inspect, "generate": cmd_generate, "ppl": cmd_ppl, "quantize": cmd_quantize,
            "eval": cmd_eval}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        (COMMANDS.get(args.command) or args.func)(args)
    except DllmqError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
