"""Number formats for weights and activations, as data: dllmq's uniform integers and the floating-point
formats of current GPUs.

=======  =====  =====================================  =============================================
format   bits   elements                               scales
=======  =====  =====================================  =============================================
int      2..8   uniform integer grid (primitives.py)   min/max per group / channel / token
fp8      8      E4M3 (max 448, subnormals, no inf)     one FP32 scale amax / 448 per weight row
                                                       (output channel) or per activation token
mxfp4    4      E2M1 {0, .5, 1, 1.5, 2, 3, 4, 6} x +-  one E8M0 power of two per 32 consecutive values:
                                                       2^(floor(log2 amax) - 2) (OCP MX v1.0: the
                                                       element format's emax is 2)
nvfp4    4      E2M1                                   one E4M3 scale per 16 consecutive values,
                                                       amax_block / 6 rounded to E4M3 after dividing by
                                                       an FP32 tensor scale amax_tensor / (448 x 6)
=======  =====  =====================================  =============================================

Element rounding is round-to-nearest, ties to even (the code with an even last mantissa bit),
including subnormals, and saturating: anything beyond the largest finite value becomes that value
(E4M3 448, E2M1 6). A block whose values are all zero gets codes 0. Blocks run along the last
dimension of a tensor (a weight's input channels, an activation's hidden channels); a last dimension
that is not a multiple of the block gives a smaller last block (its amax over the values it has).
NVFP4's tensor scale is per weight matrix; activations are quantized dynamically, so theirs is per
token (one row), like FP8's activation scale.

Everything here is fake quantization's reference: `fake_quantize(x, fmt)` returns x on the format's
grid in x's dtype, on any device. `quantize(x, fmt)` gives the codes and scales that a saved model
stores (FPQuantLinear in qlinear_fp.py), and `FPTensor.dequantize()` turns them back into exactly the
same values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dllmq.errors import DllmqError

INT, FP8, MXFP4, NVFP4 = "int", "fp8", "mxfp4", "nvfp4"
FORMAT_NAMES = (INT, FP8, MXFP4, NVFP4)


@dataclass(frozen=True)
class Minifloat:
    """A small float format without infinities: sign, `ebits` exponent bits (bias `bias`), `mbits`
    mantissa bits, largest finite magnitude `max_value` (E4M3 gives its all-ones pattern to NaN)."""

    name: str
    ebits: int
    mbits: int
    bias: int
    max_value: float

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal value (subnormals share its spacing)."""
        return 1 - self.bias

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """x (float32) rounded to the nearest representable value, ties to even, saturating."""
        x = x.float()
        mag = x.abs()
        # floor(log2 |x|) exactly: frexp gives |x| = m 2^e with m in [0.5, 1)
        _, e = torch.frexp(mag)
        exp = (e - 1).clamp_(min=self.emin)
        step = torch.ldexp(torch.ones_like(mag), exp - self.mbits)   # spacing of the grid at |x|
        q = torch.round(mag / step) * step                           # exact division by a power of two
        q = q.clamp_(max=self.max_value)
        return torch.copysign(q, x)

    def magnitudes(self) -> torch.Tensor:
        """Every non-negative finite value, indexed by its code (sign bit clear), float32."""
        n = 1 << (self.ebits + self.mbits)
        codes = torch.arange(n)
        e = codes >> self.mbits
        m = (codes & ((1 << self.mbits) - 1)).float()
        frac = torch.where(e == 0, m / (1 << self.mbits), 1 + m / (1 << self.mbits))
        values = torch.ldexp(frac, torch.where(e == 0, torch.full_like(e, self.emin), e - self.bias))
        return values[values <= self.max_value]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """float32 values of codes (uint8, sign in bit ebits + mbits)."""
        table = self.magnitudes().to(codes.device)
        c = codes.long()
        sign_bit = 1 << (self.ebits + self.mbits)
        mag = table[(c & (sign_bit - 1)).clamp_(max=table.numel() - 1)]
        return torch.where((c & sign_bit) != 0, -mag, mag)

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """uint8 codes of values that are already on the grid (zero gets code 0, never -0)."""
        table = self.magnitudes().to(values.device)
        mag = values.float().abs()
        idx = torch.searchsorted(table, mag.contiguous())
        if not torch.equal(table[idx.clamp(max=table.numel() - 1)], mag):
            raise ValueError(f"values not on the {self.name} grid")
        sign = ((values < 0) & (mag > 0)).long() << (self.ebits + self.mbits)
        return (idx | sign).to(torch.uint8)


E4M3 = Minifloat("e4m3", ebits=4, mbits=3, bias=7, max_value=448.0)
E2M1 = Minifloat("e2m1", ebits=2, mbits=1, bias=1, max_value=6.0)

E8M0_BIAS = 127


