"""Write a dllmq-quantized weight-only model in another tool's layout: GPTQ v1 (AutoGPTQ, vLLM's GPTQ
kernels), AWQ GEMM (AutoAWQ) or compressed-tensors pack-quantized (llm-compressor, vLLM). dllmq's own
saved format is GPTQ v2 already, which GPTQModel reads as it is."""
from __future__ import annotations

import json
import os
from pathlib import Path

from dllmq.errors import DllmqError
from dllmq.models.loading import save_model, state_dict_for_saving
from dllmq.models.modeling import TransformerLM
from dllmq.quant.format import QUANTIZER, read_quantization
from dllmq.quant.interop import awq, compressed_tensors, gptq
from dllmq.quant.qlinear import QuantLinear

FORMATS = ("gptq", "awq", "compressed-tensors")


def export_quantized(model: TransformerLM, tokenizer, out: str | os.PathLike, fmt: str,
                     overwrite: bool = False) -> Path:
    """Save `model` (quantized by dllmq, loaded with the fake backend) at `out` in format `fmt`."""
    if fmt not in FORMATS:
        raise DllmqError(f"Unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    saved = read_quantization(model.config.raw)
    if saved is None:
        raise DllmqError("This model is not quantized; quantize it with dllmq quantize first, then export it.")
    config = saved.config
    if config.weight.fmt.is_float:
        raise DllmqError(f"This model's weights are {config.weight.format}, and the export layouts hold integer "
                         "weights only; load it with dllmq instead.")
    if config.weight_activation:
        raise DllmqError(f"This is a {config.method} W{config.weight.bits}A{config.act.bits} model: its activation "
                         "quantizers and online transforms only run in dllmq, so it cannot be exported; export a "
                         "weight-only model.")
    layers = {path: m for path, m in model.named_modules() if isinstance(m, QuantLinear)}
    if any(m.input_transform is not None for m in layers.values()):
        raise DllmqError("This model's linears carry online input transforms that other tools do not run; export "
                         "a weight-only model without them.")
    tensors = {k: v for k, v in state_dict_for_saving(model).items() if k.rpartition(".")[0] not in layers}
    spec = config.weight
    for path, q in layers.items():
        if fmt == "gptq":
            converted = gptq.from_dllmq(q)
        elif fmt == "awq":
            converted = awq.from_dllmq(q)
        else:
            converted = compressed_tensors.from_dllmq(q, spec.sym)
        tensors.update({f"{path}.{k}": v for k, v in converted.items()})
    extra_files = None
    if fmt == "gptq":
        qc = gptq.write_config(spec.bits, spec.group_size, spec.sym, bool(getattr(config.settings, "act_order", False)),
                               QUANTIZER, gptq.V1)
        extra_files = {"quantize_config.json": json.dumps(qc, indent=2)}
    elif fmt == "awq":
        qc = awq.write_config(spec.group_size, QUANTIZER)
    else:
        qc = compressed_tensors.write_config(spec.bits, spec.group_size, spec.sym, [model.family.lm_head], QUANTIZER)
    return save_model(model, tokenizer, out, overwrite=overwrite, tensors=tensors,
                      extra_config={"quantization_config": qc}, extra_files=extra_files)
