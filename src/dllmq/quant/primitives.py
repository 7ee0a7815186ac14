"""Uniform integer quantization: the reference every faster path in dllmq is checked against.

The study's formula, verbatim::

    q     = clamp(round(x / s) + z, 0, 2^b - 1)      # codes are always unsigned
    x_hat = (q - z) * s

``round`` is torch's round-half-to-even (as in GPTQ and the study's code).

Parameters (computed in float32 whatever the input dtype) over each reduction set:

* asymmetric: ``xmin = min(x, 0) * clip``, ``xmax = max(x, 0) * clip`` (zero is always in the
  range, as in GPTQ, so 0.0 is exactly representable), ``s = (xmax - xmin) / (2^b - 1)``,
  ``z = round(-xmin / s)``.
* symmetric (GPTQ convention): ``m = max(|xmin|, |xmax|)``, ``s = 2m / (2^b - 1)``,
  ``z = 2^(b-1)``. With ``signed_grid`` (QuaRot's code): ``s = m / (2^(b-1) - 1)``, same ``z``, so
  the codes are the signed integers -2^(b-1) .. 2^(b-1) - 1 and +m is one of them exactly.
* an all-zero set uses ``xmin = -1, xmax = 1`` so ``s > 0`` (no division by zero, no NaN).
* ``study_grid`` (asymmetric; the study's SmoothQuant / DuQuant code, DuQuant's ``UniformAffineQuantizer``):
  ``xmin = min(x) * clip``, ``xmax = max(x) * clip`` (NOT widened to include zero), ``s = (xmax - xmin) /
  (2^b - 1)`` clamped to [1e-5, 1e4], ``z = round(clamp(-xmin / s, -1e4, 1e4))`` (so z may lie outside
  0 .. 2^b - 1 when every value has one sign), and ``round(x / s)`` passes through float16 before z is
  added (its ``.half()``); the codes are still clamped to 0 .. 2^b - 1.

Granularities (the reduction set of one scale/zero pair):

* ``"tensor"``: the whole tensor; scale/zero have shape ``[1] * x.ndim``.
* ``"channel"``: one output row (dim 0) of a weight; shape ``[rows, 1, ...]``.
* ``"token"``: one row of an activation, i.e. over the last dim; shape ``[..., 1]``.
* ``"group"``: ``group_size`` consecutive entries of the last dim, per row; shape
  ``[..., n_groups]`` (``[rows, n_groups]`` for a matrix), ``n_groups = ceil(in / group_size)``.
  A group size that does not divide the last dim is handled: the last group is smaller
  (576 with group 128 gives groups of 128, 128, 128, 128, 64). Group-shaped parameters do not
  broadcast against ``x``; widen them with :func:`expand_groups` before :func:`quantize`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from dllmq.errors import DllmqError

Granularity = Literal["tensor", "channel", "group", "token"]
GRANULARITIES = ("tensor", "channel", "group", "token")
MIN_BITS, MAX_BITS = 2, 8
STUDY_SCALE_MIN, STUDY_SCALE_MAX = 1e-5, 1e4   # CLIPMIN / CLIPMAX of the study's DuQuant code (quantize/const.py)


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor: bit width, symmetry, granularity, group size and clipping."""

    bits: int
    symmetric: bool = False
    granularity: Granularity = "channel"
    group_size: int | None = None
    clip_ratio: float = 1.0
    signed_grid: bool = False   # symmetric only: scale m / (2^(b-1) - 1) instead of 2m / (2^b - 1)
    study_grid: bool = False    # asymmetric only: the study's grid (module docstring)

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.granularity not in GRANULARITIES:
            raise DllmqError(
                f"Unknown quantization granularity {self.granularity!r}; "
                f"use one of {', '.join(GRANULARITIES)}."
            )
        if self.granularity == "group" and self.group_size is None:
            raise DllmqError("Group quantization needs a group size; set group_size (e.g. 128).")
        if self.group_size is not None and (
            not isinstance(self.group_size, int) or self.group_size <= 0
        ):
            raise DllmqError(
                f"Group size {self.group_size!r} is not a positive integer; use e.g. 128."
            )
        if not 0.0 < self.clip_ratio <= 1.0:
            raise DllmqError(
                f"Clip ratio {self.clip_ratio} is outside (0, 1]; "
                "use e.g. 0.9, or 1.0 for no clipping."
            )
        if self.study_grid and self.symmetric:
            raise DllmqError("The study's grid is asymmetric (its SmoothQuant / DuQuant runs quantize asymmetric); "
                             "drop the symmetric setting or the study grid.")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1