@dataclass(frozen=True)
class Format:
    """One number format: its name, the bits it implies (None for int, which takes any 2..8), its
    element type, its block (0 = one scale per row: a weight's output channel, an activation's token)
    and how a block's scale is chosen and stored ("fp32", "e8m0" or "e4m3" with an FP32 tensor scale)."""

    name: str
    bits: int | None
    element: Minifloat | None
    block: int
    scale: str
    title: str

    @property
    def is_float(self) -> bool:
        return self.element is not None

    @property
    def group_size(self) -> int:
        """The weight group size a config records for this format (-1: per output channel)."""
        return self.block or -1


FORMATS: dict[str, Format] = {
    INT: Format(INT, None, None, 0, "minmax", "INT (uniform grid)"),
    FP8: Format(FP8, 8, E4M3, 0, "fp32", "FP8 E4M3 (FP32 scales)"),
    MXFP4: Format(MXFP4, 4, E2M1, 32, "e8m0", "MXFP4 (E2M1, E8M0 scale per 32)"),
    NVFP4: Format(NVFP4, 4, E2M1, 16, "e4m3", "NVFP4 (E2M1, E4M3 scale per 16 x FP32 tensor scale)"),
}


def get_format(name: str, flag: str = "--wformat") -> Format:
    try:
        return FORMATS[str(name).lower()]
    except KeyError:
        raise DllmqError(f"{flag} {name!r} is not a known number format; use one of {', '.join(FORMAT_NAMES)}.") from None


@dataclass
class FPTensor:
    """A tensor in a floating-point format: `codes` uint8 [..., n] (one element code per value), the
    effective scale of each block `scales` float32 [..., n_blocks] (what a code's value is multiplied
    by), the stored form of the block scales `block_codes` (E8M0 exponent bytes for MXFP4, E4M3 codes
    for NVFP4; None for FP8, whose FP32 scales are stored as they are) and NVFP4's FP32 `tensor_scale`
    (broadcastable to [..., 1])."""

    format: Format
    codes: torch.Tensor
    scales: torch.Tensor
    block_codes: torch.Tensor | None = None
    tensor_scale: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.format, self.codes, self.scales)


def block_count(n: int, fmt: Format) -> int:
    return 1 if fmt.block == 0 else math.ceil(n / fmt.block)


def _blocks(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """x [..., n] as [..., n_blocks, block] (zero-padded: zeros never change a block's amax)."""
    n = x.shape[-1]
    if fmt.block == 0:
        return x.unsqueeze(-2)
    pad = (-n) % fmt.block
    xp = F.pad(x, (0, pad)) if pad else x
    return xp.reshape(*x.shape[:-1], -1, fmt.block)


def expand_blocks(scales: torch.Tensor, fmt: Format, n: int) -> torch.Tensor:
    """Per-block values [..., n_blocks] widened to per-value [..., n]."""
    if fmt.block == 0:
        return scales.expand(*scales.shape[:-1], n)
    return scales.repeat_interleave(fmt.block, dim=-1)[..., :n]


def e8m0_scale(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4's shared scale for blocks with largest magnitude `amax`: 2^(floor(log2 amax) - 2), the
    exponent clamped to E8M0's range [-127, 127]; an all-zero block gets 2^-127. Returns (scale float32,
    stored byte = exponent + 127, uint8)."""
    _, e = torch.frexp(amax.float())
    exp = torch.where(amax > 0, e - 1 - 2, torch.full_like(e, -E8M0_BIAS)).clamp_(-E8M0_BIAS, E8M0_BIAS)
    scale = torch.ldexp(torch.ones_like(amax, dtype=torch.float32), exp)
    return scale, (exp + E8M0_BIAS).to(torch.uint8)


def nvfp4_tensor_scale(amax: torch.Tensor) -> torch.Tensor:
    """NVFP4's FP32 tensor scale amax / (448 x 6) (1 for an all-zero tensor)."""
    amax = amax.float()
    return torch.where(amax > 0, amax / (E4M3.max_value * E2M1.max_value), torch.ones_like(amax))


def block_scales(x: torch.Tensor, fmt: Format, tensor_scale: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scales of x [..., n] under a float format: (effective scale [..., n_blocks] float32, tensor scale
    or None). NVFP4 takes its tensor scale (broadcastable to [..., 1]) or uses one per row."""
    amax = _blocks(x.detach().float(), fmt).abs().amax(dim=-1)         # [..., n_blocks]
    if fmt.scale == "fp32":
        return torch.where(amax > 0, amax / fmt.element.max_value, torch.ones_like(amax)), None
    if fmt.scale == "e8m0":
        return e8m0_scale(amax)[0], None
    if tensor_scale is None:
        tensor_scale = nvfp4_tensor_scale(amax.amax(dim=-1, keepdim=True))
    tensor_scale = tensor_scale.float()
    block = E4M3.round(amax / fmt.element.max_value / tensor_scale)    # in E4M3, saturating at 448
    return block * tensor_scale, tensor_scale


def dequantize(fmt: Format, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Values of element codes [..., n] times their block's effective scale [..., n_blocks] (float32)."""
    return fmt.element.decode(codes) * expand_blocks(scales, fmt, codes.shape[-1])


def round_to(x: torch.Tensor, fmt: Format, scales: torch.Tensor) -> torch.Tensor:
    """x [..., n] on the grid given by per-block effective scales [..., n_blocks], float32. A zero scale (an
    NVFP4 block scale below E4M3's smallest value) makes its block zero."""
    s = expand_blocks(scales, fmt, x.shape[-1])
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return torch.where(s > 0, fmt.element.round(x.float() / safe) * s, torch.zeros_like(s))


def quantize(x: torch.Tensor, fmt: Format, tensor_scale: torch.Tensor | None = None) -> FPTensor:
    """x [..., n] in the float format `fmt`: codes and scales along the last dim."""
    if not fmt.is_float:
        raise DllmqError(f"{fmt.name} is not a floating-point format.")
    scales, ts = block_scales(x, fmt, tensor_scale)
    stored = None if fmt.scale == "fp32" else stored_block_scales(scales, fmt, ts)
    return FPTensor(fmt, element_codes(round_to(x, fmt, scales), scales, fmt), scales, stored, ts)


def fake_quantize(x: torch.Tensor, fmt: Format, tensor_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x quantized to `fmt` and back, in x's dtype (scales along the last dim; per row unless NVFP4 is given
    a tensor scale)."""
    scales, _ = block_scales(x, fmt, tensor_scale)
    return round_to(x, fmt, scales).to(x.dtype)


# --- storage: two E2M1 codes per byte ---------------------------------------------------------------------

def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., n] (4-bit values) as [..., ceil(n / 2)] bytes: value 2i in the low nibble, 2i + 1 in
    the high nibble (an odd n gets a zero high nibble at the end)."""
    if codes.shape[-1] % 2:
        codes = F.pad(codes, (0, 1))
    pairs = codes.reshape(*codes.shape[:-1], -1, 2).to(torch.uint8)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_fp4(packed: torch.Tensor, n: int) -> torch.Tensor:
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], -1)[..., :n]


