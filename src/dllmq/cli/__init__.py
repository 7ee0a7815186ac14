"""The `dllmq` command. Thin: parse flags, call the layers, print. Errors are one sentence and exit code 2.

One module per subcommand, each with `add_parser(sub)` (which sets `func`) and `run(args)`; the model
and runtime flags they share are in common.py."""
from __future__ import annotations

import argparse
import logging
import sys

from dllmq import __version__
from dllmq.cli import bench, eval, generate, inspect, outliers, ppl, quantize, report, study
from dllmq.cli.common import DEFAULT_MODEL
from dllmq.errors import DllmqError

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

# In the order `dllmq --help` lists them.
SUBCOMMANDS = (inspect, generate, ppl, quantize, eval, bench, outliers, study, report)

__all__ = ["DEFAULT_MODEL", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dllmq", description="Quantize diffusion LLMs (LLaDA, Dream) and measure what each choice costs.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--version", action="version", version=f"dllmq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in SUBCOMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except DllmqError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