def check_bits(bits: int) -> None:
    """Raise DllmqError unless ``bits`` is an integer in 2..8."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise DllmqError(f"Bit width {bits!r} is not supported; use an integer from 2 to 8.")


def num_groups(in_features: int, group_size: int) -> int:
    """Number of groups along a dim of ``in_features``; the last one may be smaller."""
    return math.ceil(in_features / group_size)


def group_index(in_features: int, group_size: int) -> torch.Tensor:
    """The group of each input channel, ``i // group_size``: a LongTensor ``[in_features]``."""
    if group_size <= 0:
        raise DllmqError(f"Group size {group_size} is not positive; use e.g. 128.")
    return torch.arange(in_features) // group_size


def expand_groups(t: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """Widen per-group values ``[..., n_groups]`` to per-channel ``[..., in_features]``."""
    idx = group_index(in_features, group_size).to(t.device)
    if t.shape[-1] != num_groups(in_features, group_size):
        raise DllmqError(
            f"Got {t.shape[-1]} groups for {in_features} channels in groups of {group_size}; "
            f"expected {num_groups(in_features, group_size)}."
        )
    return t.index_select(-1, idx)


def _range(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """min(x, 0) and max(x, 0) over each reduction set, kept broadcastable (group: [..., G]); on the study's
    grid min(x) and max(x)."""
    if spec.granularity == "tensor":
        lo, hi = x.amin(), x.amax()
        shape = [1] * x.ndim
        lo, hi = lo.reshape(shape), hi.reshape(shape)
    elif spec.granularity == "channel":
        if x.ndim < 2:
            raise DllmqError(
                "Per-channel quantization needs a tensor with at least 2 dims (rows first); "
                "use granularity 'tensor' or 'token' for a vector."
            )
        dims = tuple(range(1, x.ndim))
        lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    elif spec.granularity == "token":
        lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    else:
        assert spec.group_size is not None
        n_in = x.shape[-1]
        groups = num_groups(n_in, spec.group_size)
        pad = groups * spec.group_size - n_in
        if pad and spec.study_grid:   # zero padding would widen the study's range: pad with what min/max ignore
            pads = (torch.nn.functional.pad(x, (0, pad), value=v) for v in (math.inf, -math.inf))
            lo_x, hi_x = (p.reshape(*x.shape[:-1], groups, spec.group_size) for p in pads)
            return lo_x.amin(dim=-1), hi_x.amax(dim=-1)
        # Zero padding cannot move dllmq's range: 0 is always inside [xmin, xmax].
        xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
        xg = xp.reshape(*x.shape[:-1], groups, spec.group_size)
        lo, hi = xg.amin(dim=-1), xg.amax(dim=-1)
    if spec.study_grid:
        return lo, hi
    return lo.clamp(max=0.0), hi.clamp(min=0.0)


def compute_qparams(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (float32; zero holds integers) for ``x`` under ``spec``.

    Shapes broadcast against ``x`` for "tensor", "channel" and "token"; for "group" they are
    ``x.shape[:-1] + (n_groups,)`` (``[rows, n_groups]`` for a matrix).
    """
    if x.numel() == 0:
        raise DllmqError("Cannot quantize an empty tensor; check the layer shapes.")
    xf = x.detach().float()
    lo, hi = _range(xf, spec)
    lo, hi = lo * spec.clip_ratio, hi * spec.clip_ratio
    maxq = spec.maxq
    if spec.study_grid:   # the order of per_token_dynamic_calibration: scale clamped, zero clamped, then rounded
        scale = ((hi - lo) / maxq).clamp(STUDY_SCALE_MIN, STUDY_SCALE_MAX)
        return scale, (-lo / scale).clamp(-STUDY_SCALE_MAX, STUDY_SCALE_MAX).round()
    if spec.symmetric:
        m = torch.maximum(-lo, hi)
        m = torch.where(m == 0, torch.ones_like(m), m)
        scale = m / (2 ** (spec.bits - 1) - 1) if spec.signed_grid else 2 * m / maxq
        zero = torch.full_like(scale, float(2 ** (spec.bits - 1)))
    else:
        degenerate = (lo == 0) & (hi == 0)
        lo = torch.where(degenerate, -torch.ones_like(lo), lo)
        hi = torch.where(degenerate, torch.ones_like(hi), hi)
        scale = (hi - lo) / maxq
        zero = torch.round(-lo / scale).clamp(0, maxq)
    # A float32 underflow (ranges near 1e-38) must not turn into a zero scale.
    scale = scale.clamp(min=torch.finfo(torch.float32).tiny)
    return scale, zero


def token_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float = 1.0,
                  signed_grid: bool = False) -> tuple[torch.Tensor, torch.Tensor | float]:
    """compute_qparams for granularity "token" from each row's min ``lo`` and max ``hi`` ([..., 1] float32,
    fresh tensors: they are overwritten), bit for bit on finite inputs, without the QuantSpec (not for the
    study's grid). A dozen small in-place ops, none of which reads a value back to the host, so on a GPU it
    never waits for the device. The symmetric zero point is returned as the float 2^(b-1)."""
    lo, hi = lo.clamp_(max=0.0), hi.clamp_(min=0.0)
    if clip_ratio != 1.0:
        lo, hi = lo.mul_(clip_ratio), hi.mul_(clip_ratio)
    maxq = 2**bits - 1
    if symmetric:
        m = torch.maximum(lo.neg_(), hi)
        m.masked_fill_(m == 0, 1.0)
        scale = m.div_(2 ** (bits - 1) - 1) if signed_grid else m.mul_(2).div_(maxq)
        zero: torch.Tensor | float = float(2 ** (bits - 1))
    else:
        # lo <= 0 <= hi, so the row is degenerate (both 0) exactly when hi - lo is 0; its grid is that of
        # [-1, 1], and 1 - (-1) is exactly the 2 written here.
        scale = hi.sub_(lo)
        degenerate = scale == 0
        scale.masked_fill_(degenerate, 2.0)
        lo.masked_fill_(degenerate, -1.0)
        scale = scale.div_(maxq)
        zero = lo.div_(scale).neg_().round_().clamp_(0, maxq)   # -(lo / s) is -lo / s exactly
    return scale.clamp_(min=torch.finfo(torch.float32).tiny), zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, *,
             study_grid: bool = False) -> torch.Tensor:
    """Integer codes ``clamp(round(x / s) + z, 0, 2^b - 1)`` as uint8.

    ``scale`` and ``zero`` must broadcast against ``x`` (expand group parameters first). ``study_grid``:
    ``round(x / s)`` is held in float16 before ``z`` is added, as the study's ``fake_quant`` does.
    """
    check_bits(bits)
    q = torch.round(x.float() / scale.float())
    if study_grid:   # exact below 2048; larger values (a narrow range far from zero) round as the study's do
        q = q.half().float()
    q = q + zero.float()
    return q.clamp_(0, 2**bits - 1).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(q - z) * s`` in float32; ``scale`` and ``zero`` broadcast against ``codes``."""
    return (codes.float() - zero.float()) * scale.float()


def _per_element(t: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Group parameters widened to the last dim of ``x``; others are already broadcastable."""
    if spec.granularity != "group":
        return t
    assert spec.group_size is not None
    return expand_groups(t, spec.group_size, x.shape[-1])


def fake_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize then dequantize ``x`` under ``spec``; the result has ``x``'s dtype."""
    scale, zero = compute_qparams(x, spec)
    scale, zero = _per_element(scale, x, spec), _per_element(zero, x, spec)
    codes = quantize(x, scale, zero, spec.bits, study_grid=spec.study_grid)
    return dequantize(codes, scale, zero).to(x.dtype)


def quantize_column(
    w_col: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """Fake-quantize one weight column ``[rows]`` with given per-row params (GPTQ's inner step).

    Returns the dequantized column in ``w_col``'s dtype.
    """
    codes = quantize(w_col, scale, zero, bits)
    return dequantize(codes, scale, zero).to(w_col.dtype)
