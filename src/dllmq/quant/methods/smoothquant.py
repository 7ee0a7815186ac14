"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights, then quantize both.

Per group of linears reading one input: s = max|X|^alpha / max|W|^(1-alpha) (alpha 0.5 in the
study's code, W's max over the group's linears), clamped at 1e-5, folded into the preceding RMSNorm
(q/k/v, gate/up) — and, with `smooth_pairs`, into v -> out and up -> down where shapes allow —
so the full-precision model is unchanged. Weights are then rounded per output channel, activations
quantized per token at run time (asymmetric), as in the study.

The paper profile (docs/fidelity.md, items 4-6) adds the study code's choices: W's max from the one
linear its `pairs` name, s floored at 0.01, v -> out under GQA divided online, Q/K/V quantized at the
activation bits, calibration windows drawn with seed 2, and the linears' weights and activations on the
study's asymmetric grid (`study_grid`: min and max not widened to include zero).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dllmq.errors import DllmqError
from dllmq.models.family import Role
from dllmq.models.modeling import Block
from dllmq.quant.block import BlockContext, QuantizedWeight
from dllmq.quant.methods.base import WEIGHT_ACTIVATION, Method
from dllmq.quant.rounding import round_block
from dllmq.quant.smoothing import (ALPHA_HELP, InputScale, can_fold, channel_absmax, check_alpha, divide_online,
                                   fold_scales, group_scales, source_carries_scales)
from dllmq.quant.specs import STUDY_GRID_HELP, MethodSettings, setting

WEIGHT_MAX = ("group", "study")


@dataclass(frozen=True)
class SmoothQuantSettings(MethodSettings):
    alpha: float = setting(0.5, ALPHA_HELP, flag="--alpha")
    smooth_pairs: bool = setting(False, "also smooth v -> attention out and up -> down where shapes allow")
    weight_max: str = setting("group", "max|W| over every linear of the group (group) or over the one linear "
                              "the study's code names: q for q/k/v, up for gate/up (study)", choices=WEIGHT_MAX,
                              optional=True)
    scale_floor: float = setting(1e-5, "the least smoothing scale s (the study's code truncates at 0.01)",
                                 optional=True)
    online_division: bool = setting(False, "with smooth_pairs, where v's outputs cannot carry 1/s (GQA), divide the "
                                    "attention out projection's input by s at run time", optional=True)
    study_grid: bool = setting(False, STUDY_GRID_HELP, optional=True)

    def check(self) -> None:
        check_alpha(self.alpha)
        if self.weight_max not in WEIGHT_MAX:
            raise DllmqError(f"weight_max must be {' or '.join(WEIGHT_MAX)}, got {self.weight_max!r}.")
        if not self.scale_floor > 0:
            raise DllmqError(f"scale_floor must be positive, got {self.scale_floor}.")


class SmoothQuant(Method):
    name = "smoothquant"
    display_name = "SmoothQuant"
    kind = WEIGHT_ACTIVATION
    transform = "smoothing"
    Settings = SmoothQuantSettings
    propagate_quantized = False  # act scales come from the full-precision model, as in the reference

    @classmethod
    def paper_settings(cls, family: str | None) -> dict:
        # scripts/*_smoothquant.sh: DuQuant's code with --smooth --alpha 0.5 (quantize/duquant.py): its
        # pairs qkv, out (v -> out), fc1 (gate/up), down (up -> down), each s from the one linear the pair
        # names, truncated at 1e-2 (truncate_number in smooth_and_let_inplace); under GQA the out pair
        # divides online (smooth_fc_inplace); Q/K/V at the activation bits (main.py's q/k/v_quant_params);
        # calibration windows with main.py's --seed 2 (docs/fidelity.md, items 4-6).
        # Weights and activations on its UniformAffineQuantizer's asymmetric grid (study_grid; item 5).
        return dict(alpha=0.5, smooth_pairs=True, weight_max="study", scale_floor=0.01, online_division=True,
                    seed=2, qkv_quant=True, study_grid=True)

    def smooth(self, ctx: BlockContext) -> None:
        st = self.settings
        feats = ctx.group_inputs()
        for group in ctx.family.groups:
            if not (group.reads_norm or st.smooth_pairs):
                continue
            foldable = group.reads_norm or can_fold(ctx, group)
            if not (foldable or st.online_division):
                continue
            s = group_scales(ctx, group, channel_absmax(feats[group.role]), st.alpha, st.weight_max, st.scale_floor)
            s = s.to(ctx.linear(group.linears[0]).weight.device)
            if foldable:
                fold_scales(ctx, group, s)
            else:
                divide_online(ctx, group, s)

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        self.smooth(ctx)
        return round_block(ctx, self.weight_spec())

    def build_runtime(self, block: Block) -> None:
        # a loaded model: the out projection's online division, empty until the checkpoint fills it
        if self.settings.smooth_pairs and self.settings.online_division:
            group = block.family.group(Role.ATTN_OUT)
            if not source_carries_scales(block, group):
                for name in group.linears:
                    linear: nn.Module = block.get_submodule(name)
                    if getattr(linear, "input_transform", None) is None:
                        linear.input_transform = InputScale(linear.in_features)
        super().build_runtime(block)
