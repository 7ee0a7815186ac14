"""GPTQ (Frantar et al., 2022): each block's linears true-sequentially, each column's rounding error
pushed onto the columns not yet quantized through the inverse Hessian of its inputs (the solver is
shared math in dllmq.quant.gptq_solver). Feeds the next block its quantized outputs."""
from __future__ import annotations

from dllmq.quant.block import BlockContext, QuantizedWeight
from dllmq.quant.formats import Format
from dllmq.quant.gptq_solver import GPTQSettings, check_float_format, gptq_block
from dllmq.quant.methods.base import WEIGHT_ONLY, Method


class GPTQ(Method):
    name = "gptq"
    display_name = "GPTQ"
    kind = WEIGHT_ONLY
    Settings = GPTQSettings
    propagate_quantized = True

    @classmethod
    def takes_token_weights(cls, settings) -> bool:
        return True

    @classmethod
    def paper_settings(cls, family: str | None) -> dict:
        # The study's AutoGPTQ fork: BaseQuantizeConfig's sym=True, damp_percent=0.01, static_groups=False,
        # true_sequential=True; quantize.py sets desc_act=False, group 128; min/max grids (mse=False);
        # WikiText-2 windows at random starts, 128 x 2048 (dllmq's default windowing).
        settings = dict(sym=True, damp=0.01, act_order=False, static_groups=False, grid_search=False,
                        calib_windows="random")
        if family == "llada":
            # modeling/llada.py lists [attn_out], [attn_q, attn_k, attn_v], [ff_out], [up_proj, ff_proj]:
            # LLaDA has no attn_q/k/v, so q/k/v are never quantized, and ff_out is calibrated before
            # up/ff_proj are quantized
            settings.update(keep_fp=("qkv",), group_order="down-first")
        return settings

    @classmethod
    def paper_note(cls, family: str | None) -> str | None:
        if family == "llada":
            return ("paper profile: q/k/v stay in full precision as in the study's LLaDA GPTQ runs; this reproduces "
                    "the published runs, not a fully quantized model.")
        return None

    @classmethod
    def check_weight_format(cls, settings: GPTQSettings, fmt: Format) -> None:
        if fmt.is_float:
            check_float_format(fmt, settings)

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        return gptq_block(ctx, self.config.weight, self.settings)
