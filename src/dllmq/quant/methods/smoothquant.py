"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights, then quantize both.

Per group of linears reading one input: s = max|X|^alpha / max|W|^(1-alpha) (alpha 0.5 in the
study's code, W's max over the group's linears), clamped at 1e-5, folded into the preceding RMSNorm
(q/k/v, gate/up) — and, with `smooth_pairs`, into v -> out and up -> down where shapes allow —
so the full-precision model is unchanged. Weights are then rounded per output channel, activations
quantized per token at run time (asymmetric), as in the study.
"""
from __future__ import annotations

from dataclasses import dataclass

from dllmq.quant.block import BlockContext, QuantizedWeight
from dllmq.quant.methods.base import WEIGHT_ACTIVATION, Method
from dllmq.quant.rounding import round_block
from dllmq.quant.smoothing import ALPHA_HELP, can_fold, channel_absmax, check_alpha, fold_scales, smoothing_scales
from dllmq.quant.specs import MethodSettings, setting

@dataclass(frozen=True)
class SmoothQuantSettings(MethodSettings):
    alpha: float = setting(0.5, ALPHA_HELP, flag="--alpha")
    smooth_pairs: bool = setting(False, "also smooth v -> attention out and up -> down where shapes allow")

    def check(self) -> None:
        check_alpha(self.alpha)


class SmoothQuant(Method):
    name = "smoothquant"
    display_name = "SmoothQuant"
    kind = WEIGHT_ACTIVATION
    transform = "smoothing"
    Settings = SmoothQuantSettings
    propagate_quantized = False  # act scales come from the full-precision model, as in the reference

    @classmethod
    def paper_settings(cls, family: str | None) -> dict:
        # scripts/*_smoothquant.sh: DuQuant's code with --smooth --alpha 0.5; its pairs (quantize/duquant.py)
        # also smooth v -> attention out and up -> down. Where shapes differ (Dream's GQA) the study divides
        # online, which dllmq does not yet do; nor does it take the weight max from one linear as the study
        # does (docs/fidelity.md, item 5).
        return dict(alpha=0.5, smooth_pairs=True)

    def smooth(self, ctx: BlockContext) -> None:
        feats = ctx.group_inputs()
        for group in ctx.family.groups:
            if not (group.reads_norm or (self.settings.smooth_pairs and can_fold(ctx, group))):
                continue
            weights = [ctx.linear(n).weight for n in group.linears]
            s = smoothing_scales(channel_absmax(feats[group.role]), weights, self.settings.alpha)
            fold_scales(ctx, group, s.to(weights[0].device))

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        self.smooth(ctx)
        return round_block(ctx, self.config.weight)
