"""The saved quantized model: a normal checkpoint directory whose block linears are stored in the
GPTQ layout, so other tools can read the weights.

    config.json        the original config + "quantization_config"
    model.safetensors  embedding, norms, LM head as usual; per quantized linear
                       <path>.qweight  int32 [ceil(in*bits/32), out]  codes packed along the input dim
                       <path>.qzeros   int32 [n_groups, ceil(out*bits/32)]  zero points (true values)
                       <path>.scales   float16 [n_groups, out]
                       <path>.g_idx    int32 [in]  group of each input channel
                       <path>.bias     (when the linear has one)
    tokenizer files

Codes are a little-endian bit stream in int32 words (GPTQ's layout for 2/3/4/8 bits). Zero points
are stored as they are ("checkpoint_format": "gptq_v2", GPTQModel's convention), not minus one.
"quant_method": "gptq" names the storage layout; which algorithm chose the codes (RTN, GPTQ, AWQ)
is under "dllmq". A weight dequantizes as (code - zero[g_idx]) * scale[g_idx].
"""
from __future__ import annotations

from dllmq import __version__
from dllmq.errors import DllmqError
from dllmq.models.modeling import TransformerLM
from dllmq.quant.config import QuantConfig
from dllmq.quant.modules import replace_module
from dllmq.quant.qlinear import QuantLinear

LAYOUT = "gptq"
CHECKPOINT_FORMAT = "gptq_v2"


def quantization_config(model: TransformerLM, config: QuantConfig) -> dict:
    return {
        # weight-activation models need dllmq to run (online transforms, activation quantizers);
        # their weights alone still read as GPTQ-layout tensors
        "quant_method": LAYOUT,
        "checkpoint_format": CHECKPOINT_FORMAT,
        "bits": config.weight.bits,
        "group_size": config.weight.group_size,
        "sym": config.weight.sym,
        # GPTQ's (and QuaRot's) act-order with permuted groups: only then is g_idx not the natural one
        "desc_act": bool(getattr(config.settings, "act_order", False)
                         and not getattr(config.settings, "static_groups", True)),
        "modules_in_block_to_quantize": [list(g.linears) for g in model.family.groups],
        "dllmq": {"version": __version__, **config.to_dict()},
    }


def read_quant_config(raw: dict) -> QuantConfig | None:
    qc = raw.get("quantization_config")
    if not qc:
        return None
    if qc.get("quant_method") != LAYOUT or qc.get("checkpoint_format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT \
            or "dllmq" not in qc:
        raise DllmqError(
            f"This checkpoint is quantized with {qc.get('quant_method')!r} "
            f"({qc.get('checkpoint_format', 'default format')}); dllmq reads only the quantized models it saves."
        )
    return QuantConfig.from_dict(qc["dllmq"])


def prepare_quantized(model: TransformerLM, raw: dict) -> None:
    """Give a (meta) model the structure its saved quantization needs: QuantLinear modules, then what
    the method runs besides the weights (online transforms, activation and K/V quantizers), through the
    same `build_runtime` that calibration ends with."""
    config = read_quant_config(raw)
    if config is None:
        return
    method, spec = config.make_method(), config.weight
    for block in model.get_blocks():
        for name in model.family.block_linears:
            linear = block.get_submodule(name)
            replace_module(block, name, QuantLinear.empty(linear.in_features, linear.out_features, spec.bits,
                                                          spec.group_size, bias=linear.bias is not None))
        method.build_runtime(block)


def describe_quantization(raw: dict) -> str | None:
    """One line for `dllmq inspect`: what a saved quantized model holds."""
    config = read_quant_config(raw)
    if config is None:
        return None
    w, a, cal = config.weight, config.act, config.calibration
    group = "per-channel" if w.group_size == -1 else f"group {w.group_size}"
    calib = "" if not config.needs_calibration else \
        f", calibrated on {cal.source} ({cal.nsamples} x {cal.seqlen} tokens, seed {config.seed})"
    acts = "" if not config.weight_activation else \
        f", activations per token ({'symmetric' if a.sym else 'asymmetric'}, clip {a.clip})" + \
        (f", KV {config.kv.bits}-bit" if config.kv.enabled else "")
    return f"quantized    {config.method.upper()} W{w.bits}A{a.bits}, {group} weights " \
           f"({'symmetric' if w.sym else 'asymmetric'}){acts}{calib}; weights stored in the GPTQ layout"
