"""The straightforward statements of the weight-activation evaluation path, kept as the reference the
fast one must match bit for bit (tests/quant/test_fast_eval_exact.py) and time against
(benchmarks/eval_speed.py).

Fast piece (where)                                      plain statement here
per-token quantizer (activations.fake_quantize_tokens)  primitives.fake_quantize
shared prepared input (dequant_linear.prepared_input)   every linear transforms and quantizes its own input
Hadamard butterflies (hadamard._fast_hadamard)          plain_hadamard: stack (a + b, a - b) each pass
DuQuant rotation (DuQuantTransform.orthogonal)          plain_duquant_orthogonal: stack the blocks per call,
                                                        fancy-index the permutation
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from dllmq.quant import activations, dequant_linear, hadamard
from dllmq.quant.methods.duquant import DuQuantTransform
from dllmq.quant.primitives import fake_quantize


def plain_hadamard(x: torch.Tensor, scale: float | None) -> torch.Tensor:
    """x @ H_n * scale on the last dim: the base factor as a matmul, then butterflies written plainly."""
    n = x.shape[-1]
    m, power = hadamard.factorize(n)
    y = x.reshape(*x.shape[:-1], m, power)
    if m > 1:
        y = torch.einsum("...ij,ik->...kj", y, hadamard._base(m).to(dtype=x.dtype, device=x.device))
    lead, h = y.shape[:-1], 1
    while h < power:
        y = y.reshape(*lead, power // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).reshape(*lead, power)
        h *= 2
    return y.reshape(x.shape) * (1.0 / math.sqrt(n) if scale is None else scale)


def plain_duquant_orthogonal(t: DuQuantTransform, x: torch.Tensor) -> torch.Tensor:
    """x @ blockdiag(R1), columns permuted, @ blockdiag(R2); blocks stacked anew each call."""
    def rotate(y: torch.Tensor, tag: str) -> torch.Tensor:
        blocks = t._blocks(tag)
        full = [r for r in blocks if r.shape[0] == t.block]
        if not full:
            return y @ blocks[0].to(y.dtype)
        k, b = len(full), t.block
        ys = y[..., :k * b].reshape(-1, k, b).transpose(0, 1)
        out = torch.bmm(ys, torch.stack(full).to(y.dtype)).transpose(0, 1).reshape(*y.shape[:-1], k * b)
        return out if k == len(blocks) else torch.cat([out, y[..., k * b:] @ blocks[-1].to(y.dtype)], dim=-1)
    return rotate(rotate(x, "r1")[..., t.perm], "r2")


@contextmanager
def plain_paths() -> Iterator[None]:
    """Within: every fast piece above replaced by its plain statement (process-wide; not thread-safe)."""
    saved = (activations.fake_quantize_tokens, dequant_linear._share_key, hadamard._fast_hadamard,
             DuQuantTransform.orthogonal)
    activations.fake_quantize_tokens = fake_quantize
    dequant_linear._share_key = lambda transform, quantizer: None
    hadamard._fast_hadamard = plain_hadamard
    DuQuantTransform.orthogonal = plain_duquant_orthogonal
    try:
        yield
    finally:
        (activations.fake_quantize_tokens, dequant_linear._share_key, hadamard._fast_hadamard,
         DuQuantTransform.orthogonal) = saved
