"""Round-to-nearest: each weight group gets its own min/max grid; no calibration data."""
from __future__ import annotations

import torch

from dllmq.quant.pipeline import BlockContext, Method, QuantizedWeight
from dllmq.quant.primitives import QuantSpec, compute_qparams, dequantize, expand_groups, quantize


def weight_spec(bits: int, group_size: int, sym: bool, clip: float = 1.0) -> QuantSpec:
    if group_size == -1:
        return QuantSpec(bits=bits, symmetric=sym, granularity="channel", clip_ratio=clip)
    return QuantSpec(bits=bits, symmetric=sym, granularity="group", group_size=group_size, clip_ratio=clip)


def round_scales(scale: torch.Tensor) -> torch.Tensor:
    """Scales are stored in float16; compute codes against the stored value so reload is exact."""
    return scale.to(torch.float16).to(torch.float32)


def rtn_weight(weight: torch.Tensor, bits: int, group_size: int, sym: bool, clip: float = 1.0) -> QuantizedWeight:
    w = weight.detach().float()
    spec = weight_spec(bits, group_size, sym, clip)
    scale, zero = compute_qparams(w, spec)
    scale = round_scales(scale)
    if group_size == -1:
        q = dequantize(quantize(w, scale, zero, bits), scale, zero)
        scale, zero = scale.reshape(-1, 1), zero.reshape(-1, 1)
    else:
        full_s, full_z = (expand_groups(t, group_size, w.shape[1]) for t in (scale, zero))
        q = dequantize(quantize(w, full_s, full_z, bits), full_s, full_z)
    error = ((q - w).norm() / w.norm().clamp_min(1e-12)).item()
    return QuantizedWeight(q, scale, zero, None, error, "weight")


class RTN(Method):
    """Plain rounding. Given activation bits it is the untransformed weight-activation baseline."""

    name = "rtn"

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        c = self.config
        return {name: rtn_weight(ctx.linear(name).weight, c.wbits, c.group_size, c.sym, c.weight_clip or 1.0)
                for name in ctx.family.block_linears}

    def finalize_block(self, block) -> None:
        if self.config.weight_activation:
            from dllmq.quant.wa_common import attach_quantizers
            attach_quantizers(block, self.config)
