"""Round-to-nearest on a weight grid: the rounding every method ends with (RTN alone, SmoothQuant and
DuQuant after their transforms, AWQ after its scale and clip searches, QuaRot without GPTQ)."""
from __future__ import annotations

import logging
from dataclasses import replace

import torch

from dllmq.quant.block import BlockContext, QuantizedWeight
from dllmq.quant.formats import quantize_weight
from dllmq.quant.primitives import QuantSpec, compute_qparams, dequantize, expand_groups, quantize
from dllmq.quant.specs import WeightSpec

log = logging.getLogger(__name__)


def round_scales(scale: torch.Tensor) -> torch.Tensor:
    """Scales are stored in float16; compute codes against the stored value so reload is exact."""
    return scale.to(torch.float16).to(torch.float32)


def rtn_weight(weight: torch.Tensor, spec: WeightSpec) -> QuantizedWeight:
    """`weight` [out, in] rounded to its own min/max grid per group (or per output channel)."""
    w = weight.detach().float()
    q, scale, zero, tensor_scale = _rounded(w, spec)
    error = ((q - w).norm() / w.norm().clamp_min(1e-12)).item()
    return QuantizedWeight(q, scale, zero, None, error, "weight", tensor_scale)


def rtn_values(weight: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """rtn_weight(weight, spec).weight alone (float32): what a search compares its candidates by."""
    return _rounded(weight.detach().float(), spec)[0]


def _rounded(w: torch.Tensor, spec: WeightSpec):
    """(values, scale, zero, tensor scale or None) of float32 `w` rounded to nearest on its grid."""
    if spec.fmt.is_float:   # FP8 / MXFP4 / NVFP4: the format's own scale rule
        q, scale, tensor_scale = quantize_weight(w, spec.fmt)
        return q, scale, torch.zeros_like(scale), tensor_scale
    qspec = spec.quant_spec()
    scale, zero = compute_qparams(w, qspec)
    if qspec.study_grid:
        scale, zero = storable_zeros(w, qspec, scale, zero)
    scale = round_scales(scale)
    study = qspec.study_grid
    if spec.group_size == -1:
        q = dequantize(quantize(w, scale, zero, spec.bits, study_grid=study), scale, zero)
        scale, zero = scale.reshape(-1, 1), zero.reshape(-1, 1)
    else:
        full_s, full_z = (expand_groups(t, spec.group_size, w.shape[1]) for t in (scale, zero))
        q = dequantize(quantize(w, full_s, full_z, spec.bits, study_grid=study), full_s, full_z)
    return q, scale, zero, None


def storable_zeros(w: torch.Tensor, qspec: QuantSpec, scale: torch.Tensor,
                   zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The saved format packs zero points in b bits (0 .. 2^b - 1). On the study's grid a row (group) whose
    weights all have one sign has its zero outside that range; such a row takes dllmq's grid instead (it
    includes zero). Weight rows of thousands of entries practically never are of one sign."""
    outside = (zero < 0) | (zero > qspec.maxq)
    if not bool(outside.any()):
        return scale, zero
    log.warning("%d weight row(s) of one sign: dllmq's grid there (the saved zero points fit %d bits)",
                int(outside.sum()), qspec.bits)
    s2, z2 = compute_qparams(w, replace(qspec, study_grid=False))
    return torch.where(outside, s2, scale), torch.where(outside, z2, zero)


def round_block(ctx: BlockContext, spec: WeightSpec) -> dict[str, QuantizedWeight]:
    """Every linear of the block rounded to nearest, as it stands now (after any transform)."""
    return {name: rtn_weight(ctx.linear(name).weight, spec) for name in ctx.quantized(ctx.family.block_linears)}
