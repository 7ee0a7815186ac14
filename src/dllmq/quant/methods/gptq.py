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
    def check_weight_format(cls, settings: GPTQSettings, fmt: Format) -> None:
        if fmt.is_float:
            check_float_format(fmt, settings)

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        return gptq_block(ctx, self.config.weight, self.settings)
