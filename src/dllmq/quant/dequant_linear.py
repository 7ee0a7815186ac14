"""What every fake-quantized linear does on its forward pass, whatever its storage layout: the online
input transform, the activation quantizer, then a matmul with the dequantized weight (kept dense
between forwards only inside qlinear.keep_dequantized_weights)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DequantizingLinear(nn.Module):
    """Base of QuantLinear (integer codes) and FPQuantLinear (FP8 / FP4 codes): a subclass stores its
    codes and scales, sets `input_transform`, `act_quantizer` and `bias`, and defines
    `dequantized_weight()`."""

    input_transform: nn.Module | None
    act_quantizer: nn.Module | None
    bias: torch.Tensor | None

    # Set only inside keep_dequantized_weights(): the dense weight kept between forwards (not state).
    _keep_weight = False
    _kept_weight: torch.Tensor | None = None

    def dequantized_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        weight = self._kept_weight
        if weight is None or weight.dtype != x.dtype:
            weight = self.dequantized_weight().to(x.dtype)
            if self._keep_weight:
                self._kept_weight = weight
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, weight, bias)
