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
is under "dllmq". A weight dequantizes as (code - zero[g_idx]) * scale[g_idx]. Weight-only models
also get a `quantize_config.json` and `meta.quantizer`, which GPTQ tools look for.

Checkpoints written by other tools (GPTQ v1/v2, AWQ GEMM, compressed-tensors) load through the same
door: their tensors are converted to this layout as they are read (dllmq.quant.interop), and the
model records where it came from under "source".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dllmq import __version__
from dllmq.models.modeling import TransformerLM
from dllmq.quant.config import QuantConfig
from dllmq.quant.interop import ForeignScheme, reader_for
from dllmq.quant.interop import gptq as gptq_layout
from dllmq.quant.modules import replace_module
from dllmq.quant.qlinear import QuantLinear
from dllmq.quant.qlinear_fp import FPQuantLinear

LAYOUT = "gptq"
FP_LAYOUT = "dllmq_fp"   # FP8 / MXFP4 / NVFP4 weights: codes + block scales (qlinear_fp.py)
CHECKPOINT_FORMAT = "gptq_v2"
QUANTIZER = f"dllmq:{__version__}"


def quantized_linears(model: TransformerLM) -> list[list[str]]:
    """Per linear group, the block linears that are quantized (dllmq's own models: all of them)."""
    block = model.get_blocks()[0]
    groups = [[n for n in g.linears if isinstance(block.get_submodule(n), (QuantLinear, FPQuantLinear))]
              for g in model.family.groups]
    return [g for g in groups if g]


def quantization_config(model: TransformerLM, config: QuantConfig, source: ForeignScheme | None = None) -> dict:
    fp = config.weight.fmt.is_float
    qc = {
        # weight-activation models need dllmq to run (online transforms, activation quantizers);
        # their weights alone still read as GPTQ-layout tensors. Floating-point weights are dllmq's own
        # layout (qlinear_fp.py), which no GPTQ tool must mistake for its own.
        "quant_method": FP_LAYOUT if fp else LAYOUT,
        "checkpoint_format": config.weight.format if fp else CHECKPOINT_FORMAT,
        "bits": config.weight.bits,
        "group_size": config.weight.group_size,
        "sym": config.weight.sym,
        # GPTQ's (and QuaRot's) act-order with permuted groups: only then is g_idx not the natural one
        "desc_act": bool(getattr(config.settings, "act_order", False)
                         and not getattr(config.settings, "static_groups", True)),
        "modules_in_block_to_quantize": quantized_linears(model),
        "meta": {"quantizer": [QUANTIZER]},
        # the profile is always recorded (the flat form lists it only where it is not dllmq's)
        "dllmq": {"version": __version__, "profile": config.profile, **config.to_dict()},
    }
    if source is not None:
        qc["source"] = {"format": source.format, "quantizer": source.quantizer}
    return qc


def tool_config(qc: dict, config: QuantConfig) -> dict | None:
    """The quantize_config.json GPTQ tools read, for a weight-only model (None for a weight-activation
    one: its online transforms and activation quantizers only run in dllmq)."""
    if config.weight_activation or config.weight.fmt.is_float:
        return None
    return gptq_layout.write_config(qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"], QUANTIZER,
                                    CHECKPOINT_FORMAT)


@dataclass
class SavedQuantization:
    """What a checkpoint's quantization_config says: dllmq's config, and for another tool's checkpoint
    its scheme and the module that converts its tensors."""

    config: QuantConfig
    foreign: ForeignScheme | None = None
    reader: object | None = None


def read_quantization(raw: dict) -> SavedQuantization | None:
    qc = raw.get("quantization_config")
    if not qc:
        return None
    if qc.get("quant_method") in (LAYOUT, FP_LAYOUT) and "dllmq" in qc:
        return SavedQuantization(QuantConfig.from_dict(qc["dllmq"]))
    reader = reader_for(qc)
    scheme = reader.read_scheme(qc)
    config = QuantConfig(scheme.method, wbits=scheme.bits, group_size=scheme.group_size, sym=scheme.sym,
                         **({"act_order": scheme.act_order} if scheme.method == "gptq" else {}))
    return SavedQuantization(config, scheme, reader)


