"""Round-to-nearest: each weight group gets its own min/max grid; no calibration data. Given
activation bits it is the untransformed weight-activation baseline."""
from __future__ import annotations

from dllmq.quant.block import BlockContext, QuantizedWeight
from dllmq.quant.methods.base import EITHER, Method
from dllmq.quant.rounding import round_block


class RTN(Method):
    name = "rtn"
    display_name = "RTN"
    kind = EITHER

    @classmethod
    def needs_calibration(cls, settings) -> bool:
        return False

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        return round_block(ctx, self.config.weight)
