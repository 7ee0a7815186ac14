"""A full-precision linear that carries an online input transform, while a weight-activation method
is applied; quantizing it yields a QuantLinear carrying the same transform."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dllmq.quant.dequant_linear import prepared_input


class OnlineLinear(nn.Linear):
    """nn.Linear with `input_transform` (x -> T(x) before the matmul) and `act_quantizer` slots,
    the same slots QuantLinear has. The weight is stored already multiplied by T's inverse side, so
    the layer computes the original function."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.input_transform: nn.Module | None = None
        self.act_quantizer: nn.Module | None = None

    @classmethod
    def wrap(cls, linear: nn.Linear) -> "OnlineLinear":
        if isinstance(linear, OnlineLinear):
            return linear
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(prepared_input(self, x), self.weight, self.bias)


def seen_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input a linear's weight actually multiplies: after its online transform, if any."""
    transform = getattr(module, "input_transform", None)
    return transform(x) if transform is not None else x
