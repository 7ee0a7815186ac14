"""GPTQ checkpoints as AutoGPTQ, GPTQModel and optimum write them.

The tensors are the layout dllmq itself saves (`qweight` codes packed along the input dim, `qzeros`
packed along the output dim, `scales`, `g_idx`); what differs is the zero-point convention. GPTQ v1
(`checkpoint_format` "gptq", or no such key: AutoGPTQ's files) stores every zero point minus one,
GPTQ v2 ("gptq_v2", GPTQModel's and dllmq's) stores it as it is. The config sits in config.json's
`quantization_config` or in a `quantize_config.json` beside it.
"""
from __future__ import annotations

import torch

from dllmq.errors import DllmqError
from dllmq.quant.interop.scheme import ForeignScheme, natural_g_idx, quantizer_of
from dllmq.quant.packing import pack_codes, unpack_codes
from dllmq.quant.qlinear import QuantLinear

V1, V2 = "gptq", "gptq_v2"


def matches(qc: dict) -> bool:
    return qc.get("quant_method", "gptq") == "gptq" and "bits" in qc


def read_scheme(qc: dict) -> ForeignScheme:
    layout = qc.get("checkpoint_format") or V1
    if layout not in (V1, V2):
        raise DllmqError(f"This GPTQ checkpoint is stored as {layout!r}, a kernel-specific layout; dllmq reads "
                         "checkpoint_format gptq (v1) and gptq_v2. Convert it back with the tool that wrote it.")
    if qc.get("dynamic"):
        raise DllmqError("This GPTQ checkpoint sets per-module schemes ('dynamic'), which dllmq does not read; "
                         "it reads one scheme for every quantized linear.")
    if qc.get("lm_head"):
        raise DllmqError("This GPTQ checkpoint quantizes the LM head, which dllmq keeps in full precision; "
                         "quantize the model without lm_head to read it in dllmq.")
    bits, group = int(qc["bits"]), int(qc.get("group_size", -1))
    if not 2 <= bits <= 8 or group == 0 or group < -1:
        raise DllmqError(f"This GPTQ checkpoint has bits {bits} and group size {group}; dllmq reads 2-8 bits "
                         "with a positive group size or -1 (per channel).")
    return ForeignScheme(format="GPTQ v1" if layout == V1 else "GPTQ v2", method="gptq", bits=bits, group_size=group,
                         sym=bool(qc.get("sym", True)), act_order=bool(qc.get("desc_act", False)),
                         quantizer=quantizer_of(qc, "AutoGPTQ / GPTQModel"))


def is_quantized(tensors: dict, path: str) -> bool:
    return f"{path}.qweight" in tensors


def to_dllmq(tensors: dict, path: str, scheme: ForeignScheme, in_features: int, out_features: int) -> dict:
    out = {name: tensors[f"{path}.{name}"] for name in ("qweight", "qzeros", "scales")}
    g_idx = tensors.get(f"{path}.g_idx")
    out["g_idx"] = natural_g_idx(in_features, scheme.group_size) if g_idx is None else g_idx.to(torch.int32)
    if scheme.format == "GPTQ v1":
        out["qzeros"] = _shift_zeros(out["qzeros"], scheme.bits, out_features, +1)
    if f"{path}.bias" in tensors:
        out["bias"] = tensors[f"{path}.bias"]
    return out


def from_dllmq(q: QuantLinear) -> dict:
    """A QuantLinear's tensors in the GPTQ v1 layout (zero points stored minus one)."""
    zeros = unpack_codes(q.qzeros, q.bits, q.out_features, dim=1)
    if (zeros == 0).any():
        raise DllmqError("GPTQ v1 stores each zero point minus one, so a zero point of 0 cannot be written (this "
                         "asymmetric model has some); export a symmetric model (--sym) or read it in a GPTQ v2 tool.")
    out = {"qweight": q.qweight, "qzeros": _shift_zeros(q.qzeros, q.bits, q.out_features, -1), "scales": q.scales,
           "g_idx": q.g_idx}
    if q.bias is not None:
        out["bias"] = q.bias
    return out


def write_config(bits: int, group_size: int, sym: bool, desc_act: bool, quantizer: str, layout: str) -> dict:
    """The quantization config GPTQ tools read (config.json's quantization_config and quantize_config.json)."""
    return {"quant_method": "gptq", "checkpoint_format": layout, "bits": bits, "group_size": group_size, "sym": sym,
            "desc_act": desc_act, "lm_head": False, "meta": {"quantizer": [quantizer]}}


def _shift_zeros(qzeros: torch.Tensor, bits: int, out_features: int, step: int) -> torch.Tensor:
    zeros = unpack_codes(qzeros, bits, out_features, dim=1).to(torch.int32)
    return pack_codes(((zeros + step) % (1 << bits)).to(torch.uint8), bits, dim=1)
