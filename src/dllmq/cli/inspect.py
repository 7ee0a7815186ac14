"""`dllmq inspect`: describe a model from its config.json alone (no weights are read)."""
from __future__ import annotations

import json

from dllmq.cli.commands import help_of
from dllmq.cli.common import add_model_args, model_config_json
from dllmq.models.describe import describe, format_description
from dllmq.models.registry import get_family, parse_model_config
from dllmq.models.safetensors_io import verify_checkpoint
from dllmq.quant.backend import plan_kernels
from dllmq.quant.format import describe_quantization


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help=help_of("inspect"),
                       description="Describe a model from its config.json (no weights are read; the safetensors "
                                   "headers are checked against the file sizes). "
                                   "Also accepts llada-8b, dream-7b and smollm2-135m: the real configs shipped with dllmq.")
    add_model_args(p, with_runtime=False)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args) -> None:
    name = args.model
    raw, directory = model_config_json(name)
    config = parse_model_config(raw)
    if directory is not None:  # a truncated or corrupt weights file is reported here, not at the first load
        verify_checkpoint(directory)
    family = get_family(config.family)
    quantized = describe_quantization(raw, family)
    if args.json:
        print(json.dumps({"model": name, **describe(config, family),
                          "quantization_config": raw.get("quantization_config")}, indent=2))
    else:
        print(format_description(name, config, family))
        if quantized:
            print(quantized)
            print(f"kernels      {plan_kernels(raw).summary()} (CPU, --backend kernel)")
