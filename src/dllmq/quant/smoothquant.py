"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights, then quantize both.

Per group of linears reading one input: s = max|X|^alpha / max|W|^(1-alpha) (alpha 0.5 in the
study's code, W's max over the group's linears), clamped at 1e-5, folded into the preceding RMSNorm
(q/k/v, gate/up) — and, with `smooth_pairs`, into v -> out and up -> down where shapes allow —
so the full-precision model is unchanged. Weights are then rounded per output channel, activations
quantized per token at run time (asymmetric), as in the study.
"""
from __future__ import annotations

from dllmq.models.modeling import Block
from dllmq.quant.awq import AWQ, fold_scales
from dllmq.quant.pipeline import BlockContext, Method, QuantizedWeight
from dllmq.quant.wa_common import attach_quantizers, channel_absmax, group_inputs, round_weights, smoothing_scales


class SmoothQuant(Method):
    name = "smoothquant"
    propagate_quantized = False  # act scales come from the full-precision model, as in the reference
    smooth_pairs = False

    def smooth(self, ctx: BlockContext) -> None:
        feats = group_inputs(ctx)
        for group in ctx.family.groups:
            from_norm = group.name in ("qkv", "gate_up")
            if not (from_norm or (self.smooth_pairs and AWQ._scalable(ctx, group))):
                continue
            weights = [ctx.linear(n).weight for n in group.linears]
            s = smoothing_scales(channel_absmax(feats[group.linears[0]]), weights, self.config.alpha)
            fold_scales(ctx, group, s.to(weights[0].device))

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        self.smooth(ctx)
        return round_weights(ctx, self.config)

    def finalize_block(self, block: Block) -> None:
        attach_quantizers(block, self.config)
