"""Hadamard matrices of every size these models need, and a fast transform, in pure PyTorch.

Supported orders: n = m * 2^k where m is 1, or q + 1 for a prime q = 3 (mod 4) (Paley I: 4, 12, 20,
24, 32, 44, ...), or 2(q + 1) for a prime q = 1 (mod 4) (Paley II: 12, 28, 36, 60, 148, ...).
That covers LLaDA-8B (4096 = 2^12, FFN 12288 = 12 x 2^10), Dream-7B (hidden 3584 = 28 x 2^7, FFN
18944 = 148 x 2^7 — the size the study's QuaRot code could not build), SmolLM2 (576 = 36 x 2^4,
1536 = 12 x 2^7) and head dims of 64 / 128.

Matrices are built in float64 with entries +-1 (H H^T = n I); transforms use H / sqrt(n), which is
orthogonal. The fast transform applies the small m x m factor as a matmul and the 2^k factor as
a butterfly (k passes of adds), O(n (m + log n)) per vector instead of O(n^2).
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from dllmq.errors import DllmqError


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(math.isqrt(q)) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i), chi the quadratic character mod q (0, +1 or -1)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1 for prime q = 3 mod 4: H = I + S, S skew with a bordered Jacobsthal core."""
    n = q + 1
    S = torch.zeros(n, n, dtype=torch.float64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = _jacobsthal(q)
    return torch.eye(n, dtype=torch.float64) + S


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q + 1) for prime q = 1 mod 4, from the symmetric conference matrix C of order q + 1."""
    n = q + 1
    C = torch.zeros(n, n, dtype=torch.float64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, a) + torch.kron(torch.eye(n, dtype=torch.float64), b)


@functools.lru_cache(maxsize=None)
def _base(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order m from the constructions above, or None (cached: always on the CPU,
    even when called under a `torch.device("meta")` context while a checkpoint is being loaded)."""
    with torch.device("cpu"):
        return _construct(m)


def _construct(m: int) -> torch.Tensor | None:
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return _paley1(m - 1)
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return _paley2(m // 2 - 1)
    return None


def factorize(n: int) -> tuple[int, int]:
    """(m, 2^k) with n = m * 2^k and a constructible base of order m; smallest m first."""
    if n >= 1:
        power = n & -n  # largest power of two dividing n
        while power >= 1:
            m = n // power
            if _base(m) is not None:
                return m, power
            power //= 2
    raise DllmqError(
        f"No Hadamard matrix of order {n} can be built here; supported orders are m x 2^k with m = 1, "
        "q+1 (q prime, q = 3 mod 4) or 2(q+1) (q prime, q = 1 mod 4), e.g. 4096, 12288 = 12 x 2^10, "
        "18944 = 148 x 2^7."
    )


def _sylvester(power: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < power:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=32)
def hadamard_matrix(n: int) -> torch.Tensor:
    """The +-1 Hadamard matrix of order n (float64), H H^T = n I. Kron(base_m, Sylvester_2^k)."""
    m, power = factorize(n)
    with torch.device("cpu"):
        return torch.kron(_base(m), _sylvester(power))


# Rows per butterfly pass are capped so the pass's temporaries stay cache-sized: on a whole [1024, 12288]
# activation each of the 12 passes went to main memory and the transform cost 3x the GEMM it precedes.
_CHUNK_ELEMENTS = 1 << 19


def fast_hadamard(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """x @ H_n * scale along the last dim (default scale 1/sqrt(n): the orthogonal transform)."""
    n = x.shape[-1]
    rows = x.numel() // n if n else 0
    step = max(1, _CHUNK_ELEMENTS // max(n, 1))
    if rows <= step or x.device.type != "cpu":
        return _fast_hadamard(x, scale)
    flat = x.reshape(rows, n)
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    for start in range(0, rows, step):
        out[start:start + step] = _fast_hadamard(flat[start:start + step], scale)
    return out.reshape(x.shape)


def _fast_hadamard(x: torch.Tensor, scale: float | None) -> torch.Tensor:
    n = x.shape[-1]
    m, power = factorize(n)
    y = x.reshape(*x.shape[:-1], m, power)
    if m > 1:  # the base factor mixes the m slices: y[..., i', j] = sum_i x[..., i, j] B[i, i']
        base = _base(m).to(dtype=x.dtype, device=x.device)
        y = torch.einsum("...ij,ik->...kj", y, base)
    lead = y.shape[:-1]
    # Butterflies on the power-of-two factor: pair j with j + h inside blocks of 2h. Each pass writes
    # a + b and a - b straight into the other of two private buffers (no stack, no temporaries).
    private = m > 1  # y is ours to overwrite (not a view of x)
    spare = None
    h = 1
    while h < power:
        if spare is None:
            spare = torch.empty(*lead, power, dtype=y.dtype, device=y.device)
        src = y.reshape(*lead, power // (2 * h), 2, h)
        dst = spare.view(*lead, power // (2 * h), 2, h)
        torch.add(src[..., 0, :], src[..., 1, :], out=dst[..., 0, :])
        torch.sub(src[..., 0, :], src[..., 1, :], out=dst[..., 1, :])
        y, spare = spare, (y if private and y.is_contiguous() else None)
        private = True
        h *= 2
    factor = 1.0 / math.sqrt(n) if scale is None else scale
    if private:
        return y.mul_(factor).reshape(x.shape)
    return y.reshape(x.shape) * factor


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """An orthogonal matrix H_n diag(+-1) / sqrt(n) with seeded random signs (QuaRot's rotation), float64."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
    return signs[:, None] * hadamard_matrix(n) / math.sqrt(n)


class HadamardTransform(nn.Module):
    """Online x -> x H / sqrt(n) on the last dim (e.g. before the down projection in QuaRot).
    Computed in float32 at least, returned in the input dtype."""

    def __init__(self, n: int):
        super().__init__()
        factorize(n)  # refuse unsupported sizes at construction
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        y = fast_hadamard(x.float() if dtype in (torch.float16, torch.bfloat16) else x)
        return y.to(dtype)

    def extra_repr(self) -> str:
        m, power = factorize(self.n)
        return f"n={self.n} ({m} x {power})"


class CrossHeadHadamard(nn.Module):
    """Online Hadamard across attention heads: x [..., heads * head_dim] viewed as [..., heads, head_dim],
    mixed along the heads axis by H_heads / sqrt(heads) (= x @ kron(H_heads, I) / sqrt(heads)). After a
    per-head Hadamard it makes a full-width one (QuaRot's online rotation before the attention output).
    Computed in float32 at least, returned in the input dtype."""

    def __init__(self, heads: int):
        super().__init__()
        factorize(heads)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        y = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        shape = y.shape
        y = y.reshape(*shape[:-1], self.heads, shape[-1] // self.heads).transpose(-1, -2)
        y = fast_hadamard(y).transpose(-1, -2).reshape(shape)
        return y.to(dtype)

    def extra_repr(self) -> str:
        return f"heads={self.heads}"
