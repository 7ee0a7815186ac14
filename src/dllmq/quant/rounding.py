"""Round-to-nearest on a weight grid: the rounding every method ends with (RTN alone, SmoothQuant and
DuQuant after their transforms, AWQ after its scale and clip searches, QuaRot without GPTQ)."""
from __future__ import annotations

import torch

from dllmq.quant.block import BlockContext, QuantizedWeight
from dllmq.quant.formats import quantize_weight
from dllmq.quant.primitives import compute_qparams, dequantize, expand_groups, quantize
from dllmq.quant.specs import WeightSpec


def round_scales(scale: torch.Tensor) -> torch.Tensor:
    """Scales are stored in float16; compute codes against the stored value so reload is exact."""
    return scale.to(torch.float16).to(torch.float32)


def rtn_weight(weight: torch.Tensor, spec: WeightSpec) -> QuantizedWeight:
    """`weight` [out, in] rounded to its own min/max grid per group (or per output channel)."""
    w = weight.detach().float()
    if spec.fmt.is_float:   # FP8 / MXFP4 / NVFP4: the format's own scale rule
        q, scale, tensor_scale = quantize_weight(w, spec.fmt)
        error = ((q - w).norm() / w.norm().clamp_min(1e-12)).item()
        return QuantizedWeight(q, scale, torch.zeros_like(scale), None, error, "weight", tensor_scale)
    scale, zero = compute_qparams(w, spec.quant_spec())
    scale = round_scales(scale)
    if spec.group_size == -1:
        q = dequantize(quantize(w, scale, zero, spec.bits), scale, zero)
        scale, zero = scale.reshape(-1, 1), zero.reshape(-1, 1)
    else:
        full_s, full_z = (expand_groups(t, spec.group_size, w.shape[1]) for t in (scale, zero))
        q = dequantize(quantize(w, full_s, full_z, spec.bits), full_s, full_z)
    error = ((q - w).norm() / w.norm().clamp_min(1e-12)).item()
    return QuantizedWeight(q, scale, zero, None, error, "weight")


def round_block(ctx: BlockContext, spec: WeightSpec) -> dict[str, QuantizedWeight]:
    """Every linear of the block rounded to nearest, as it stands now (after any transform)."""
    return {name: rtn_weight(ctx.linear(name).weight, spec) for name in ctx.quantized(ctx.family.block_linears)}