# --- weights -----------------------------------------------------------------------------------------------

def weight_tensor_scale(w: torch.Tensor, fmt: Format) -> torch.Tensor | None:
    """NVFP4's tensor scale of a weight matrix (one per matrix, shape [1, 1]); None for the other formats."""
    if fmt.scale != "e4m3":
        return None
    return nvfp4_tensor_scale(w.detach().float().abs().amax()).reshape(1, 1)


def quantize_weight(w: torch.Tensor, fmt: Format) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A weight [out, in] on the format's grid: (values float32, effective scales [out, n_blocks], tensor
    scale or None). Blocks run along the input channels; FP8 has one scale per output channel."""
    ts = weight_tensor_scale(w, fmt)
    scales, _ = block_scales(w, fmt, ts)
    return round_to(w, fmt, scales), scales, ts


def stored_block_scales(scales: torch.Tensor, fmt: Format, tensor_scale: torch.Tensor | None) -> torch.Tensor:
    """What a checkpoint stores for effective block scales: FP8's FP32 scales as they are, MXFP4's E8M0
    exponent bytes, NVFP4's E4M3 codes of scale / tensor scale (exact inverses of how they were made)."""
    if fmt.scale == "fp32":
        return scales.float()
    if fmt.scale == "e8m0":
        _, e = torch.frexp(scales.float())
        return (e - 1 + E8M0_BIAS).to(torch.uint8)
    return E4M3.encode(E4M3.round(scales.float() / tensor_scale.float()))


def effective_block_scales(stored: torch.Tensor, fmt: Format, tensor_scale: torch.Tensor | None) -> torch.Tensor:
    """The effective scales [..., n_blocks] float32 from their stored form (the inverse of the above)."""
    if fmt.scale == "fp32":
        return stored.float()
    if fmt.scale == "e8m0":
        return torch.ldexp(torch.ones(stored.shape, device=stored.device), stored.long() - E8M0_BIAS)
    return E4M3.decode(stored) * tensor_scale.float()


def element_codes(values: torch.Tensor, scales: torch.Tensor, fmt: Format) -> torch.Tensor:
    """uint8 element codes of values [..., n] that lie on the grid of the effective scales [..., n_blocks]."""
    s = expand_blocks(scales.float(), fmt, values.shape[-1])
    safe = torch.where(s > 0, s, torch.ones_like(s))
    elements = torch.where(s > 0, fmt.element.round(values.float() / safe), torch.zeros_like(s))
    return fmt.element.encode(elements)
