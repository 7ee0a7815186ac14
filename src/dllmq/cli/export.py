"""`dllmq export`: write a dllmq-quantized weight-only model in another tool's checkpoint layout."""
from __future__ import annotations

import argparse
from pathlib import Path

from dllmq.cli.commands import help_of
from dllmq.cli.common import add_model_args, load
from dllmq.errors import DllmqError
from dllmq.quant.interop.export import FORMATS, export_quantized

DESCRIPTION = """\
Write a quantized MODEL (a directory saved by dllmq quantize, or another tool's checkpoint dllmq reads)
in the layout another tool expects. dllmq's own directories are GPTQ v2 with a quantize_config.json
already, which GPTQModel loads as they are; export writes GPTQ v1 (AutoGPTQ, vLLM's GPTQ kernels), AWQ
GEMM (AutoAWQ) or compressed-tensors pack-quantized (llm-compressor, vLLM; needs pip install
'dllmq[interop]'). Weight-activation models (SmoothQuant, QuaRot, DuQuant, RTN with --abits) only run in
dllmq and are refused."""

EPILOG = """\
examples:
  dllmq export q/ --format gptq --out q-gptq-v1/
  dllmq export q/ --format compressed-tensors --out q-ct/
  dllmq export q/ --format awq --out q-awq/         # 4-bit, groups that divide every input dim
"""


def add_parser(sub) -> None:
    p = sub.add_parser("export", help=help_of("export"), description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, model_help="a quantized model directory")
    p.add_argument("--format", required=True, choices=FORMATS, help="the layout to write")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def run(args) -> None:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise DllmqError(f"{out} already exists; choose another --out or pass --overwrite.")
    model, tokenizer, _ = load(args, backend="fake")
    export_quantized(model, tokenizer, out, args.format, overwrite=args.overwrite)
    print(f"wrote {out} ({args.format})")
