"""GPTQ's solver (Frantar et al., 2022), as the reference implementation runs it. Shared math: the
GPTQ method uses it, and QuaRot quantizes its rotated weights with it.

Per linear: H = 2/N sum x x^T over the calibration tokens; dead inputs (H_ii = 0) get H_ii = 1 and a
zero weight column; damping 0.01 x mean(diag H), raised and retried with a warning if the Cholesky
factorisation fails; H^-1 through Cholesky, then its upper Cholesky factor; columns quantized one by
one with the error pushed onto the not-yet-quantized columns, lazily in blocks of 128; group scales
fixed when each group starts (or, with act-order and static groups, up front in natural order).
Inside a block the linears go true-sequentially: q/k/v, then attention out, then gate/up, then down,
each group calibrated on inputs produced by the already-quantized linears before it.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from dllmq.errors import DllmqError
from dllmq.quant.block import BlockContext, QuantizedWeight
from dllmq.quant.primitives import QuantSpec, compute_qparams, quantize_column
from dllmq.quant.rounding import round_scales
from dllmq.quant.specs import MethodSettings, WeightSpec, setting

log = logging.getLogger(__name__)


class HessianAccumulator:
    """Running H = 2/N sum_t x_t x_t^T in float32 (float64 when asked, for tests)."""

    def __init__(self, n_in: int, device, dtype=torch.float32):
        self.H = torch.zeros(n_in, n_in, device=device, dtype=dtype)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.H.dtype)
        t = x.shape[0]
        self.H *= self.n / (self.n + t)
        self.n += t
        x = x * math.sqrt(2 / self.n)
        self.H += x.T @ x


def _column_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row grid of a column slice [out, k]; scales rounded to their stored float16 value."""
    scale, zero = compute_qparams(w, QuantSpec(bits=bits, symmetric=sym, granularity="channel"))
    return round_scales(scale.reshape(-1)), zero.reshape(-1).to(torch.float32)


def inverse_hessian_factor(H: torch.Tensor, damp: float, retries: int = 4) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1; damping x10 per failed attempt."""
    for attempt in range(retries + 1):
        Hd = H.clone()
        Hd.diagonal().add_(damp * Hd.diagonal().mean())
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U
        if attempt < retries:
            log.warning("GPTQ: Hessian not positive definite at damp %.3g; retrying with %.3g", damp, damp * 10)
            damp *= 10
    raise DllmqError("GPTQ could not factorise a layer's Hessian even with heavy damping; "
                     "use more calibration samples or RTN for this model.")


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int = 128, sym: bool = False,
                  damp: float = 0.01, blocksize: int = 128, act_order: bool = False,
                  static_groups: bool = True):
    """Quantize W [out, in] against the Hessian H [in, in].

    Returns (Q dequantized [out, in], scale [out, n_groups], zero [out, n_groups], g_idx [in] or None).
    """
    W = W.detach().clone().to(H.dtype)
    H = H.clone()
    n_out, n_in = W.shape
    g = n_in if group_size == -1 else group_size
    n_groups = -(-n_in // g)
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    static = None
    if act_order and static_groups:  # grids from the original weights, natural group order
        static = [_column_params(W[:, j:j + g], bits, sym) for j in range(0, n_in, g)]
    perm = None
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True)
        W, H = W[:, perm], H[perm][:, perm]

    U = inverse_hessian_factor(H, damp)
    Q = torch.zeros_like(W)
    scales = torch.zeros(n_out, n_groups, dtype=torch.float32, device=W.device)
    zeros = torch.zeros_like(scales)
    g_idx = torch.zeros(n_in, dtype=torch.int32, device=W.device)
    scale = zero = None
    for i1 in range(0, n_in, blocksize):
        i2 = min(i1 + blocksize, n_in)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i                          # position in (possibly permuted) processing order
            orig = col if perm is None else int(perm[col])
            if static is not None:
                group = orig // g
                scale, zero = static[group]
            else:
                group = col // g
                if col % g == 0:  # a group starts: fix its grid from W as the reference does (lazy
                    # updates of the current block not yet applied; identical when g == blocksize)
                    scale, zero = _column_params(W[:, col:col + g], bits, sym)
            scales[:, group], zeros[:, group] = scale, zero
            g_idx[orig] = group
            w = W1[:, i]
            q = quantize_column(w, scale, zero, bits).to(W.dtype)
            Q[:, col] = q
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    natural = torch.arange(n_in, device=W.device) // g
    return Q, scales, zeros, None if torch.equal(g_idx.long(), natural) else g_idx


def relative_output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """||(W - Q) X|| / ||W X|| over the calibration inputs, from H (which is proportional to X X^T)."""
    D = (W - Q).to(H.dtype)
    num = torch.einsum("oi,ij,oj->", D, H, D)
    den = torch.einsum("oi,ij,oj->", W.to(H.dtype), H, W.to(H.dtype))
    return math.sqrt(max(num.item(), 0.0) / max(den.item(), 1e-30))


@dataclass(frozen=True)
class GPTQSettings(MethodSettings):
    damp: float = setting(0.01, "damping, a fraction of mean diag(H)", flag="--damp")
    blocksize: int = setting(128, "columns per lazy error-update block")
    act_order: bool = setting(False, "columns in order of decreasing Hessian diagonal", flag="--act-order")
    static_groups: bool = setting(True, "with act-order: groups follow the permuted order instead of static "
                                        "natural groups", flag="--dynamic-groups", invert=True)

    def check(self) -> None:
        if not 0 < self.damp < 1:
            raise DllmqError(f"GPTQ damping must be in (0, 1), got {self.damp}.")
        if self.blocksize < 1:
            raise DllmqError(f"GPTQ's block size must be at least 1, got {self.blocksize}.")


def gptq_block(ctx: BlockContext, spec: WeightSpec, settings: GPTQSettings) -> dict[str, QuantizedWeight]:
    """GPTQ on every linear of a block, true-sequentially: each group is calibrated on the outputs of
    the already-quantized groups before it."""
    results: dict[str, QuantizedWeight] = {}
    for group in ctx.family.groups:
        # the linears of a group read the same input, so they share one Hessian
        first = group.linears[0]
        hessian = HessianAccumulator(ctx.linear(first).in_features, ctx.device)
        ctx.run({first: hessian.add})
        H = hessian.H
        for name in group.linears:
            linear = ctx.linear(name)
            Q, scale, zero, g_idx = gptq_quantize(linear.weight.float(), H, spec.bits, spec.group_size, spec.sym,
                                                  settings.damp, settings.blocksize, settings.act_order,
                                                  settings.static_groups)
            err = relative_output_error(linear.weight.float(), Q, H)
            results[name] = QuantizedWeight(Q.float(), scale, zero, g_idx, err, "output")
            linear.weight.data = Q.to(linear.weight.dtype)  # later groups calibrate on quantized outputs
    return results
