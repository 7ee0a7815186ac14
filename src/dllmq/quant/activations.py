"""Activation and K/V quantizers (fake quantization: the reference the real kernels are checked against).

ActQuantizer: every row (token) of a linear's input gets its own grid at run time ("per-token
dynamic"), asymmetric by default, symmetric for QuaRot, with a clip ratio; or one static per-tensor
grid calibrated beforehand. KVQuantizer: attaches to a block's `kv_hook` and quantizes K and V per
head in groups of head-dim channels (asymmetric, clip), after optionally rotating Q and K by a
Hadamard (QuaRot: the scores Q K^T are unchanged, K's outliers are spread before quantization).
"""
from __future__ import annotations

import torch
from torch import nn

from dllmq.errors import DllmqError
from dllmq.models.modeling import Block
from dllmq.quant.formats import INT, get_format
from dllmq.quant.formats import fake_quantize as fp_fake_quantize
from dllmq.quant.hadamard import fast_hadamard
from dllmq.quant.primitives import QuantSpec, compute_qparams, dequantize, fake_quantize, quantize, token_qparams
from dllmq.quant.specs import ActSpec, KVSpec


def fake_quantize_tokens(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """primitives.fake_quantize(x, spec) for spec.granularity "token", bit for bit on finite inputs, in
    fewer passes: one temporary, rounded and rescaled in place, and no uint8 round trip (the clamped
    codes are small integers, exact in float32). Every element sees the same float ops in the same order.
    The study's grid (spec.study_grid) goes through primitives.fake_quantize itself."""
    if spec.study_grid:
        return fake_quantize(x, spec)
    xf = x.detach().float()
    lo, hi = xf.amin(dim=-1, keepdim=True), xf.amax(dim=-1, keepdim=True)  # (torch.aminmax: 3-7x slower here)
    scale, zero = token_qparams(lo, hi, spec.bits, spec.symmetric, spec.clip_ratio, spec.signed_grid)
    maxq = spec.maxq
    q = xf / scale
    q.round_().add_(zero).clamp_(0, maxq).sub_(zero).mul_(scale)
    return q.to(x.dtype)


class ActQuantizer(nn.Module):
    """`format` "int" (the uniform grid above) or a floating-point format of dllmq.quant.formats: FP8 with
    one scale per token, MXFP4 / NVFP4 with their block scales along each token (NVFP4's tensor scale per
    token: activations are quantized dynamically). The float formats have no static grid."""

    def __init__(self, bits: int, symmetric: bool = False, clip_ratio: float = 1.0, static: bool = False,
                 format: str = INT, signed_grid: bool = False, study_grid: bool = False):
        super().__init__()
        self.spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="token", clip_ratio=clip_ratio,
                              signed_grid=signed_grid, study_grid=study_grid)
        self.static = static
        self.format = format
        self.fmt = get_format(format, "--aformat")
        if self.fmt.is_float and static:
            raise DllmqError(f"{format} activations are quantized per token at run time; a static grid is int only.")
        if static:  # one grid per tensor, filled by `calibrate`; buffers so saved models keep it
            self.register_buffer("static_scale", torch.zeros(()))
            self.register_buffer("static_zero", torch.zeros(()))

    def calibrate(self, x: torch.Tensor) -> None:
        """Widen the static grid to cover x (call over the calibration set)."""
        if self.spec.study_grid:
            raise DllmqError("The study's grid is per token at run time; a static per-tensor grid is dllmq's only.")
        spec = QuantSpec(bits=self.spec.bits, symmetric=self.spec.symmetric, granularity="tensor",
                         clip_ratio=self.spec.clip_ratio, signed_grid=self.spec.signed_grid)
        lo = torch.minimum(x.min().float(), torch.zeros(()))
        hi = torch.maximum(x.max().float(), torch.zeros(()))
        if self.static_scale.item() > 0:  # merge with the range seen so far
            lo0 = -self.static_zero * self.static_scale
            hi0 = lo0 + self.static_scale * self.spec.maxq
            lo, hi = torch.minimum(lo, lo0), torch.maximum(hi, hi0)
        scale, zero = compute_qparams(torch.stack([lo, hi]), spec)
        self.static_scale.copy_(scale.reshape(()))
        self.static_zero.copy_(zero.reshape(()))

    @property
    def share_key(self) -> tuple | None:
        """Equal for quantizers that compute the same function (dynamic ones with equal settings), so
        linears reading one input quantize it once (dequant_linear.prepared_input); None: only itself."""
        return None if self.static else (ActQuantizer, self.spec, self.format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt.is_float:
            return fp_fake_quantize(x, self.fmt)
        if not self.static:
            return fake_quantize_tokens(x, self.spec)
        return dequantize(quantize(x, self.static_scale, self.static_zero, self.spec.bits),
                          self.static_scale, self.static_zero).to(x.dtype)

    def extra_repr(self) -> str:
        kind = "static per-tensor" if self.static else "per-token dynamic"
        if self.fmt.is_float:
            return f"format={self.format}, {kind}"
        sym = ("symmetric (signed grid)" if self.spec.signed_grid else "symmetric") if self.spec.symmetric \
            else ("asymmetric (study grid)" if self.spec.study_grid else "asymmetric")
        return f"bits={self.spec.bits}, {kind}, {sym}, clip={self.spec.clip_ratio}"


class KVQuantizer(nn.Module):
    """A block's kv_hook: optional Q/K Hadamard, then K and V quantized per head in groups."""

    def __init__(self, bits: int, group_size: int = 128, clip_ratio: float = 0.95, rotate_qk: bool = False):
        super().__init__()
        self.bits, self.group_size, self.clip_ratio, self.rotate_qk = bits, group_size, clip_ratio, rotate_qk

    def _quantize(self, t: torch.Tensor) -> torch.Tensor:  # t: [B, heads, L, head_dim]
        d = t.shape[-1]
        g = min(self.group_size, d)
        spec = QuantSpec(bits=self.bits, symmetric=False, granularity="group", group_size=g,
                         clip_ratio=self.clip_ratio)
        return fake_quantize(t, spec)

    def forward(self, q, k, v):
        if self.rotate_qk:
            q, k = fast_hadamard(q), fast_hadamard(k)
        return q, self._quantize(k), self._quantize(v)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, group={self.group_size}, clip={self.clip_ratio}, rotate_qk={self.rotate_qk}"


def study_token_fake_quantize(x: torch.Tensor, bits: int, clip: float = 1.0) -> torch.Tensor:
    """The study's per-token dynamic asymmetric grid (DuQuant's UniformAffineQuantizer, `per_token`; see
    primitives' `study_grid`) over the last dim of x, clipped at `clip`. Computed in float32."""
    return fake_quantize(x, QuantSpec(bits=bits, granularity="token", clip_ratio=clip, study_grid=True))


class QKVQuantizer(nn.Module):
    """A block's kv_hook for the study's SmoothQuant / DuQuant runs: Q, K and V (after RoPE, [B, heads, L,
    head_dim]) quantized per head and token at the activation bits on the study's grid; Q and K clipped at
    `qk_clip`, V never. With `hadamard_block`, Q and K are first multiplied by a normalized Hadamard of that
    order along each head (DuQuant's QuantMatMul with rotate=None; Q K^T is unchanged, and Q, K stay rotated);
    when head_dim is not a multiple of the block, by one of order head_dim. The attention probabilities stay
    in full precision."""

    def __init__(self, bits: int, qk_clip: float = 1.0, hadamard_block: int | None = None):
        super().__init__()
        self.bits, self.qk_clip, self.hadamard_block = bits, qk_clip, hadamard_block

    def _rotate(self, t: torch.Tensor) -> torch.Tensor:
        d = t.shape[-1]
        b = self.hadamard_block if d % self.hadamard_block == 0 else d
        return fast_hadamard(t.reshape(*t.shape[:-1], d // b, b)).reshape(t.shape)

    def forward(self, q, k, v):
        if self.hadamard_block:
            q, k = self._rotate(q), self._rotate(k)
        return (study_token_fake_quantize(q, self.bits, self.qk_clip),
                study_token_fake_quantize(k, self.bits, self.qk_clip), study_token_fake_quantize(v, self.bits))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, qk_clip={self.qk_clip}, hadamard_block={self.hadamard_block}"


def attach_quantizers(block: Block, act: ActSpec, kv: KVSpec, rotate_qk: bool = False,
                      study_grid: bool = False) -> None:
    """Per-token activation quantizers on every block linear (on the study's grid with `study_grid`), and the
    K/V quantizer when asked."""
    for name in block.family.block_linears:
        block.get_submodule(name).act_quantizer = ActQuantizer(act.bits, symmetric=act.sym, clip_ratio=act.clip,
                                                               format=act.format, study_grid=study_grid)
    if kv.enabled:
        block.kv_hook = KVQuantizer(kv.bits, kv.group_size, kv.clip, rotate_qk=rotate_qk)
