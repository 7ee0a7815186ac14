"""AWQ checkpoints in the GEMM layout (AutoAWQ, llm-awq; also what GPTQModel writes for AWQ).

Per linear: `qweight` int32 [in, out / 8] holds the codes of W^T, eight output channels per word in
the interleaved order 0, 2, 4, 6, 1, 3, 5, 7 (nibble i of a word holds channel ORDER[i] of its eight);
`qzeros` int32 [in / group, out / 8] the zero points packed the same way (stored as they are);
`scales` [in / group, out]. A weight dequantizes as (code - zero) * scale, groups along the input
dim. Only 4-bit weights with zero points exist in this layout.
"""
from __future__ import annotations

import torch

from dllmq.errors import DllmqError
from dllmq.quant.interop.scheme import ForeignScheme, natural_g_idx, quantizer_of
from dllmq.quant.packing import pack_codes, unpack_codes
from dllmq.quant.qlinear import QuantLinear

BITS = 4
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def matches(qc: dict) -> bool:
    return qc.get("quant_method") == "awq" or ("w_bit" in qc and "q_group_size" in qc)   # or AutoAWQ's quant_config.json


def read_scheme(qc: dict) -> ForeignScheme:
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise DllmqError(f"This AWQ checkpoint uses the {version!r} layout; dllmq reads AWQ's GEMM layout only.")
    bits, group = int(qc.get("bits", qc.get("w_bit", BITS))), int(qc.get("group_size", qc.get("q_group_size", 128)))
    if bits != BITS:
        raise DllmqError(f"This AWQ checkpoint claims {bits}-bit weights; the GEMM layout holds 4-bit weights only.")
    if not qc.get("zero_point", True):
        raise DllmqError("This AWQ checkpoint has no zero points (zero_point: false), which dllmq does not read.")
    if group <= 0:
        raise DllmqError(f"This AWQ checkpoint has group size {group}; dllmq reads AWQ with a positive group size.")
    return ForeignScheme(format="AWQ GEMM", method="awq", bits=BITS, group_size=group, sym=False, act_order=False,
                         quantizer=quantizer_of(qc, "AutoAWQ / llm-awq"))


def is_quantized(tensors: dict, path: str) -> bool:
    return f"{path}.qweight" in tensors


def unpack(words: torch.Tensor) -> torch.Tensor:
    """[rows, n / 8] int32 in AWQ's order -> [rows, n] codes (uint8)."""
    shifts = torch.arange(0, 32, BITS, dtype=torch.int32)
    nibbles = (words.to(torch.int32)[..., None] >> shifts) & 0xF            # [rows, n/8, 8]: nibble i
    codes = torch.empty_like(nibbles)
    codes[..., list(ORDER)] = nibbles                                         # nibble i is channel ORDER[i]
    return codes.reshape(words.shape[0], -1).to(torch.uint8)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """[rows, n] codes -> [rows, n / 8] int32 in AWQ's order (n a multiple of 8)."""
    rows, n = codes.shape
    if n % 8:
        raise DllmqError(f"AWQ's GEMM layout packs 8 output channels per word; {n} is not a multiple of 8.")
    grouped = codes.to(torch.int64).reshape(rows, n // 8, 8)[..., list(ORDER)]
    shifts = torch.arange(0, 32, BITS, dtype=torch.int64)
    words = (grouped << shifts).sum(-1)                                      # disjoint bits: the sum is an OR
    return (words - (words >> 31 << 32)).to(torch.int32)                     # as the int32 bit pattern


def to_dllmq(tensors: dict, path: str, scheme: ForeignScheme, in_features: int, out_features: int) -> dict:
    codes = unpack(tensors[f"{path}.qweight"])[:, :out_features]            # [in, out]
    zeros = unpack(tensors[f"{path}.qzeros"])[:, :out_features]             # [groups, out]
    out = {"qweight": pack_codes(codes, BITS, dim=0), "qzeros": pack_codes(zeros, BITS, dim=1),
           "scales": tensors[f"{path}.scales"], "g_idx": natural_g_idx(in_features, scheme.group_size)}
    if f"{path}.bias" in tensors:
        out["bias"] = tensors[f"{path}.bias"]
    return out


def from_dllmq(q: QuantLinear) -> dict:
    """A 4-bit QuantLinear in AWQ's GEMM layout (natural groups that divide the input dim)."""
    if q.bits != BITS or q.group_size == -1 or q.in_features % q.group_size:
        raise DllmqError(f"AWQ's GEMM layout holds 4-bit weights in groups that divide the input dim; this layer has "
                         f"{q.bits} bits, group {q.group_size}, {q.in_features} inputs.")
    if not torch.equal(q.g_idx.long(), natural_g_idx(q.in_features, q.group_size).long()):
        raise DllmqError("AWQ's GEMM layout has no g_idx; an act-order model with permuted groups cannot be written.")
    codes = unpack_codes(q.qweight, BITS, q.in_features, dim=0)
    zeros = unpack_codes(q.qzeros, BITS, q.out_features, dim=1)
    out = {"qweight": pack(codes), "qzeros": pack(zeros), "scales": q.scales}
    if q.bias is not None:
        out["bias"] = q.bias
    return out


def write_config(group_size: int, quantizer: str) -> dict:
    return {"quant_method": "awq", "bits": BITS, "group_size": group_size, "zero_point": True, "version": "gemm",
            "meta": {"quantizer": [quantizer]}}
