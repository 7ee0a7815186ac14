"""The `dllmq` command. Thin: parse flags, call the layers, print. Errors are one sentence and exit code 2.

One module per subcommand (commands.py lists them), each with `add_parser(sub)`, which sets `func`,
and `run(args)`; the model and runtime flags they share are in common.py. `main` imports only the
module of the command it runs, so `dllmq --help` loads no model code."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from dllmq import __version__
from dllmq.cli.commands import COMMANDS
from dllmq.errors import DllmqError

EPILOG = """\
MODEL is a built-in name, a checkpoint directory (config.json + safetensors, e.g. a downloaded
LLaDA-8B-Instruct or Dream-v0-Base-7B), or a Hub id when network or the Hugging Face cache allows
(HF_HUB_OFFLINE=1 reads the cache only). Built-in: dllmq-tiny (the default) and dllmq-tiny-instruct,
small LLaDA-architecture diffusion models trained by dllmq and shipped with it; random-llada,
random-dream, random-llama, untrained models with the real architectures, for tests.

examples:
  dllmq generate --prompt "Question: What is 30 + 5? Answer:" --gen-length 8 --block-length 4
  dllmq eval dllmq-tiny-instruct --tasks mini
  dllmq inspect random-llada
  dllmq inspect llada-8b                      # the real LLaDA-8B config, no weights needed
  dllmq generate random-llada --prompt "Hello" --gen-length 64 --steps 64 --block-length 32
  dllmq ppl random-dream --data notes.txt --seqlen 256
  dllmq quantize random-llada --method gptq --preset W4A16-g128 --nsamples 16 --seqlen 256 --out q/
  dllmq generate q/ --prompt "Hello"          # a saved quantized model is a MODEL everywhere
"""

__all__ = ["Parser", "build_parser", "main"]


class Parser(argparse.ArgumentParser):
    """argparse's parser whose usage errors (an unknown flag, a value of the wrong type) are one sentence
    like every other error: raised as a DllmqError, which main prints as one line and exits 2 with."""

    def error(self, message: str):
        raise DllmqError(f"{self.prog}: {message}; see {self.prog} --help.")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of `dllmq`. With `command`, only that subcommand's module is imported and its flags
    added; the other subcommands are listed (for --help and argparse's choices) but take no flags."""
    parser = Parser(
        prog="dllmq", description="Quantize diffusion LLMs (LLaDA, Dream) and measure what each choice costs.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--version", action="version", version=f"dllmq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, summary) in COMMANDS.items():
        if command is None or name == command:
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, help=summary)
    return parser


def _command_of(argv: list[str]) -> str:
    """The subcommand named in argv: its first word that is not an option ("" if none; the global
    options take no values)."""
    return next((a for a in argv if not a.startswith("-")), "")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser(_command_of(argv)).parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        if getattr(args, "preflight", None) is not None:  # the runtime flags, before the command starts
            args.preflight(args)
        args.func(args)
    except DllmqError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
