"""llm-compressor's checkpoints: compressed-tensors "pack-quantized" integer weights, read and written
through the compressed-tensors library (an optional dependency: `pip install 'dllmq[interop]'`).

Per linear: `weight_packed` int32 [out, ceil(in * b / 32)], signed codes offset by 2^(b-1) and packed
along the input dim; `weight_scale` [out, groups]; `weight_shape` [2]; for asymmetric schemes
`weight_zero_point`, signed zero points packed along the output dim; optionally `weight_g_idx`. A
weight dequantizes as (code - zero) * scale. In dllmq's terms the unsigned code is code + 2^(b-1) and
the zero point zero + 2^(b-1) (2^(b-1) for a symmetric scheme).
"""
from __future__ import annotations

import importlib

import torch

from dllmq.errors import DllmqError
from dllmq.quant.interop.scheme import ForeignScheme, natural_g_idx, quantizer_of
from dllmq.quant.packing import pack_codes, unpack_codes
from dllmq.quant.qlinear import QuantLinear

FORMAT = "pack-quantized"


def library():
    """The compressed-tensors modules dllmq uses, or one sentence saying how to install them."""
    try:
        helpers = importlib.import_module("compressed_tensors.compressors.pack_quantized.helpers")
        quantization = importlib.import_module("compressed_tensors.quantization")
    except ImportError:
        raise DllmqError("Reading or writing compressed-tensors checkpoints needs the compressed-tensors library; "
                         "install it with pip install 'dllmq[interop]'.") from None
    return helpers, quantization


def matches(qc: dict) -> bool:
    return qc.get("quant_method") == "compressed-tensors"


def read_scheme(qc: dict) -> ForeignScheme:
    _, quantization = library()
    config = quantization.QuantizationConfig.model_validate(qc)
    if config.format != FORMAT:
        raise DllmqError(f"This compressed-tensors checkpoint is stored as {config.format!r}; dllmq reads "
                         f"{FORMAT!r} integer weights.")
    schemes = [s for s in config.config_groups.values()]
    if len(schemes) != 1:
        raise DllmqError(f"This compressed-tensors checkpoint has {len(schemes)} quantization schemes; dllmq reads "
                         "checkpoints with one scheme for every quantized linear.")
    scheme = schemes[0]
    if scheme.input_activations is not None or scheme.output_activations is not None or config.kv_cache_scheme:
        raise DllmqError("This compressed-tensors checkpoint quantizes activations or the KV cache as well; dllmq "
                         "reads weight-only checkpoints from other tools.")
    w = scheme.weights
    strategy = str(getattr(w.strategy, "value", w.strategy))
    if str(getattr(w.type, "value", w.type)) != "int" or strategy not in ("group", "channel"):
        raise DllmqError(f"This compressed-tensors checkpoint's weights are {w.type} per {strategy}; dllmq reads "
                         "integer weights per group or per channel.")
    return ForeignScheme(format=f"compressed-tensors {FORMAT}", method="rtn", bits=int(w.num_bits),
                         group_size=int(w.group_size) if strategy == "group" else -1, sym=bool(w.symmetric),
                         act_order=bool(w.actorder), quantizer=quantizer_of(qc, "llm-compressor"))


def is_quantized(tensors: dict, path: str) -> bool:
    return f"{path}.weight_packed" in tensors


def to_dllmq(tensors: dict, path: str, scheme: ForeignScheme, in_features: int, out_features: int) -> dict:
    helpers, _ = library()
    bits, offset = scheme.bits, 1 << (scheme.bits - 1)
    shape = tuple(int(x) for x in tensors[f"{path}.weight_shape"].tolist())
    if shape != (out_features, in_features):
        raise DllmqError(f"{path}.weight_shape is {shape} but the model's linear is {(out_features, in_features)}.")
    signed = helpers.unpack_from_int32(tensors[f"{path}.weight_packed"], bits, torch.Size(shape))    # [out, in]
    scale = tensors[f"{path}.weight_scale"]                                                           # [out, groups]
    if scheme.sym:
        zeros = torch.full(tuple(scale.shape), offset, dtype=torch.int32)
    else:
        zp = helpers.unpack_from_int32(tensors[f"{path}.weight_zero_point"], bits, torch.Size(scale.shape),
                                       packed_dim=0)
        zeros = zp.to(torch.int32) + offset
    g_idx = tensors.get(f"{path}.weight_g_idx")
    out = {"qweight": pack_codes((signed.to(torch.int32) + offset).t().to(torch.uint8), bits, dim=0),
           "qzeros": pack_codes(zeros.t().to(torch.uint8), bits, dim=1), "scales": scale.t().contiguous(),
           "g_idx": natural_g_idx(in_features, scheme.group_size) if g_idx is None else g_idx.to(torch.int32)}
    if f"{path}.bias" in tensors:
        out["bias"] = tensors[f"{path}.bias"]
    return out


def from_dllmq(q: QuantLinear, sym: bool) -> dict:
    """A QuantLinear's tensors in the pack-quantized layout (natural group order)."""
    helpers, _ = library()
    if not torch.equal(q.g_idx.long(), natural_g_idx(q.in_features, q.group_size).long()):
        raise DllmqError("This model's groups follow act-order (a permuted g_idx); dllmq writes compressed-tensors "
                         "checkpoints with natural group order only.")
    offset = 1 << (q.bits - 1)
    codes = unpack_codes(q.qweight, q.bits, q.in_features, dim=0).to(torch.int32)           # [in, out]
    zeros = unpack_codes(q.qzeros, q.bits, q.out_features, dim=1).to(torch.int32)           # [groups, out]
    out = {"weight_packed": helpers.pack_to_int32((codes - offset).t().contiguous().to(torch.int8), q.bits),
           "weight_scale": q.scales.t().contiguous(),
           "weight_shape": torch.tensor([q.out_features, q.in_features])}
    if not sym:
        out["weight_zero_point"] = helpers.pack_to_int32((zeros - offset).t().contiguous().to(torch.int8), q.bits,
                                                         packed_dim=0)
    elif (zeros != offset).any():
        raise DllmqError("A symmetric scheme needs every zero point at 2^(bits-1); this model's are not.")
    if q.bias is not None:
        out["bias"] = q.bias
    return out


def write_config(bits: int, group_size: int, sym: bool, ignore: list[str], quantizer: str) -> dict:
    _, quantization = library()
    args = quantization.QuantizationArgs(num_bits=bits, type="int", symmetric=sym,
                                         strategy="channel" if group_size == -1 else "group",
                                         group_size=None if group_size == -1 else group_size)
    config = quantization.QuantizationConfig(
        config_groups={"group_0": quantization.QuantizationScheme(targets=["Linear"], weights=args)},
        format=FORMAT, quantization_status="compressed", ignore=ignore)
    return {**config.to_dict(), "meta": {"quantizer": [quantizer]}}
