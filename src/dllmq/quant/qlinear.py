"""QuantLinear: a linear layer whose weight is stored as packed integer codes (GPTQ layout).

Buffers (all persistent, so ``state_dict()`` holds exactly these):

* ``qweight`` int32 ``[ceil(in * b / 32), out]``: codes of ``W^T`` packed along the input dim.
* ``qzeros``  int32 ``[n_groups, ceil(out * b / 32)]``: zero points packed along the output dim.
  They are the true zero points (GPTQModel's "gptq_v2" convention, no ``- 1`` offset).
* ``scales``  ``[n_groups, out]`` in ``scale_dtype`` (float16 by default).
* ``g_idx``   int32 ``[in]``: the group of each input channel. It need not be monotonic, so
  act-order (a permutation of the input channels before grouping) is represented directly.
* ``bias``    ``[out]`` or absent.

``W[o, i] = (code[i, o] - zero[g_idx[i], o]) * scale[g_idx[i], o]``, computed in float32.

Per-channel quantization is one group: ``group_size`` is ``-1`` (or ``in_features``). A group
size that does not divide ``in_features`` gives a smaller last group.

The forward pass is ``x -> input_transform -> act_quantizer -> F.linear(x, W, bias)``; both
optional submodules are None until a method (e.g. QuaRot, W4A4) sets them.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from dllmq.errors import DllmqError
from dllmq.quant.dequant_linear import DequantizingLinear
from dllmq.quant.packing import pack_codes, packed_length, unpack_codes
from dllmq.quant.primitives import check_bits, dequantize, group_index, num_groups, quantize

# Buffers whose dtype may legitimately differ between a saved checkpoint and an empty module.
_FLOAT_BUFFERS = ("scales", "bias")


def _smallest_positive(dtype: torch.dtype) -> float:
    """The smallest positive (subnormal) value of a float dtype."""
    info = torch.finfo(dtype)
    return info.tiny * info.eps


class QuantLinear(DequantizingLinear):
    """A linear layer with packed low-bit weights, per-group scales and zero points."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        scale_dtype: torch.dtype = torch.float16,
        bias_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_bits(bits)
        if in_features <= 0 or out_features <= 0:
            raise DllmqError(
                f"A quantized linear needs positive sizes, got {in_features} x {out_features}."
            )
        if group_size != -1 and group_size <= 0:
            raise DllmqError(
                f"Group size {group_size} is invalid; use a positive size (e.g. 128) "
                "or -1 for per-channel."
            )
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        n_groups = self.n_groups
        self.register_buffer(
            "qweight",
            torch.zeros(packed_length(in_features, bits), out_features, dtype=torch.int32,
                        device=device),
        )
        self.register_buffer(
            "qzeros",
            torch.zeros(n_groups, packed_length(out_features, bits), dtype=torch.int32,
                        device=device),
        )
        self.register_buffer(
            "scales", torch.zeros(n_groups, out_features, dtype=scale_dtype, device=device)
        )
        self.register_buffer(
            "g_idx",
            group_index(in_features, self.effective_group_size).to(torch.int32).to(device),
        )
        if bias:
            self.register_buffer(
                "bias", torch.zeros(out_features, dtype=bias_dtype or scale_dtype, device=device)
            )
        else:
            self.register_buffer("bias", None)
        self.register_module("input_transform", None)
        self.register_module("act_quantizer", None)

    # --- shapes -----------------------------------------------------------------------------

    @property
    def effective_group_size(self) -> int:
        """Input channels per group; per-channel (-1) means one group of all inputs."""
        return self.in_features if self.group_size == -1 else self.group_size

    @property
    def n_groups(self) -> int:
        return num_groups(self.in_features, self.effective_group_size)

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def empty(
        cls,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        scale_dtype: torch.dtype = torch.float16,
        *,
        bias_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> QuantLinear:
        """A module with zero buffers of the right shapes, ready for ``load_state_dict``.

        Loading adopts the checkpoint's dtype for ``scales`` and ``bias`` (shapes must match),
        so a module built with the default dtypes reads any saved float precision unchanged.
        """
        return cls(in_features, out_features, bits, group_size, bias, scale_dtype,
                   bias_dtype, device)

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        scale: torch.Tensor,
        zero: torch.Tensor,
        bits: int,
        group_size: int,
        g_idx: torch.Tensor | None = None,
        scale_dtype: torch.dtype = torch.float16,
    ) -> QuantLinear:
        """Quantize ``linear.weight`` with given ``scale``/``zero`` of shape ``[out, n_groups]``.

        ``g_idx`` (``[in]``) maps each input channel to its group; by default ``i // group_size``.
        The scales are rounded to ``scale_dtype`` BEFORE the codes are computed, so dequantizing
        from the stored scales reproduces exactly the grid the codes were chosen on (rounding
        afterwards would shift every weight by the scale's rounding error). Scales too small
        for ``scale_dtype`` are raised to its smallest positive value rather than becoming 0.
        """
        weight = linear.weight.detach()
        out_f, in_f = weight.shape
        device = weight.device
        has_bias = linear.bias is not None
        bias_dtype = linear.bias.dtype if has_bias else None
        module = cls(in_f, out_f, bits, group_size, has_bias, scale_dtype, bias_dtype, device)
        n_groups = module.n_groups

        g_idx = module._check_g_idx(g_idx, device)
        scale = module._check_param(scale, "scale", device)
        zero = module._check_param(zero, "zero", device)
        if not torch.equal(zero, zero.round()) or zero.min() < 0 or zero.max() > 2**bits - 1:
            raise DllmqError(
                f"Zero points must be integers in [0, {2**bits - 1}] for {bits} bits; "
                "compute them with the same bit width."
            )
        scale = scale.to(scale_dtype).clamp(min=_smallest_positive(scale_dtype))
        if not torch.isfinite(scale).all():
            raise DllmqError(
                f"Some scales do not fit in {scale_dtype}; pass scale_dtype=torch.float32."
            )

        # Per-element parameters for W^T [in, out]: row i uses group g_idx[i].
        gi = g_idx.long()
        s_el = scale.t().float().index_select(0, gi)
        z_el = zero.t().index_select(0, gi)
        codes = quantize(weight.float().t(), s_el, z_el, bits)  # [in, out]

        module.qweight.copy_(pack_codes(codes, bits, dim=0))
        module.qzeros.copy_(pack_codes(zero.t().to(torch.uint8), bits, dim=1))
        module.scales.copy_(scale.t())
        module.g_idx.copy_(g_idx)
        if has_bias:
            module.bias.copy_(linear.bias.detach())
        assert module.scales.shape == (n_groups, out_f)
        return module

    def _check_param(self, t: torch.Tensor, name: str, device: torch.device) -> torch.Tensor:
        """A float32 ``[out, n_groups]`` copy of a scale or zero tensor, or a DllmqError."""
        expected = (self.out_features, self.n_groups)
        if tuple(t.shape) != expected:
            raise DllmqError(
                f"The {name} tensor has shape {tuple(t.shape)} but this layer needs {expected} "
                f"(out_features, n_groups); compute it with group size {self.group_size}."
            )
        return t.detach().to(device=device, dtype=torch.float32)

    def _check_g_idx(self, g_idx: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        if g_idx is None:
            return group_index(self.in_features, self.effective_group_size).to(
                device=device, dtype=torch.int32
            )
        if tuple(g_idx.shape) != (self.in_features,):
            raise DllmqError(
                f"g_idx has shape {tuple(g_idx.shape)} but needs ({self.in_features},), "
                "one group index per input channel."
            )
        if g_idx.min() < 0 or g_idx.max() >= self.n_groups:
            raise DllmqError(
                f"g_idx holds group indices outside [0, {self.n_groups - 1}]; "
                "check the group size it was built with."
            )
        return g_idx.detach().to(device=device, dtype=torch.int32)

    # --- use --------------------------------------------------------------------------------

    def dequantized_weight(self) -> torch.Tensor:
        """The weight ``[out, in]`` in float32, exactly as the codes and stored scales define it."""
        codes = unpack_codes(self.qweight, self.bits, self.in_features, dim=0)  # [in, out]
        zeros = unpack_codes(self.qzeros, self.bits, self.out_features, dim=1)  # [G, out]
        gi = self.g_idx.long()
        w_t = dequantize(codes, self.scales.index_select(0, gi), zeros.index_select(0, gi))
        return w_t.t()

    def storage_bytes(self) -> int:
        """Bytes held by the packed weight, zeros, scales and g_idx (bias excluded)."""
        return sum(
            t.numel() * t.element_size()
            for t in (self.qweight, self.qzeros, self.scales, self.g_idx)
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}"
        )

    # --- loading ----------------------------------------------------------------------------

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # Adopt the checkpoint's float dtype for scales/bias instead of silently rounding it.
        for name in _FLOAT_BUFFERS:
            saved = state_dict.get(prefix + name)
            mine = self._buffers.get(name)
            if saved is not None and mine is not None and saved.shape == mine.shape:
                if saved.dtype != mine.dtype and saved.dtype.is_floating_point:
                    self._buffers[name] = torch.empty_like(mine, dtype=saved.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def dense_weight_bytes(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """What keeping every QuantLinear's dequantized weight in ``dtype`` would cost."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(m.in_features * m.out_features * size for m in model.modules() if isinstance(m, DequantizingLinear))


# The layers that dequantize their weight on every forward (integer and floating-point formats).

KEEP_WEIGHTS_BYTES = 2 << 30  # evaluations keep dequantized weights up to this size (an 8B model's are not kept)


@contextlib.contextmanager
def keep_dequantized_weights(model: nn.Module, max_bytes: int = KEEP_WEIGHTS_BYTES) -> Iterator[None]:
    """Inside the block every QuantLinear dequantizes its weight once and keeps it: the same numbers,
    without unpacking the codes again on each of an evaluation's many forwards (on small models that was
    a third of the time). Only when the kept weights fit ``max_bytes`` (counted at float32, the widest
    forward dtype); otherwise nothing changes. The buffers must not change inside the block; leaving it
    frees the kept weights. Nested blocks leave the layers to the outermost one."""
    if dense_weight_bytes(model) > max_bytes:
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, DequantizingLinear) and not m._keep_weight]
    for m in layers:
        m._keep_weight = True
    try:
        yield
    finally:
        for m in layers:
            m._keep_weight, m._kept_weight = False, None