def prepare_quantized(model: TransformerLM, raw: dict, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Give a (meta) model the structure its saved quantization needs: QuantLinear modules where the
    checkpoint has quantized linears (all of them when `tensors` is not given), then what the method runs
    besides the weights (online transforms, activation and K/V quantizers), through the same
    `build_runtime` that calibration ends with. Another tool's tensors in `tensors` are converted to
    dllmq's layout in place, and the model's config records dllmq's view of the quantization."""
    saved = read_quantization(raw)
    if saved is None:
        return
    method, spec, reader = saved.config.make_method(), saved.config.weight, saved.reader
    family = model.family
    listed = _listed_linears(raw)
    for i, block in enumerate(model.get_blocks()):
        for name in family.block_linears:
            path = f"{family.blocks}.{i}.{name}"
            if tensors is not None and not _holds_quantized(reader, spec, tensors, path):
                continue  # left in full precision by the tool that quantized the checkpoint
            if tensors is None and listed is not None and name not in listed:
                continue  # dllmq's config lists the linears it quantized (--keep-fp left the others)
            linear = block.get_submodule(name)
            if reader is not None and tensors is not None:
                with torch.device("cpu"):  # the loader builds the model on the meta device; tensors are real
                    converted = reader.to_dllmq(tensors, path, saved.foreign, linear.in_features, linear.out_features)
                _convert(tensors, path, converted)
            if spec.fmt.is_float:
                layer = FPQuantLinear.empty(linear.in_features, linear.out_features, spec.format,
                                            bias=linear.bias is not None)
            else:
                layer = QuantLinear.empty(linear.in_features, linear.out_features, spec.bits, spec.group_size,
                                          bias=linear.bias is not None)
            replace_module(block, name, layer)
        method.build_runtime(block)
    if saved.foreign is not None:
        model.config.raw["quantization_config"] = quantization_config(model, saved.config, saved.foreign)
    elif tensors is not None:  # the linears the checkpoint really holds quantized
        model.config.raw["quantization_config"] = {**raw["quantization_config"],
                                                   "modules_in_block_to_quantize": quantized_linears(model)}


def _listed_linears(raw: dict) -> set[str] | None:
    """The block linears a dllmq config lists as quantized (None for another tool's config)."""
    qc = raw.get("quantization_config") or {}
    groups = qc.get("modules_in_block_to_quantize")
    if "dllmq" not in qc or not isinstance(groups, list):
        return None
    return {name for group in groups for name in group}


def full_precision_linears(raw: dict, family) -> tuple[str, ...]:
    """The block linears a dllmq-quantized model left in full precision (--keep-fp), in execution order."""
    listed = _listed_linears(raw)
    return () if listed is None else tuple(n for n in family.block_linears if n not in listed)


def _holds_quantized(reader, spec, tensors: dict, path: str) -> bool:
    if reader is None and spec.fmt.is_float:
        return f"{path}.codes" in tensors
    return (reader or gptq_layout).is_quantized(tensors, path)


def _convert(tensors: dict[str, torch.Tensor], path: str, converted: dict[str, torch.Tensor]) -> None:
    for key in [k for k in tensors if k.startswith(path + ".")]:
        del tensors[key]
    tensors.update({f"{path}.{k}": v for k, v in converted.items()})


def describe_quantization(raw: dict, family=None) -> str | None:
    """A few lines for `dllmq inspect`: what a saved quantized model holds and, given its family, which
    block linears are quantized and which stayed in full precision."""
    saved = read_quantization(raw)
    if saved is None:
        return None
    if saved.foreign is not None:
        return f"quantized    {saved.foreign.describe()}; dllmq runs it as its own quantized linears"
    config = saved.config
    w, a, cal = config.weight, config.act, config.calibration
    group = "per-channel" if w.group_size == -1 else f"group {w.group_size}"
    profile = raw["quantization_config"].get("dllmq", {}).get("profile", config.profile)
    calib = "" if not config.needs_calibration else \
        f", calibrated on {cal.source} ({cal.nsamples} x {cal.seqlen} tokens, seed {config.seed})" \
        if cal.windows == "random" else \
        f", calibrated on {cal.source} ({cal.nsamples} documents cut into {cal.seqlen}-token windows)"
    kv = f", KV {config.kv.bits}-bit" if config.kv.enabled else ""
    if w.fmt.is_float or a.fmt.is_float:
        wdesc = f"{w.fmt.title} weights" + (" per output channel" if w.fmt.block == 0 else "") if w.fmt.is_float else \
            f"int {group} weights ({'symmetric' if w.sym else 'asymmetric'})"
        adesc = "" if not config.weight_activation else \
            (f", {a.fmt.title} activations per token" if a.fmt.is_float else
             f", int activations per token ({'symmetric' if a.sym else 'asymmetric'}, clip {a.clip})") + kv
        layout = "dllmq's FP layout (codes + block scales)" if w.fmt.is_float else "the GPTQ layout"
        line = f"quantized    {config.method.upper()} W{w.bits}A{a.bits}, {wdesc}{adesc}{calib}; weights stored " \
               f"in {layout}; profile {profile}"
    else:
        acts = "" if not config.weight_activation else \
            f", activations per token ({'symmetric' if a.sym else 'asymmetric'}, clip {a.clip})" + kv
        line = f"quantized    {config.method.upper()} W{w.bits}A{a.bits}, {group} weights " \
               f"({'symmetric' if w.sym else 'asymmetric'}){acts}{calib}; weights stored in the GPTQ layout" \
               f"; profile {profile}"
    listed = _listed_linears(raw)
    if listed is None or family is None:
        return line
    kept = full_precision_linears(raw, family)
    return "\n".join([line, f"linears      quantized: {', '.join(n for n in family.block_linears if n in listed) or 'none'}",
                       f"             full precision: {', '.join(kept) or 'none'}"])
