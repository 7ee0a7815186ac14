"""FPQuantLinear: a linear layer whose weight is stored in a floating-point format (dllmq.quant.formats).

Buffers (all persistent; a saved model holds exactly these, `<path>.<name>` in model.safetensors):

=================  =========================================  ===============================================
buffer             fp8                                        mxfp4 / nvfp4
=================  =========================================  ===============================================
``codes``          uint8 [out, in]: E4M3 bit patterns         uint8 [out, ceil(in / 2)]: two E2M1 codes per
                   (the bytes of ``torch.float8_e4m3fn``)     byte, input 2i in the low nibble, 2i + 1 high
``scales``         float32 [out, 1]: amax / 448 per row       uint8 [out, ceil(in / block)]: MXFP4 E8M0
                                                              exponent bytes (scale 2^(byte - 127)), NVFP4
                                                              E4M3 codes of the block scales
``tensor_scale``   (absent)                                   NVFP4 only: float32 [1], amax / (448 x 6)
``bias``           [out] in the linear's dtype, or absent
=================  =========================================  ===============================================

``W[o, i] = element(code[o, i]) * s[o, i // block]`` with s the FP32 scale (FP8), 2^(byte - 127) (MXFP4)
or E4M3(byte) x tensor_scale (NVFP4), computed in float32: exactly the values fake quantization chose.
The forward pass is ``x -> input_transform -> act_quantizer -> F.linear(x, W, bias)``, as QuantLinear's.
"""
from __future__ import annotations

import torch
from torch import nn

from dllmq.errors import DllmqError
from dllmq.quant.dequant_linear import DequantizingLinear
from dllmq.quant import formats as fm


class FPQuantLinear(DequantizingLinear):
    """A linear layer with FP8 / MXFP4 / NVFP4 weights."""

    def __init__(self, in_features: int, out_features: int, format: str, bias: bool = False,
                 bias_dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        fmt = fm.get_format(format)
        if not fmt.is_float:
            raise DllmqError(f"FPQuantLinear holds floating-point formats, not {fmt.name}; use QuantLinear.")
        self.in_features, self.out_features, self.format = in_features, out_features, fmt.name
        n_blocks = fm.block_count(in_features, fmt)
        if fmt.name == fm.FP8:
            self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        else:
            self.register_buffer("codes", torch.zeros(out_features, (in_features + 1) // 2, dtype=torch.uint8,
                                                      device=device))
            self.register_buffer("scales", torch.zeros(out_features, n_blocks, dtype=torch.uint8, device=device))
        if fmt.scale == "e4m3":
            self.register_buffer("tensor_scale", torch.ones(1, dtype=torch.float32, device=device))
        else:
            self.register_buffer("tensor_scale", None)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype or torch.float32, device=device))
        else:
            self.register_buffer("bias", None)
        self.register_module("input_transform", None)
        self.register_module("act_quantizer", None)

    @property
    def fmt(self) -> fm.Format:
        return fm.FORMATS[self.format]

    @property
    def bits(self) -> int:
        return self.fmt.bits

    @property
    def group_size(self) -> int:
        return self.fmt.group_size

    @classmethod
    def empty(cls, in_features: int, out_features: int, format: str, bias: bool = False, *,
              device: torch.device | str | None = None) -> "FPQuantLinear":
        """Zero buffers of the right shapes for ``load_state_dict`` (the bias adopts the checkpoint's dtype)."""
        return cls(in_features, out_features, format, bias, device=device)

    @classmethod
    def from_values(cls, linear: nn.Linear, values: torch.Tensor, scales: torch.Tensor, format: str,
                    tensor_scale: torch.Tensor | None = None) -> "FPQuantLinear":
        """The layer for a weight already on the format's grid: ``values`` [out, in] (dequantized), its
        effective block scales [out, n_blocks] and NVFP4's tensor scale. Checks that the stored form gives
        back exactly ``values``."""
        out_f, in_f = values.shape
        has_bias = linear.bias is not None
        module = cls(in_f, out_f, format, has_bias, linear.bias.dtype if has_bias else None, values.device)
        fmt = module.fmt
        codes = fm.element_codes(values, scales, fmt)
        module.codes.copy_(codes if fmt.name == fm.FP8 else fm.pack_fp4(codes))
        module.scales.copy_(fm.stored_block_scales(scales, fmt, tensor_scale))
        if tensor_scale is not None:
            module.tensor_scale.copy_(tensor_scale.reshape(1))
        if has_bias:
            module.bias.copy_(linear.bias.detach())
        if not torch.equal(module.dequantized_weight(), values.float()):
            raise DllmqError(f"A {format} weight did not survive encoding exactly; this is a bug in dllmq.")
        return module

    def element_codes(self) -> torch.Tensor:
        """uint8 element codes [out, in] (unpacked)."""
        return self.codes if self.format == fm.FP8 else fm.unpack_fp4(self.codes, self.in_features)

    def block_scales(self) -> torch.Tensor:
        """The effective scale of every block, float32 [out, n_blocks]."""
        return fm.effective_block_scales(self.scales, self.fmt, self.tensor_scale)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight [out, in] in float32, exactly as the codes and stored scales define it."""
        return fm.dequantize(self.fmt, self.element_codes(), self.block_scales())

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.tensor_scale) if t is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
                f"bias={self.bias is not None}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        saved = state_dict.get(prefix + "bias")
        if saved is not None and self.bias is not None and saved.dtype != self.bias.dtype:
            self._buffers["bias"] = torch.empty_like(self.bias, dtype=saved.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
