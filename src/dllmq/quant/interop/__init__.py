"""Checkpoints quantized by other tools, read as dllmq models and written for other tools.

Each format is one module with the same few functions:

    matches(qc)                      is this quantization_config of the format?
    read_scheme(qc)                  a ForeignScheme, or one DllmqError sentence naming what is unsupported
    is_quantized(tensors, path)      did the checkpoint quantize the linear at `path`?
    to_dllmq(tensors, path, scheme, in_features, out_features)
                                     that linear's tensors in dllmq's QuantLinear layout (GPTQ v2:
                                     qweight / qzeros / scales / g_idx, and bias)

dllmq's own saved format (dllmq.quant.format) is GPTQ v2 plus a `dllmq` block; it is tried first.
"""
from __future__ import annotations

from dllmq.errors import DllmqError
from dllmq.quant.interop import awq, compressed_tensors, gptq
from dllmq.quant.interop.scheme import ForeignScheme

READERS = (gptq, awq, compressed_tensors)
__all__ = ["READERS", "ForeignScheme", "reader_for"]


def reader_for(qc: dict):
    """The module that reads a foreign quantization_config, or one sentence saying none does."""
    for reader in READERS:
        if reader.matches(qc):
            return reader
    method = qc.get("quant_method", "an unknown method")
    layout = qc.get("checkpoint_format") or qc.get("format") or qc.get("version") or "unknown layout"
    raise DllmqError(f"This checkpoint is quantized with {method!r} ({layout}), which dllmq does not read; it reads "
                     "dllmq's own models, GPTQ v1/v2, AWQ GEMM and compressed-tensors pack-quantized integer weights.")
